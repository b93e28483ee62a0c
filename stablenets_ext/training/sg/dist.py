"""The synthetic-gradient pipeline over torch.distributed: one rank per stage.

Ranks hand cut states forward and gradients back with point-to-point sends
(``isend`` from ``inflight`` preallocated buffers per direction, blocking
``recv`` into preallocated buffers): gloo on CPU, NCCL when every rank has a
GPU of its own (several ranks sharing one GPU compute on it and talk through
gloo). The schedule is that of :mod:`.stages`, so a run equals the
in-process trainer with the same ``inflight``. Every rank holds the data and
draws the same batches from ``(seed, epoch)``, so only cut states and
gradients travel. Rank 0 is stage 0 and the coordinator: it broadcasts a
command before every epoch (train epoch ``e``, send your state, finish),
gathers the stages' statistics and parameters after it, evaluates, keeps the
history and writes checkpoints.

Entry points:

- ``torchrun --nproc-per-node M -m stablenets_ext.cli.sg_dist
  [stablenets train options]``: the ``stablenets train`` command line with
  ``--trainer sg --backend dist`` implied; rank 0 prints (``--json``: one line).
  That entry point lives in :mod:`stablenets_ext.cli.sg_dist`, beside the CLI;
  this module's own ``__main__`` only runs the ranks :func:`launch` starts
  (``--spec``/``--result``);
- ``train_sg(..., backend="dist")`` and ``stablenets train --trainer sg
  --backend dist`` outside torchrun: :func:`launch` writes the model, data and
  settings to a file, runs torchrun with ``M`` local ranks on 127.0.0.1 and a
  free port, and reads the result back. A rank that fails makes torchrun stop
  the others; :func:`launch` raises :class:`~..runtime.StageError` with
  torchrun's report, which names the failed rank (= stage).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

from ... import models
from .. import runtime
from ..runtime import StageError, torchrun
from ..runtime.torchrun import under_torchrun
from .epochs import epoch_loop, new_history
from .stages import (
    StageRunner,
    batch_order,
    merge_stages,
    split_model,
)

CMD_EPOCH, CMD_STATE, CMD_FINISH = 1, 2, 3
TAG_FWD, TAG_GRAD, TAG_PARAMS = 11, 12, 13


# --------------------------------------------------------------- the rank


class DistStage:
    """This rank's stage: its runner and the point-to-point transport."""

    def __init__(self, runner: StageRunner, sg_shape, parts, comm_device, device, inflight,
                 batch_size, dtype):
        self.runner, self.k = runner, runner.index
        self.world = runner.net.count
        self.parts, self.shape = parts, tuple(sg_shape) if sg_shape is not None else None
        self.comm, self.device = comm_device, device
        self.inflight, self.batch_size, self.dtype = inflight, batch_size, dtype
        self.send_fwd = self.send_grad = None
        self.reqs_fwd = [None] * inflight
        self.reqs_grad = [None] * inflight
        self.in_shape = None

    def _buffers(self, shape):
        return [torch.zeros((self.batch_size, *shape), dtype=self.dtype, device=self.comm)
                for _ in range(self.inflight)]

    @staticmethod
    def _isend(bufs, reqs, slot, tensors, dst, tag):
        if reqs[slot] is not None:
            reqs[slot].wait()
        n = tensors[0].shape[0]
        buf = bufs[slot][:n]
        for i, t in enumerate(tensors):
            buf[:, i].copy_(t)
        reqs[slot] = dist.isend(buf, dst, tag=tag)

    def _recv(self, n, src, tag):
        buf = torch.empty((n, self.in_parts, *self.in_shape), dtype=self.dtype, device=self.comm)
        dist.recv(buf, src, tag=tag)
        return tuple(buf[:, i].to(self.device, copy=True).contiguous()
                     for i in range(self.in_parts))

    def _recv_grad(self, n):
        buf = torch.empty((n, self.parts, *self.shape), dtype=self.dtype, device=self.comm)
        dist.recv(buf, self.k + 1, tag=TAG_GRAD)
        return tuple(buf[:, i].to(self.device, copy=True).contiguous() for i in range(self.parts))

    def set_input(self, in_parts, in_shape):
        self.in_parts, self.in_shape = in_parts, tuple(in_shape)
        if self.k > 0:
            self.send_grad = self._buffers((in_parts, *in_shape))
        if not self.runner.last:
            self.send_fwd = self._buffers((self.parts, *self.shape))

    def learn_upto(self, upto):
        r = self.runner
        for s in list(r.pending):
            if upto is not None and s > upto:
                break
            n = r.pending[s][1].shape[0]
            r.learn(s, self._recv_grad(n))

    def epoch(self, epoch, x, y, seed):
        r = self.runner
        r.reset_stats()
        batches = batch_order(y.shape[0], self.batch_size, seed, epoch)
        t0 = epoch * len(batches)
        for i, idx in enumerate(batches):
            t, n = t0 + i, idx.shape[0]
            labels = y.index_select(0, idx).to(self.device)
            if r.first:
                inputs = (x.index_select(0, idx).to(self.device),)
            else:
                inputs = self._recv(n, self.k - 1, TAG_FWD)
            if not r.last:
                self.learn_upto(t - self.inflight)
            out = r.forward(t, inputs, labels)
            if not r.last:
                self._isend(self.send_fwd, self.reqs_fwd, t % self.inflight, out, self.k + 1,
                            TAG_FWD)
            grads = r.backward()
            if not r.first:
                self._isend(self.send_grad, self.reqs_grad, t % self.inflight, grads, self.k - 1,
                            TAG_GRAD)
        if not r.last:
            self.learn_upto(None)
        self.drain()
        stats = r.epoch_stats()
        r.end_epoch()
        return stats

    def drain(self):
        for reqs in (self.reqs_fwd, self.reqs_grad):
            for j, req in enumerate(reqs):
                if req is not None:
                    req.wait()
                    reqs[j] = None

    def flat_params(self):
        ps = [p.detach().reshape(-1) for m in (self.runner.net, self.runner.sg) if m is not None
              for p in m.parameters()]
        return torch.cat(ps).to(self.comm)


def _load_flat(modules, flat):
    with torch.no_grad():
        i = 0
        for m in modules:
            if m is None:
                continue
            for p in m.parameters():
                n = p.numel()
                p.copy_(flat[i:i + n].view_as(p))
                i += n


class DistEngine:
    """Rank 0's side of the engine protocol of :mod:`.trainer`."""

    def __init__(self, stage: DistStage, nets, sgs, x, y, seed, comm):
        self.stage, self.nets, self.sgs = stage, nets, sgs
        self.x, self.y, self.seed, self.comm = x, y, seed, comm
        self.eval_device = torch.device("cpu")
        self.world = len(nets)
        self.finished = False
        self.broken = False

    def start(self):
        pass

    def _command(self, cmd, arg=0):
        t = torch.tensor([cmd, arg], dtype=torch.int64, device=self.comm)
        dist.broadcast(t, 0)

    def run_epoch(self, epoch):
        self.broken = True  # until the epoch completes: a failed one leaves the ranks mid-way
        self._command(CMD_EPOCH, epoch)
        start = time.perf_counter()
        own = self.stage.epoch(epoch, self.x, self.y, self.seed)
        stats = [None] * self.world
        dist.gather_object(own, stats, dst=0)
        seconds = time.perf_counter() - start
        self._pull_params()
        self.broken = False
        return seconds, stats

    def _pull_params(self):
        mods = [(self.nets[k], self.sgs[k] if k < self.world - 1 else None)
                for k in range(self.world)]
        _load_flat(mods[0], self.stage.flat_params().cpu())
        for k in range(1, self.world):
            size = sum(p.numel() for m in mods[k] if m is not None for p in m.parameters())
            buf = torch.empty(size, dtype=self.stage.dtype, device=self.comm)
            dist.recv(buf, k, tag=TAG_PARAMS)
            _load_flat(mods[k], buf.cpu())

    def state_dicts(self):
        self._command(CMD_STATE)
        states = [None] * self.world
        dist.gather_object(_cpu_state(self.stage.runner.state_dict()), states, dst=0)
        return states

    def load_states(self, states):
        self.stage.runner.load_state_dict(states[0])
        for net, sg, s in zip(self.nets, self.sgs + [None], states):
            net.load_state_dict(s["net"])
            if sg is not None:
                sg.load_state_dict(s["sg"])

    def finish(self):
        if not self.finished:
            self.finished = True
            self._command(CMD_FINISH)

    def close(self):
        # Release the other ranks when the loop ended without finish() (a
        # checkpoint that had already stopped); after a failed epoch they are
        # left to torchrun, which stops them when this rank exits.
        if not self.broken:
            self.finish()


def _cpu_state(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_state(v) for v in obj)
    return obj


def _follow(stage: DistStage, x, y, seed, comm):
    """Ranks > 0: obey rank 0's commands until it says finish."""
    while True:
        t = torch.zeros(2, dtype=torch.int64, device=comm)
        dist.broadcast(t, 0)
        cmd, arg = t.tolist()
        if cmd == CMD_EPOCH:
            own = stage.epoch(arg, x, y, seed)
            dist.gather_object(own, None, dst=0)
            dist.send(stage.flat_params(), 0, tag=TAG_PARAMS)
        elif cmd == CMD_STATE:
            dist.gather_object(_cpu_state(stage.runner.state_dict()), None, dst=0)
        elif cmd == CMD_FINISH:
            return
        else:
            raise RuntimeError(f"synthetic-gradient rank {dist.get_rank()}: unknown command {cmd}")


def _rank_devices(device: torch.device, world: int, local_rank: int):
    """(compute device, communication device, backend) for this rank."""
    device = torch.device(device)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if n >= world:
            d = torch.device("cuda", local_rank % n)
            return d, d, "nccl"
        if device.index is None:
            device = torch.device("cuda", 0)
        return device, torch.device("cpu"), "gloo"
    return device, torch.device("cpu"), "gloo"


def run_rank(model, data, *, bounds, sgs, device, batch_size, seed, inflight, epochs, settings,
             threads, history, checkpoint, resume, target_accuracy, eval_batch_size, quiet,
             timeout=None, checkpoint_extra=None):
    """Train as this torchrun rank; rank 0 returns the summary (and has merged
    the trained parameters into ``model``), the others ``{"rank": r}``."""
    from .. import checkpoint as ckpt

    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world != len(bounds) - 1:
        raise ValueError(f"backend dist: {len(bounds) - 1} stages need {len(bounds) - 1} ranks, "
                         f"torchrun started {world}")
    torch.set_num_threads(threads)
    dev, comm, backend = _rank_devices(device, world, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout or 600))
    try:
        model = model.cpu()
        nets = split_model(model, bounds=bounds)
        sgs = [sg.cpu() for sg in sgs]
        # Every rank starts from rank 0's parameters, whatever its own RNG did.
        for m in nets + sgs:
            for p in m.parameters():
                buf = p.detach().to(comm).contiguous()
                dist.broadcast(buf, 0)
                with torch.no_grad():
                    p.copy_(buf.cpu())
        import copy

        net = copy.deepcopy(nets[rank]).to(dev)
        sg = copy.deepcopy(sgs[rank]).to(dev) if rank < world - 1 else None
        runner = StageRunner(net, sg, epochs=epochs, **settings)
        dtype = next(net.parameters()).dtype
        out_sg = sgs[rank] if rank < world - 1 else None
        stage = DistStage(runner, out_sg.state_shape if out_sg else None,
                          out_sg.parts if out_sg else None, comm, dev, inflight, batch_size, dtype)
        if rank > 0:
            stage.set_input(sgs[rank - 1].parts, sgs[rank - 1].state_shape)
        else:
            stage.set_input(1, tuple(data.train_x.shape[1:]))
        x, y = data.train_x.cpu(), data.train_y.cpu()
        resume_state = ckpt.load(resume) if resume is not None else None
        if rank > 0:
            if resume_state is not None and resume_state.get("phase") == "fine":
                runner.load_state_dict(resume_state["runners"][rank])
            _follow(stage, x, y, seed, comm)
            stage.drain()
            _quiesce()
            return {"rank": rank}
        engine = DistEngine(stage, nets, sgs, x, y, seed, comm)
        result = epoch_loop(
            engine, "fine", data, torch.device("cpu"), epochs, history, checkpoint=checkpoint,
            resume_state=resume_state, bounds=bounds, model=model,
            target_accuracy=target_accuracy, quiet=quiet, eval_batch_size=eval_batch_size,
            on_epoch=None, extra={"mode": "dist", "inflight": inflight, "workers": world,
                                  "threads": threads, "cores": threads * world,
                                  "dist_backend": backend},
            checkpoint_extra=checkpoint_extra)
        merge_stages(nets, model)
        result["sg_modules"] = sgs
        stage.drain()
        _quiesce()
        return result
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _quiesce():
    """Every rank reaches this after its last send has completed: tearing the gloo
    group down while a peer still has traffic in flight can abort the process
    ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------ the launcher


def launch(model, nets, sgs, data, device, *, batch_size, seed, inflight, epochs, settings, threads,
           history, checkpoint, resume, target_accuracy, eval_batch_size, quiet, timeout=None,
           heartbeat_timeout=runtime.DEFAULT_TIMEOUT, checkpoint_extra=None,
           start_timeout=120.0):
    """Run the dist backend from an ordinary process (see module doc)."""
    world = len(nets)
    bounds = [nets[0].lo] + [n.hi for n in nets]
    if under_torchrun():
        return run_rank(model, data, bounds=bounds, sgs=sgs, device=device,
                        batch_size=batch_size, seed=seed, inflight=inflight, epochs=epochs,
                        settings=settings, threads=threads, history=history,
                        checkpoint=checkpoint, resume=resume, target_accuracy=target_accuracy,
                        eval_batch_size=eval_batch_size, quiet=quiet, timeout=timeout,
                        checkpoint_extra=checkpoint_extra)

    def prepare(folder):
        spec_path = os.path.join(folder, "spec.pt")
        torch.save({
            "model_config": model.config(), "model_state": _cpu_state(model.state_dict()),
            "sg_config": [(sg.state_shape, sg.parts, sg.classes, sg.hidden) for sg in sgs],
            "sg_states": [_cpu_state(sg.state_dict()) for sg in sgs],
            "data": {"name": data.name, "train_x": data.train_x.cpu(),
                     "train_y": data.train_y.cpu(), "val_x": data.val_x.cpu(),
                     "val_y": data.val_y.cpu(), "features": data.features,
                     "classes": data.classes},
            "kwargs": dict(bounds=bounds, device=str(device), batch_size=batch_size, seed=seed,
                           inflight=inflight, epochs=epochs, settings=settings, threads=threads,
                           history=history, checkpoint=checkpoint, resume=resume,
                           target_accuracy=target_accuracy, eval_batch_size=eval_batch_size,
                           quiet=True, timeout=timeout, checkpoint_extra=checkpoint_extra),
        }, spec_path)
        return ["--spec", spec_path, "--result", os.path.join(folder, "result.pt")]

    def collect(folder):
        path = os.path.join(folder, "result.pt")
        if not os.path.exists(path):
            raise StageError("synthetic-gradient dist run: torchrun exited 0 but rank 0 wrote "
                             "no result")
        return torch.load(path, weights_only=False)

    out = torchrun.launch("stablenets_ext.training.sg.dist", [], world, threads=threads,
                          name="sg", prepare=prepare, collect=collect,
                          heartbeat_timeout=heartbeat_timeout, start_timeout=start_timeout,
                          error_type=StageError,
                          what=lambda r: f"synthetic-gradient stage {r}")
    model.load_state_dict(out["model_state"])
    for sg, state in zip(sgs, out["sg_states"]):
        sg.load_state_dict(state)
    result = out["result"]
    history.clear()
    history.update(result["history"])
    result["sg_modules"] = sgs
    return result


# ------------------------------------------------------------ entry points


def _main_spec(spec_path, result_path):
    from ...data import Dataset
    from .stages import SyntheticGradient

    spec = torch.load(spec_path, weights_only=False)
    model = models.StableNet.from_config(spec["model_config"])
    model.load_state_dict(spec["model_state"])
    sgs = []
    for (shape, parts, classes, hidden), state in zip(spec["sg_config"], spec["sg_states"]):
        sg = SyntheticGradient(shape, parts, classes, hidden)
        sg.load_state_dict(state)
        sgs.append(sg)
    d = spec["data"]
    data = Dataset(d["name"], d["train_x"], d["train_y"], d["val_x"], d["val_y"], d["features"],
                   d["classes"])
    kw = dict(spec["kwargs"])
    kw["device"] = torch.device(kw["device"])
    kw["history"] = kw["history"] if kw["history"] is not None else {}
    kw["history"] = new_history(kw["history"])
    result = run_rank(model, data, sgs=sgs, **kw)
    if int(os.environ["RANK"]) == 0:
        result = {k: v for k, v in result.items() if k not in ("sg_modules", "coarse")}
        torch.save({"result": result, "model_state": _cpu_state(model.state_dict()),
                    "sg_states": [_cpu_state(sg.state_dict()) for sg in sgs]},
                   result_path)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--spec")
    p.add_argument("--result")
    known, _ = p.parse_known_args(argv)
    if under_torchrun():
        torchrun.rank_setup()
    if known.spec:
        # a failure is one line in the run folder, which the launcher raises as this
        # stage's StageError (as the DDP ranks do), not a traceback in torchrun's log
        with torchrun.reporting_errors():
            _main_spec(known.spec, known.result)
        return 0
    # The command-line entry point moved beside the CLI (trainers never import it).
    print("stablenets_ext.training.sg.dist: this module runs the ranks that "
          "train_sg(backend='dist') starts (--spec/--result); for the command line use "
          "`torchrun --nproc-per-node 2 -m stablenets_ext.cli.sg_dist --dataset digits --json`",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    code = main()
    if under_torchrun():
        torchrun.exit_rank(code)
    sys.exit(code)
