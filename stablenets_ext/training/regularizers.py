"""Penalties added to the cross-entropy loss.

- :func:`smoothness`: Haber & Ruthotto's smoothness-in-time regulariser of the
  stack parameters, ``alpha / (2 h) * sum_j (||K_{j+1} - K_j||^2 + ||b_{j+1} - b_j||^2)``,
  which keeps the layers a discretisation of a smooth trajectory (and makes
  layer doubling in :mod:`multilevel` nearly function-preserving).
- :func:`classifier`: ``alpha_c / 2 * ||W||_F^2`` on the classifier weights.
"""

from __future__ import annotations

import torch


def smoothness(stack, alpha: float) -> torch.Tensor | float:
    if alpha == 0 or stack.layers < 2:
        return 0.0
    dk = stack.weight[1:] - stack.weight[:-1]
    db = stack.bias[1:] - stack.bias[:-1]
    return alpha / (2.0 * stack.step) * (dk.pow(2).sum() + db.pow(2).sum())


def classifier(model, alpha_c: float) -> torch.Tensor | float:
    if alpha_c == 0:
        return 0.0
    return 0.5 * alpha_c * model.classifier.weight.pow(2).sum()


def penalty(model, alpha: float = 0.0, alpha_c: float = 0.0):
    """Both penalties for a :class:`~stablenets_ext.models.StableNet`."""
    stacks = getattr(model, "stage_stacks", None) or [model.stack]
    return sum((smoothness(s, alpha) for s in stacks), 0.0) + classifier(model, alpha_c)
