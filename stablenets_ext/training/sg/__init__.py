"""Synthetic-gradient (DNI) training: the network cut into stages joined by
synthetic-gradient modules, each stage updating as soon as it has produced its
output (Jaderberg et al. 2016). See :mod:`.trainer`.

The trainer interface (see :mod:`stablenets_ext.training`): :class:`Options`,
:data:`ENGINES`, :func:`fit`, :func:`compare`."""

from __future__ import annotations

import copy
import dataclasses

import torch

from ..config import TrainConfig, prepare
from ..options import (
    OptionError,
    ParallelOptions,
    nonneg_int,
    option,
    per_level,
    positive_float,
    positive_int,
)
from ..runtime import StageError
from .trainer import InProcessEngine, time_backprop, train_sg

NAME = "sg"
ENGINES = {"inprocess": "every stage in this process (the reference)",
           "process": "one process per stage, shared-memory buffers",
           "dist": "one torch.distributed rank per stage (torchrun)"}
UNSUPPORTED: frozenset = frozenset()  # --amp: bf16 and fp16 (a loss scale per stage)
COMPARISONS = ("backprop",)

__all__ = ["COMPARISONS", "ENGINES", "InProcessEngine", "Options", "StageError", "UNSUPPORTED",
           "compare", "fit", "time_backprop", "train_sg"]


@dataclasses.dataclass
class Options(ParallelOptions):
    BACKENDS = ("process", "dist")

    stages: int | None = option("--stages", None, type=positive_int, metavar="M",
                                help="sub-networks joined by M-1 synthetic-gradient modules "
                                     "(default: --workers, else 2)")
    sg_cuts: object = option("--sg-cuts", None, type=per_level(positive_int), metavar="L[,L...]",
                             help="cut the stack after these layers (M-1 increasing numbers; "
                                  "default: near-equal stages). Stage 0 also carries the input "
                                  "lift and the SG module's fit, so an earlier cut balances it")
    sg_hidden: int = option("--sg-hidden", 0, type=nonneg_int, metavar="H",
                            help="SG module: 0 for a linear map (default), else an MLP with H "
                                 "hidden units")
    sg_fit: str = option("--sg-fit", "auto", choices=("auto", "solve", "adam"),
                         help="how SG modules learn: solve (least squares over recent batches; "
                              "linear modules on flat states), adam (--sg-lr), auto (solve where "
                              "possible; default)")
    sg_lr: float = option("--sg-lr", 1e-3, type=positive_float,
                          help="SG modules' Adam rate with --sg-fit adam (default 1e-3)")
    sg_unconditional: bool = option("--sg-unconditional", False, action="store_true",
                                    help="do not feed the label to the SG modules (DNI, not cDNI)")
    sg_inflight: int | None = option("--sg-inflight", None, type=positive_int, metavar="K",
                                     help="batches a stage may run ahead of the true gradient "
                                          "its SG module learns from (default 1 in-process, 3 "
                                          "with --workers)")
    coarse_epochs: int = option("--coarse-epochs", 0, type=nonneg_int, metavar="E",
                                help="multilevel: first train a network of half the layers for "
                                     "E epochs with true gradients, then double it")
    sg_threads: int | None = option("--sg-threads", None, type=positive_int,
                                    help="torch threads per stage process (default: --threads, "
                                         "else cores / workers)")
    sg_timeout: float = option("--sg-timeout", 300.0, type=positive_float,
                               help="seconds without any progress before a pipeline is "
                                    "declared stuck (default 300)")
    sg_baseline_epochs: int = option("--sg-baseline-epochs", 3, type=positive_int, metavar="E",
                                     help="with --compare backprop: epochs of single-process "
                                          "backprop timed for the speed-up (median; default 3)")


def fit(model, data, config: TrainConfig, options: Options | None = None, callbacks=None) -> dict:
    options = prepare(config, options, Options, UNSUPPORTED, NAME)
    callbacks = callbacks or {}
    bounds = None
    if options.sg_cuts is not None:
        cuts = options.sg_cuts if isinstance(options.sg_cuts, tuple) else (options.sg_cuts,)
        bounds = [0, *cuts, model.layers]
        if any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise OptionError(f"sg_cuts: expected increasing layer numbers between 1 and "
                              f"{model.layers - 1} (the stack has {model.layers} layers), got "
                              f"{list(cuts)}")
    workers = options.workers
    if workers is None and options.backend is not None:
        workers = options.stages or (len(bounds) - 1 if bounds else 2)
    threads = options.sg_threads or config.threads
    kw = config.common()
    result = train_sg(
        model, data, stages=options.stages, workers=workers, bounds=bounds,
        backend=options.backend or "process", inflight=options.sg_inflight,
        sg_hidden=options.sg_hidden, sg_lr=options.sg_lr, sg_fit=options.sg_fit,
        conditional=not options.sg_unconditional, coarse_epochs=options.coarse_epochs,
        threads=threads, checkpoint=config.checkpoint, resume=config.resume,
        timeout=options.sg_timeout, heartbeat_timeout=options.heartbeat_timeout,
        start_timeout=options.start_timeout, amp=config.amp,
        on_epoch=callbacks.get("on_epoch"), on_workers_started=callbacks.get("on_workers_started"),
        checkpoint_extra={"run": config.run} if config.run else None, **kw)
    if "rank" in result:  # a torchrun rank other than 0: rank 0 reports
        return {"rank": result["rank"], "history": {}, "model": model}
    coarse = result.pop("coarse", None)
    result.pop("sg_modules", None)
    if coarse is not None:
        result["coarse_accuracy"] = coarse["accuracy"]
        result["coarse_epochs"] = sum(1 for p in result["history"]["phase"] if p == "coarse")
    result.setdefault("model", model)
    return result


def compare(start_model, data, config: TrainConfig, options: Options, result: dict,
            which=("backprop",)) -> dict:
    """``backprop``: time single-process backprop from the same initial model on
    the same number of cores, like the trainer (median epoch), and add
    ``speedup_vs_backprop``."""
    if "backprop" in which:
        model = copy.deepcopy(start_model)
        result.update(time_backprop(model, data, epochs=options.sg_baseline_epochs,
                                    batch_size=config.batch_size, lr=config.lr,
                                    device=config.device, seed=config.seed,
                                    threads=result.get("cores") or torch.get_num_threads(),
                                    amp=config.amp))
        if result.get("backprop_seconds_per_epoch") and result.get("seconds_per_epoch"):
            result["speedup_vs_backprop"] = (result["backprop_seconds_per_epoch"]
                                             / result["seconds_per_epoch"])
    return result
