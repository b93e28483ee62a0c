"""Multilevel training: train N layers, double to 2N layers with half the step
(:func:`stablenets_ext.models.double_layers`), continue; any number of levels.

Each level runs :func:`stablenets_ext.training.backprop.train` with a fresh
optimiser and schedule. A checkpoint records the level it belongs to, so a
resumed run rebuilds the model of that level and carries on from there."""

from __future__ import annotations

import torch

from ...models import StableNet, double_layers
from .. import loop
from ..outputs import check_trainer_outputs, write_json
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
    """Multilevel training: train ``model``, double its layers at half the step
    (:func:`~stablenets_ext.double_layers`), train again, ``levels`` times in
    all.

    Each level runs :func:`train` with a fresh optimiser and schedule; it stops
    early, at any level, once ``target_accuracy`` (a keyword for :func:`train`)
    is reached. ``model`` is trained in place at the first level (unless
    resuming); the deeper models are new ones.

    Args:
        model (StableNet): the coarsest model (every stage's layers are
            doubled at each level).
        data (Dataset): training and validation tensors
            (:class:`~stablenets_ext.data.Dataset`).
        levels (int): the number of levels, > 0 (1: plain :func:`train`).
        epochs (int or sequence): epochs per level: one value for every level,
            or one per level.
        resume (str or None): a checkpoint of a multilevel run to continue
            from: it records its level, and the model of that level is rebuilt
            from it (``model`` then only gives the device). None (default):
            start afresh.
        checkpoint (str or None): a file written atomically after every epoch,
            recording the level (an existing file there must be a stablenets
            checkpoint, as in :func:`train`). None (default): none.
        history_path (str or None): write the returned summary there as JSON
            at the end (an existing file there must be a stablenets history);
            None (default): none.
        device (torch.device, str or None): where to train; None (default): the
            model's device.
        quiet (bool): no progress bar (default False).
        lr (float or sequence): Adam's learning rate: one value for every level,
            or one per level. Required.
        steps (float, sequence or None): the step h of each level: one value
            for every level, or one per level; None (default): the model's,
            halved at every doubling (``layers * step`` stays fixed).
        checkpoint_extra (dict or None): more entries written into every
            checkpoint.
        train_kwargs: the other keyword arguments of :func:`train`
            (``batch_size`` is required; ``weight_decay``, ``lr_step``,
            ``lr_gamma``, ``alpha``, ``alpha_c``, ``target_accuracy``, ``seed``,
            ``on_epoch``, ``amp``...), the same at every level.

    Returns:
        tuple: ``(model, result)``: the final (deepest) model, and the summary
        of the whole run as :func:`train` returns it, whose ``history`` spans
        every level (its ``layers`` list tells them apart), plus ``levels``: one
        dict per level run (``level``, ``layers``, ``step``, ``lr``,
        ``epochs``, ``accuracy``, ``loss``).

    Raises:
        ValueError: ``levels`` not a positive int, ``lr`` missing, a
            per-level ``epochs``, ``lr`` or ``steps`` of the wrong length, a
            ``checkpoint`` or ``history_path`` over a file this package did not
            write, or any error of :func:`train`.

    Example:
        >>> import torch
        >>> import stablenets_ext as sn
        >>> from stablenets_ext.data import Dataset
        >>> x = torch.randn(64, 2)
        >>> y = (x[:, 0] > 0).long()
        >>> data = Dataset("toy", x[:48], y[:48], x[48:], y[48:], features=2, classes=2)
        >>> from stablenets_ext.training import train_multilevel
        >>> net = sn.StableNet("verlet", 2, classes=2, layers=2, width=4, step=0.2)
        >>> deep, result = train_multilevel(net, data, levels=2, epochs=1, lr=0.05,
        ...                                 batch_size=16)
        >>> deep.layers, deep.step, [level["layers"] for level in result["levels"]]
        (4, 0.1, [2, 4])
    """
    if not isinstance(levels, int) or isinstance(levels, bool) or levels < 1:
        raise ValueError(f"levels: expected a positive int, got {levels!r}")
    check_trainer_outputs(checkpoint, history_path)
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
