"""What every trainer's epoch loop shares: the history layout, the result
summary, the progress bar switch, device helpers and argument checks."""

from __future__ import annotations

import math
import sys

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
