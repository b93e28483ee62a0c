"""Heartbeats: how a coordinator tells a hung worker from a slow one.

Every worker runs a daemon thread that stamps the time into its slot every
``interval`` seconds. The thread keeps beating while the worker computes
(torch releases the GIL inside its kernels), so a stale slot means the whole
process stopped: SIGSTOP, a deadlock in the interpreter, or a machine so
overloaded it cannot be used. A dead process is caught at once by its
sentinel; a hung one within ``timeout`` seconds of its last beat.

:class:`Heartbeats` keeps the stamps in a shared-memory tensor (workers this
process starts); :class:`FileHeartbeats` in the mtimes of files in a folder
(torchrun ranks, which this process does not start itself)."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import torch

from .errors import HungWorkerError
from .processes import fd_sharing, process_state

DEFAULT_TIMEOUT = 30.0
INTERVAL = 0.5


def check_timeout(value, name="heartbeat_timeout") -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not value == value or value <= 0 or value == float("inf"):
        raise ValueError(f"{name}: expected a finite number of seconds > 0, got {value!r}")
    return float(value)


class _Beats:
    _thread = None
    _stop = None

    def start(self, index: int, interval: float = INTERVAL) -> None:
        """Beat now and then every ``interval`` seconds from a daemon thread."""
        self.beat(index)
        stop = threading.Event()

        def loop():
            while not stop.wait(interval):
                with contextlib.suppress(Exception):
                    self.beat(index)

        self._stop = stop
        self._thread = threading.Thread(target=loop, name=f"heartbeat-{index}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the beating thread (before the process exits: a thread still
        inside torch while the interpreter shuts down can abort it)."""
        if self._stop is not None:
            self._stop.set()
            self._thread.join(2 * INTERVAL)
            self._stop = self._thread = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_thread", None)
        state.pop("_stop", None)
        return state

    def overdue(self, indices, timeout: float):
        """``(index, seconds since its last beat)`` of the first worker among
        ``indices`` silent for more than ``timeout`` (one that never beat does not
        count: start-up has its own limit), else None."""
        for i in indices:
            age = self.age(i)
            if age is not None and age > timeout:
                return i, age
        return None

    def check(self, indices, timeout: float | None, describe, pids=None) -> None:
        """Raise :class:`HungWorkerError` naming the first overdue worker
        (``describe(index)`` gives its name)."""
        if timeout is None:
            return
        late = self.overdue(indices, timeout)
        if late is None:
            return
        i, age = late
        state = process_state(pids[i]) if pids and i < len(pids) and pids[i] else ""
        how = f" (process state: {state})" if state else ""
        raise HungWorkerError(
            f"{describe(i)} stopped responding: no heartbeat for {age:.0f} s{how}; the limit is "
            f"{timeout:g} s (--heartbeat-timeout)", i)


class Heartbeats(_Beats):
    """Stamps in a shared float64 tensor; pass the object to the workers."""

    def __init__(self, count: int):
        with fd_sharing():
            self.times = torch.zeros(count, dtype=torch.float64).share_memory_()

    def beat(self, index: int) -> None:
        self.times[index] = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process

    def age(self, index: int):
        t = float(self.times[index])
        return None if t == 0.0 else time.monotonic() - t


class FileHeartbeats(_Beats):
    """Stamps as the mtimes of ``<folder>/heartbeat-<index>``."""

    def __init__(self, folder: str):
        self.folder = folder

    def _path(self, index):
        return os.path.join(self.folder, f"heartbeat-{index}")

    def beat(self, index: int) -> None:
        path = self._path(index)
        with open(path, "a"):
            os.utime(path, None)

    def age(self, index: int):
        try:
            return time.time() - os.stat(self._path(index)).st_mtime
        except OSError:
            return None
