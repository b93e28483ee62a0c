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
    """The settings every trainer understands: what ``stablenets train`` builds
    from its flags, and what a trainer's ``fit`` takes (see :func:`load_trainer`).

    Nothing is checked when it is built; :meth:`check` (which every ``fit``
    calls first) refuses bad values, and a trainer that cannot honour a setting
    refuses it (:meth:`refuse`) instead of ignoring it: PVD refuses
    ``weight_decay``, ``lr_step``, ``lr_gamma``, ``alpha`` and ``alpha_c`` away
    from their defaults.

    Args:
        epochs (int): training epochs, > 0 (default 20). With multilevel
            backprop, epochs per level; with PVD the iteration limit unless its
            options set one.
        batch_size (int): mini-batch size, > 0 (default 64).
        lr (float): Adam's learning rate, > 0 (default 1e-2).
        weight_decay (float): Adam's weight decay, >= 0 (default 0).
        lr_step (int or None): multiply the rate by ``lr_gamma`` every
            ``lr_step`` epochs (StepLR), > 0; None (default) keeps it constant.
        lr_gamma (float): the decay factor of ``lr_step``, > 0 (default 0.5).
        alpha (float): weight of the smoothness-in-time penalty on the stack
            parameters, ``alpha / (2 h) * sum_j ||K_{j+1} - K_j||^2 + ||b_{j+1} -
            b_j||^2``, >= 0 (default 0: off).
        alpha_c (float): weight of ``alpha_c / 2 * ||W||_F^2`` on the classifier
            weights, >= 0 (default 0: off).
        target_accuracy (float or None): stop once the validation accuracy (a
            fraction in (0, 1]) reaches it; None (default) runs every epoch.
        seed (int): seed of the trainer's own random draws (batch order; PVD's
            batches), 0 to 2**32 - 1 (default 0). The model's initial
            parameters are whatever the model holds.
        device (torch.device, str or None): where to train; None (default): the
            model's device.
        threads (int or None): torch threads, > 0 (per stage or worker for the
            parallel trainers); None (default): torch's setting in one process,
            the cores shared out among the workers of the parallel trainers.
        checkpoint (str or None): a file written atomically after every epoch
            (or PVD iteration), to resume from; None (default): none.
        resume (str or None): a checkpoint of the same trainer to continue from
            (a resumed run sees the same batches as an uninterrupted one); None
            (default) starts afresh.
        quiet (bool): no progress bar (there is one only when stderr is a
            terminal; default False).
        run (dict or None): free-form settings that identify the run, written
            into every checkpoint (the command line records its options there
            to check a resume against them); default None.
        amp (str or None): mixed precision: ``"bf16"`` (bfloat16 autocast),
            ``"fp16"`` (float16 with a gradient scaler; SG and PVD: a loss scale per
            stage or worker, :class:`~stablenets_ext.training.amp.LossScale`) or None
            (default: float32). A device that cannot run it is refused.

    Example:
        >>> from stablenets_ext.training import TrainConfig
        >>> config = TrainConfig(epochs=2, lr=0.05, lr_step=1).check()
        >>> config.epochs, config.lr_gamma
        (2, 0.5)
        >>> TrainConfig(batch_size=0).check()
        Traceback (most recent call last):
            ...
        stablenets_ext.training.options.OptionError: batch_size: expected a positive int, got 0
    """

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
        """Return this config after checking every value (ranges as in the
        class's Args); the first bad one raises ``OptionError`` (a ValueError)
        naming it."""
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
        """Raise ``OptionError`` (a ValueError) naming every setting in
        ``unsupported`` (field names) that differs from its default, saying that
        the ``trainer`` (its name, for the message) cannot honour it."""
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
