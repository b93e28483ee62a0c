"""Running the P block solvers: worker processes on one machine, or inline.

:class:`ProcessPool` starts P ``torch.multiprocessing`` processes (spawn). The
point ``x``, the direction, the proposals and the data are tensors in shared
memory that every process maps, so broadcasting the synchronised point is an
in-place write by the coordinator and copies nothing between processes. The
pipes carry only commands and small replies (losses, mu, timings).

Shared memory uses torch's ``file_descriptor`` strategy, chosen explicitly for
the allocation and the process start (and restored afterwards): its segments
are unlinked from ``/dev/shm`` as soon as they are created and live only as
long as some process holds the descriptor, so no kill -9 anywhere can leave a
file behind. (``file_system`` would leave named files that only
``torch_shm_manager`` cleans up.)

Failure handling: every wait is :func:`multiprocessing.connection.wait` on
the workers' pipes *and* process sentinels with a timeout, so a worker that
raises (it sends its traceback) or dies (its sentinel fires, e.g. kill -9)
becomes a :class:`WorkerError` naming it at once; the pool then terminates
and reaps the others. Workers ignore SIGINT (Ctrl-C is the coordinator's to
handle: it raises KeyboardInterrupt there and the pool is closed on the way
out) and exit by themselves when the coordinator disappears (its sentinel),
so none is left orphaned.

:class:`InlinePool` runs the same solvers one after another in the calling
process: the sequential reference the parallel phase is timed against.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import time
from multiprocessing import connection

import torch
import torch.multiprocessing as tmp

from .. import runtime
from ..runtime import WorkerError, describe_exit, fd_sharing, sigint_ignored
from .blocks import digest
from .solver import BlockSolver, Net, PVDConfig, SharedState

__all__ = ["InlinePool", "ProcessPool", "WorkerError", "mp_context", "shared_copy", "skeleton",
           "warm_optimizers"]


def mp_context(start_method: str):
    """A spawn or forkserver context; the forkserver preloads torch and PVD."""
    return runtime.mp_context(start_method, preload=(
        "torch", "torch.distributed", "stablenets_ext.models",
        "stablenets_ext.training.pvd.process"))


def warm_optimizers():
    """The first ``torch.optim`` optimiser built in a process pays a one-off
    import (seconds); pay it here rather than inside a timed phase."""
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])


def execute(solver: BlockSolver, cmd: str, iteration: int, payload=None, heartbeat=None) -> dict:
    """Worker command ``cmd`` on ``solver``: the same in a worker process and inline."""
    t0 = time.perf_counter()
    if cmd == "gradient":
        reply = {"count": solver.gradient(iteration)}
    elif cmd == "solve":
        reply = solver.solve(iteration, heartbeat)
    elif cmd == "digest":
        reply = {"digest": digest(solver.shared.x)}
    elif cmd == "state":
        reply = {"state": solver.state_dict()}
    elif cmd == "load":
        solver.load_state_dict(payload)
        reply = {}
    else:
        raise ValueError(f"unknown command {cmd!r}")
    reply.setdefault("seconds", time.perf_counter() - t0)
    return reply


def _worker_main(index: int, conn, payload: dict):
    """Entry point of worker ``index`` (top level: spawn imports it by name)."""
    parent = tmp.parent_process()
    try:
        with runtime.reporting_to(conn, index, quiet=(EOFError, BrokenPipeError,
                                                      KeyboardInterrupt)):
            payload["heartbeats"].start(index)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            runtime.set_threads(payload["threads"])
            net = Net(payload["module"], payload["buffers"], payload["partition"])
            solver = BlockSolver(index, net, payload["shared"], payload["train"],
                                 payload["val"], payload["config"])
            watch = [conn] + ([parent.sentinel] if parent is not None else [])

            def heartbeat():  # the coordinator is gone: leave instead of computing for nobody
                if parent is not None and connection.wait([parent.sentinel], 0):
                    os._exit(1)

            conn.send(("ok", index, {"pid": os.getpid()}))
            while True:
                ready = connection.wait(watch, timeout=1.0)
                if not ready:
                    continue
                if parent is not None and parent.sentinel in ready:
                    os._exit(1)
                msg = conn.recv()
                if msg[0] == "stop":
                    break
                reply = execute(solver, msg[0], msg[1], msg[2] if len(msg) > 2 else None,
                                heartbeat)
                conn.send(("ok", index, reply))
    finally:
        payload["heartbeats"].stop()
        # The Process object keeps ``payload`` alive until exit, when destructors
        # may not run: drop the shared tensors now so CUDA IPC references are
        # released while the coordinator (their producer) still waits for us.
        payload.clear()
        solver = net = None  # noqa: F841
        import gc

        gc.collect()


class ProcessPool:
    """P worker processes over shared memory; see the module docstring."""

    def __init__(self, cfg: PVDConfig, net: Net, shared: SharedState, train, val,
                 start_timeout: float = 120.0, phase_timeout: float | None = None,
                 start_method: str = "spawn",
                 heartbeat_timeout: float | None = runtime.DEFAULT_TIMEOUT):
        self.cfg, self.net, self.shared = cfg, net, shared
        self.heartbeats = runtime.Heartbeats(cfg.workers)
        self.heartbeat_timeout = heartbeat_timeout
        self.start_method = start_method
        self.train, self.val = train, val
        self.start_timeout, self.phase_timeout = start_timeout, phase_timeout
        self.procs: list = []
        self.conns: list = []
        self.pids: list[int] = []
        self.phase = "start"
        self.iteration = -1

    # ------------------------------------------------------------ lifecycle

    def start(self):
        ctx = mp_context(self.start_method)
        P = self.cfg.workers
        module = skeleton(self.net.module)
        with fd_sharing(), sigint_ignored():
            for l in range(P):
                ours, theirs = ctx.Pipe(duplex=True)
                payload = {
                    "module": module, "buffers": self.net.buffers, "partition": self.net.partition,
                    "shared": self.shared, "train": self.train, "val": self.val,
                    "config": self.cfg, "threads": self.cfg.worker_threads(),
                    "heartbeats": self.heartbeats,
                }
                proc = ctx.Process(target=_worker_main, args=(l, theirs, payload),
                                   name=f"pvd-worker-{l}", daemon=True)
                proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(ours)
        warm_optimizers()  # overlaps the workers' start instead of delaying the first sync
        replies = self._gather(timeout=self.start_timeout)
        self.pids = [r["pid"] for r in replies]
        return self

    def close(self, graceful: bool = True):
        """Stop every worker and reap it: stop message, then SIGTERM, then SIGKILL."""
        if graceful:
            for conn in self.conns:
                with contextlib.suppress(Exception):
                    conn.send(("stop",))
        runtime.reap(self.procs, grace=3.0 if graceful else 0.0)
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()
        for p in self.procs:
            with contextlib.suppress(ValueError):
                p.close()
        self.procs, self.conns = [], []

    def __enter__(self):
        try:
            return self.start()
        except BaseException:  # a worker that never answered, or Ctrl-C: reap them all
            self.close(graceful=False)
            raise

    def __exit__(self, exc_type, exc, tb):
        self.close(graceful=exc_type is None)

    # ------------------------------------------------------------- commands

    def run(self, cmd: str, iteration: int, payloads=None) -> list[dict]:
        """Send ``cmd`` (with ``payloads[l]`` to worker ``l``) to every worker and
        return their replies in worker order."""
        self.phase, self.iteration = cmd, iteration
        for l, conn in enumerate(self.conns):
            try:
                conn.send((cmd, iteration) if payloads is None else (cmd, iteration, payloads[l]))
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                self._raise_dead(l)
        return self._gather(timeout=self.phase_timeout)

    def _where(self) -> str:
        if self.phase == "start":
            return "while starting"
        return f"during '{self.phase}' of iteration {self.iteration}"

    def _name(self, l: int) -> str:
        a, b = self.net.partition.layer_ranges[l]
        pid = self.procs[l].pid if l < len(self.procs) else "?"
        return f"PVD worker {l} (pid {pid}, layers {a}-{b - 1})"

    def _raise_dead(self, l: int):
        proc = self.procs[l]
        proc.join(1.0)
        raise WorkerError(f"{self._name(l)} died {self._where()}: {describe_exit(proc.exitcode)}", l)

    def _gather(self, timeout: float | None) -> list[dict]:
        P = len(self.procs)
        replies: dict[int, dict] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        conn_index = {id(c): l for l, c in enumerate(self.conns)}
        sentinel_index = {p.sentinel: l for l, p in enumerate(self.procs)}
        while len(replies) < P:
            pending = [self.conns[l] for l in range(P) if l not in replies]
            ready = connection.wait(pending + list(sentinel_index), timeout=0.5)
            # Messages first: a worker that sent its traceback and exited is an error, not a death.
            for obj in sorted(ready, key=lambda o: isinstance(o, int)):
                if isinstance(obj, int):
                    l = sentinel_index[obj]
                    if self.conns[l].poll():
                        self._receive(l, replies)
                    self._raise_dead(l)
                else:
                    self._receive(conn_index[id(obj)], replies)
            pending = [l for l in range(P) if l not in replies]
            self.heartbeats.check(pending, self.heartbeat_timeout, self._name,
                                  [p.pid for p in self.procs])
            if deadline is not None and time.monotonic() > deadline and len(replies) < P:
                late = [l for l in range(P) if l not in replies]
                raise WorkerError(
                    f"{', '.join(self._name(l) for l in late)} did not answer {self._where()} "
                    f"within {timeout:.0f} s", late[0])
        return [replies[l] for l in range(P)]

    def _receive(self, l: int, replies: dict):
        try:
            status, index, body = self.conns[l].recv()
        except (EOFError, ConnectionResetError, OSError):
            self._raise_dead(l)
        if status == "error":
            raise WorkerError(f"{self._name(l)} failed {self._where()}:\n{body.rstrip()}", l)
        replies[index] = body


class InlinePool:
    """The same solvers, run one after another in this process (sequential PVD)."""

    def __init__(self, cfg: PVDConfig, net: Net, shared: SharedState, train, val):
        self.cfg = cfg
        self.solvers = [BlockSolver(l, net, shared, train, val, cfg) for l in range(cfg.workers)]
        self.pids = [os.getpid()] * cfg.workers

    def start(self):
        warm_optimizers()
        return self

    def close(self, graceful: bool = True):
        pass

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.close()

    def run(self, cmd: str, iteration: int, payloads=None) -> list[dict]:
        # The workers' thread count for the workers' part only: the coordinator's
        # part (synchronisation, evaluation) runs as it does with ProcessPool.
        threads = torch.get_num_threads()
        torch.set_num_threads(self.cfg.worker_threads())
        try:
            return self._run(cmd, iteration, payloads)
        finally:
            torch.set_num_threads(threads)

    def _run(self, cmd: str, iteration: int, payloads=None) -> list[dict]:
        return [execute(s, cmd, iteration, None if payloads is None else payloads[l])
                for l, s in enumerate(self.solvers)]


def skeleton(module):
    """The module without its parameter values (they come from the flat vector):
    what travels to the workers is its structure, not a copy of its weights."""
    return copy.deepcopy(module).to("meta")


def shared_copy(t: torch.Tensor, device, share: bool) -> torch.Tensor:
    """A copy of ``t`` on ``device``; in shared memory when ``share`` (CPU; a
    CUDA tensor is shared through CUDA IPC when it is sent to a worker)."""
    t = t.detach()
    if share and torch.device(device).type == "cpu":
        return torch.empty_like(t, device=device).share_memory_().copy_(t)
    return t.to(device, copy=True)
