"""Parallel Variable Distribution (Ferris & Mangasarian 1994; Solodov 1997).

The layers are split into P blocks of contiguous layers (the input lift goes
with the first block, the classifier with the last), one per worker. Each
iteration:

1. **direction**: ``d = -grad f(x)`` on ``direction_batches`` mini-batches,
   the batches shared out among the workers and the gradients summed; each
   block of ``d`` is scaled to unit RMS (``normalize_direction``) so that a
   multiplier moves its block about as far as an Adam step moves a weight;
2. **parallel phase**: worker ``l`` optimises its block ``x_l`` together with
   P-1 scalars ``mu_m`` that move every other block along ``d_m`` only (the
   forget-me-not terms), with Adam, for ``inner_epochs`` epochs (or
   ``inner_batches`` mini-batches); see :mod:`.solver`;
3. **synchronisation**: the best of the P points (``sync="best"``) or the best
   point of the affine hull of ``x`` and the P points (``sync="hull"``), both
   judged on a batch of the validation set; see :mod:`.sync`. The new
   point is written into the shared ``x`` that every worker maps.

It stops at ``target_accuracy`` (validation) or after ``iterations``.

Backends: ``process`` (P ``torch.multiprocessing`` workers over shared
memory, :mod:`.process`), ``sequential`` (the same P subproblems run one
after another in this process: the baseline the parallel phase is timed
against, and bit-for-bit the same iterates when each worker has one thread)
and ``dist`` (one rank per block over ``torch.distributed``, gloo or NCCL,
:mod:`.dist`).

The result dict is the backprop trainer's (:func:`..loop.summary`:
``accuracy``, ``loss``, ``seconds``, ``epochs``, ``history``...) plus the PVD
measurements: ``phase_seconds`` per iteration, ``startup_seconds``,
``seconds_to_target``... :func:`compare` adds the sequential run (measured
parallel speed-up) and plain Adam backprop (time to the target accuracy).
"""

from __future__ import annotations

import copy
import time

import torch

from .. import amp as _amp
from .. import loop, runtime
from ..outputs import check_trainer_outputs
from ..backprop import engine as backprop
from .blocks import BlockPartition, digest, write_back
from .history import load_resume, new_history, result_dict
from .process import InlinePool, ProcessPool, mp_context, shared_copy, skeleton
from ..runtime import WorkerError, fd_sharing
from .solver import Net, PVDConfig, SharedState, make_direction
from .sync import synchronise

__all__ = ["PVDConfig", "WorkerError", "compare", "train_pvd"]

BACKENDS = ("process", "sequential", "dist")


def _device_of(model, device):
    if device is not None:
        return torch.device(device)
    return loop.model_device(model)


def _sync_device(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ shared


def _train_shared(model, data, cfg: PVDConfig, backend: str, device, callback, phase_timeout,
                  eval_train: int, verify: bool, start_method: str, heartbeat_timeout,
                  start_timeout, checkpoint=None, resume=None, checkpoint_extra=None) -> dict:
    """The coordinator of the process and sequential backends."""
    t_start = time.perf_counter()
    partition = BlockPartition(model, cfg.workers)
    dtype = next(model.parameters()).dtype
    share = backend == "process"
    with fd_sharing():
        shared = SharedState.allocate(partition.numel, cfg.workers, dtype, device, share)
        partition.flatten(dict(model.named_parameters()), out=shared.x)
        train = (shared_copy(data.train_x, device, share), shared_copy(data.train_y, device, share))
        val = (shared_copy(data.val_x, device, share), shared_copy(data.val_y, device, share))
        buffers = {n: shared_copy(b, device, share) for n, b in model.named_buffers()}
    net = Net(skeleton(model), buffers, partition)
    n_eval = min(eval_train, train[0].shape[0])
    g = torch.Generator().manual_seed(cfg.seed)
    eval_idx = torch.randperm(train[0].shape[0], generator=g)[:n_eval].to(device)
    train_eval = (train[0][eval_idx], train[1][eval_idx])

    if backend == "process":
        pool = ProcessPool(cfg, net, shared, train, val, phase_timeout=phase_timeout,
                           start_method=start_method, heartbeat_timeout=heartbeat_timeout,
                           start_timeout=start_timeout)
    else:
        pool = InlinePool(cfg, net, shared, train, val)
    history = new_history()
    coordinator = _Coordinator(pool, net, shared, partition, cfg, device, val, train_eval,
                               verify, backend, model)
    first, stopped = 0, False
    if resume is not None:
        state = load_resume(resume, cfg, partition, device)
        first, stopped = loop.resume(coordinator, state, history)

    def on_iteration(rec):
        if callback is not None:
            callback({"iteration": rec["epoch"], "val_accuracy": rec["val_accuracy"],
                      "val_loss": rec["val_loss"], "pids": list(pool.pids),
                      "sync": coordinator.info, "backend": backend})

    with pool:
        coordinator.push_state()
        startup = time.perf_counter() - t_start
        init_loss, init_acc = net.evaluate(shared.x, *val)
        if not stopped:
            stopped = loop.run_epochs(
                coordinator, epochs=cfg.iterations, start=first, history=history,
                target_accuracy=cfg.target_accuracy, checkpoint=checkpoint,
                checkpoint_extra=checkpoint_extra, quiet=True, on_epoch=on_iteration)
            target_wall = time.perf_counter() - t_start
    write_back(model, partition, shared.x)
    extra = {"backend": backend, "startup_seconds": startup,
             "wall_seconds": time.perf_counter() - t_start,
             "initial_accuracy": init_acc, "initial_val_loss": init_loss}
    if stopped and first == 0:  # everything included: start-up, verification, evaluation
        extra["seconds_to_target_wall"] = target_wall
    return result_dict(history, stopped, cfg, partition, extra)


class _Coordinator:
    """One PVD iteration (direction, parallel phase, synchronisation, check) on
    a worker pool: the engine protocol of :func:`..loop.run_epochs`."""

    def __init__(self, pool, net, shared, partition, cfg, device, val, train_eval, verify,
                 backend, model):
        self.pool, self.net, self.shared, self.partition = pool, net, shared, partition
        self.cfg, self.device, self.val, self.train_eval = cfg, device, val, train_eval
        self.verify, self.backend, self.model = verify, backend, model
        self.info, self.pending = None, None

    def run_epoch(self, k: int) -> dict:
        pool, shared, partition, cfg = self.pool, self.shared, self.partition, self.cfg
        t0 = time.perf_counter()
        replies = pool.run("gradient", k)
        make_direction(shared, partition, sum(r["count"] for r in replies),
                       cfg.normalize_direction)
        _sync_device(self.device)
        t1 = time.perf_counter()
        results = pool.run("solve", k)
        t2 = time.perf_counter()
        new, info = synchronise(self.net, shared, [r["sync_loss"] for r in results], cfg, k,
                                self.val)
        with torch.no_grad():
            shared.x.copy_(new)
        _sync_device(self.device)
        t3 = time.perf_counter()
        if self.verify:
            worker_digests = [r["digest"] for r in pool.run("digest", k)]
            own = digest(shared.x)
        else:
            worker_digests, own = [], None
        self.info = info
        best = results[info["best_worker"]]
        return dict(
            epoch=k + 1, seconds=t3 - t0, lr=cfg.lr, layers=partition.layers,
            direction_seconds=t1 - t0, phase_seconds=t2 - t1, sync_seconds=t3 - t2,
            worker_seconds=[r["seconds"] for r in results],
            worker_cpu_seconds=[r["cpu_seconds"] for r in results], worker_steps=best["steps"],
            candidate_losses=info["candidate_losses"], best_worker=info["best_worker"],
            best_loss=info["best_loss"], hull_loss=info.get("hull_loss"),
            sync_loss=info["sync_loss"], sync_choice=info["choice"],
            mu=[r["mu"] for r in results], digest=own, worker_digests=worker_digests,
            **{"lambda": info.get("lambda")})

    def evaluate(self) -> dict:
        val_loss, val_acc = self.net.evaluate(self.shared.x, *self.val)
        train_loss, train_acc = self.net.evaluate(self.shared.x, *self.train_eval)
        return {"val_loss": val_loss, "val_accuracy": val_acc, "loss": train_loss,
                "train_accuracy": train_acc}

    def state_dict(self) -> dict:
        return {"trainer": "pvd", "backend": self.backend,
                "x": self.shared.x.detach().cpu().clone(),
                "solvers": [r["state"] for r in self.pool.run("state", -1)],
                "model_config": self.model.config() if hasattr(self.model, "config") else None}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.shared.x.copy_(state["x"].to(self.shared.x))
        self.pending = state["solvers"]  # the workers get them once they run

    def push_state(self) -> None:
        if self.pending is not None:
            self.pool.run("load", -1, payloads=self.pending)
            self.pending = None


# --------------------------------------------------------------------- API


def train_pvd(model, data, workers: int = 2, *, backend: str = "process", sync: str = "hull",
              iterations: int = 20, inner_epochs: float = 3.0, inner_batches: int | None = None,
              direction_batches: int = 8, batch_size: int = 64, lr: float = 1e-2,
              mu_lr: float | None = None, sync_batch: int = 1024, hull_steps: int = 10,
              normalize_direction: bool = True, persistent_adam: bool = True,
              target_accuracy: float | None = None, seed: int = 0, threads: int | None = None,
              device=None, callback=None, phase_timeout: float | None = None,
              init_method: str | None = None, dist_timeout: float = 300.0,
              eval_train: int = 2048, verify: bool = True, start_method: str = "spawn",
              heartbeat_timeout: float | None = runtime.DEFAULT_TIMEOUT,
              start_timeout: float = 120.0, checkpoint=None, resume=None,
              checkpoint_extra=None, fault=None, amp=None) -> dict:
    """Train ``model`` in place with Parallel Variable Distribution (Ferris &
    Mangasarian 1994): the layers split into ``workers`` blocks of contiguous
    layers (an input lift with the first, the classifier with the last), one
    per worker.

    Each iteration computes a direction ``d = -grad f(x)`` on
    ``direction_batches`` mini-batches; then each worker optimises its block
    with Adam, together with one multiplier per other block that moves that
    block along ``d`` (the forget-me-not terms), for ``inner_epochs`` epochs
    (or ``inner_batches`` mini-batches); a synchronisation then picks the next
    point, judged on ``sync_batch`` validation examples. It stops at
    ``target_accuracy`` or after ``iterations``.

    Args:
        model (StableNet): the classifier to train in place (a StableNet-like
            module with ``lift``, ``stack`` and ``classifier``); its stack
            needs at least ``workers`` layers.
        data (Dataset): training and validation tensors
            (:class:`~stablenets_ext.data.Dataset`).
        workers (int): P, the number of blocks and of worker processes (ranks
            for ``dist``), > 0 (default 2).
        backend (str): ``"process"`` (default: P worker processes over shared
            memory), ``"sequential"`` (the same P subproblems one after another
            in this process: the timing baseline, the same iterates when each
            worker has one thread) or ``"dist"`` (one torch.distributed rank
            per block: under torchrun, in an initialised process group, or P
            local ranks spawned here).
        sync (str): the synchronisation: ``"best"`` of the P points or
            ``"hull"`` (default: the best point of the affine hull of the
            current point and the P points, by L-BFGS).
        iterations (int): the PVD iteration limit, > 0 (default 20).
        inner_epochs (float): epochs of training data each worker's Adam runs
            through per iteration, > 0 (default 3).
        inner_batches (int or None): mini-batches per worker per iteration, >
            0, instead of ``inner_epochs``; None (default): from
            ``inner_epochs``.
        direction_batches (int): mini-batches the direction is computed on, > 0
            (default 8; at most one pass over the training set).
        batch_size (int): mini-batch size, > 0 (default 64).
        lr (float): Adam's rate for the blocks, finite and > 0 (default 1e-2).
        mu_lr (float or None): Adam's rate for the multipliers, finite and > 0;
            None (default): ``lr``.
        sync_batch (int): validation examples the synchronisation is judged
            on, > 0 (default 1024).
        hull_steps (int): L-BFGS iterations of the affine-hull step, >= 0
            (default 10).
        normalize_direction (bool): scale each block of ``d`` to unit RMS, so a
            multiplier moves its block about as far as an Adam step moves a
            weight (default True).
        persistent_adam (bool): keep each worker's Adam state for its block
            from one iteration to the next (default True); False resets it
            every iteration (the multipliers' Adam is always reset).
        target_accuracy (float or None): stop once the validation accuracy
            reaches this fraction in (0, 1]; None (default): run every
            iteration.
        seed (int): seed of the batches drawn for the direction, the
            subproblems and the synchronisation (default 0).
        threads (int or None): torch threads per worker; None (default): the
            machine's cores // ``workers`` (at least 1).
        device (torch.device, str or None): where to train; None (default): the
            model's device.
        callback (callable or None): called by the coordinator after every
            synchronisation with a dict (the iteration, accuracy and the worker
            pids).
        phase_timeout (float or None): seconds a parallel phase may take before
            the workers are declared hung; None (default): no limit (a worker
            that dies is detected at once regardless). ``process`` backend.
        init_method (str or None): ``dist`` only: the rendezvous of locally
            spawned ranks; None (default): ``tcp://127.0.0.1:<free port>``
            (``env://`` under torchrun).
        dist_timeout (float): ``dist`` only: the collectives' timeout in
            seconds (default 300).
        eval_train (int): training examples (a fixed random subset) the
            training loss and accuracy are measured on after every iteration
            (default 2048; at most the training set).
        verify (bool): after every synchronisation each worker fingerprints the
            point it holds (history ``worker_digests``, result
            ``digests_identical``; default True).
        start_method (str): how worker processes start: ``"spawn"`` (default)
            or ``"forkserver"`` (torch imported once, later workers forked from
            it: much cheaper when one process trains repeatedly).
        heartbeat_timeout (float or None): seconds a live worker may go without
            a heartbeat before it is reported as hung, finite and > 0 (default
            30; None: never).
        start_timeout (float): seconds the workers may take to start, finite and
            > 0 (default 120).
        checkpoint (str or None): a file written atomically after every
            iteration (the point, every worker's optimiser state and the
            history; an existing file there must be a stablenets checkpoint,
            else it is refused before training); None (default): none.
        resume (str or None): a checkpoint to continue from, exactly (the same
            iterates as an uninterrupted run), with any backend; None (default):
            start afresh.
        checkpoint_extra (dict or None): more entries written into every
            checkpoint.
        fault (tuple or None): tests only: ``(kind, worker, iteration)``
            injects a failure. Leave it None.
        amp (str or None): ``"bf16"`` runs the workers' direction and
            subproblem steps under bfloat16 autocast (the point, the
            multipliers and Adam's state stay float32; the synchronisation and
            the evaluation run in float32); ``"fp16"`` in float16, each worker
            with its own dynamic loss scale
            (:class:`~stablenets_ext.training.amp.LossScale`: a subproblem step
            whose gradients overflow is skipped, the direction's gradient sum is
            recomputed at a lower scale); None (default): float32.

    Returns:
        dict: the summary of :func:`~stablenets_ext.training.train`
        (``accuracy``, ``best_accuracy``, ``loss``, ``val_loss``, ``seconds``,
        ``epochs``, ``stopped_early``, ``history``: one row per iteration) plus
        the PVD figures: ``iterations``, ``workers``, ``blocks`` (per block:
        its layers and parameter count), ``backend``,
        ``sync``, ``initial_accuracy``, ``phase_seconds_total`` and
        ``phase_seconds_mean`` (the parallel phases), ``startup_seconds``,
        ``wall_seconds``, ``reached_target``, ``iterations_to_target``,
        ``seconds_to_target``, ``digests_identical``, ``config``...

    Raises:
        ValueError: a bad value (an unknown ``backend``, ``sync`` or
            ``start_method``; a non-positive count, rate or timeout; a
            ``target_accuracy`` outside (0, 1]; more ``workers`` than layers;
            an ``amp`` mode the trainer or device cannot run; a ``checkpoint``
            over a file this package did not write), naming the argument.
        TypeError: a ``model`` PVD cannot split (no ``lift``, ``stack`` and
            ``classifier``).
        WorkerError: a worker (process or rank) raised, died or stopped
            answering (naming it); the workers are reaped and the shared
            memory released before it propagates, as on Ctrl-C
            (KeyboardInterrupt). A RuntimeError, importable from
            ``stablenets_ext.training.pvd``.

    Example:
        >>> import torch
        >>> import stablenets_ext as sn
        >>> from stablenets_ext.data import Dataset
        >>> x = torch.randn(64, 2)
        >>> y = (x[:, 0] > 0).long()
        >>> data = Dataset("toy", x[:48], y[:48], x[48:], y[48:], features=2, classes=2)
        >>> from stablenets_ext.training.pvd import train_pvd
        >>> net = sn.StableNet("verlet", 2, classes=2, layers=4, width=4)
        >>> result = train_pvd(net, data, workers=2, backend="sequential", iterations=2,
        ...                    inner_batches=2, direction_batches=2, batch_size=16,
        ...                    sync_batch=16)
        >>> result["iterations"], [block["layers"] for block in result["blocks"]]
        (2, [[0, 2], [2, 4]])
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    mp_context(start_method)  # checks the name
    if heartbeat_timeout is not None:
        runtime.check_timeout(heartbeat_timeout)
    runtime.check_timeout(start_timeout, "start_timeout")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise ValueError(f"target_accuracy: expected a fraction in (0, 1], got {target_accuracy!r}")
    check_trainer_outputs(checkpoint)
    cfg = PVDConfig(
        workers=workers, sync=sync, iterations=iterations, inner_epochs=inner_epochs,
        inner_batches=inner_batches, direction_batches=direction_batches, batch_size=batch_size,
        lr=lr, mu_lr=mu_lr, sync_batch=sync_batch, hull_steps=hull_steps,
        normalize_direction=normalize_direction, persistent_adam=persistent_adam,
        target_accuracy=target_accuracy, seed=seed, threads=threads,
        fault=tuple(fault) if fault else None, amp=amp,
    ).check()
    BlockPartition(model, workers)  # fail early on a model PVD cannot split
    device = _device_of(model, device)
    _amp.check_device(amp, device)
    if backend == "dist":
        from .dist import train_dist

        return train_dist(model, data, cfg, device, init_method=init_method, timeout=dist_timeout,
                          callback=callback, eval_train=eval_train, verify=verify,
                          start_method=start_method, heartbeat_timeout=heartbeat_timeout,
                          start_timeout=start_timeout, checkpoint=checkpoint, resume=resume,
                          checkpoint_extra=checkpoint_extra)
    return _train_shared(model, data, cfg, backend, device, callback, phase_timeout, eval_train,
                         verify, start_method, heartbeat_timeout, start_timeout,
                         checkpoint=checkpoint, resume=resume, checkpoint_extra=checkpoint_extra)


# ------------------------------------------------------------- comparisons


def _prefix_sum(values, n):
    return float(sum(values[:n]))


def compare(model, data, *, pvd: dict | None = None, sequential: bool = True,
            backprop_epochs: int | None = None, backprop_kwargs: dict | None = None,
            **kwargs) -> dict:
    """Run PVD (unless ``pvd`` already holds its result, trained from ``model``'s
    *current* parameters), the same run with the subproblems executed one after
    another (``sequential``), and plain Adam backprop for ``backprop_epochs``
    from the same initial parameters; return the PVD result with a
    ``comparison`` entry and ``phase_speedup`` / ``time_to_target_vs_backprop``
    (PVD's seconds to the target over backprop's; training time, evaluation
    and worker start-up excluded for both). ``model`` is left untouched."""
    start = copy.deepcopy(model)
    if pvd is None:
        pvd = train_pvd(copy.deepcopy(start), data, **kwargs)
    out = dict(pvd)
    comp: dict = {}
    if sequential:
        kw = dict(kwargs, backend="sequential")
        seq = train_pvd(copy.deepcopy(start), data, **kw)
        n = min(seq["iterations"], pvd["iterations"])
        par_t = _prefix_sum(pvd["history"]["phase_seconds"], n)
        seq_t = _prefix_sum(seq["history"]["phase_seconds"], n)
        comp["sequential"] = {
            "iterations": seq["iterations"],
            "accuracy": seq["accuracy"],
            "phase_seconds": seq["history"]["phase_seconds"],
            "phase_seconds_total": seq_t,
            "parallel_phase_seconds_total": par_t,
            "phase_speedup": seq_t / par_t if par_t > 0 else float("nan"),
            "seconds": seq["seconds"],
            "seconds_to_target": seq["seconds_to_target"],
            "same_iterates": seq["history"]["digest"][:n] == pvd["history"]["digest"][:n],
        }
        out["phase_speedup"] = comp["sequential"]["phase_speedup"]
    if backprop_epochs:
        bp_model = copy.deepcopy(start)
        t0 = time.perf_counter()
        bp = backprop.train(
            bp_model, data, epochs=backprop_epochs, batch_size=kwargs.get("batch_size", 64),
            lr=kwargs.get("lr", 1e-2), target_accuracy=kwargs.get("target_accuracy"),
            device=kwargs.get("device"), seed=kwargs.get("seed", 0), quiet=True,
            amp=kwargs.get("amp"), **(backprop_kwargs or {}),
        )
        wall = time.perf_counter() - t0
        h = bp["history"]
        target = kwargs.get("target_accuracy")
        hit = next((i for i, a in enumerate(h["val_accuracy"]) if target is not None and a >= target), None)
        bp_t = None if hit is None else float(sum(h["seconds"][:hit + 1]))
        comp["backprop"] = {
            "epochs": bp["epochs"],
            "accuracy": bp["accuracy"],
            "seconds": bp["seconds"],
            "wall_seconds": wall,
            "epochs_to_target": None if hit is None else hit + 1,
            "seconds_to_target": bp_t,
            "threads": torch.get_num_threads(),
        }
        p_t = pvd.get("seconds_to_target")
        out["time_to_target_vs_backprop"] = (p_t / bp_t) if (p_t and bp_t) else None
        out["time_to_target_vs_backprop_with_startup"] = (
            (p_t + pvd.get("startup_seconds", 0.0)) / bp_t if (p_t and bp_t) else None)
    out["comparison"] = comp
    return out
