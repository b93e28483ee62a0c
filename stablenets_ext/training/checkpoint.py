"""Atomic checkpoints and the random-number state a resumed run needs."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path, state: dict) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over
    ``path``: a crash mid-write leaves the previous checkpoint intact."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path, map_location="cpu") -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: checkpoint {os.fspath(path)!r} does not exist")
    # Checkpoints hold numpy/python RNG states as well as tensors.
    return torch.load(path, map_location=map_location, weights_only=False)
