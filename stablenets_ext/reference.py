"""The four stable stacks in plain PyTorch.

Each function mirrors one op of :mod:`stablenets_ext.ops`: same arguments, same
results, differentiated by autograd. Tests check the fused kernels against
these, benchmarks time them as the baseline, and the modules fall back to them
on a device for which no kernel was compiled.

Rows are examples: ``y`` is ``(B, d)``, ``weight`` is ``(N, d, d)`` in the
``nn.Linear`` layout and ``bias`` is ``(N, d)``. See ARCHITECTURE.md for the
update rules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The one list of activation names: the fused kernels (csrc/include/stablenets/
# activation.h), the fake kernels, the modules and the CLI all accept exactly these.
ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "identity": lambda x: x,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,  # beta 1 (PyTorch's threshold 20; the kernels use the exact form)
    "leaky_relu": F.leaky_relu,  # negative slope 0.01, as the kernels
    "silu": F.silu,
}


def activation_fn(activation):
    """The activation function for a name in :data:`ACTIVATIONS`, or ``activation``
    itself when it is a callable (``nn.ReLU()``, ``torch.sin``: reference path only)."""
    if isinstance(activation, str):
        if activation in ACTIVATIONS:
            return ACTIVATIONS[activation]
    elif callable(activation):
        return activation
    raise ValueError(
        f"activation: expected one of {sorted(ACTIVATIONS)} or a callable, got {activation!r}"
    )


def antisymmetric_weight(weight: torch.Tensor, gamma: float) -> torch.Tensor:
    """``A_j = 0.5 * (K_j - K_j^T - gamma * I)`` for every layer at once."""
    eye = torch.eye(weight.shape[-1], dtype=weight.dtype, device=weight.device)
    return 0.5 * (weight - weight.transpose(-1, -2) - gamma * eye)


def resnet(y, weight, bias, step=0.1, activation="tanh"):
    act = activation_fn(activation)
    for j in range(weight.shape[0]):
        y = y + step * act(F.linear(y, weight[j], bias[j]))
    return y


def antisymmetric(y, weight, bias, step=0.1, activation="tanh", gamma=0.01):
    return resnet(y, antisymmetric_weight(weight, gamma), bias, step, activation)


def leapfrog(y, weight, bias, step=0.1, activation="tanh", y_prev=None, return_state=False):
    """``Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 act(Y_j K_j^T + b_j) K_j``; ``Y_{-1} = y_prev``
    (default ``y``: zero initial velocity). Returns ``Y_N`` or ``(Y_N, Y_{N-1})``."""
    act = activation_fn(activation)
    prev = y if y_prev is None else y_prev
    h2 = step * step
    for j in range(weight.shape[0]):
        nxt = 2 * y - prev - h2 * (act(F.linear(y, weight[j], bias[j])) @ weight[j])
        prev, y = y, nxt
    return (y, prev) if return_state else y


def verlet(y, weight, bias, step=0.1, activation="tanh", z=None, return_state=False):
    """``Z <- Z - h act(Y K_j + b_j)``, then ``Y <- Y + h act(Z K_j^T + b_j)``;
    ``Z_{-1/2} = z`` (default 0). Returns ``Y_N`` or ``(Y_N, Z_{N-1/2})``."""
    act = activation_fn(activation)
    if z is None:
        z = torch.zeros_like(y)
    for j in range(weight.shape[0]):
        z = z - step * act(y @ weight[j] + bias[j])
        y = y + step * act(F.linear(z, weight[j], bias[j]))
    return (y, z) if return_state else y


FUNCTIONS = {
    "resnet": resnet,
    "antisymmetric": antisymmetric,
    "leapfrog": leapfrog,
    "verlet": verlet,
}
