"""One PVD worker's work: its share of the direction, and its block subproblem.

Worker ``l`` owns block ``l``. At iteration ``k``, given the current point ``x``
and the direction ``d`` (both flat vectors, see :mod:`.blocks`), it solves

    min over (y_l, mu)   f( x_1 + mu_1 d_1, ..., y_l, ..., x_P + mu_P d_P )

starting from ``y_l = x_l`` and ``mu = 0``, with Adam for a fixed number of
mini-batches. The ``mu_m d_m`` ("forget-me-not") terms let every other block
move along its part of the direction, so the worker's result is a point of the
whole space, not just of its block (Ferris & Mangasarian 1994; Solodov 1997).

The worker writes ``y_l`` into its range of the shared ``proposal`` vector and
its ``mu`` into row ``l`` of the shared ``mu`` matrix; the candidate point is
rebuilt from those by :func:`candidate` wherever it is needed, so nothing of
size ``numel`` is ever sent through a pipe.

The same class runs inside a worker process (process backend), inline one
block after another (sequential backend) and on each rank (dist backend).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .. import amp as _amp
from .blocks import BlockPartition


@dataclass
class PVDConfig:
    workers: int = 2
    sync: str = "hull"  # "best" | "hull"
    iterations: int = 20
    inner_epochs: float = 3.0
    inner_batches: int | None = None  # overrides inner_epochs when set
    direction_batches: int = 8
    batch_size: int = 64
    lr: float = 1e-2
    mu_lr: float | None = None  # default: lr
    sync_batch: int = 1024
    hull_steps: int = 10
    normalize_direction: bool = True
    persistent_adam: bool = True
    target_accuracy: float | None = None
    seed: int = 0
    threads: int | None = None  # per worker; default max(1, cores // workers)
    amp: str | None = None  # "bf16"/"fp16": the direction and subproblem steps under autocast
    fault: tuple | None = field(default=None, repr=False)  # tests: (kind, worker, iteration)

    def check(self):
        _amp.check_mode(self.amp)
        if self.sync not in ("best", "hull"):
            raise ValueError(f"sync: expected 'best' or 'hull', got {self.sync!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers: expected a positive int, got {self.workers!r}")
        for name in ("iterations", "direction_batches", "batch_size", "sync_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.hull_steps < 0:
            raise ValueError(f"hull_steps: expected an int >= 0, got {self.hull_steps!r}")
        if self.inner_batches is None and not (self.inner_epochs > 0):
            raise ValueError(f"inner_epochs: expected a positive number, got {self.inner_epochs!r}")
        if self.inner_batches is not None and self.inner_batches < 1:
            raise ValueError(f"inner_batches: expected a positive int, got {self.inner_batches!r}")
        for name in ("lr", "mu_lr"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name}: expected a finite positive number, got {v!r}")
        return self

    def inner_steps(self, n_train: int) -> int:
        if self.inner_batches is not None:
            return self.inner_batches
        return max(1, math.ceil(self.inner_epochs * n_train / self.batch_size))

    def worker_threads(self) -> int:
        if self.threads is not None:
            return max(1, int(self.threads))
        return max(1, (os.cpu_count() or 1) // self.workers)


def seed_for(seed: int, *parts: int) -> int:
    """A reproducible 63-bit seed from the run seed and (iteration, worker, tag)."""
    h = seed & 0xFFFFFFFF
    for p in parts:
        h = (h * 6364136223846793005 + p + 1442695040888963407) & 0x7FFFFFFFFFFFFFFF
    return h


TAG_DIRECTION, TAG_SOLVE, TAG_SYNC = 1, 2, 3


def direction_batches(cfg: PVDConfig, n_train: int, iteration: int) -> list[torch.Tensor]:
    """The index batches the direction is computed on at this iteration (same on every worker)."""
    gen = torch.Generator().manual_seed(seed_for(cfg.seed, iteration, 0, TAG_DIRECTION))
    perm = torch.randperm(n_train, generator=gen)
    count = min(cfg.direction_batches, math.ceil(n_train / cfg.batch_size))
    return [perm[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(count)]


def sync_indices(cfg: PVDConfig, n_val: int, iteration: int, device=None) -> torch.Tensor | None:
    """The validation examples the synchronisation is judged on (None: all of them)."""
    if cfg.sync_batch >= n_val:
        return None
    gen = torch.Generator().manual_seed(seed_for(cfg.seed, iteration, 0, TAG_SYNC))
    return torch.randperm(n_val, generator=gen)[:cfg.sync_batch].to(device)


def make_direction(shared: "SharedState", partition: BlockPartition, count: int, normalize: bool):
    """``d = -(sum of the workers' gradient sums) / examples``, each block scaled to
    unit RMS when ``normalize`` (so that a multiplier step of size lr moves its
    block about as far as an Adam step of size lr moves a weight)."""
    with torch.no_grad():
        d = torch.sum(shared.grads, 0).div_(-max(count, 1))
        if normalize:
            for m in range(partition.blocks):
                blk = partition.block(d, m)
                rms = blk.pow(2).mean().sqrt()
                if rms > 0:
                    blk.div_(rms)
        shared.d.copy_(d)


class Net:
    """The model as a function of a flat parameter vector."""

    def __init__(self, module, buffers: dict, partition: BlockPartition):
        self.module, self.buffers, self.partition = module, buffers, partition

    def __call__(self, flat: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        params = self.partition.unflatten(flat)
        if self.buffers:
            params = {**params, **self.buffers}
        return functional_call(self.module, params, (inputs,))

    def loss(self, flat, inputs, targets, reduction="mean"):
        return F.cross_entropy(self(flat, inputs), targets, reduction=reduction)

    @torch.no_grad()
    def evaluate(self, flat, inputs, targets, batch=4096) -> tuple[float, float]:
        """(mean cross-entropy, accuracy) over all of ``inputs``."""
        total, correct = 0.0, 0
        for i in range(0, inputs.shape[0], batch):
            logits = self(flat, inputs[i:i + batch])
            t = targets[i:i + batch]
            total += F.cross_entropy(logits, t, reduction="sum").item()
            correct += (logits.argmax(1) == t).sum().item()
        n = max(1, inputs.shape[0])
        return total / n, correct / n


def candidate(partition: BlockPartition, x, d, proposal, mu_row, l: int) -> torch.Tensor:
    """Worker ``l``'s point: its own block from ``proposal``, every other block
    ``x_m + mu_row[m] d_m``. Same operations as inside :meth:`BlockSolver.solve`."""
    parts = []
    for m in range(partition.blocks):
        if m == l:
            parts.append(partition.block(proposal, m))
        else:
            parts.append(partition.block(x, m) + mu_row[m] * partition.block(d, m))
    return torch.cat(parts)


@dataclass
class SharedState:
    """The vectors every worker reads and writes (shared memory, or per rank for dist).

    ``x``: the current point; ``d``: the direction; ``proposal``: the workers'
    blocks side by side (their ranges do not overlap); ``grads[l]``: worker l's
    summed gradient on its direction batches; ``mu[l]``: worker l's multipliers
    (``mu[l, l] = 0``)."""

    x: torch.Tensor
    d: torch.Tensor
    proposal: torch.Tensor
    grads: torch.Tensor
    mu: torch.Tensor

    @classmethod
    def allocate(cls, numel: int, workers: int, dtype, device, share: bool):
        def make(*shape):
            t = torch.zeros(*shape, dtype=dtype, device=device)
            return t.share_memory_() if share and t.device.type == "cpu" else t

        return cls(make(numel), make(numel), make(numel), make(workers, numel), make(workers, workers))


class Adam:
    """Adam (Kingma & Ba), the arithmetic of ``torch.optim.Adam`` with default
    betas and eps. Written out because the first ``torch.optim`` optimiser a
    process builds imports ``torch._dynamo`` (over a second of CPU per worker
    start, measured here), and a worker needs nothing else from it."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.reset()

    def reset(self):
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        c1 = 1 - b1 ** self.t
        c2 = math.sqrt(1 - b2 ** self.t)
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.addcdiv_(m, (v.sqrt() / c2).add_(self.eps), value=-self.lr / c1)


class WorkerFault(RuntimeError):
    """Raised on purpose by the fault-injection hook the tests use."""


class BlockSolver:
    """Worker ``index``: see the module docstring."""

    def __init__(self, index: int, net: Net, shared: SharedState, train, val, cfg: PVDConfig):
        self.index, self.net, self.shared, self.cfg = index, net, shared, cfg
        self.partition = net.partition
        self.train_x, self.train_y = train
        self.val_x, self.val_y = val
        lo, hi = self.partition.ranges[index]
        x = shared.x
        self.y = torch.zeros(hi - lo, dtype=x.dtype, device=x.device, requires_grad=True)
        self.mu = torch.zeros(self.partition.blocks, dtype=x.dtype, device=x.device, requires_grad=True)
        self.opt_y = Adam([self.y], lr=cfg.lr)
        self.opt_mu = Adam([self.mu], lr=cfg.mu_lr or cfg.lr)
        # Mixed precision: the forwards of the direction and of the subproblem
        # steps run under autocast; the flat point, y, mu and Adam's moments stay
        # float32, and so do the candidate's synchronisation loss (below) and the
        # coordinator's synchronisation and evaluation (their losses are compared
        # and line-searched, where bfloat16's rounding would pick by noise).
        # fp16: the worker's own loss scale (..amp.LossScale); a subproblem step
        # whose gradients overflow is skipped, and the direction's gradient sum is
        # recomputed at a lower scale until it is finite (it is written unscaled).
        self.amp = _amp.Amp(cfg.amp, x.device, manual_scale=True)

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """What a resumed run needs from this worker: its block's Adam moments
        (``y`` and ``mu`` restart from ``x`` and 0 at every iteration anyway).
        Numpy arrays, so that it travels through a pipe by value."""
        opt, ls = self.opt_y, self.amp.loss_scale
        return {"t": opt.t, "m": [m.detach().cpu().numpy().copy() for m in opt.m],
                "v": [v.detach().cpu().numpy().copy() for v in opt.v],
                **({"loss_scale": ls.state_dict()} if ls is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        opt = self.opt_y
        if len(state["m"]) != len(opt.m) or any(a.shape != tuple(m.shape)
                                                for a, m in zip(state["m"], opt.m)):
            raise ValueError(f"worker {self.index}: the checkpoint's optimiser state does not "
                             "fit this block")
        opt.t = int(state["t"])
        if self.amp.loss_scale is not None:
            self.amp.loss_scale.load_state_dict(state.get("loss_scale"))
        with torch.no_grad():
            for dst, src in zip(opt.m + opt.v, list(state["m"]) + list(state["v"])):
                dst.copy_(torch.as_tensor(src))

    # ------------------------------------------------------------ direction

    def gradient(self, iteration: int) -> int:
        """Sum of the loss gradients over this worker's share of the direction
        batches, written to ``shared.grads[index]``; returns the example count."""
        P = self.partition.blocks
        batches = direction_batches(self.cfg, self.train_x.shape[0], iteration)[self.index::P]
        ls = self.amp.loss_scale
        while True:
            flat = self.shared.x.detach().clone().requires_grad_(True)
            scale = ls.scale if ls is not None else 1.0
            count = 0
            for idx in batches:
                idx = idx.to(self.train_x.device)
                with self.amp.autocast():
                    loss = self.net.loss(flat, self.train_x[idx], self.train_y[idx],
                                         reduction="sum")
                (loss * scale if ls is not None else loss).backward()
                count += idx.numel()
            if ls is None or ls.all_finite([flat.grad]):
                break
            ls.update(False)  # fp16 overflow: again at half the scale
            if ls.scale < 1.0:
                raise FloatingPointError(
                    f"worker {self.index}: amp fp16: the direction's gradient is not finite "
                    f"even unscaled (iteration {iteration}); the run diverged or float16's "
                    "range is too narrow for it: use --amp bf16")
        with torch.no_grad():
            if flat.grad is None:
                self.shared.grads[self.index].zero_()
            else:
                self.shared.grads[self.index].copy_(flat.grad)
                if ls is not None:
                    self.shared.grads[self.index].div_(scale)
        if flat.device.type == "cuda":  # the coordinator reads it once we reply
            torch.cuda.synchronize(flat.device)
        return count

    # ----------------------------------------------------------- subproblem

    def solve(self, iteration: int, heartbeat=None) -> dict:
        """Optimise (y_l, mu) from (x_l, 0); write them to the shared state and
        return the candidate's loss on this iteration's synchronisation batch."""
        t0, c0 = time.perf_counter(), time.process_time()
        cfg, part, sh, l = self.cfg, self.partition, self.shared, self.index
        P = part.blocks
        with torch.no_grad():
            self.y.copy_(part.block(sh.x, l))
            self.mu.zero_()
        if not cfg.persistent_adam:
            self.opt_y.reset()
        self.opt_mu.reset()  # mu starts again from 0 along a new direction
        opt_mu = self.opt_mu
        xs = [part.block(sh.x, m) for m in range(P)]
        ds = [part.block(sh.d, m) for m in range(P)]
        n = self.train_x.shape[0]
        gen = torch.Generator().manual_seed(seed_for(cfg.seed, iteration, l, TAG_SOLVE))
        steps = cfg.inner_steps(n)
        perm, pos = torch.randperm(n, generator=gen), 0
        last_beat = time.monotonic()
        loss_sum = torch.zeros((), dtype=torch.float64, device=sh.x.device)  # no per-step sync
        for step in range(steps):
            if step == steps // 2:
                self._maybe_fail(iteration)
            if pos >= n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + cfg.batch_size].to(self.train_x.device)
            pos += cfg.batch_size
            parts = [self.y if m == l else xs[m] + self.mu[m] * ds[m] for m in range(P)]
            with self.amp.autocast():
                loss = self.net.loss(torch.cat(parts), self.train_x[idx], self.train_y[idx])
            self.opt_y.zero_grad()
            opt_mu.zero_grad()
            ls = self.amp.loss_scale
            (loss * ls.scale if ls is not None else loss).backward()
            if self.mu.grad is not None:  # None with one block: no other block to move
                self.mu.grad[l] = 0  # mu_l does not exist: block l moves freely
            loss_sum += loss.detach()
            finite = True
            if ls is not None:  # fp16: unscale, or skip a step that overflowed
                grads = [t.grad for t in (self.y, self.mu) if t.grad is not None]
                scale = ls.scale
                finite = ls.all_finite(grads)
                ls.update(finite)
                if finite:
                    torch._foreach_div_(grads, scale)
            if finite:
                self.opt_y.step()
                opt_mu.step()
            if heartbeat is not None and time.monotonic() - last_beat > 0.5:
                heartbeat()
                last_beat = time.monotonic()
        with torch.no_grad():
            self.mu[l] = 0
            part.block(sh.proposal, l).copy_(self.y)
            sh.mu[l].copy_(self.mu)
            flat = candidate(part, sh.x, sh.d, sh.proposal, sh.mu[l], l)
            vi = sync_indices(cfg, self.val_x.shape[0], iteration, self.val_x.device)
            vx, vy = (self.val_x, self.val_y) if vi is None else (self.val_x[vi], self.val_y[vi])
            sync_loss = self.net.loss(flat, vx, vy).item()
        if sh.x.device.type == "cuda":
            torch.cuda.synchronize(sh.x.device)
        return {
            "worker": l,
            "sync_loss": sync_loss,
            "train_loss": loss_sum.item() / steps,
            "steps": steps,
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "mu": [float(v) for v in self.mu.detach().cpu()],
        }

    # -------------------------------------------------------------- testing

    def _maybe_fail(self, iteration: int):
        """The tests' fault injection, halfway through a subproblem."""
        fault = self.cfg.fault
        if not fault:
            return
        kind, worker, at = fault
        if worker != self.index or at != iteration:
            return
        if kind == "raise":
            raise WorkerFault(f"injected fault in worker {worker} at iteration {iteration}")
        if kind == "exit":
            os._exit(3)
