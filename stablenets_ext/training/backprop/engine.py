"""Plain backpropagation: Adam, a StepLR schedule, regularisers, evaluation
every epoch, early stop at a target accuracy, atomic checkpoints that resume
bit-for-bit."""

from __future__ import annotations

import math
import os
import time

import torch

from ...data import Dataset, TensorLoader
from .. import amp as _amp
from .. import checkpoint as ckpt
from .. import regularizers
from .. import loop
from ..loop import (HISTORY_KEYS, check_positive, model_device, new_history,  # noqa: F401
                    progress_enabled, summary, sync)
from ..outputs import check_trainer_outputs, write_json

@torch.no_grad()
def evaluate(model, x, y, batch_size=4096, device=None):
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``.

    Runs without gradients and in eval mode (the model's train/eval mode is
    restored afterwards), ``batch_size`` examples at a time, each batch moved to
    ``device``.

    Args:
        model (nn.Module): a classifier returning ``(B, classes)`` logits.
        x (Tensor): the examples, on any device.
        y (Tensor): their int64 labels, ``(N,)``.
        batch_size (int): examples per forward (default 4096).
        device (torch.device, str or None): where to compute; None (default):
            the device of the model's first parameter (CPU if it has none).

    Returns:
        tuple[float, float]: ``(loss, accuracy)``: the mean cross-entropy and
        the fraction of examples whose largest logit is the label (both 0.0
        for no examples).

    Example:
        >>> import torch
        >>> import stablenets_ext as sn
        >>> from stablenets_ext.data import Dataset
        >>> x = torch.randn(64, 2)
        >>> y = (x[:, 0] > 0).long()
        >>> data = Dataset("toy", x[:48], y[:48], x[48:], y[48:], features=2, classes=2)
        >>> from stablenets_ext.training import evaluate
        >>> net = sn.StableNet("verlet", 2, classes=2, layers=4, width=4)
        >>> loss, accuracy = evaluate(net, data.val_x, data.val_y)
        >>> 0 <= accuracy <= 1
        True
    """
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    n = x.shape[0]
    for lo in range(0, n, batch_size):
        xb = x[lo:lo + batch_size].to(device, non_blocking=True)
        yb = y[lo:lo + batch_size].to(device, non_blocking=True)
        logits = model(xb)
        loss += torch.nn.functional.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    return loss.item() / max(n, 1), correct.item() / max(n, 1)


def make_optimizer(model, lr, weight_decay=0.0, lr_step=None, lr_gamma=0.5, epochs=1):
    """Adam and its StepLR (``lr_step`` epochs per decay; None: never decays)."""
    params = list(model.parameters())
    # The fused (single-kernel) Adam saves most of the per-step optimiser overhead,
    # which matters next to a fused stack; it needs float params on CPU or CUDA.
    fused = all(p.dtype in (torch.float32, torch.float64) and p.device.type in ("cpu", "cuda")
                for p in params)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=lr_step or max(1, epochs), gamma=lr_gamma
                                            if lr_step else 1.0)
    return opt, sched


def train(model, data: Dataset, *, epochs, batch_size, lr, weight_decay=0.0, lr_step=None,
          lr_gamma=0.5, alpha=0.0, alpha_c=0.0, target_accuracy=None, device=None, seed=0,
          checkpoint=None, resume=None, history_path=None, quiet=False, eval_batch_size=4096,
          history=None, checkpoint_extra=None, desc=None, on_epoch=None, shard=None,
          amp=None) -> dict:
    """Train ``model`` in place with Adam and backpropagation, evaluating it on
    the validation split after every epoch.

    Each epoch shuffles the training examples (a permutation drawn from
    ``seed`` and the epoch alone), takes one Adam step per batch on the mean
    cross-entropy plus the ``alpha``/``alpha_c`` penalties, steps the schedule,
    then evaluates. The fused Adam is used when every parameter is a float on
    the CPU or a GPU.

    Args:
        model (StableNet): the classifier to train (moved to ``device``; its
            ``arch`` and ``layers`` name the progress bar and the history).
        data (Dataset): training and validation tensors
            (:class:`~stablenets_ext.data.Dataset`); neither split may be empty.
        epochs (int): the total number of epochs, > 0, counting those a
            resumed checkpoint already ran.
        batch_size (int): training mini-batch size, > 0 (the last batch of an
            epoch may be smaller).
        lr (float): Adam's learning rate, > 0.
        weight_decay (float): Adam's weight decay, >= 0 (default 0).
        lr_step (int or None): multiply the rate by ``lr_gamma`` every
            ``lr_step`` epochs (StepLR, stepped once per epoch), > 0; None
            (default): a constant rate.
        lr_gamma (float): the decay factor of ``lr_step`` (default 0.5).
        alpha (float): smoothness-in-time penalty on the stack parameters,
            ``alpha / (2 h) * sum_j ||K_{j+1} - K_j||^2 + ||b_{j+1} - b_j||^2``
            (default 0: off).
        alpha_c (float): ``alpha_c / 2 * ||W||_F^2`` on the classifier weights
            (default 0: off).
        target_accuracy (float or None): stop after the first epoch whose
            validation accuracy reaches this fraction in (0, 1]; None (default):
            run every epoch.
        device (torch.device, str or None): where to train; None (default): the
            model's device. The data is copied there once.
        seed (int): seed of the batch order (default 0); the model's
            initialisation is whatever it holds.
        checkpoint (str or None): a file written atomically after every epoch
            (model, optimiser, schedule, RNG state, epoch, history). An existing
            file there must be a stablenets checkpoint (it is replaced); any other
            file is refused before training, as ``stablenets train --save`` does.
            None (default): none.
        resume (str or None): a checkpoint of this trainer to continue from,
            exactly (the same batches and updates as an uninterrupted run);
            ``epochs`` still counts the epochs it ran. None (default): start
            afresh.
        history_path (str or None): write the returned summary there as JSON
            at the end (atomically, replacing a history this package wrote; any
            other existing file is refused before training); None (default): none.
        quiet (bool): no progress bar (there is one only when stderr is a
            terminal; default False).
        eval_batch_size (int): validation examples per forward, > 0 (default
            4096).
        history (dict or None): per-epoch lists to append to (multilevel
            training passes the previous levels'); None (default): new ones.
        checkpoint_extra (dict or None): more entries written into every
            checkpoint (the command line records its run settings there).
        desc (str or None): the progress bar's label (default: the model's
            ``arch`` and layers).
        on_epoch (callable or None): called after every epoch with that
            epoch's record (a dict: ``epoch``, ``loss``, ``train_accuracy``,
            ``val_loss``, ``val_accuracy``, ``seconds``, ``eval_seconds``,
            ``lr``, ``layers``).
        shard (object or None): data-parallel training only: the
            ``stablenets_ext.training.backprop.ddp.Shard`` of this rank, set by
            the DDP engine (loss scaled so the all-reduced gradient is the whole
            batch's mean; only rank 0 writes checkpoints and the history file).
            Leave it None.
        amp (str or None): mixed precision: ``"bf16"`` (bfloat16 autocast),
            ``"fp16"`` (float16 with a gradient scaler) or None (default:
            float32). Parameters and optimiser state stay float32; evaluation
            runs in float32.

    Returns:
        dict: ``accuracy`` (the last validation accuracy), ``best_accuracy``,
        ``loss`` (the last epoch's mean training loss), ``val_loss``,
        ``seconds`` (training time, evaluation excluded), ``seconds_per_epoch``,
        ``epochs`` (run, resumed ones included), ``stopped_early`` (whether
        ``target_accuracy`` stopped it) and ``history`` (the per-epoch lists of
        the ``on_epoch`` records' keys).

    Raises:
        ValueError: ``epochs``, ``batch_size``, ``eval_batch_size``, ``lr``,
            ``lr_step`` or ``lr_gamma`` not positive, a negative or non-finite
            ``weight_decay``, ``alpha`` or ``alpha_c``, ``target_accuracy`` outside
            (0, 1], an empty training or validation split, a ``checkpoint`` or
            ``history_path`` over a file this package did not write, an unknown ``amp``
            mode or one the device cannot run, or a ``resume`` file that is not a checkpoint of
            this trainer or does not fit the model (the message names the
            argument).
        FileNotFoundError: a ``resume`` path that does not exist.

    Example:
        >>> import torch
        >>> import stablenets_ext as sn
        >>> from stablenets_ext.data import Dataset
        >>> x = torch.randn(64, 2)
        >>> y = (x[:, 0] > 0).long()
        >>> data = Dataset("toy", x[:48], y[:48], x[48:], y[48:], features=2, classes=2)
        >>> from stablenets_ext.training import train
        >>> net = sn.StableNet("verlet", 2, classes=2, layers=4, width=4)
        >>> result = train(net, data, epochs=2, batch_size=16, lr=0.05)
        >>> result["epochs"], len(result["history"]["val_accuracy"])
        (2, 2)
    """
    check_positive(epochs, "epochs")
    check_positive(batch_size, "batch_size")
    for part in ("train", "val"):
        if getattr(data, f"{part}_x").shape[0] == 0:
            raise ValueError(f"data: dataset {data.name!r} has no "
                             f"{'training' if part == 'train' else 'validation'} examples")
    check_positive(eval_batch_size, "eval_batch_size")
    check_positive(lr, "lr", float)
    check_positive(lr_gamma, "lr_gamma", float)
    for name, value in (("weight_decay", weight_decay), ("alpha", alpha), ("alpha_c", alpha_c)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
    if lr_step is not None:
        check_positive(lr_step, "lr_step")
    check_trainer_outputs(checkpoint, history_path)
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise ValueError(f"target_accuracy: expected a fraction in (0, 1], got {target_accuracy!r}")
    device = torch.device(device) if device is not None else model_device(model)
    _amp.check_device(amp, device)
    model.to(device)
    history = new_history() if history is None else history
    engine = BackpropEngine(model, data, device=device, batch_size=batch_size, lr=lr,
                            weight_decay=weight_decay, lr_step=lr_step, lr_gamma=lr_gamma,
                            epochs=epochs, alpha=alpha, alpha_c=alpha_c, seed=seed,
                            eval_batch_size=eval_batch_size, shard=shard, amp=amp)
    start, stopped = 0, False
    if resume is not None:
        state = ckpt.load(resume, map_location=device,
                          require=("model", "optimizer", "scheduler", "rng", "epoch", "history"))
        try:
            start, stopped = loop.resume(engine, state, history)
        except RuntimeError as exc:
            raise ValueError(f"resume: checkpoint {os.fspath(resume)!r} does not fit this model "
                             f"({state.get('model_config')}): {exc}") from None
    main = shard is None or shard.rank == 0
    if not stopped:
        model.train()
        stopped = loop.run_epochs(
            engine, epochs=epochs, start=start, history=history,
            target_accuracy=target_accuracy, checkpoint=checkpoint,
            checkpoint_extra=checkpoint_extra, quiet=quiet, on_epoch=on_epoch, main=main,
            desc=desc or f"{model.arch} L={model.layers}")
    result = summary(history, stopped)
    if history_path is not None and main:
        write_json(history_path, result)
    return result


class BackpropEngine:
    """One process (or one DDP rank: ``shard``) of plain backprop: the engine
    protocol of :func:`..loop.run_epochs`."""

    def __init__(self, model, data, *, device, batch_size, lr, weight_decay, lr_step, lr_gamma,
                 epochs, alpha, alpha_c, seed, eval_batch_size, shard=None, amp=None):
        self.model, self.device, self.shard = model, device, shard
        self.amp = _amp.Amp(amp, device)
        self.alpha, self.alpha_c, self.eval_batch_size = alpha, alpha_c, eval_batch_size
        self.opt, self.sched = make_optimizer(model, lr, weight_decay, lr_step, lr_gamma, epochs)
        self.loader = TensorLoader(data.train_x, data.train_y, batch_size, shuffle=True,
                                   seed=seed, device=device)
        self.val = TensorLoader(data.val_x, data.val_y, eval_batch_size, device=device)
        self.forward = model if shard is None else shard.forward

    def run_epoch(self, epoch: int) -> dict:
        model, opt, shard, device = self.model, self.opt, self.shard, self.device
        self.loader.set_epoch(epoch)
        sync(device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.int64)
        for xb, yb in self.loader:
            opt.zero_grad(set_to_none=True)
            with self.amp.autocast():
                if shard is None:
                    logits = model(xb)
                    loss = torch.nn.functional.cross_entropy(logits, yb)
                    loss_total = loss
                    batch_loss, labels = loss.detach() * yb.shape[0], yb
                else:
                    xb, labels, scale = shard.slice(xb, yb)
                    logits = self.forward(xb)
                    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
                    loss_total = loss * scale
                    batch_loss = loss.detach() * (1.0 if scale else 0.0)
                    if not scale:
                        labels = labels[:0]
                        logits = logits[:0]
                if self.alpha or self.alpha_c:
                    loss_total = loss_total + regularizers.penalty(model, self.alpha, self.alpha_c)
            self.amp.backward(loss_total)
            self.amp.step(opt)
            loss_sum += batch_loss
            correct += (logits.detach().argmax(1) == labels).sum()
        if shard is not None:
            loss_sum, correct = shard.total(loss_sum, correct)
        lr_now = opt.param_groups[0]["lr"]
        self.sched.step()
        sync(device)
        seconds = time.perf_counter() - t0
        n = self.loader.x.shape[0]
        return {"epoch": epoch + 1, "loss": loss_sum.item() / n,
                "train_accuracy": correct.item() / n, "seconds": seconds, "lr": lr_now,
                "layers": model.layers}

    def evaluate(self) -> dict:
        val_loss, val_acc = evaluate(self.model, self.val.x, self.val.y, self.eval_batch_size,
                                     self.device)
        return {"val_loss": val_loss, "val_accuracy": val_acc}

    def state_dict(self) -> dict:
        model = self.model
        return {"model_config": model.config() if hasattr(model, "config") else None,
                "model": model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                **({"grad_scaler": self.amp.state_dict()} if self.amp.scaler is not None else {})}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.amp.load_state_dict(state.get("grad_scaler"))
