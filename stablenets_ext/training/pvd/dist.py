"""PVD over ``torch.distributed``: one rank per block, on one or several machines.

Each rank holds its own copy of the point and the data. Per iteration:

- direction: every rank sums the gradients of its share of the direction
  batches; one all-reduce gives every rank the same ``d``;
- parallel phase: rank ``l`` solves block ``l``'s subproblem
  (:class:`.pvd_solver.BlockSolver`); the proposals (disjoint blocks, zero
  elsewhere), the multiplier rows and the candidate losses are all-reduced;
- synchronisation: rank 0 picks the best point or the best hull point
  (:mod:`.sync`) and broadcasts it; every rank then fingerprints the
  point it holds and rank 0 gathers the fingerprints (history ``worker_digests``);
- rank 0 evaluates and broadcasts whether to stop.

Launch: under ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set: the
``env://`` rendezvous, several machines), inside an already initialised
process group, or, with neither, by spawning ``workers`` local ranks that
meet at ``tcp://127.0.0.1:<free port>`` (or ``init_method``). Backend: NCCL
when the ranks compute on distinct GPUs, gloo otherwise (the messages are
small next to the compute, so gloo on the CPU copies is no bottleneck).

Failures: collectives carry ``timeout``; with locally spawned ranks the
parent watches their sentinels, so a rank that dies is named within a second
and the others are terminated; each spawned rank also exits when its parent
disappears.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import time
from multiprocessing import connection
from types import SimpleNamespace

import torch
import torch.distributed as dist

from .. import loop, runtime
from ..runtime import WorkerError, describe_exit, fd_sharing, free_port, sigint_ignored
from .blocks import BlockPartition, digest, write_back
from .history import load_resume, new_history, result_dict
from .process import mp_context, shared_copy, skeleton, warm_optimizers
from .solver import BlockSolver, Net, PVDConfig, SharedState, make_direction
from .sync import synchronise


def choose_backend(device: torch.device, world: int) -> str:
    if device.type == "cuda" and dist.is_nccl_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if torch.cuda.device_count() >= local:
            return "nccl"
    return "gloo"


class _Comm:
    """Collectives on the compute device or through CPU copies (gloo + CUDA)."""

    def __init__(self, backend: str, device: torch.device):
        self.staged = backend == "gloo" and device.type != "cpu"

    def _run(self, fn, t: torch.Tensor, *args, **kw):
        if not self.staged:
            fn(t, *args, **kw)
            return t
        host = t.cpu()
        fn(host, *args, **kw)
        t.copy_(host)
        return t

    def all_reduce(self, t):
        return self._run(dist.all_reduce, t)

    def broadcast(self, t, src=0):
        return self._run(dist.broadcast, t, src=src)


def _digest_int(flat: torch.Tensor) -> int:
    return int(digest(flat), 16)  # 60 bits: fits an int64


def rank_loop(rank: int, world: int, model, data, cfg: PVDConfig, device: torch.device,
              callback=None, eval_train: int = 2048, verify: bool = True, checkpoint=None,
              resume=None, checkpoint_extra=None) -> dict:
    """Run PVD as rank ``rank`` of an initialised process group; every rank returns
    rank 0's result (broadcast at the end). ``checkpoint`` is written by rank 0
    (every rank's optimiser state gathered to it); ``resume`` is read by every
    rank."""
    if world != cfg.workers:
        raise ValueError(f"workers: the process group has {world} ranks but workers={cfg.workers}; "
                         "PVD runs one block per rank")
    t_start = time.perf_counter()
    comm = _Comm(dist.get_backend(), device)
    partition = BlockPartition(model, world)
    dtype = next(model.parameters()).dtype
    shared = SharedState.allocate(partition.numel, world, dtype, device, share=False)
    partition.flatten(dict(model.named_parameters()), out=shared.x)
    comm.broadcast(shared.x, src=0)  # every rank starts from rank 0's initialisation
    train = (data.train_x.to(device), data.train_y.to(device))
    val = (data.val_x.to(device), data.val_y.to(device))
    buffers = {n: b.detach().to(device) for n, b in model.named_buffers()}
    net = Net(skeleton(model), buffers, partition)
    solver = BlockSolver(rank, net, shared, train, val, cfg)
    warm_optimizers()
    n_eval = min(eval_train, train[0].shape[0])
    g = torch.Generator().manual_seed(cfg.seed)
    eval_idx = torch.randperm(train[0].shape[0], generator=g)[:n_eval].to(device)
    train_eval = (train[0][eval_idx], train[1][eval_idx])
    engine = _RankEngine(rank, world, comm, solver, net, shared, partition, cfg, device, val,
                         train_eval, verify, model, gather_states=checkpoint is not None)
    history = new_history()
    first, stopped = 0, False
    if resume is not None:
        first, stopped = loop.resume(engine, load_resume(resume, cfg, partition, device),
                                     history)
    dist.barrier()
    startup = time.perf_counter() - t_start
    init_loss, init_acc = net.evaluate(shared.x, *val)

    def on_iteration(rec):
        if callback is not None and rank == 0:
            callback({"iteration": rec["epoch"], "val_accuracy": rec["val_accuracy"],
                      "val_loss": rec["val_loss"], "pids": None, "sync": engine.info,
                      "backend": "dist"})

    if not stopped:
        stopped = loop.run_epochs(
            engine, epochs=cfg.iterations, start=first, history=history,
            target_accuracy=cfg.target_accuracy, checkpoint=checkpoint if rank == 0 else None,
            checkpoint_extra=checkpoint_extra, quiet=True, on_epoch=on_iteration,
            main=rank == 0)
    write_back(model, partition, shared.x)
    out = [None]
    if rank == 0:
        out[0] = result_dict(history, stopped, cfg, partition, {
            "backend": "dist", "dist_backend": dist.get_backend(), "startup_seconds": startup,
            "wall_seconds": time.perf_counter() - t_start, "initial_accuracy": init_acc,
            "initial_val_loss": init_loss,
        })
    dist.broadcast_object_list(out, src=0)
    result = out[0]
    result["rank"] = rank
    return result


class _RankEngine:
    """One PVD iteration on this rank (collectives with the others): the engine
    protocol of :func:`..loop.run_epochs`. Rank 0 synchronises, evaluates and
    keeps the history; the figures it evaluates are broadcast, so every rank
    takes the same stop decision."""

    def __init__(self, rank, world, comm, solver, net, shared, partition, cfg, device, val,
                 train_eval, verify, model, gather_states):
        self.rank, self.world, self.comm, self.solver = rank, world, comm, solver
        self.net, self.shared, self.partition, self.cfg = net, shared, partition, cfg
        self.device, self.val, self.train_eval, self.verify = device, val, train_eval, verify
        self.model, self.gather_states = model, gather_states
        self.info, self.states = None, None

    def run_epoch(self, k: int) -> dict:
        rank, world, comm, shared, partition = (self.rank, self.world, self.comm, self.shared,
                                                self.partition)
        cfg, device, dtype = self.cfg, self.device, shared.x.dtype
        lo, hi = partition.ranges[rank]
        t0 = time.perf_counter()
        count = self.solver.gradient(k)
        grad = shared.grads[rank].clone()
        grad_count = torch.tensor([float(count)], dtype=dtype, device=device)
        comm.all_reduce(grad)
        comm.all_reduce(grad_count)
        shared.grads.zero_()
        shared.grads[0].copy_(grad)
        make_direction(shared, partition, int(grad_count.item()), cfg.normalize_direction)
        t1 = time.perf_counter()
        res = self.solver.solve(k)
        with torch.no_grad():
            own = shared.proposal[lo:hi].clone()
            shared.proposal.zero_()
            shared.proposal[lo:hi].copy_(own)
            row = shared.mu[rank].clone()
            shared.mu.zero_()
            shared.mu[rank].copy_(row)
        stats = torch.zeros(world, 4, dtype=torch.float64, device=device)
        stats[rank] = torch.tensor([res["sync_loss"], res["seconds"], res["cpu_seconds"],
                                    res["train_loss"]], dtype=torch.float64)
        comm.all_reduce(shared.proposal)
        comm.all_reduce(shared.mu)
        comm.all_reduce(stats)
        t2 = time.perf_counter()
        info = None
        if rank == 0:
            new, info = synchronise(self.net, shared, stats[:, 0].tolist(), cfg, k, self.val)
            with torch.no_grad():
                shared.x.copy_(new)
        comm.broadcast(shared.x, src=0)
        t3 = time.perf_counter()
        digests = torch.zeros(world, dtype=torch.int64, device=device)
        if self.verify:
            digests[rank] = _digest_int(shared.x)
            comm.all_reduce(digests)
        if self.gather_states:
            states = [None] * world if rank == 0 else None
            dist.gather_object(self.solver.state_dict(), states, dst=0)
            self.states = states
        self.info = info
        if rank != 0:
            return {"epoch": k + 1}
        return dict(
            epoch=k + 1, seconds=t3 - t0, lr=cfg.lr, layers=partition.layers,
            direction_seconds=t1 - t0, phase_seconds=t2 - t1, sync_seconds=t3 - t2,
            worker_seconds=stats[:, 1].tolist(), worker_cpu_seconds=stats[:, 2].tolist(),
            worker_steps=res["steps"], candidate_losses=info["candidate_losses"],
            best_worker=info["best_worker"], best_loss=info["best_loss"],
            hull_loss=info.get("hull_loss"), sync_loss=info["sync_loss"],
            sync_choice=info["choice"], mu=shared.mu.tolist(),
            digest=digest(shared.x) if self.verify else None,
            worker_digests=[format(v, "015x") for v in digests.tolist()] if self.verify else [],
            **{"lambda": info.get("lambda")})

    def evaluate(self) -> dict:
        figures = torch.zeros(5, dtype=torch.float64, device=self.device)
        if self.rank == 0:
            t0 = time.perf_counter()
            val_loss, val_acc = self.net.evaluate(self.shared.x, *self.val)
            train_loss, train_acc = self.net.evaluate(self.shared.x, *self.train_eval)
            figures.copy_(torch.tensor([val_loss, val_acc, train_loss, train_acc,
                                        time.perf_counter() - t0], dtype=torch.float64))
        self.comm.broadcast(figures, src=0)
        v = figures.tolist()
        return {"val_loss": v[0], "val_accuracy": v[1], "loss": v[2], "train_accuracy": v[3],
                "eval_seconds": v[4]}

    def state_dict(self) -> dict:
        return {"trainer": "pvd", "backend": "dist", "x": self.shared.x.detach().cpu().clone(),
                "solvers": self.states,
                "model_config": self.model.config() if hasattr(self.model, "config") else None}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.shared.x.copy_(state["x"].to(self.shared.x))
        self.solver.load_state_dict(state["solvers"][self.rank])


# ---------------------------------------------------------------- launchers


def train_dist(model, data, cfg: PVDConfig, device: torch.device, *, init_method=None,
               timeout: float = 300.0, callback=None, eval_train=2048, verify=True,
               start_method: str = "spawn",
               heartbeat_timeout: float | None = runtime.DEFAULT_TIMEOUT, checkpoint=None,
               resume=None, checkpoint_extra=None, start_timeout: float = 120.0) -> dict:
    """Run on the current process group, a torchrun one, or spawn local ranks."""
    ck = dict(checkpoint=checkpoint, resume=resume, checkpoint_extra=checkpoint_extra)
    if dist.is_available() and dist.is_initialized():
        return rank_loop(dist.get_rank(), dist.get_world_size(), model, data, cfg, device,
                         callback, eval_train, verify, **ck)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        world = int(os.environ["WORLD_SIZE"])
        if device.type == "cuda" and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
            torch.cuda.set_device(device)  # NCCL's object collectives use the current device
            model.to(device)
        dist.init_process_group(choose_backend(device, world), init_method=init_method or "env://",
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            return rank_loop(dist.get_rank(), world, model, data, cfg, device, callback,
                             eval_train, verify, **ck)
        finally:
            dist.destroy_process_group()
    return spawn_local(model, data, cfg, device, init_method=init_method, timeout=timeout,
                       eval_train=eval_train, verify=verify, start_method=start_method,
                       heartbeat_timeout=heartbeat_timeout, start_timeout=start_timeout, **ck)


@contextlib.contextmanager
def _beating(heartbeats, index):
    heartbeats.start(index)
    try:
        yield
    finally:
        heartbeats.stop()


def _rank_main(rank: int, world: int, init_method: str, backend: str, conn, payload: dict):
    """Entry point of a locally spawned rank."""
    runtime.exit_with_parent()  # no orphans: leave when the launcher disappears
    with runtime.reporting_to(conn, rank), _beating(payload["heartbeats"], rank):
        torch.set_num_threads(payload["threads"])
        device = payload["device"]
        if device.type == "cuda" and backend == "nccl":
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        model = copy.deepcopy(payload["model"]).to(device)  # private, not the shared copy
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=payload["timeout"]))
        try:
            result = rank_loop(rank, world, model, payload["data"], payload["config"], device,
                               None, payload["eval_train"], payload["verify"],
                               **payload["checkpointing"])
        finally:
            dist.destroy_process_group()
        if rank == 0:
            # numpy, not tensors: a tensor would travel as a descriptor this
            # process must still be alive to hand over.
            final = {n: p.detach().cpu().numpy() for n, p in model.named_parameters()}
            conn.send(("ok", rank, (result, final)))


def spawn_local(model, data, cfg: PVDConfig, device: torch.device, *, init_method=None,
                timeout: float = 300.0, eval_train=2048, verify=True,
                start_method: str = "spawn",
                heartbeat_timeout: float | None = runtime.DEFAULT_TIMEOUT, checkpoint=None,
                resume=None, checkpoint_extra=None, start_timeout: float = 120.0) -> dict:
    """Spawn ``cfg.workers`` ranks on this machine, wait for rank 0's result and
    copy the final parameters into ``model``."""
    world = cfg.workers
    init_method = init_method or f"tcp://127.0.0.1:{free_port()}"
    backend = choose_backend(device, world)
    ctx = mp_context(start_method)
    procs, conns = [], []
    with fd_sharing():
        shared = {k: shared_copy(getattr(data, k), "cpu", True)
                  for k in ("train_x", "train_y", "val_x", "val_y")}
        model_copy = copy.deepcopy(model).cpu()
        for p in model_copy.parameters():
            p.data = shared_copy(p.data, "cpu", True)
    payload = {
        "model": model_copy, "data": SimpleNamespace(**shared), "config": cfg, "device": device,
        "threads": cfg.worker_threads(), "timeout": timeout, "eval_train": eval_train,
        "verify": verify, "heartbeats": runtime.Heartbeats(world),
        "checkpointing": dict(checkpoint=checkpoint, resume=resume,
                              checkpoint_extra=checkpoint_extra),
    }
    try:
        with fd_sharing(), sigint_ignored():
            for r in range(world):
                ours, theirs = ctx.Pipe(duplex=False)
                p = ctx.Process(target=_rank_main, args=(r, world, init_method, backend, theirs, payload),
                                name=f"pvd-rank-{r}", daemon=True)
                p.start()
                theirs.close()
                procs.append(p)
                conns.append(ours)
        result = _wait_for_result(procs, conns, payload["heartbeats"], heartbeat_timeout,
                                  start_timeout)
        for p in procs:
            p.join(10.0)
    finally:
        runtime.reap(procs, grace=0.0)
        for c in conns:
            with contextlib.suppress(Exception):
                c.close()
    result, final = result
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.from_numpy(final[n]))
    return result


def _wait_for_result(procs, conns, heartbeats=None, heartbeat_timeout=None, start_timeout=None):
    """Rank 0's ``(result, parameters)``; a WorkerError as soon as any rank fails or
    dies, stops beating for ``heartbeat_timeout`` seconds, or has not started
    (beaten once) ``start_timeout`` seconds after the start."""
    started = time.monotonic()
    watch = {id(c): r for r, c in enumerate(conns)}
    live_conns = list(conns)
    sentinels = {p.sentinel: r for r, p in enumerate(procs)}
    while True:
        ready = connection.wait(live_conns + list(sentinels), timeout=0.5)
        if heartbeats is not None and not ready:
            heartbeats.check(list(sentinels.values()), heartbeat_timeout,
                             lambda r: f"PVD rank {r} (pid {procs[r].pid})",
                             [p.pid for p in procs])
            silent = [r for r in sentinels.values() if heartbeats.age(r) is None]
            if silent and start_timeout is not None and \
                    time.monotonic() - started > start_timeout:
                r = silent[0]
                raise WorkerError(f"PVD rank {r} (pid {procs[r].pid}) did not start within "
                                  f"{start_timeout:.0f} s", r)
        # Messages before deaths: a rank that reported its traceback and exited is an error.
        for obj in sorted(ready, key=lambda o: isinstance(o, int)):
            if not isinstance(obj, int):
                r = watch[id(obj)]
                try:
                    status, _, body = obj.recv()
                except (EOFError, OSError):  # the rank closed its end: finished, or died
                    live_conns.remove(obj)
                    continue
                if status == "error":
                    raise WorkerError(f"PVD rank {r} (pid {procs[r].pid}) failed:\n{body.rstrip()}", r)
                return body
            r = sentinels.pop(obj)
            procs[r].join(1.0)
            if conns[r] in live_conns and conns[r].poll():
                with contextlib.suppress(EOFError, OSError):
                    status, _, body = conns[r].recv()
                    if status == "error":
                        raise WorkerError(f"PVD rank {r} (pid {procs[r].pid}) failed:\n{body.rstrip()}", r)
                    return body
            if procs[r].exitcode != 0 or r == 0:
                raise WorkerError(f"PVD rank {r} (pid {procs[r].pid}) died: "
                                  f"{describe_exit(procs[r].exitcode)}", r)
