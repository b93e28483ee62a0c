"""What every trainer's epoch loop shares: the history layout, the result
summary, the progress bar switch, device helpers and argument checks."""

from __future__ import annotations

import math
import sys
import time

import torch

HISTORY_KEYS = ("epoch", "loss", "train_accuracy", "val_loss", "val_accuracy", "seconds",
                "eval_seconds", "lr", "layers")


def new_history() -> dict:
    return {k: [] for k in HISTORY_KEYS}


def model_device(model) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def check_positive(value, name, kind=int):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = ok and isinstance(value, int)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive {kind.__name__}, got {value!r}")


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def summary(history: dict, stopped_early=False) -> dict:
    """The result dict shared by every trainer: final figures plus the history."""
    return {
        "accuracy": history["val_accuracy"][-1] if history["val_accuracy"] else float("nan"),
        "best_accuracy": max(history["val_accuracy"], default=float("nan")),
        "loss": history["loss"][-1] if history["loss"] else float("nan"),
        "val_loss": history["val_loss"][-1] if history["val_loss"] else float("nan"),
        "seconds": float(sum(history["seconds"])),
        "seconds_per_epoch": (float(sum(history["seconds"])) / len(history["seconds"])
                              if history["seconds"] else float("nan")),
        "epochs": len(history["epoch"]),
        "stopped_early": bool(stopped_early),
        "history": history,
    }


# ------------------------------------------------------------ the epoch loop


class ProgressBar:
    """tqdm on a terminal (stderr), nothing otherwise."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = None
        if enabled and progress_enabled(False) and initial < total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="ep",
                            dynamic_ncols=True, leave=True)

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            loss = record.get("loss")
            self.bar.set_postfix(loss=f"{loss:.4f}" if isinstance(loss, float) else loss,
                                 val=f"{100 * record['val_accuracy']:.2f}%")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def resume(engine, state: dict, history: dict) -> tuple[int, bool]:
    """Load a checkpoint written by :func:`run_epochs` into ``engine`` and
    ``history``; returns ``(epochs done, whether it had stopped early)``."""
    from . import checkpoint as ckpt

    engine.load_state_dict(state)
    ckpt.set_rng_state(state["rng"])
    history.clear()
    history.update(state["history"])
    return int(state["epoch"]), bool(state.get("stopped_early"))


def run_epochs(engine, *, epochs: int, start: int, history: dict, target_accuracy=None,
               checkpoint=None, checkpoint_extra=None, quiet=False, desc="", on_epoch=None,
               main=True) -> bool:
    """The one epoch loop every trainer runs: ``engine.run_epoch(epoch)`` (the
    training figures of one epoch or iteration), ``engine.evaluate()`` (at
    least ``val_loss`` and ``val_accuracy``), one history row, an atomic
    checkpoint (``engine.state_dict()`` plus RNG state, epoch, history; rank 0
    only: ``main``), the progress bar, ``on_epoch(record)``, and the early
    stop at ``target_accuracy``. Returns whether it stopped early."""
    from . import checkpoint as ckpt

    stopped = False
    bar = ProgressBar(not quiet and main, epochs, start, desc)
    try:
        for epoch in range(start, epochs):
            record = dict(engine.run_epoch(epoch))
            t1 = time.perf_counter()
            record.update(engine.evaluate())
            record.setdefault("eval_seconds", time.perf_counter() - t1)
            record.setdefault("epoch", epoch + 1)
            for k, v in record.items():
                history.setdefault(k, []).append(v)
            stopped = target_accuracy is not None and record["val_accuracy"] >= target_accuracy
            if checkpoint is not None and main:
                ckpt.save(checkpoint, {
                    **engine.state_dict(), "rng": ckpt.rng_state(), "epoch": epoch + 1,
                    "history": history, "stopped_early": stopped, **(checkpoint_extra or {}),
                })
            bar.update(record)
            if on_epoch is not None:
                on_epoch(record)
            if stopped:
                break
    finally:
        bar.close()
    return stopped
