"""One training configuration for every trainer.

:class:`TrainConfig` holds what every trainer understands (epochs, batch,
learning rate and schedule, regularisers, target accuracy, seed, device,
threads, checkpoint and resume paths, quiet). A trainer that cannot honour a
setting lists it in its ``UNSUPPORTED`` set and :meth:`TrainConfig.refuse`
raises instead of ignoring it. ``run`` is free-form: the settings that
identify a run (the CLI records its resolved options there), written into
every checkpoint so that a resume can be checked against them."""

from __future__ import annotations

import dataclasses
import math
import os

from . import amp
from .options import OptionError


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-2
    weight_decay: float = 0.0
    lr_step: int | None = None
    lr_gamma: float = 0.5
    alpha: float = 0.0
    alpha_c: float = 0.0
    target_accuracy: float | None = None
    seed: int = 0
    device: object = None
    threads: int | None = None
    checkpoint: str | None = None
    resume: str | None = None
    quiet: bool = False
    run: dict | None = None
    amp: str | None = None  # mixed precision: None, "bf16" or "fp16" (training/amp.py)

    def check(self) -> "TrainConfig":
        def positive(name, kind=int):
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if kind is int:
                ok = ok and isinstance(v, int)
            if not ok or not math.isfinite(v) or v <= 0:
                raise OptionError(f"{name}: expected a positive {kind.__name__}, got {v!r}")

        def nonneg(name):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise OptionError(f"{name}: expected a finite number >= 0, got {v!r}")

        for name in ("epochs", "batch_size"):
            positive(name)
        positive("lr", float)
        positive("lr_gamma", float)
        for name in ("weight_decay", "alpha", "alpha_c"):
            nonneg(name)
        if self.lr_step is not None:
            positive("lr_step")
        if self.threads is not None:
            positive("threads")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise OptionError(f"target_accuracy: expected a fraction in (0, 1], got "
                              f"{self.target_accuracy!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise OptionError(f"seed: expected an integer from 0 to {2**32 - 1}, got {self.seed!r}")
        amp.check_mode(self.amp)
        for name in ("checkpoint", "resume"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise OptionError(f"{name}: expected a path, got {v!r}")
        return self

    def refuse(self, unsupported, trainer: str) -> None:
        """Raise for every setting in ``unsupported`` that differs from its default."""
        defaults = TrainConfig()
        bad = [n for n in sorted(unsupported) if getattr(self, n) != getattr(defaults, n)]
        if bad:
            raise OptionError(
                f"{', '.join(bad)}: the {trainer} trainer cannot honour "
                f"{'this setting' if len(bad) == 1 else 'these settings'} (leave "
                f"{'it' if len(bad) == 1 else 'them'} at the default)")

    def common(self) -> dict:
        """The keyword arguments the existing ``train*`` functions take."""
        return {k: getattr(self, k) for k in (
            "epochs", "batch_size", "lr", "weight_decay", "lr_step", "lr_gamma", "alpha",
            "alpha_c", "target_accuracy", "device", "seed", "quiet")}


def prepare(config: TrainConfig, options, options_cls, unsupported, trainer: str):
    """The checks every ``fit`` starts with; returns the (default) options."""
    options = (options if options is not None else options_cls()).check()
    config.check()
    config.refuse(unsupported, trainer)
    return options
