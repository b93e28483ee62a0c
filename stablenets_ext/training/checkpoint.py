"""Atomic checkpoints, the random-number state a resumed run needs, clear
errors for files that are not checkpoints, and a lock so that two runs never
write the same checkpoint."""

from __future__ import annotations

import fcntl
import os
import pickle
import random
import zipfile

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


SIGNATURE = ("epoch", "history", "rng")  # keys every checkpoint of loop.run_epochs holds


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a checkpoint this package wrote, read without
    unpickling anything: a torch zip archive whose pickle names the keys of
    :data:`SIGNATURE`."""
    import pickletools

    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if name is None:
            return False
        raw = z.read(name)
    strings = set()
    for op, arg, _ in pickletools.genops(raw):
        if isinstance(arg, str):
            strings.add(arg)
    return all(k in strings for k in SIGNATURE)


class CheckpointError(ValueError):
    """A file that cannot be resumed from: the message names it and says why."""


def load(path, map_location="cpu", require=()) -> dict:
    """Read a checkpoint; a missing, empty, truncated or foreign file raises
    :class:`CheckpointError` (one line naming the file). ``require``: keys the
    caller needs."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"resume: checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"resume: {path!r} is a folder, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"resume: checkpoint {path!r} is empty")
    try:
        # Checkpoints hold numpy/python RNG states as well as tensors.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, AttributeError, ImportError, IndexError, KeyError, TypeError) as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"resume: {path!r} is not a readable checkpoint (truncated or "
                              f"another format: {why})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"resume: {path!r} is not a stablenets checkpoint (it holds a "
                              f"{type(state).__name__}, not a dict)")
    missing = [k for k in require if k not in state]
    if missing:
        raise CheckpointError(f"resume: {path!r} is not a stablenets checkpoint of this kind "
                              f"(no {', '.join(repr(k) for k in missing)})")
    if "history" in state and not isinstance(state["history"], dict):
        raise CheckpointError(f"resume: {path!r} is not a stablenets checkpoint (its 'history' "
                              f"is a {type(state['history']).__name__}, not a dict)")
    return state


class CheckpointLock:
    """An exclusive lock on ``<path>.lock`` for as long as a run writes ``path``:
    a second run that would write the same checkpoint is refused at once
    instead of silently overwriting the first one's."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self.lock_path = self.path + ".lock"
        self.fd = None

    def acquire(self):
        folder = os.path.dirname(os.path.abspath(self.lock_path))
        os.makedirs(folder, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise CheckpointError(
                f"--save: checkpoint {self.path!r} is being written by another run (pid "
                f"{holder}, lock {self.lock_path!r}); choose another path or wait for it") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self):
        if self.fd is not None:
            try:
                os.remove(self.lock_path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
