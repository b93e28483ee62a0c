"""Process and torch.distributed plumbing, written once for every trainer:
spawn contexts, shared memory, ports, threads, heartbeats and hung-worker
detection, reaping, dying with the parent, the torchrun launcher, and the
:class:`WorkerError` family the CLI catches by type."""

from .errors import HungWorkerError, StageError, WorkerError
from .heartbeat import DEFAULT_TIMEOUT, FileHeartbeats, Heartbeats, check_timeout
from .processes import (START_METHODS, describe_exit, die_with_parent_preexec, exit_with_parent,
                        fd_sharing, free_port, mp_context, process_state, reap, reporting_to,
                        set_threads, sigint_ignored)

__all__ = [
    "DEFAULT_TIMEOUT", "FileHeartbeats", "Heartbeats", "HungWorkerError", "START_METHODS",
    "StageError", "WorkerError", "check_timeout", "describe_exit", "die_with_parent_preexec",
    "exit_with_parent", "fd_sharing", "free_port", "mp_context", "process_state", "reap",
    "reporting_to", "set_threads", "sigint_ignored",
]
