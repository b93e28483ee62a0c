"""Multilevel training: train N layers, double to 2N layers with half the step
(:func:`stablenets_ext.models.double_layers`), continue; any number of levels.

Each level runs :func:`stablenets_ext.training.backprop.train` with a fresh
optimiser and schedule. A checkpoint records the level it belongs to, so a
resumed run rebuilds the model of that level and carries on from there."""

from __future__ import annotations

import torch

from ...models import StableNet, double_layers
from .. import loop
from ..outputs import write_json
from . import engine as backprop
from .. import checkpoint as ckpt


def _per_level(value, levels, name):
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"{name}: expected one value per level ({levels}), got {len(value)}")
        return list(value)
    return [value] * levels


def train_multilevel(model, data, *, levels, epochs, resume=None, checkpoint=None,
                     history_path=None, device=None, quiet=False, lr=None, steps=None,
                     checkpoint_extra=None, **train_kwargs):
    """Train ``model`` over ``levels`` levels; ``epochs`` and ``lr`` are per level
    (a value, or one per level); ``steps``: the step h of each level (default:
    the model's, halved at every doubling, which keeps ``N h`` fixed). Other
    keyword arguments go to :func:`backprop.train`.

    Returns ``(model, result)``: the final (deepest) model and the summary of
    the whole run, whose ``history`` spans all levels (``layers`` tells them
    apart) and whose ``levels`` lists a summary per level."""
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise ValueError(f"levels: expected a positive int, got {levels!r}")
    epochs = _per_level(epochs, levels, "epochs")
    if lr is None:
        raise ValueError("lr: required")
    lrs = _per_level(lr, levels, "lr")
    steps = None if steps is None else _per_level(steps, levels, "steps")
    device = torch.device(device) if device is not None else loop.model_device(model)
    start, per_level = 0, []
    if resume is not None:
        state = ckpt.load(resume)
        start = int(state.get("level", 0))
        per_level = list(state.get("level_summaries", []))
        if state.get("model_config") is not None:
            model = StableNet.from_config(state["model_config"])
        for _ in range(start - len(per_level)):
            per_level.append({})
    model.to(device)
    history = loop.new_history()
    result = None
    for level in range(start, levels):
        if steps is not None:
            model.set_step(float(steps[level]))
        extra = {"level": level, "levels": levels, "level_summaries": per_level,
                 **(checkpoint_extra or {})}
        result = backprop.train(
            model, data, epochs=epochs[level], history=history, device=device, quiet=quiet,
            resume=resume if level == start else None, checkpoint=checkpoint,
            checkpoint_extra=extra, desc=f"level {level + 1}/{levels} L={model.layers}",
            lr=lrs[level], **train_kwargs,
        )
        per_level.append({
            "level": level + 1, "layers": model.layers, "step": model.step, "lr": lrs[level],
            "epochs": sum(1 for n in history["layers"] if n == model.layers),
            "accuracy": result["accuracy"], "loss": result["loss"],
        })
        if result["stopped_early"] or level == levels - 1:
            break
        model = double_layers(model)
    result = loop.summary(history, result["stopped_early"])
    result["levels"] = per_level
    if history_path is not None:
        write_json(history_path, result)
    return model, result
