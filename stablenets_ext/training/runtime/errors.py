"""The one family of errors a parallel trainer raises when a worker fails.

The CLI catches :class:`WorkerError` by type (never by class name): every
trainer's worker, stage and rank failures are subclasses."""

from __future__ import annotations


class WorkerError(RuntimeError):
    """A worker process (or rank) raised, died or stopped answering; ``worker``
    is its index when known. The message names it."""

    def __init__(self, message: str, worker: int | None = None):
        super().__init__(message)
        self.worker = worker


class StageError(WorkerError):
    """A synthetic-gradient stage raised, died or stopped answering."""

    def __init__(self, message: str, stage: int | None = None):
        super().__init__(message, stage)
        self.stage = stage


class HungWorkerError(WorkerError):
    """A worker that is alive but sent no heartbeat for longer than allowed
    (stopped with SIGSTOP, deadlocked, or swapped out)."""
