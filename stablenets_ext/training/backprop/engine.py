"""Plain backpropagation: Adam, a StepLR schedule, regularisers, evaluation
every epoch, early stop at a target accuracy, atomic checkpoints that resume
bit-for-bit."""

from __future__ import annotations

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
from ..outputs import write_json

@torch.no_grad()
def evaluate(model, x, y, batch_size=4096, device=None):
    """Mean cross-entropy and accuracy (a fraction) of ``model`` on ``(x, y)``."""
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
    """Train ``model`` in place on ``data`` for ``epochs`` epochs (total, counting
    epochs already done in a resumed checkpoint).

    ``alpha``/``alpha_c``: smoothness and classifier regularisers. ``lr_step``
    and ``lr_gamma``: StepLR, stepped once per epoch. ``target_accuracy``: stop
    once the validation accuracy (a fraction) reaches it. ``checkpoint``: a
    path written atomically after every epoch; ``resume``: a path to continue
    from (model, optimiser, scheduler, RNG state, epoch, history). ``history``:
    records to append to (multilevel training passes the previous levels').

    ``shard``: data-parallel training (:mod:`.ddp`): a :class:`.ddp.Shard`
    whose ``forward`` (the DistributedDataParallel wrapper) computes this
    rank's slice of every batch; the loss is scaled so that the all-reduced
    gradient is the whole batch's mean, and only rank 0 writes checkpoints.

    ``amp``: mixed precision, ``"bf16"`` or ``"fp16"`` (with a gradient scaler), see
    :mod:`..amp`; evaluation stays in float32.

    Returns :func:`summary`: ``accuracy``, ``loss``, ``seconds``, ``epochs``,
    ``stopped_early`` and ``history`` (per-epoch lists: ``loss``,
    ``train_accuracy``, ``val_loss``, ``val_accuracy``, ``seconds``, ``lr``...).
    """
    check_positive(epochs, "epochs")
    check_positive(batch_size, "batch_size")
    for part in ("train", "val"):
        if getattr(data, f"{part}_x").shape[0] == 0:
            raise ValueError(f"data: dataset {data.name!r} has no "
                             f"{'training' if part == 'train' else 'validation'} examples")
    check_positive(lr, "lr", float)
    if weight_decay < 0:
        raise ValueError(f"weight_decay: expected a number >= 0, got {weight_decay!r}")
    if lr_step is not None:
        check_positive(lr_step, "lr_step")
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
