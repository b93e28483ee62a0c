"""The synthetic-gradient pipeline: one process per stage.

:class:`PipelineEngine` starts ``M`` ``torch.multiprocessing`` processes
(spawn), stage ``k`` in process ``k``, and streams batches to stage 0 without
waiting for their losses. Every tensor that moves lives in shared memory
allocated once, before the processes start:

- the training inputs and labels, which stage 0 draws its batches from by
  itself (the permutation of :func:`.stages.batch_order`), so the coordinator
  sends one message per epoch, not one per batch;
- per cut, ``inflight`` slots of the cut state, the labels and the gradient:
  stage ``k`` writes batch ``t``'s output state into slot ``t % inflight``,
  stage ``k+1`` reads it and writes the true gradient of its input back into
  the same slot, stage ``k`` trains its SG module on it before its forward of
  batch ``t + inflight`` (which is when it needs the slot again);
- the parameters (stage net and SG module) of every stage, which the stage
  copies its private, trained ones into at the end of every epoch, so the
  coordinator evaluates and returns them without any transfer.

Pipes carry only small tuples (``("fwd", t, n)``, ``("grad", t)``, replies);
the last stage reports progress to the coordinator every :data:`DONE_EVERY`
batches and at the end of an epoch (which is what its stall check watches).
The schedule is that of :mod:`.stages`, fixed by ``inflight`` and
not by timing, so a pipeline run equals the in-process trainer run with the
same ``inflight`` (up to the floating-point effects of thread counts).

Shared memory uses torch's ``file_descriptor`` strategy, chosen explicitly:
its segments are unlinked from ``/dev/shm`` as soon as they are created and
live as long as some process holds the descriptor, so no crash or kill -9
leaves a file behind (``file_system`` would leave named segments).

Failures: every wait is :func:`multiprocessing.connection.wait` on the pipes
*and* the process sentinels with a timeout. A stage that raises sends its
traceback; a stage that dies (kill -9) fires its sentinel; either becomes a
:class:`~..runtime.StageError` naming the stage, and the engine terminates
and reaps the others. Stages ignore SIGINT (Ctrl-C is the coordinator's: it
raises KeyboardInterrupt there and the engine is closed on the way out), exit
by themselves when the coordinator's sentinel fires, and exit quietly with
:data:`EXIT_PEER_LOST` when a neighbour's pipe closes, so the root cause is
the one reported.
"""

from __future__ import annotations

import copy
import io
import os
import signal
import time
import traceback
from multiprocessing import connection

import torch
import torch.multiprocessing as tmp

from .. import runtime
from ..runtime import StageError, fd_sharing
from .stages import StageRunner, batch_order

EXIT_PEER_LOST = 75
DONE_EVERY = 16
EXIT_PARENT_GONE = 76
POLL_SECONDS = 0.25


class PeerLost(Exception):
    pass


def stage_error(message, stage=None):
    return StageError(message, stage)


def stage_devices(device: torch.device, count: int) -> list[str]:
    """One CUDA device per stage when there are enough, else all on ``device``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        if torch.cuda.device_count() >= count:
            return [f"cuda:{k}" for k in range(count)]
        device = torch.device("cuda", torch.cuda.current_device())
    return [str(device)] * count


def _blob(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unblob(data: bytes, device="cpu"):
    return torch.load(io.BytesIO(data), map_location=device, weights_only=False)


# ------------------------------------------------------------------ worker


class _StageWorker:
    def __init__(self, spec, net, sg, ctrl, up, down, inbuf, outbuf):
        self.k, self.count = spec["index"], spec["count"]
        self.inflight = spec["inflight"]
        self.batches, self.batch_size, self.seed = spec["batches"], spec["batch_size"], spec["seed"]
        self.done = 0
        self.device = torch.device(spec["device"])
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.shared = [p for m in (net, sg) if m is not None for p in m.parameters()]
        private_net = copy.deepcopy(net).to(self.device)
        private_sg = copy.deepcopy(sg).to(self.device) if sg is not None else None
        self.runner = StageRunner(private_net, private_sg, epochs=spec["epochs"],
                                  **spec["settings"])
        if spec.get("state") is not None:
            self.runner.load_state_dict(_unblob(spec["state"], self.device))
        self.private = [p for m in (private_net, private_sg) if m is not None
                        for p in m.parameters()]
        self.ctrl, self.up, self.down = ctrl, up, down
        self.inbuf, self.outbuf = inbuf, outbuf
        # tensors crossing the input and output cuts (1 on a model-stage boundary)
        self.in_parts, self.out_parts = private_net.in_parts, private_net.out_parts
        self.arrived: set[int] = set()
        parent = tmp.parent_process()
        self.parent_sentinel = parent.sentinel if parent is not None else None
        self.backlog: list = []

    # -- messages

    def _recv(self, conn):
        try:
            return conn.recv()
        except (EOFError, OSError):
            if conn is self.ctrl:
                os._exit(EXIT_PARENT_GONE)
            raise PeerLost() from None

    def _wait(self, conns):
        objs = list(conns)
        if self.parent_sentinel is not None:
            objs.append(self.parent_sentinel)
        ready = connection.wait(objs, timeout=POLL_SECONDS)
        if self.parent_sentinel is not None and self.parent_sentinel in ready:
            os._exit(EXIT_PARENT_GONE)
        return ready

    def _take_grads(self, ready):
        if self.down is not None and self.down in ready:
            while self.down.poll():
                kind, t = self._recv(self.down)
                self.arrived.add(t)

    def _next_message(self):
        sources = [self.ctrl] + ([self.up] if self.up is not None else [])
        watch = sources + ([self.down] if self.down is not None else [])
        while True:
            if self.backlog:
                return self.backlog.pop(0)
            ready = self._wait(watch)
            self._take_grads(ready)
            for conn in sources:
                if conn in ready:
                    self.backlog.append(self._recv(conn))

    def _await_grad(self, t):
        while t not in self.arrived:
            ready = self._wait([self.down])
            self._take_grads(ready)
        self.arrived.discard(t)

    # -- the schedule

    def _learn_upto(self, upto):
        for s in list(self.runner.pending):
            if upto is not None and s > upto:
                break
            self._await_grad(s)
            n = self.runner.pending[s][1].shape[0]
            slot = s % self.inflight
            target = tuple(self.outbuf["grad"][slot, i, :n].to(self.device, copy=True)
                           for i in range(self.out_parts))
            self.runner.learn(s, target)

    def _epoch(self, epoch):
        """Stage 0: the whole epoch's batches, drawn from the shared data."""
        x, y = self.inbuf["x"], self.inbuf["y"]
        order = batch_order(x.shape[0], self.batch_size, self.seed, epoch)
        t0 = epoch * len(order)
        for i, idx in enumerate(order):
            inputs = (x.index_select(0, idx).to(self.device),)
            labels = y.index_select(0, idx).to(self.device)
            self._step(t0 + i, idx.shape[0], inputs, labels)

    def _step(self, t, n, inputs=None, labels=None):
        r = self.runner
        if r.first:
            slot = None
        else:
            slot = t % self.inflight
            inputs = tuple(self.inbuf["state"][slot, i, :n].to(self.device, copy=True)
                           for i in range(self.in_parts))
            labels = self.inbuf["labels"][slot, :n].to(self.device, copy=True)
        if not r.last:
            self._learn_upto(t - self.inflight)
        out = r.forward(t, inputs, labels)
        if not r.last:
            o_slot = t % self.inflight
            for i, o in enumerate(out):
                self.outbuf["state"][o_slot, i, :n].copy_(o)
            self.outbuf["labels"][o_slot, :n].copy_(labels)
            self.down.send(("fwd", t, n))
        grads = r.backward()
        if not r.first:
            for i, g in enumerate(grads):
                self.inbuf["grad"][slot, i, :n].copy_(g)
            self.up.send(("grad", t))
        if r.last:
            self.done += 1
            if self.done >= DONE_EVERY or (t + 1) % self.batches == 0:
                self.ctrl.send(("done", t, self.done))
                self.done = 0

    @torch.no_grad()
    def _publish(self):
        for s, p in zip(self.shared, self.private):
            s.copy_(p)

    def run(self):
        self.ctrl.send(("ready", self.k, os.getpid()))
        while True:
            msg = self._next_message()
            kind = msg[0]
            if kind == "epoch":
                self._epoch(msg[1])
            elif kind == "fwd":
                self._step(msg[1], msg[2])
            elif kind == "sync":
                self._learn_upto(None)
                stats = self.runner.epoch_stats()
                self.runner.end_epoch()
                self.runner.reset_stats()
                self._publish()
                self.ctrl.send(("synced", self.k, stats))
            elif kind == "state":
                self.ctrl.send(("state", self.k, _blob(self.runner.state_dict())))
            elif kind == "finish":
                self._learn_upto(None)
                self._publish()
                self.ctrl.send(("finished", self.k))
                return
            else:
                raise RuntimeError(f"stage {self.k}: unexpected message {msg!r}")


def _stage_main(spec, net, sg, ctrl, up, down, inbuf, outbuf):
    spec["heartbeats"].start(spec["index"])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tmp.set_sharing_strategy("file_descriptor")
    torch.set_num_threads(spec["threads"])
    try:
        _StageWorker(spec, net, sg, ctrl, up, down, inbuf, outbuf).run()
        spec["heartbeats"].stop()
    except PeerLost:
        os._exit(EXIT_PEER_LOST)
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the coordinator
        try:
            ctrl.send(("error", spec["index"], f"{type(exc).__name__}: {exc}",
                       traceback.format_exc()))
        except Exception:  # noqa: BLE001
            pass
        os._exit(1)


# ------------------------------------------------------------- coordinator


class PipelineEngine:
    """The coordinator's side; see the module doc. Engine protocol of
    :mod:`.trainer`: ``start``, ``run_epoch``, ``state_dicts``,
    ``load_states``, ``finish``, ``close``, ``nets``, ``sgs``."""

    def __init__(self, nets, sgs, data, device, *, batch_size, seed, inflight, epochs, settings,
                 threads=1, on_started=None, timeout=300.0,
                 heartbeat_timeout=runtime.DEFAULT_TIMEOUT, start_timeout=120.0):
        self.count = len(nets)
        self.nets = [net.cpu() for net in nets]
        self.sgs = [sg.cpu() for sg in sgs]
        self.eval_device = torch.device("cpu")
        self.x, self.y = data.train_x.cpu(), data.train_y.cpu()
        self.batch_size, self.seed, self.inflight = batch_size, seed, inflight
        self.batches = len(batch_order(self.x.shape[0], batch_size, seed, 0))
        self.epochs, self.settings, self.threads = epochs, settings, threads
        self.devices = stage_devices(device, self.count)
        self.on_started, self.timeout = on_started, timeout
        self.heartbeats = runtime.Heartbeats(self.count)
        self.heartbeat_timeout, self.start_timeout = heartbeat_timeout, start_timeout
        self.procs, self.ctrl, self.pids = [], [], []
        self.init_states = [None] * self.count
        self.inbuf = None
        self.cuts = []
        self._started = False

    # -- protocol

    def load_states(self, states):
        """Runner states (from a checkpoint) the stages start from."""
        self.init_states = [_blob(s) for s in states]
        for net, sg, s in zip(self.nets, self.sgs + [None], states):
            net.load_state_dict(s["net"])
            if sg is not None:
                sg.load_state_dict(s["sg"])

    def start(self):
        if self._started:
            return
        self._started = True
        ctx = tmp.get_context("spawn")
        with fd_sharing():
            self._allocate()
            links = [ctx.Pipe(duplex=True) for _ in range(self.count - 1)]
            child_ends = []
            for k in range(self.count):
                parent_end, child_end = ctx.Pipe(duplex=True)
                self.ctrl.append(parent_end)
                up = links[k - 1][1] if k > 0 else None
                down = links[k][0] if k < self.count - 1 else None
                spec = {
                    "index": k, "count": self.count, "inflight": self.inflight,
                    "batches": self.batches, "batch_size": self.batch_size, "seed": self.seed,
                    "device": self.devices[k], "epochs": self.epochs,
                    "settings": self.settings, "threads": self.threads,
                    "state": self.init_states[k], "heartbeats": self.heartbeats,
                }
                inbuf = self.inbuf if k == 0 else self.cuts[k - 1]
                outbuf = self.cuts[k] if k < self.count - 1 else None
                sg = self.sgs[k] if k < self.count - 1 else None
                proc = ctx.Process(
                    target=_stage_main, name=f"sg-stage-{k}", daemon=True,
                    args=(spec, self.nets[k], sg, child_end, up, down, inbuf, outbuf))
                self.procs.append(proc)
                child_ends.append(child_end)
            for proc in self.procs:
                proc.start()
        # The children hold their own ends now; closing ours makes a dead
        # neighbour's pipe read as EOF.
        for conn in child_ends:
            conn.close()
        for a, b in links:
            a.close()
            b.close()
        replies = self._collect("ready", range(self.count), limit=self.start_timeout)
        self.pids = [replies[k][2] for k in range(self.count)]
        if self.on_started is not None:
            self.on_started(list(self.pids))

    def _allocate(self):
        b = self.batch_size
        self.inbuf = {"x": self.x.clone().share_memory_(), "y": self.y.clone().share_memory_()}
        for net in self.nets:
            net.share_memory()
        for sg in self.sgs:
            sg.share_memory()
        self.cuts = []
        for sg in self.sgs:
            shape = (self.inflight, sg.parts, b, *sg.state_shape)
            dtype = next(sg.parameters()).dtype
            self.cuts.append({
                "state": torch.zeros(shape, dtype=dtype).share_memory_(),
                "grad": torch.zeros(shape, dtype=dtype).share_memory_(),
                "labels": torch.zeros((self.inflight, b), dtype=torch.int64).share_memory_(),
            })

    def run_epoch(self, epoch):
        nb = self.batches
        start = time.perf_counter()
        done = 0
        last_progress = time.monotonic()
        self._send(0, ("epoch", epoch))
        while done < nb:
            for k, msg in self._poll():
                last_progress = time.monotonic()
                if msg[0] == "done":
                    done += msg[2]
                else:
                    raise stage_error(f"synthetic-gradient pipeline: unexpected message {msg!r} "
                                      f"from stage {k}", k)
            self._check_stall(last_progress)
        for k in range(self.count):
            self._send(k, ("sync", epoch))
        replies = self._collect("synced", range(self.count))
        seconds = time.perf_counter() - start
        return seconds, [replies[k][2] for k in range(self.count)]

    def state_dicts(self):
        for k in range(self.count):
            self._send(k, ("state",))
        replies = self._collect("state", range(self.count))
        return [_unblob(replies[k][2]) for k in range(self.count)]

    def finish(self):
        for k in range(self.count):
            self._send(k, ("finish",))
        self._collect("finished", range(self.count))
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))

    def close(self):
        """Terminate and reap every stage still running; close the pipes."""
        runtime.reap(self.procs, grace=0.0)
        for conn in self.ctrl:
            conn.close()
        self.ctrl = []
        self.inbuf, self.cuts = None, []

    # -- talking and waiting

    def _send(self, k, msg):
        """A command to stage ``k``; a stage that has gone (its pipe is broken)
        becomes the :class:`StageError` naming the root cause."""
        try:
            self.ctrl[k].send(msg)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            raise self._failure(k) from None

    def _check_stall(self, last_progress, limit=None):
        self.heartbeats.check(range(len(self.procs)), self.heartbeat_timeout,
                              lambda k: f"synthetic-gradient stage {k} (pid {self.procs[k].pid})",
                              [p.pid for p in self.procs])
        limit = self.timeout if limit is None else limit
        if time.monotonic() - last_progress > limit:
            raise stage_error(
                f"synthetic-gradient pipeline: no progress for {limit:.0f} s "
                f"(stages alive: {[p.is_alive() for p in self.procs]})")

    def _poll(self):
        """Messages ready within one poll interval; raises on a failed stage."""
        sentinels = {p.sentinel: k for k, p in enumerate(self.procs)}
        ready = connection.wait(list(self.ctrl) + list(sentinels), timeout=POLL_SECONDS)
        out = []
        failed = None
        for obj in ready:
            if obj in sentinels:
                failed = sentinels[obj] if failed is None else failed
                continue
            k = self.ctrl.index(obj)
            while True:
                try:
                    if not obj.poll():
                        break
                    msg = obj.recv()
                except (EOFError, OSError):
                    failed = k if failed is None else failed
                    break
                if msg[0] == "error":
                    raise self._failure(k, msg)
                out.append((k, msg))
        if failed is not None:
            raise self._failure(failed)
        return out

    def _collect(self, kind, stages, limit=None):
        want = set(stages)
        replies = {}
        last_progress = time.monotonic()
        while want:
            for k, msg in self._poll():
                last_progress = time.monotonic()
                if msg[0] == kind and k in want:
                    replies[k] = msg
                    want.discard(k)
                elif msg[0] != "done":
                    raise stage_error(f"synthetic-gradient pipeline: unexpected message {msg[0]!r} "
                                      f"from stage {k} while waiting for {kind!r}", k)
            self._check_stall(last_progress, limit)
        return replies

    def _failure(self, k, msg=None):
        """The error that names the root cause: an exception a stage reported,
        else a stage that died (not one that quit because a neighbour died)."""
        time.sleep(0.2)  # let a neighbour's death and the reports land
        reports = {}
        if msg is not None:
            reports[k] = msg
        for j, conn in enumerate(self.ctrl):
            try:
                while conn.poll():
                    m = conn.recv()
                    if m[0] == "error":
                        reports.setdefault(j, m)
            except (EOFError, OSError):
                pass
        for proc in self.procs:
            proc.join(0.3)
        if reports:
            j = min(reports)
            _, _, what, tb = reports[j]
            return stage_error(
                f"synthetic-gradient stage {j} (pid {self.pids[j] if j < len(self.pids) else '?'})"
                f" raised {what}\n--- traceback of stage {j} ---\n{tb}", j)
        dead = [(j, p.exitcode) for j, p in enumerate(self.procs) if p.exitcode is not None]
        roots = [(j, c) for j, c in dead if c not in (0, EXIT_PEER_LOST)]
        j, code = (roots or dead or [(k, self.procs[k].exitcode)])[0]
        if code is not None and code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        elif code == EXIT_PEER_LOST:
            how = "lost a neighbouring stage"
        else:
            how = f"exited unexpectedly with code {code}"
        pid = self.procs[j].pid
        return stage_error(f"synthetic-gradient stage {j} (pid {pid}) {how}; the pipeline was "
                           "stopped and its other stages terminated", j)
