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
train ...``), inside an initialised process group (:func:`train_ddp`), or from
an ordinary process (:func:`launch`; ``stablenets train --backend dist
--workers W``), which writes the model, data and settings into a private run
folder and runs ``W`` local torchrun ranks of this module on the shared
runtime (:mod:`..runtime.torchrun`): every rank beats, dies with the launcher
(even kill -9), and a rank's own error reaches the caller as its one line; a
rank silent for ``heartbeat_timeout`` s is named. Only rank 0 prints and
writes checkpoints."""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import torch.distributed as dist

from ..runtime import DEFAULT_TIMEOUT, WorkerError, torchrun
from . import engine as backprop

START_TIMEOUT = 180.0


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


def check_batch(batch_size, world) -> None:
    if batch_size < world:
        raise ValueError(f"batch_size: data-parallel training over {world} ranks needs "
                         f"batches of at least {world}, got {batch_size}")


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
        check_batch(train_kwargs.get("batch_size", 1), world)
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


# ------------------------------------------------------------ the launcher


def _cpu_state(state):
    return {k: v.detach().cpu() for k, v in state.items()}


def launch(model, data, *, workers=2, threads=None, heartbeat_timeout=DEFAULT_TIMEOUT,
           start_timeout=START_TIMEOUT, **train_kwargs) -> dict:
    """Train ``model`` (in place) as ``workers`` local torchrun ranks started
    from this ordinary process; returns rank 0's summary. ``threads``: torch
    threads per rank (default: this process's, shared out). Failures raise
    :class:`~..runtime.WorkerError` naming the rank: its own one-line error, a
    rank that died, or one silent for ``heartbeat_timeout`` seconds (None:
    never). ``start_timeout`` bounds the start-up only: once every rank has
    beaten, a run may last as long as it needs."""
    check_batch(train_kwargs.get("batch_size", 1), workers)
    threads = threads or max(1, torch.get_num_threads() // workers)
    device = train_kwargs.pop("device", None)
    train_kwargs["quiet"] = True  # ranks have no terminal; the caller reports

    def prepare(folder):
        spec = os.path.join(folder, "spec.pt")
        torch.save({"model_config": model.config(), "model_state": _cpu_state(model.state_dict()),
                    "data": data.to("cpu"), "threads": threads,
                    "device": None if device is None else str(device),
                    "kwargs": train_kwargs}, spec)
        return ["--spec", spec, "--result", os.path.join(folder, "result.pt")]

    def collect(folder):
        path = os.path.join(folder, "result.pt")
        if not os.path.exists(path):
            raise WorkerError("DDP run: torchrun exited 0 but rank 0 wrote no result")
        return torch.load(path, weights_only=False)

    out = torchrun.launch("stablenets_ext.training.backprop.ddp", [], workers, threads=threads,
                          name="ddp", prepare=prepare, collect=collect,
                          heartbeat_timeout=heartbeat_timeout, start_timeout=start_timeout,
                          what=lambda r: f"DDP rank {r}")
    model.load_state_dict(out["model_state"])
    return out["result"]


def _run_spec(spec_path, result_path) -> None:
    from ...models import StableNet

    spec = torch.load(spec_path, weights_only=False)
    torch.set_num_threads(max(1, int(spec["threads"])))
    model = StableNet.from_config(spec["model_config"])
    model.load_state_dict(spec["model_state"])
    result = train_ddp(model, spec["data"], device=spec["device"], **spec["kwargs"])
    if result["rank"] == 0:
        torch.save({"result": result, "model_state": _cpu_state(model.state_dict())},
                   result_path)


def main(argv=None) -> int:
    """A rank started by :func:`launch` (``--spec``/``--result`` in its run folder)."""
    p = argparse.ArgumentParser(prog="stablenets_ext.training.backprop.ddp")
    p.add_argument("--spec", required=True)
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)
    if not torchrun.under_torchrun():
        print("backprop.ddp: started by backprop.ddp.launch under torchrun, not by hand; by hand "
              "run `torchrun --nproc-per-node 2 -m stablenets_ext train --backend dist ...`",
              file=sys.stderr)
        return 2
    torchrun.rank_setup()
    with torchrun.reporting_errors():
        _run_spec(args.spec, args.result)
    return 0


if __name__ == "__main__":
    torchrun.exit_rank(main())
