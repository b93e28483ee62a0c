"""Synthetic-gradient (DNI) training: a network cut into ``M`` stages joined by
``M-1`` synthetic-gradient modules, each stage updating as soon as it has
produced its output (Jaderberg et al. 2016), as in the original research's
``ParallelNetworks.py``.

Three ways to run the same schedule (:mod:`.stages` defines it):

- in-process (``workers=None``): every stage in this process, one after the
  other; exact and deterministic, the reference the others are checked against;
- ``backend="process"`` with ``workers=M``: one process per stage, activations
  and gradients handed on through shared-memory buffers
  (:mod:`.pipeline`);
- ``backend="dist"``: one torch.distributed rank per stage, point-to-point
  sends (gloo on CPU, NCCL on GPUs), launched with torchrun
  (:mod:`.dist`).

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

from ... import models
from .. import checkpoint as ckpt
from .. import loop, runtime
from .. import amp as _amp
from ..backprop import engine as backprop
from ..outputs import check_trainer_outputs, write_json
from ..runtime import StageError  # noqa: F401  (re-exported: the SG trainer's error)
from .epochs import epoch_loop, median, new_history
from .stages import (
    SG_FITS,
    StageRunner,
    batch_order,
    check_bounds,
    make_sg_modules,
    merge_stages,
    default_bounds,
    split_model,
)

BACKENDS = ("process", "dist")
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
        loop.sync(self.device)
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
        loop.sync(self.device)
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
    if any(n % 2 for n in model.stage_layers):
        raise ValueError(
            f"coarse_epochs: multilevel training halves the network, so layers must be even "
            f"(in every stage), got {model.layers if not model.multistage else list(model.stage_layers)}"
        )
    return models.halve_layers(model)


def train_sg(model: models.StableNet, data, *, epochs, batch_size, lr, stages=None, workers=None,
             backend="process", inflight=None, bounds=None, sg_hidden=0, sg_lr=1e-3,
             sg_fit="auto", conditional=True, coarse_epochs=0, weight_decay=0.0, lr_step=None, lr_gamma=0.5,
             alpha=0.0, alpha_c=0.0, target_accuracy=None, device=None, seed=0, threads=None,
             checkpoint=None, resume=None, history_path=None, quiet=False, eval_batch_size=4096,
             history=None, on_epoch=None, on_workers_started=None, timeout=None,
             heartbeat_timeout=runtime.DEFAULT_TIMEOUT, checkpoint_extra=None,
             start_timeout=120.0, amp=None) -> dict:
    """Train ``model`` in place with synthetic gradients (DNI): the network cut
    into ``stages`` sub-networks joined by synthetic-gradient (SG) modules, each
    stage updating as soon as it has produced its output, from its SG module's
    prediction of the gradient (Jaderberg et al. 2016).

    Three ways to run the same schedule: in this process (``workers=None``, the
    exact reference), one process per stage (``backend="process"``), or one
    torch.distributed rank per stage (``backend="dist"``). Each stage has its
    own Adam, schedule and penalties, as in :func:`~stablenets_ext.training.train`.

    Args:
        model (StableNet or dict): the classifier to train in place, or its
            ``config()`` dict to build one.
        data (Dataset): training and validation tensors
            (:class:`~stablenets_ext.data.Dataset`).
        epochs (int): training epochs, > 0 (with ``coarse_epochs``, the epochs
            of the full network, after the coarse ones).
        batch_size (int): mini-batch size, > 0.
        lr (float): the stages' Adam learning rate, > 0.
        stages (int or None): the number of sub-networks M; None (default):
            ``workers``, else the number of ``bounds`` intervals, else 2.
        workers (int or None): None or 0 (default): every stage in this process;
            else one worker per stage, so it must equal ``stages``.
        backend (str): with ``workers``: ``"process"`` (default: shared-memory
            pipeline) or ``"dist"`` (torch.distributed ranks, launched here or
            run under torchrun).
        inflight (int or None): batches a stage may run ahead of the true
            gradient its SG module learns from, >= 1; None (default): 1 in this
            process, 3 with workers.
        bounds (sequence or None): the cut points as layer indices, increasing
            from 0 to ``model.layers`` (``[0, 4, 8]``: two stages of 4
            layers); None (default): near-equal stages (a multi-stage model
            with as many stages is cut at its own stage boundaries).
        sg_hidden (int): 0 (default) for a linear SG module, else the hidden
            width of an MLP one.
        sg_lr (float): the SG modules' Adam rate with ``sg_fit="adam"``, > 0
            (default 1e-3).
        sg_fit (str): how the SG modules learn: ``"solve"`` (least squares over
            the recent batches; linear modules on flat states only),
            ``"adam"`` (Adam at ``sg_lr``) or ``"auto"`` (default: solve where
            it can, else adam).
        conditional (bool): feed the one-hot label to the SG modules (cDNI;
            default True).
        coarse_epochs (int): multilevel, >= 0 (default 0: off): first train a
            network of half the layers (every stage's layer count must be
            even) and twice the step for this many epochs with true gradients,
            in this process, while the SG modules learn; then double it and
            train with synthetic gradients.
        weight_decay (float): Adam's weight decay (default 0).
        lr_step (int or None): StepLR period in epochs; None (default): a
            constant rate.
        lr_gamma (float): the StepLR factor (default 0.5).
        alpha (float): smoothness-in-time penalty weight (default 0).
        alpha_c (float): classifier weight penalty (default 0).
        target_accuracy (float or None): stop once the validation accuracy
            reaches this fraction in (0, 1]; None (default): every epoch.
        device (torch.device, str or None): where to train; None (default): the
            model's device.
        seed (int): seed of the batch order (default 0).
        threads (int or None): torch threads per worker, > 0; None (default):
            this process's threads divided by ``workers``. Ignored in process.
        checkpoint (str or None): a file written atomically after every epoch
            (an existing file there must be a stablenets checkpoint, else it is
            refused before training); None (default): none.
        resume (str or None): a checkpoint of this trainer to continue from;
            None (default): start afresh.
        history_path (str or None): write the summary there as JSON at the
            end (an existing file there must be a stablenets history); None
            (default): none.
        quiet (bool): no progress bar (default False).
        eval_batch_size (int): validation examples per forward (default 4096).
        history (dict or None): per-epoch lists to append to; None (default):
            new ones.
        on_epoch (callable or None): called with every epoch's record (a
            dict, as the history's rows).
        on_workers_started (callable or None): called once with the list of
            worker process ids when the pipeline's processes run
            (``backend="process"``).
        timeout (float or None): finite and > 0: with ``backend="process"``,
            seconds without any progress before the pipeline is declared stuck
            (None, the default: 300); with ``"dist"``, the ranks' collective
            timeout (None: 600).
        heartbeat_timeout (float or None): seconds a live worker may go without
            a heartbeat before it is reported as hung (default 30; None:
            never).
        checkpoint_extra (dict or None): more entries written into every
            checkpoint.
        start_timeout (float): seconds the worker processes may take to start
            (default 120).
        amp (str or None): ``"bf16"`` runs each stage's forward and loss under
            bfloat16 autocast (the states and gradients crossing a cut, the SG
            modules and the optimiser state stay float32); ``"fp16"`` in float16,
            each stage with its own dynamic loss scale
            (:class:`~stablenets_ext.training.amp.LossScale`: a step whose
            gradients overflow is skipped, and the input gradient it hands
            upstream is unscaled and, when not finite, not learnt from); None
            (default): float32.

    Returns:
        dict: the summary of :func:`~stablenets_ext.training.train`
        (``accuracy``, ``best_accuracy``, ``loss``, ``val_loss``, ``epochs``,
        ``stopped_early``, ``history``...; ``seconds_per_epoch`` is the median
        epoch) plus the SG figures: ``stages``, ``bounds``, ``mode``,
        ``inflight``, ``workers``, ``threads``, ``cores``,
        ``theoretical_seconds_per_epoch`` (the busiest stage's compute time:
        the ideal parallel time), ``sequential_seconds_per_epoch``,
        ``theoretical_speedup``, ``sg_loss`` and ``sg_rel_error`` (per SG
        module, last epoch), and, for the caller, ``model``, ``sg_modules``
        (the trained SG modules) and ``coarse`` (the coarse phase's summary or
        None): drop those three before serialising. Under torchrun, a rank
        other than 0 returns a dict with its ``rank`` and none of the figures
        (rank 0 reports).

    Raises:
        ValueError: a bad value (non-positive ``epochs``, ``batch_size``,
            ``lr``, ``sg_lr``, ``threads`` or ``timeout``; ``workers`` not
            equal to ``stages``; ``bounds`` not increasing from 0 to the layers
            or disagreeing with ``stages``; an unknown ``backend`` or
            ``sg_fit``; ``sg_fit="solve"`` with ``sg_hidden > 0``; odd layer
            counts or cut points with ``coarse_epochs``; an ``amp`` mode the
            trainer or device cannot run; a ``resume`` file not written by this
            trainer; a ``checkpoint`` or ``history_path`` over a file this
            package did not write), naming the argument.
        FileNotFoundError: a ``resume`` path that does not exist.
        StageError: a stage (process or rank) raised, died or stopped
            answering; the message names it (a RuntimeError, importable from
            ``stablenets_ext.training.sg``).

    Example:
        >>> import torch
        >>> import stablenets_ext as sn
        >>> from stablenets_ext.data import Dataset
        >>> x = torch.randn(64, 2)
        >>> y = (x[:, 0] > 0).long()
        >>> data = Dataset("toy", x[:48], y[:48], x[48:], y[48:], features=2, classes=2)
        >>> from stablenets_ext.training.sg import train_sg
        >>> net = sn.StableNet("verlet", 2, classes=2, layers=4, width=4)
        >>> result = train_sg(net, data, epochs=2, batch_size=16, lr=0.05, stages=2)
        >>> result["stages"], result["bounds"], result["epochs"]
        (2, [0, 2, 4], 2)
    """
    if isinstance(model, dict):
        model = models.StableNet.from_config(model)
    loop.check_positive(epochs, "epochs")
    loop.check_positive(batch_size, "batch_size")
    loop.check_positive(lr, "lr", float)
    loop.check_positive(sg_lr, "sg_lr", float)
    check_trainer_outputs(checkpoint, history_path)
    if not isinstance(coarse_epochs, int) or coarse_epochs < 0:
        raise ValueError(f"coarse_epochs: expected an int >= 0, got {coarse_epochs!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise ValueError(f"threads: expected a positive int, got {threads!r}")
    if timeout is not None:
        runtime.check_timeout(timeout, "timeout")
    if not isinstance(sg_hidden, int) or sg_hidden < 0:
        raise ValueError(f"sg_hidden: expected an int >= 0, got {sg_hidden!r}")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise ValueError(f"target_accuracy: expected a fraction in (0, 1], got {target_accuracy!r}")
    if bounds is not None:
        bounds = check_bounds(bounds, model.layers)
        cut = len(bounds) - 1
        for name, value in (("stages", stages), ("workers", workers)):
            if value and value != cut:
                raise ValueError(f"bounds: {bounds} cut the network into {cut} stages, but "
                                 f"{name} is {value}")
        stages = cut
    stages, workers = _resolve_topology(stages, workers, backend)
    mode = "inprocess" if workers is None else backend
    if inflight is None:
        inflight = DEFAULT_INFLIGHT[mode]
    if not isinstance(inflight, int) or inflight < 1:
        raise ValueError(f"inflight: expected an int >= 1, got {inflight!r}")
    device = torch.device(device) if device is not None else loop.model_device(model)
    model.to(device)
    history = new_history(history)
    if sg_fit not in SG_FITS:
        raise ValueError(f"sg_fit: expected one of {SG_FITS}, got {sg_fit!r}")
    if sg_fit == "solve" and sg_hidden:
        raise ValueError("sg_fit: 'solve' fits a linear SG module; sg_hidden > 0 makes an MLP "
                         "(use 'adam' or 'auto')")
    _amp.check_device(amp, device)
    settings = dict(lr=lr, sg_lr=sg_lr, sg_fit=sg_fit, weight_decay=weight_decay, lr_step=lr_step,
                    lr_gamma=lr_gamma, alpha=alpha, alpha_c=alpha_c, amp=amp)
    resume_state = ckpt.load(resume, map_location=device) if resume is not None else None
    if resume_state is not None and resume_state.get("trainer") != "sg":
        raise ValueError(f"resume: checkpoint {os.fspath(resume)!r} was not written by the "
                         "synthetic-gradient trainer")

    fine_bounds = default_bounds(model, stages) if bounds is None else list(bounds)
    sgs = None
    coarse_result = None
    if coarse_epochs:
        coarse = _coarse_model(model)
        if bounds is None:
            cb = default_bounds(coarse, stages)
        else:
            if any(b % 2 for b in bounds):
                raise ValueError(f"bounds: multilevel training needs even cut points, got {bounds}")
            cb = [b // 2 for b in bounds]
        fine_bounds = [2 * b for b in cb]
        skip = resume_state is not None and resume_state.get("phase") == "fine"
        nets = split_model(coarse, bounds=cb)
        sgs = make_sg_modules(nets, data.train_x[:1], data.classes, sg_hidden, conditional)
        if not skip:
            runners = make_runners(nets, sgs, coarse_epochs, settings, device)
            engine = InProcessEngine(runners, data, device, batch_size=batch_size, seed=seed,
                                     synthetic=False)
            coarse_result = epoch_loop(
                engine, "coarse", data, device, coarse_epochs, history, checkpoint=checkpoint,
                resume_state=resume_state, bounds=cb, model=coarse, target_accuracy=None,
                quiet=quiet, eval_batch_size=eval_batch_size, on_epoch=on_epoch,
                extra={"mode": "inprocess", "inflight": 1}, checkpoint_extra=checkpoint_extra)
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
                  checkpoint_extra=checkpoint_extra,
                  model=model, target_accuracy=target_accuracy, quiet=quiet,
                  eval_batch_size=eval_batch_size, on_epoch=on_epoch,
                  extra={"mode": mode, "inflight": inflight, "workers": workers,
                         "threads": threads, "cores": cores})
    if mode == "inprocess":
        runners = make_runners(nets, [s.to(device) for s in sgs], epochs, settings, device)
        engine = InProcessEngine(runners, data, device, batch_size=batch_size, seed=seed,
                                 inflight=inflight)
    elif mode == "process":
        from .pipeline import PipelineEngine

        engine = PipelineEngine(nets, sgs, data, device, batch_size=batch_size, seed=seed,
                                inflight=inflight, epochs=epochs, settings=settings,
                                threads=threads, on_started=on_workers_started,
                                timeout=300.0 if timeout is None else timeout,
                                heartbeat_timeout=heartbeat_timeout,
                                start_timeout=start_timeout)
    else:
        from .dist import launch

        result = launch(model, nets, sgs, data, device, batch_size=batch_size, seed=seed,
                        inflight=inflight, epochs=epochs, settings=settings, threads=threads,
                        history=history, checkpoint=checkpoint, resume=resume,
                        target_accuracy=target_accuracy, eval_batch_size=eval_batch_size,
                        quiet=quiet, timeout=timeout, heartbeat_timeout=heartbeat_timeout,
                        checkpoint_extra=checkpoint_extra, start_timeout=start_timeout)
        result["coarse"] = coarse_result
        result["model"] = model
        if history_path is not None:
            write_json(history_path, _jsonable(result))
        return result
    result = epoch_loop(engine, "fine", data, device, epochs, history, **common)
    merge_stages(engine.nets, model)
    result["sg_modules"] = engine.sgs
    result["coarse"] = coarse_result
    result["model"] = model
    if history_path is not None:
        write_json(history_path, _jsonable(result))
    return result


def make_runners(nets, sgs, epochs, settings, device):
    runners = []
    for k, net in enumerate(nets):
        sg = sgs[k].to(device) if k < len(nets) - 1 else None
        runners.append(StageRunner(net.to(device), sg, epochs=epochs, **settings))
    return runners


def _jsonable(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("sg_modules", "coarse", "model")}


def time_backprop(model, data, *, epochs, batch_size, lr, device, seed=0, threads=None,
                  amp=None) -> dict:
    """Seconds per epoch of single-process backprop with ``threads`` torch threads,
    timed like the SG trainer: the median over ``epochs`` epochs (3 or more
    keep a first, warm-up epoch out of the figure); ``amp`` as the SG run's."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        res = backprop.train(model, data, epochs=epochs, batch_size=batch_size, lr=lr,
                             device=device, seed=seed, quiet=True, amp=amp)
    finally:
        torch.set_num_threads(old)
    return {"backprop_seconds_per_epoch": median(res["history"]["seconds"]),
            "backprop_threads": torch.get_num_threads() if not threads else threads,
            "backprop_epochs": res["epochs"], "backprop_accuracy": res["accuracy"]}
