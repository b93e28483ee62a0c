"""Plain backpropagation: Adam, a StepLR schedule, regularisers, multilevel
layer doubling, and data-parallel training over ``torch.distributed`` (DDP).

The trainer interface (see :mod:`stablenets_ext.training`): :class:`Options`,
:data:`ENGINES`, :func:`fit`."""

from __future__ import annotations

import dataclasses

import torch

from ..config import TrainConfig, prepare
from ..options import OptionError, check_fields, option, per_level, positive_float, positive_int
from .engine import evaluate, make_optimizer, train
from .multilevel import train_multilevel

NAME = "backprop"
ENGINES = {"inprocess": "one process (multilevel when levels > 1)",
           "dist": "DistributedDataParallel, one rank per worker (gloo on CPU, NCCL on GPUs)"}
UNSUPPORTED: frozenset = frozenset()
COMPARISONS: tuple = ()

__all__ = ["COMPARISONS", "ENGINES", "Options", "UNSUPPORTED", "evaluate", "fit",
           "make_optimizer", "train", "train_multilevel"]


@dataclasses.dataclass
class Options:
    levels: int = option("--levels", 1, type=positive_int,
                         help="multilevel: train, double the layers, halve the step, repeat")
    level_lr: object = option("--level-lr", None, type=per_level(positive_float),
                              metavar="LR[,LR...]",
                              help="multilevel: Adam rate per level (default --lr at every level)")
    level_step: object = option("--level-step", None, type=per_level(positive_float),
                                metavar="H[,H...]",
                                help="multilevel: step h per level (default --step, halved at "
                                     "every doubling)")
    workers: int | None = None    # the CLI's --workers: ranks for backend "dist"
    backend: str | None = None    # the CLI's --backend: None (one process) or "dist"
    # backend "dist" launched from this process: seconds a live rank may go
    # without a heartbeat (default 30), and seconds the ranks may take to start.
    heartbeat_timeout: float | None = None
    start_timeout: float | None = None

    def check(self) -> "Options":
        check_fields(self)
        if self.backend not in (None, "inprocess", "dist"):
            raise OptionError(f"backend: the backprop trainer runs in one process or as 'dist' "
                              f"(DistributedDataParallel), not {self.backend!r}")
        if self.workers is not None and self.backend != "dist":
            raise OptionError("workers: only applies to backprop with backend 'dist'")
        if self.backend == "dist" and self.levels > 1:
            raise OptionError("levels: multilevel training runs in one process, not with "
                              "backend 'dist'")
        for name in ("level_lr", "level_step"):
            if self.backend == "dist" and getattr(self, name) is not None:
                raise OptionError(f"{name}: multilevel training runs in one process, not with "
                                  "backend 'dist'")
        for name in ("heartbeat_timeout", "start_timeout"):
            if getattr(self, name) is not None:
                if self.backend != "dist":
                    raise OptionError(f"{name}: only applies to backprop with backend 'dist' "
                                      "(the ranks it launches)")
                from ..runtime import check_timeout

                check_timeout(getattr(self, name), name)
        for name in ("level_lr", "level_step"):
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != self.levels:
                raise OptionError(f"{name}: expected one value per level ({self.levels}), "
                                  f"got {len(v)}")
        return self


def fit(model, data, config: TrainConfig, options: Options | None = None, callbacks=None) -> dict:
    """Train ``model`` (in place where possible) and return the summary plus
    ``model``: the trained model (a new, deeper one after multilevel)."""
    options = prepare(config, options, Options, UNSUPPORTED, NAME)
    if config.threads is None:
        return _fit(model, data, config, options, callbacks)
    old = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _fit(model, data, config, options, callbacks)
    finally:
        torch.set_num_threads(old)


def _fit(model, data, config, options, callbacks):
    on_epoch = (callbacks or {}).get("on_epoch")
    kw = config.common()
    kw["amp"] = config.amp  # mixed precision: this trainer's alone so far (training/amp.py)
    extra = {"run": config.run} if config.run else None
    if options.backend == "dist":
        import torch.distributed as dist

        from ..runtime.torchrun import under_torchrun
        from . import ddp

        if under_torchrun() or dist.is_initialized():  # this process is one rank
            for name in ("heartbeat_timeout", "start_timeout"):
                if getattr(options, name) is not None:
                    raise OptionError(f"{name}: bounds the ranks this process launches; this "
                                      "process is itself a rank (torchrun watches its ranks)")
            result = ddp.train_ddp(model, data, checkpoint=config.checkpoint,
                                   resume=config.resume, checkpoint_extra=extra,
                                   on_epoch=on_epoch, **kw)
        else:  # launch the ranks (their engine: .ddp)
            timeouts = {k: v for k, v in (("heartbeat_timeout", options.heartbeat_timeout),
                                          ("start_timeout", options.start_timeout))
                        if v is not None}
            result = ddp.launch(model, data, workers=options.workers or 2,
                                threads=config.threads, checkpoint=config.checkpoint,
                                resume=config.resume, checkpoint_extra=extra, **timeouts, **kw)
        result["model"] = model
        return result
    # --level-lr / --level-step with one level are honoured by the multilevel path.
    if options.levels > 1 or config.resume is not None or options.level_step is not None \
            or options.level_lr is not None:
        lr = options.level_lr if options.level_lr is not None else kw.pop("lr")
        kw.pop("lr", None)
        model, result = train_multilevel(
            model, data, levels=options.levels, lr=lr, steps=options.level_step,
            resume=config.resume, checkpoint=config.checkpoint, checkpoint_extra=extra,
            on_epoch=on_epoch, **kw)
    else:
        result = train(model, data, checkpoint=config.checkpoint, checkpoint_extra=extra,
                       on_epoch=on_epoch, **kw)
    result["model"] = model
    return result
