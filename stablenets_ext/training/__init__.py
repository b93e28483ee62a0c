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
    """The trainer subpackage registered as ``name``."""
    if name not in TRAINERS:
        raise ValueError(f"trainer: expected one of {list(TRAINERS)}, got {name!r}")
    return importlib.import_module(TRAINERS[name])


__all__ = ["PRESETS", "TRAINERS", "TrainConfig", "evaluate", "load_trainer", "preset", "train",
           "train_multilevel"]
