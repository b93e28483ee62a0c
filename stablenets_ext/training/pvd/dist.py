"""PVD over ``torch.distributed``: one rank per block, on one or several machines.

Each rank holds its own copy of the point and the data. Per iteration:

- direction: every rank sums the gradients of its share of the direction
  batches; one all-reduce gives every rank the same ``d``;
- parallel phase: rank ``l`` solves block ``l``'s subproblem
  (:class:`.pvd_solver.BlockSolver`); the proposals (disjoint blocks, zero
  elsewhere), the multiplier rows and the candidate losses are all-reduced;
- synchronisation: rank 0 picks the best point or the best hull point
  (:mod:`.pvd_sync`) and broadcasts it; every rank then fingerprints the
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

from .. import runtime
from ..runtime import WorkerError, describe_exit, fd_sharing, free_port, sigint_ignored
from .blocks import BlockPartition, digest, write_back
from .history import new_history, record, result_dict
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
              callback=None, eval_train: int = 2048, verify: bool = True) -> dict:
    """Run PVD as rank ``rank`` of an initialised process group; every rank returns
    rank 0's result (broadcast at the end)."""
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
    lo, hi = partition.ranges[rank]

    history = new_history()
    stopped = False
    dist.barrier()
    startup = time.perf_counter() - t_start
    init_loss, init_acc = net.evaluate(shared.x, *val)
    flag = torch.zeros(1, device=device)
    for k in range(cfg.iterations):
        t0 = time.perf_counter()
        count = solver.gradient(k)
        grad = shared.grads[rank].clone()
        grad_count = torch.tensor([float(count)], dtype=dtype, device=device)
        comm.all_reduce(grad)
        comm.all_reduce(grad_count)
        shared.grads.zero_()
        shared.grads[0].copy_(grad)
        make_direction(shared, partition, int(grad_count.item()), cfg.normalize_direction)
        t1 = time.perf_counter()
        res = solver.solve(k)
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
            new, info = synchronise(net, shared, stats[:, 0].tolist(), cfg, k, val)
            with torch.no_grad():
                shared.x.copy_(new)
        comm.broadcast(shared.x, src=0)
        t3 = time.perf_counter()
        digests = torch.zeros(world, dtype=torch.int64, device=device)
        if verify:
            digests[rank] = _digest_int(shared.x)
            comm.all_reduce(digests)
        if rank == 0:
            t4 = time.perf_counter()
            val_loss, val_acc = net.evaluate(shared.x, *val)
            train_loss, train_acc = net.evaluate(shared.x, *train_eval)
            eval_seconds = time.perf_counter() - t4
            record(
                history, epoch=k + 1, loss=train_loss, train_accuracy=train_acc,
                val_loss=val_loss, val_accuracy=val_acc, seconds=t3 - t0,
                eval_seconds=eval_seconds, lr=cfg.lr, layers=partition.layers,
                direction_seconds=t1 - t0, phase_seconds=t2 - t1, sync_seconds=t3 - t2,
                worker_seconds=stats[:, 1].tolist(), worker_cpu_seconds=stats[:, 2].tolist(),
                worker_steps=res["steps"], candidate_losses=info["candidate_losses"],
                best_worker=info["best_worker"], best_loss=info["best_loss"],
                hull_loss=info.get("hull_loss"), sync_loss=info["sync_loss"],
                sync_choice=info["choice"], mu=shared.mu.tolist(),
                digest=digest(shared.x) if verify else None,
                worker_digests=[format(v, "015x") for v in digests.tolist()] if verify else [],
            )
            history["lambda"].append(info.get("lambda"))
            stopped = cfg.target_accuracy is not None and val_acc >= cfg.target_accuracy
            flag.fill_(1.0 if stopped else 0.0)
            if callback is not None:
                callback({"iteration": k + 1, "val_accuracy": val_acc, "val_loss": val_loss,
                          "pids": None, "sync": info, "backend": "dist"})
        comm.broadcast(flag, src=0)
        if flag.item() > 0:
            stopped = True
            break
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


# ---------------------------------------------------------------- launchers


def train_dist(model, data, cfg: PVDConfig, device: torch.device, *, init_method=None,
               timeout: float = 300.0, callback=None, eval_train=2048, verify=True,
               start_method: str = "spawn",
               heartbeat_timeout: float | None = runtime.DEFAULT_TIMEOUT) -> dict:
    """Run on the current process group, a torchrun one, or spawn local ranks."""
    if dist.is_available() and dist.is_initialized():
        return rank_loop(dist.get_rank(), dist.get_world_size(), model, data, cfg, device,
                         callback, eval_train, verify)
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
                             eval_train, verify)
        finally:
            dist.destroy_process_group()
    return spawn_local(model, data, cfg, device, init_method=init_method, timeout=timeout,
                       eval_train=eval_train, verify=verify, start_method=start_method,
                       heartbeat_timeout=heartbeat_timeout)


def _rank_main(rank: int, world: int, init_method: str, backend: str, conn, payload: dict):
    """Entry point of a locally spawned rank."""
    runtime.exit_with_parent()  # no orphans: leave when the launcher disappears
    with runtime.reporting_to(conn, rank):
        payload["heartbeats"].start(rank)
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
                               None, payload["eval_train"], payload["verify"])
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
                heartbeat_timeout: float | None = runtime.DEFAULT_TIMEOUT) -> dict:
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
        result = _wait_for_result(procs, conns, payload["heartbeats"], heartbeat_timeout)
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


def _wait_for_result(procs, conns, heartbeats=None, heartbeat_timeout=None):
    """Rank 0's ``(result, parameters)``; a WorkerError as soon as any rank fails or
    dies, or stops beating for ``heartbeat_timeout`` seconds."""
    watch = {id(c): r for r, c in enumerate(conns)}
    live_conns = list(conns)
    sentinels = {p.sentinel: r for r, p in enumerate(procs)}
    while True:
        ready = connection.wait(live_conns + list(sentinels), timeout=0.5)
        if heartbeats is not None and not ready:
            heartbeats.check(list(sentinels.values()), heartbeat_timeout,
                             lambda r: f"PVD rank {r} (pid {procs[r].pid})",
                             [p.pid for p in procs])
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
