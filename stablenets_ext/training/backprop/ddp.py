"""Data-parallel backprop with ``DistributedDataParallel``.

Every rank holds the whole model and the whole dataset, draws the same batch
order from ``(seed, epoch)`` and computes its contiguous slice of every batch;
DDP all-reduces the gradients (the fused ops' parameter gradients included:
they are ordinary autograd leaves' gradients), and every rank then takes the
same Adam step. The local loss is ``sum of the slice's cross-entropies * world
/ batch``, so the averaged gradient is exactly the whole batch's mean: a run on
``W`` ranks equals the single-process run on the same global batch up to the
order of floating-point sums. gloo on the CPU, NCCL when every rank has a GPU.

Launch: under ``torchrun`` (``torchrun --nproc-per-node 2 -m stablenets_ext
train ...``), inside an initialised process group, or ``stablenets train
--backend dist --workers W``, which runs torchrun itself
(:mod:`.runtime.torchrun`). Only rank 0 prints and writes checkpoints."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from . import engine as backprop


class Shard:
    """This rank's part of every batch, and the epoch totals."""

    def __init__(self, forward, rank: int, world: int, comm_device):
        self.forward, self.rank, self.world, self.comm = forward, rank, world, comm_device

    def slice(self, xb, yb):
        """``(inputs, labels, scale)``; ``scale`` 0 for a rank whose slice of a
        short last batch is empty (it still runs one example, weighted 0, so
        that DDP's all-reduce sees every rank)."""
        n = yb.shape[0]
        lo, hi = (n * self.rank) // self.world, (n * (self.rank + 1)) // self.world
        if hi == lo:
            return xb[:1], yb[:1], 0.0
        return xb[lo:hi], yb[lo:hi], self.world / n

    def total(self, loss_sum, correct):
        t = torch.stack([loss_sum.double(), correct.double()]).to(self.comm)
        dist.all_reduce(t)
        t = t.to(loss_sum.device)
        return t[0].to(loss_sum.dtype), t[1].round().long()


def rank_device(device) -> tuple[torch.device, str]:
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and dist.is_nccl_available():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank() if dist.is_initialized() else 0))
        return torch.device("cuda", local % torch.cuda.device_count()), "nccl"
    return device, "gloo"


def train_ddp(model, data, *, init_method=None, rank=None, world=None, timeout=300.0,
              **train_kwargs) -> dict:
    """Train ``model`` in place as one rank of a data-parallel run; every rank
    returns the summary (same numbers on every rank). Uses the current process
    group, else creates one (``init_method``, ``rank``, ``world``; default the
    torchrun environment) and destroys it at the end."""
    own = not dist.is_initialized()
    device, backend = rank_device(train_kwargs.pop("device", None))
    if own:
        if backend == "nccl":
            torch.cuda.set_device(device)
        kw = {} if rank is None else {"rank": rank, "world_size": world}
        dist.init_process_group(backend, init_method=init_method or "env://",
                                timeout=datetime.timedelta(seconds=timeout), **kw)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if train_kwargs.get("batch_size", 1) < world:
            raise ValueError(f"batch_size: data-parallel training over {world} ranks needs "
                             f"batches of at least {world}, got {train_kwargs.get('batch_size')}")
        model.to(device)
        # Every rank starts from rank 0's parameters, whatever its own RNG did.
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                buf = t.detach().clone()
                dist.broadcast(buf, 0)
                t.copy_(buf)
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
        comm = device if backend == "nccl" else torch.device("cpu")
        shard = Shard(ddp, rank, world, comm)
        quiet = train_kwargs.pop("quiet", False) or rank != 0
        result = backprop.train(model, data, device=device, quiet=quiet, shard=shard,
                                **train_kwargs)
        result.update(workers=world, dist_backend=backend, rank=rank)
        # Every rank gets here before any tears the group down: destroying a gloo
        # group while a peer still has traffic in flight can abort the process
        # ("terminate called without an active exception").
        dist.barrier()
        return result
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()
