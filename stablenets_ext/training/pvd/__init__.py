"""Parallel Variable Distribution (Ferris & Mangasarian 1994): the layers split
into blocks, one per worker, with forget-me-not multipliers and a
synchronisation step. See :mod:`.trainer`.

The trainer interface (see :mod:`stablenets_ext.training`): :class:`Options`,
:data:`ENGINES`, :func:`fit`, :func:`compare`."""

from __future__ import annotations

import dataclasses
import os

from .. import runtime
from ..config import TrainConfig, prepare
from ..options import ParallelOptions, nonneg_int, option, positive_float, positive_int
from ..runtime import WorkerError
from .solver import PVDConfig
from .trainer import compare as compare_runs
from .trainer import train_pvd

NAME = "pvd"
ENGINES = {"process": "one worker process per block over shared memory",
           "sequential": "the blocks one after another in this process (the timing baseline)",
           "dist": "one torch.distributed rank per block"}
# PVD runs Adam on each block with a fixed rate; it has no schedule or regulariser.
UNSUPPORTED = frozenset({"weight_decay", "lr_step", "lr_gamma", "alpha", "alpha_c"})
COMPARISONS = ("sequential", "backprop")

__all__ = ["COMPARISONS", "ENGINES", "Options", "PVDConfig", "UNSUPPORTED", "WorkerError",
           "compare", "fit", "train_pvd"]


@dataclasses.dataclass
class Options(ParallelOptions):
    BACKENDS = ("process", "sequential", "dist")

    pvd_sync: str = option("--pvd-sync", "hull", choices=("best", "hull"),
                           help="synchronisation: best of the P points, or best point of their "
                                "affine hull (default: hull)")
    pvd_iterations: int | None = option("--pvd-iterations", None, type=positive_int,
                                        help="PVD iteration limit (default: --epochs)")
    pvd_inner_epochs: float = option("--pvd-inner-epochs", 3.0, type=positive_float,
                                     help="epochs each worker trains its block per iteration "
                                          "(default: 3)")
    pvd_inner_batches: int | None = option("--pvd-inner-batches", None, type=positive_int,
                                           help="mini-batches per worker per iteration "
                                                "(overrides --pvd-inner-epochs)")
    pvd_direction_batches: int = option("--pvd-direction-batches", 8, type=positive_int,
                                        help="mini-batches the direction -grad f(x) is "
                                             "computed on (default: 8)")
    pvd_mu_lr: float | None = option("--pvd-mu-lr", None, type=positive_float,
                                     help="Adam rate of the forget-me-not multipliers "
                                          "(default: --lr)")
    pvd_sync_batch: int = option("--pvd-sync-batch", 1024, type=positive_int,
                                 help="validation examples the synchronisation is judged on "
                                      "(default: 1024)")
    pvd_hull_steps: int = option("--pvd-hull-steps", 10, type=nonneg_int,
                                 help="L-BFGS iterations of the affine-hull step (default: 10)")
    pvd_threads: int | None = option("--pvd-threads", None, type=positive_int,
                                     help="torch threads per worker (default: --threads, else "
                                          "cores // workers)")
    pvd_start_method: str = option("--pvd-start-method", "spawn", choices=runtime.START_METHODS,
                                   help="how worker processes start (default: spawn)")


    def kwargs(self, config: TrainConfig) -> dict:
        """:func:`train_pvd`'s keyword arguments."""
        backend = self.backend or "process"
        workers = self.workers
        if workers is None:  # under torchrun: one block per rank
            workers = int(os.environ.get("WORLD_SIZE", 2)) if backend == "dist" else 2
        return dict(
            workers=workers, backend=backend, sync=self.pvd_sync,
            iterations=self.pvd_iterations or config.epochs, inner_epochs=self.pvd_inner_epochs,
            inner_batches=self.pvd_inner_batches, direction_batches=self.pvd_direction_batches,
            batch_size=config.batch_size, lr=config.lr, mu_lr=self.pvd_mu_lr,
            sync_batch=self.pvd_sync_batch, hull_steps=self.pvd_hull_steps,
            target_accuracy=config.target_accuracy, seed=config.seed,
            threads=self.pvd_threads or config.threads, device=config.device,
            start_method=self.pvd_start_method, heartbeat_timeout=self.heartbeat_timeout,
            start_timeout=self.start_timeout, amp=config.amp)


def fit(model, data, config: TrainConfig, options: Options | None = None, callbacks=None) -> dict:
    options = prepare(config, options, Options, UNSUPPORTED, NAME)
    kw = options.kwargs(config)
    result = train_pvd(model, data, callback=(callbacks or {}).get("on_iteration"),
                       checkpoint=config.checkpoint, resume=config.resume,
                       checkpoint_extra={"run": config.run} if config.run else None, **kw)
    result["model"] = model
    return result


def compare(start_model, data, config: TrainConfig, options: Options, result: dict,
            which=COMPARISONS) -> dict:
    """``sequential``: the same run with the subproblems one after another (the
    measured parallel speed-up); ``backprop``: plain Adam from the same start
    for as many epochs (time to the target)."""
    kw = options.kwargs(config)
    model = result.pop("model", None)
    out = compare_runs(start_model, data, pvd=result, sequential="sequential" in which,
                       backprop_epochs=kw["iterations"] if "backprop" in which else None, **kw)
    out["model"] = model
    return out
