"""Trainers and what they share.

Every trainer is a subpackage (:mod:`.backprop`, :mod:`.sg`, :mod:`.pvd`)
exposing ``Options`` (a dataclass whose fields carry their command-line
flags), ``ENGINES`` (how it can run: in process, process pool or pipeline,
torch.distributed), ``UNSUPPORTED`` (the :class:`TrainConfig` settings it
refuses), ``COMPARISONS`` and ``fit(model, data, config, options, callbacks)``.
:data:`TRAINERS` is the registry the CLI reads: a new trainer is one
subpackage and one entry here."""

from __future__ import annotations

import importlib

from .backprop import evaluate, train, train_multilevel
from .config import TrainConfig
from .presets import PRESETS, preset

TRAINERS = {
    "backprop": "stablenets_ext.training.backprop",
    "sg": "stablenets_ext.training.sg",
    "pvd": "stablenets_ext.training.pvd",
}


def load_trainer(name: str):
    """The trainer registered as ``name``: the way to run any trainer from a
    :class:`TrainConfig`, as ``stablenets train --trainer`` does.

    Every trainer module has ``fit(model, data, config, options=None,
    callbacks=None)``: it checks ``config`` and ``options`` (the module's
    ``Options`` dataclass, whose fields are the trainer's own command-line
    flags; None: the defaults), refuses the settings it cannot honour, trains
    ``model`` on ``data`` (a :class:`~stablenets_ext.data.Dataset`) and returns
    the summary dict of :func:`train` plus ``model`` (the trained model; a new,
    deeper one after multilevel backprop). ``callbacks`` maps ``"on_epoch"``
    (backprop, SG: called with each epoch's record), ``"on_iteration"`` (PVD:
    after each synchronisation) or ``"on_workers_started"`` (SG: with the worker
    pids) to a function. The module also lists ``ENGINES`` (how it can run),
    ``UNSUPPORTED`` (the :class:`TrainConfig` fields it refuses) and
    ``COMPARISONS``.

    Args:
        name (str): ``"backprop"`` (:func:`train`, :func:`train_multilevel`,
            DistributedDataParallel), ``"sg"`` (synthetic gradients,
            :func:`~stablenets_ext.training.sg.train_sg`) or ``"pvd"``
            (:func:`~stablenets_ext.training.pvd.train_pvd`).

    Returns:
        module: the trainer's subpackage (``stablenets_ext.training.<name>``).

    Raises:
        ValueError: an unknown ``name``.

    Example:
        >>> import torch
        >>> import stablenets_ext as sn
        >>> from stablenets_ext.data import Dataset
        >>> from stablenets_ext.training import TrainConfig, load_trainer
        >>> x = torch.randn(64, 2)
        >>> y = (x[:, 0] > 0).long()
        >>> data = Dataset("toy", x[:48], y[:48], x[48:], y[48:], features=2, classes=2)
        >>> trainer = load_trainer("backprop")
        >>> net = sn.StableNet("verlet", 2, classes=2, layers=4, width=4)
        >>> result = trainer.fit(net, data, TrainConfig(epochs=2, batch_size=16, lr=0.05))
        >>> result["epochs"], result["model"] is net
        (2, True)
        >>> sorted(load_trainer("pvd").UNSUPPORTED)
        ['alpha', 'alpha_c', 'lr_gamma', 'lr_step', 'weight_decay']
    """
    if name not in TRAINERS:
        raise ValueError(f"trainer: expected one of {list(TRAINERS)}, got {name!r}")
    return importlib.import_module(TRAINERS[name])


__all__ = ["PRESETS", "TRAINERS", "TrainConfig", "evaluate", "load_trainer", "preset", "train",
           "train_multilevel"]
