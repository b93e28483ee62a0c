"""Synthetic-gradient (DNI) training: a network cut into ``M`` stages joined by
``M-1`` synthetic-gradient modules, each stage updating as soon as it has
produced its output (Jaderberg et al. 2016), as in the original research's
``ParallelNetworks.py``.

Three ways to run the same schedule (:mod:`.synthetic_stages` defines it):

- in-process (``workers=None``): every stage in this process, one after the
  other; exact and deterministic, the reference the others are checked against;
- ``backend="process"`` with ``workers=M``: one process per stage, activations
  and gradients handed on through shared-memory buffers
  (:mod:`.synthetic_pipeline`);
- ``backend="dist"``: one torch.distributed rank per stage, point-to-point
  sends (gloo on CPU, NCCL on GPUs), launched with torchrun
  (:mod:`.synthetic_dist`).

Multilevel (``coarse_epochs > 0``): a network with half the layers and twice
the step is first trained with true gradients while the SG modules learn to
predict them, then doubled (:func:`~stablenets_ext.models.double_layers`) and
trained with synthetic gradients.

Timing: ``seconds`` per epoch is the measured wall time of the training pass
(evaluation excluded, as in the backprop trainer); ``theoretical_seconds`` is
the original's idealised parallel time, the busiest stage's compute time in
the epoch (perfect overlap, free communication).
"""

from __future__ import annotations

import os
import time

import torch

from .. import models
from . import backprop, runtime
from . import checkpoint as ckpt
from .runtime import StageError  # noqa: F401  (re-exported: the SG trainer's error)
from .synthetic_stages import (
    StageRunner,
    batch_order,
    combine_epoch,
    evaluate_stages,
    make_sg_modules,
    merge_stages,
    split_bounds,
    split_model,
)

BACKENDS = ("process", "dist")
EXTRA_HISTORY_KEYS = ("phase", "sg_loss", "sg_rel_error", "busy_seconds", "theoretical_seconds")
DEFAULT_INFLIGHT = {"inprocess": 1, "process": 3, "dist": 3}


# ----------------------------------------------------------------- engines


class InProcessEngine:
    """Every stage in this process. ``synthetic=False`` backpropagates the true
    gradient through the cuts (the SG modules still learn from it): the coarse
    phase of multilevel training, and a check that the cut network is the
    uncut one."""

    def __init__(self, runners, data, device, *, batch_size, seed, inflight=1, synthetic=True):
        self.runners = runners
        self.nets = [r.net for r in runners]
        self.sgs = [r.sg for r in runners[:-1]]
        self.device = device
        self.x, self.y = data.train_x.to(device), data.train_y.to(device)
        self.batch_size, self.seed = batch_size, seed
        self.inflight, self.synthetic = inflight, synthetic
        self.inbox = [dict() for _ in runners]

    def start(self):
        pass

    def run_epoch(self, epoch: int):
        for r in self.runners:
            r.reset_stats()
        batches = batch_order(self.x.shape[0], self.batch_size, self.seed, epoch)
        t = epoch * len(batches)
        backprop.sync(self.device)
        start = time.perf_counter()
        for idx in batches:
            idx = idx.to(self.device)
            x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
            if self.synthetic:
                self._synthetic_step(t, x, y)
            else:
                self._true_step(t, x, y)
            t += 1
        for k, r in enumerate(self.runners[:-1]):
            self._learn_upto(k, None)
        backprop.sync(self.device)
        seconds = time.perf_counter() - start
        stats = [r.epoch_stats() for r in self.runners]
        for r in self.runners:
            r.end_epoch()
        return seconds, stats

    def _learn_upto(self, k, upto):
        box = self.inbox[k]
        for s in sorted(box):
            if upto is not None and s > upto:
                break
            self.runners[k].learn(s, box.pop(s))

    def _synthetic_step(self, t, x, y):
        inputs = (x,)
        for k, r in enumerate(self.runners):
            if not r.last:
                self._learn_upto(k, t - self.inflight)
            out = r.forward(t, inputs, y)
            grad_in = r.backward()
            if k > 0:
                self.inbox[k - 1][t] = grad_in
            inputs = out

    def _true_step(self, t, x, y):
        inputs = (x,)
        for r in self.runners:
            inputs = r.forward(t, inputs, y)
        grads = None
        for k in range(len(self.runners) - 1, -1, -1):
            grad_in = self.runners[k].backward(grads)
            if k > 0:
                self.runners[k - 1].learn(t, grad_in)
            grads = grad_in

    def state_dicts(self):
        return [r.state_dict() for r in self.runners]

    def finish(self):
        pass

    def close(self):
        pass


# ------------------------------------------------------------- the trainer


def _resolve_topology(stages, workers, backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool)
                                or workers < 0):
        raise ValueError(f"workers: expected an int >= 0, got {workers!r}")
    workers = workers or None
    if stages is None:
        stages = workers or 2
    if workers is not None and workers != stages:
        raise ValueError(
            f"workers: the synthetic-gradient pipeline runs one worker per stage, so workers "
            f"({workers}) must equal stages ({stages}); leave stages out to use {workers}"
        )
    if backend == "dist" and workers is None:
        workers = stages
    return stages, workers


def _coarse_model(model: models.StableNet) -> models.StableNet:
    """Half the layers, twice the step: every other layer of ``model``."""
    if model.layers % 2:
        raise ValueError(
            f"coarse_epochs: multilevel training halves the network, so layers must be even, "
            f"got {model.layers}"
        )
    cfg = model.config()
    cfg["layers"] = model.layers // 2
    cfg["step"] = model.step * 2
    ref = model.stack.weight
    coarse = models.StableNet.from_config(cfg).to(device=ref.device, dtype=ref.dtype)
    coarse.lift.load_state_dict(model.lift.state_dict())
    coarse.classifier.load_state_dict(model.classifier.state_dict())
    with torch.no_grad():
        coarse.stack.weight.copy_(model.stack.weight[0::2])
        coarse.stack.bias.copy_(model.stack.bias[0::2])
    return coarse


def _new_history(history):
    history = backprop.new_history() if history is None else history
    for k in EXTRA_HISTORY_KEYS:
        history.setdefault(k, [])
    return history


def _median(values):
    values = sorted(values)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def train_sg(model: models.StableNet, data, *, epochs, batch_size, lr, stages=None, workers=None,
             backend="process", inflight=None, bounds=None, sg_hidden=0, sg_lr=3e-4,
             conditional=True, coarse_epochs=0, weight_decay=0.0, lr_step=None, lr_gamma=0.5,
             alpha=0.0, alpha_c=0.0, target_accuracy=None, device=None, seed=0, threads=None,
             checkpoint=None, resume=None, history_path=None, quiet=False, eval_batch_size=4096,
             history=None, on_epoch=None, on_workers_started=None, timeout=None,
             heartbeat_timeout=runtime.DEFAULT_TIMEOUT) -> dict:
    """Train ``model`` (a :class:`~stablenets_ext.models.StableNet`, or its
    ``config()`` dict to build one) in place with synthetic gradients; returns
    :func:`~.backprop.summary` plus the SG figures.

    ``stages``: sub-networks ``M`` (default ``workers`` or 2), cut at ``bounds``
    (default: near-equal layer counts). ``workers``: None for the in-process
    trainer, else ``M`` for one process (``backend="process"``) or torchrun
    rank (``backend="dist"``) per stage. ``inflight``: batches a stage may run
    ahead of the true gradient its SG module learns from (default 1
    in-process, 3 in a pipeline). ``sg_hidden``: 0 for a linear SG module,
    else the hidden width of an MLP; ``sg_lr``: its Adam rate; ``conditional``:
    feed it the one-hot label (cDNI). ``coarse_epochs``: multilevel training
    (see module doc); ``epochs`` then counts the fine epochs. ``threads``:
    torch threads per worker (default: this process's threads / workers).
    ``on_workers_started(pids)``: called once the worker processes run.
    ``timeout``: seconds without progress after which a pipeline is declared
    stuck (default 300); ``heartbeat_timeout``: seconds a live stage may go
    without a heartbeat before it is reported as hung (None: never). Other
    arguments as :func:`~.backprop.train`.

    The returned dict also holds ``model``, ``sg_modules`` (the trained SG
    modules) and ``coarse`` (the coarse phase's summary) for the caller; drop
    them before serialising.
    """
    if isinstance(model, dict):
        model = models.StableNet.from_config(model)
    backprop.check_positive(epochs, "epochs")
    backprop.check_positive(batch_size, "batch_size")
    backprop.check_positive(lr, "lr", float)
    backprop.check_positive(sg_lr, "sg_lr", float)
    if not isinstance(coarse_epochs, int) or coarse_epochs < 0:
        raise ValueError(f"coarse_epochs: expected an int >= 0, got {coarse_epochs!r}")
    if not isinstance(sg_hidden, int) or sg_hidden < 0:
        raise ValueError(f"sg_hidden: expected an int >= 0, got {sg_hidden!r}")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise ValueError(f"target_accuracy: expected a fraction in (0, 1], got {target_accuracy!r}")
    stages, workers = _resolve_topology(stages, workers, backend)
    mode = "inprocess" if workers is None else backend
    if inflight is None:
        inflight = DEFAULT_INFLIGHT[mode]
    if not isinstance(inflight, int) or inflight < 1:
        raise ValueError(f"inflight: expected an int >= 1, got {inflight!r}")
    device = torch.device(device) if device is not None else backprop.model_device(model)
    model.to(device)
    history = _new_history(history)
    settings = dict(lr=lr, sg_lr=sg_lr, weight_decay=weight_decay, lr_step=lr_step,
                    lr_gamma=lr_gamma, alpha=alpha, alpha_c=alpha_c)
    resume_state = ckpt.load(resume, map_location=device) if resume is not None else None
    if resume_state is not None and resume_state.get("trainer") != "sg":
        raise ValueError(f"resume: checkpoint {os.fspath(resume)!r} was not written by the "
                         "synthetic-gradient trainer")

    fine_bounds = split_bounds(model.layers, stages) if bounds is None else list(bounds)
    sgs = None
    coarse_result = None
    if coarse_epochs:
        coarse = _coarse_model(model)
        if bounds is None:
            cb = split_bounds(coarse.layers, stages)
        else:
            if any(b % 2 for b in bounds):
                raise ValueError(f"bounds: multilevel training needs even cut points, got {bounds}")
            cb = [b // 2 for b in bounds]
        fine_bounds = [2 * b for b in cb]
        skip = resume_state is not None and resume_state.get("phase") == "fine"
        nets = split_model(coarse, bounds=cb)
        sgs = make_sg_modules(nets, data.train_x[:1], data.classes, sg_hidden, conditional)
        if not skip:
            runners = _make_runners(nets, sgs, coarse_epochs, settings, device)
            engine = InProcessEngine(runners, data, device, batch_size=batch_size, seed=seed,
                                     synthetic=False)
            coarse_result = _epoch_loop(
                engine, "coarse", data, device, coarse_epochs, history, checkpoint=checkpoint,
                resume_state=resume_state, bounds=cb, model=coarse, target_accuracy=None,
                quiet=quiet, eval_batch_size=eval_batch_size, on_epoch=on_epoch,
                extra={"mode": "inprocess", "inflight": 1})
            sgs = engine.sgs
            merge_stages(engine.nets, coarse)
            resume_state = None
        fine = models.double_layers(coarse)
        model.load_state_dict(fine.state_dict())

    nets = split_model(model, bounds=fine_bounds)
    if sgs is None:
        sgs = make_sg_modules(nets, data.train_x[:1], data.classes, sg_hidden, conditional)
    if workers is None:
        threads = torch.get_num_threads()
    elif threads is None:
        threads = max(1, torch.get_num_threads() // workers)
    cores = threads * (workers or 1)
    common = dict(checkpoint=checkpoint, resume_state=resume_state, bounds=fine_bounds,
                  model=model, target_accuracy=target_accuracy, quiet=quiet,
                  eval_batch_size=eval_batch_size, on_epoch=on_epoch,
                  extra={"mode": mode, "inflight": inflight, "workers": workers,
                         "threads": threads, "cores": cores})
    if mode == "inprocess":
        runners = _make_runners(nets, [s.to(device) for s in sgs], epochs, settings, device)
        engine = InProcessEngine(runners, data, device, batch_size=batch_size, seed=seed,
                                 inflight=inflight)
    elif mode == "process":
        from .synthetic_pipeline import PipelineEngine

        engine = PipelineEngine(nets, sgs, data, device, batch_size=batch_size, seed=seed,
                                inflight=inflight, epochs=epochs, settings=settings,
                                threads=threads, on_started=on_workers_started,
                                timeout=300.0 if timeout is None else timeout,
                                heartbeat_timeout=heartbeat_timeout)
    else:
        from .synthetic_dist import launch

        result = launch(model, nets, sgs, data, device, batch_size=batch_size, seed=seed,
                        inflight=inflight, epochs=epochs, settings=settings, threads=threads,
                        history=history, checkpoint=checkpoint, resume=resume,
                        target_accuracy=target_accuracy, eval_batch_size=eval_batch_size,
                        quiet=quiet, timeout=timeout, heartbeat_timeout=heartbeat_timeout)
        result["coarse"] = coarse_result
        result["model"] = model
        if history_path is not None:
            backprop.write_json(history_path, _jsonable(result))
        return result
    result = _epoch_loop(engine, "fine", data, device, epochs, history, **common)
    merge_stages(engine.nets, model)
    result["sg_modules"] = engine.sgs
    result["coarse"] = coarse_result
    result["model"] = model
    if history_path is not None:
        backprop.write_json(history_path, _jsonable(result))
    return result


def _make_runners(nets, sgs, epochs, settings, device):
    runners = []
    for k, net in enumerate(nets):
        sg = sgs[k].to(device) if k < len(nets) - 1 else None
        runners.append(StageRunner(net.to(device), sg, epochs=epochs, **settings))
    return runners


def _jsonable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("sg_modules", "coarse", "model")}


def finish_summary(history: dict, stopped: bool, phase: str, extra: dict) -> dict:
    """:func:`~.backprop.summary` over ``phase``'s epochs plus the SG figures."""
    idx = [i for i, p in enumerate(history["phase"]) if p == phase]
    result = backprop.summary(history, stopped)
    seconds = [history["seconds"][i] for i in idx]
    theory = [history["theoretical_seconds"][i] for i in idx]
    result.update(
        trainer="sg",
        stages=len(history["busy_seconds"][idx[-1]]) if idx else None,
        seconds=float(sum(history["seconds"])),
        seconds_per_epoch=_median(seconds),
        theoretical_seconds_per_epoch=_median(theory),
        sequential_seconds_per_epoch=_median([sum(history["busy_seconds"][i]) for i in idx]),
        theoretical_speedup=_median([sum(history["busy_seconds"][i])
                                     / history["theoretical_seconds"][i]
                                     for i in idx if history["theoretical_seconds"][i] > 0]),
        sg_loss=history["sg_loss"][idx[-1]] if idx else [],
        sg_rel_error=history["sg_rel_error"][idx[-1]] if idx else [],
        **extra,
    )
    return result


def _epoch_loop(engine, phase, data, device, epochs, history, *, checkpoint, resume_state, bounds,
                model, target_accuracy, quiet, eval_batch_size, on_epoch, extra):
    start = 0
    stopped = False
    try:
        if resume_state is not None and resume_state.get("phase") == phase:
            if resume_state["bounds"] != list(bounds):
                raise ValueError(f"resume: the checkpoint cuts the network at "
                                 f"{resume_state['bounds']}, this run at {list(bounds)}")
            _load_runner_states(engine, resume_state["runners"])
            ckpt.set_rng_state(resume_state["rng"])
            start = resume_state["epoch"]
            history.clear()
            history.update(resume_state["history"])
            if resume_state.get("stopped_early"):
                return finish_summary(history, True, phase, dict(extra, bounds=list(bounds)))
        engine.start()
        bar = None
        if backprop.progress_enabled(quiet) and start < epochs:
            from tqdm import tqdm

            bar = tqdm(total=epochs, initial=start, unit="ep", dynamic_ncols=True, leave=True,
                       desc=f"sg {phase} M={len(engine.nets)} L={model.layers}")
        for epoch in range(start, epochs):
            seconds, stats = engine.run_epoch(epoch)
            t1 = time.perf_counter()
            val_loss, val_acc = evaluate_stages(engine.nets, data.val_x, data.val_y,
                                                eval_batch_size,
                                                getattr(engine, "eval_device", device))
            record = {
                "epoch": len(history["epoch"]) + 1, "seconds": seconds,
                "val_loss": val_loss, "val_accuracy": val_acc,
                "eval_seconds": time.perf_counter() - t1,
                "layers": model.layers, "phase": phase, **combine_epoch(stats),
            }
            for k, v in record.items():
                history.setdefault(k, []).append(v)
            stopped = target_accuracy is not None and val_acc >= target_accuracy
            if checkpoint is not None:
                ckpt.save(checkpoint, {
                    "trainer": "sg", "phase": phase, "bounds": list(bounds),
                    "model_config": model.config(), "runners": engine.state_dicts(),
                    "rng": ckpt.rng_state(), "epoch": epoch + 1, "history": history,
                    "stopped_early": stopped,
                })
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{100 * val_acc:.2f}%")
            if on_epoch is not None:
                on_epoch(record)
            if stopped:
                break
        if bar is not None:
            bar.close()
        engine.finish()
    finally:
        engine.close()
    return finish_summary(history, stopped, phase, dict(extra, bounds=list(bounds)))


def _load_runner_states(engine, states):
    loader = getattr(engine, "load_states", None)
    if loader is not None:
        loader(states)
        return
    for r, s in zip(engine.runners, states):
        r.load_state_dict(s)


# -------------------------------------------------------------------- CLI


def add_cli_arguments(group) -> None:
    """Options of ``stablenets train --trainer sg`` (``--workers``, ``--backend``,
    ``--epochs``, ``--lr``... are the CLI's own)."""
    group.add_argument("--stages", type=int, default=None, metavar="M",
                       help="sub-networks joined by M-1 synthetic-gradient modules "
                            "(default: --workers, else 2)")
    group.add_argument("--sg-hidden", type=int, default=0, metavar="H",
                       help="SG module: 0 for a linear map (default), else an MLP with H "
                            "hidden units")
    group.add_argument("--sg-lr", type=float, default=3e-4,
                       help="SG modules' Adam rate (default 3e-4)")
    group.add_argument("--sg-unconditional", action="store_true",
                       help="do not feed the label to the SG modules (DNI instead of cDNI)")
    group.add_argument("--sg-inflight", type=int, default=None, metavar="K",
                       help="batches a stage may run ahead of the true gradient its SG module "
                            "learns from (default 1 in-process, 3 with --workers)")
    group.add_argument("--coarse-epochs", type=int, default=0, metavar="E",
                       help="multilevel: first train a network of half the layers for E epochs "
                            "with true gradients while the SG modules learn, then double it")
    group.add_argument("--sg-threads", type=int, default=None,
                       help="torch threads per stage process (default: cores / workers)")
    group.add_argument("--sg-baseline-epochs", type=int, default=1, metavar="E",
                       help="time E epochs of single-process backprop on the same cores for "
                            "the speed-up figure (0: skip; default 1)")
    group.add_argument("--sg-timeout", type=float, default=300.0,
                       help="seconds without progress before a pipeline is declared stuck")


def _arg(args, name, default=None):
    value = getattr(args, name, None)
    return default if value is None else value


def run_cli(args, data, device) -> dict:
    """``stablenets train --trainer sg``: train, then time backprop on the same cores."""
    import copy

    model = getattr(args, "model", None)
    if model is None:
        model = models.StableNet(args.arch, data.features, data.classes, args.layers,
                                 width=args.width, step=args.step, activation=args.activation,
                                 impl=args.impl).to(device)
    workers = _arg(args, "workers")
    backend = _arg(args, "backend", "process")
    stages = _arg(args, "stages")
    if workers is None and getattr(args, "backend", None) is not None:
        workers = stages or 2
    start_model = copy.deepcopy(model)
    checkpoint = args.save or args.resume
    result = train_sg(
        model, data, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        stages=stages, workers=workers, backend=backend, inflight=args.sg_inflight,
        sg_hidden=args.sg_hidden, sg_lr=args.sg_lr, conditional=not args.sg_unconditional,
        coarse_epochs=args.coarse_epochs, weight_decay=args.weight_decay, lr_step=args.lr_step,
        lr_gamma=args.lr_gamma, alpha=args.alpha, alpha_c=args.alpha_c,
        target_accuracy=args.target_accuracy, device=device, seed=args.seed,
        threads=args.sg_threads, checkpoint=checkpoint, resume=args.resume,
        quiet=args.quiet or args.json, timeout=args.sg_timeout)
    if "rank" in result:  # a torchrun rank other than 0: rank 0 reports
        return {"rank": result["rank"], "history": {}}
    coarse = result.pop("coarse", None)
    result.pop("sg_modules", None)
    model = result.pop("model", model)
    if coarse is not None:
        result["coarse_accuracy"] = coarse["accuracy"]
        result["coarse_epochs"] = sum(1 for p in result["history"]["phase"] if p == "coarse")
    if args.sg_baseline_epochs > 0:
        result.update(time_backprop(start_model, data, epochs=args.sg_baseline_epochs,
                                    batch_size=args.batch_size, lr=args.lr, device=device,
                                    seed=args.seed, threads=result["cores"]))
        if result.get("backprop_seconds_per_epoch"):
            result["speedup_vs_backprop"] = (result["backprop_seconds_per_epoch"]
                                             / result["seconds_per_epoch"])
    result["model"] = model
    return result


def time_backprop(model, data, *, epochs, batch_size, lr, device, seed=0, threads=None) -> dict:
    """Seconds per epoch of single-process backprop with ``threads`` torch threads."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        res = backprop.train(model, data, epochs=epochs, batch_size=batch_size, lr=lr,
                             device=device, seed=seed, quiet=True)
    finally:
        torch.set_num_threads(old)
    return {"backprop_seconds_per_epoch": _median(res["history"]["seconds"]),
            "backprop_threads": torch.get_num_threads() if not threads else threads,
            "backprop_epochs": res["epochs"], "backprop_accuracy": res["accuracy"]}
