"""Launching local torchrun jobs from an ordinary process, and the rank side.

:func:`launch` makes a private run folder (``/tmp/stablenets-<name>-*``),
starts ``python -m torch.distributed.run`` with ``world`` local ranks on
127.0.0.1 and a free port in a new session, and waits. What keeps it clean:

- torchrun gets ``PR_SET_PDEATHSIG``: it is killed when the launcher dies,
  even by kill -9; every rank calls :func:`rank_setup`, which ends the rank
  when the launcher (``STABLENETS_LAUNCHER_PID``) is gone, and rank 0 removes
  the run folder on the way out, so nothing is left under PID 1 or in /tmp;
- SIGTERM to the launcher is turned into an orderly stop by the CLI
  (see :func:`sigterm_as_interrupt`): torchrun's whole session is stopped and
  the folder removed;
- every rank beats into the run folder (:class:`.FileHeartbeats`); a rank
  silent for ``heartbeat_timeout`` s is named (torchrun itself would blame
  whichever healthy rank timed out first) and the session is killed;
- a rank that fails inside :func:`reporting_errors` leaves its one-line
  error in the run folder, and the launcher raises ``error_type`` with that
  line (the rank that failed first); any other failed run raises it with the
  rank torchrun reports as the root cause and the tail of its log;
- the start-up limit only covers the start: once every rank has beaten it is
  off, and a run may last as long as it needs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from .errors import WorkerError
from .heartbeat import DEFAULT_TIMEOUT, FileHeartbeats
from .processes import descendants, die_with_parent_preexec, exit_with_parent, free_port, kill_all

ENV_LAUNCHER = "STABLENETS_LAUNCHER_PID"
ENV_RUN_DIR = "STABLENETS_RUN_DIR"


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def run_dir() -> str | None:
    """The launcher's run folder, when this rank was started by :func:`launch`."""
    return os.environ.get(ENV_RUN_DIR)


def rank_setup() -> None:
    """Called first thing by every rank: heartbeats into the run folder, and an
    exit (removing the folder, rank 0) as soon as the launcher is gone."""
    folder, launcher = os.environ.get(ENV_RUN_DIR), os.environ.get(ENV_LAUNCHER)
    rank = int(os.environ.get("RANK", 0))
    if folder and os.path.isdir(folder):
        FileHeartbeats(folder).start(rank)
    if launcher:
        cleanup = None
        if folder and rank == 0:
            def cleanup():
                shutil.rmtree(folder, ignore_errors=True)
        exit_with_parent(int(launcher), on_exit=cleanup)


def _error_path(folder, rank):
    return os.path.join(folder, f"error-{rank}")


@contextlib.contextmanager
def reporting_errors():
    """In a rank: an exception inside the block is printed as one line on
    stderr and written to the run folder (for :func:`launch` to report), and
    the rank exits with status 1 (2 for a ``ValueError``: a bad setting)."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (ValueError, OSError, RuntimeError)):
            text = f"{type(exc).__name__}: {text}"
        print(text, file=sys.stderr, flush=True)
        folder = run_dir()
        if folder and os.path.isdir(folder):
            rank = int(os.environ.get("RANK", 0))
            with contextlib.suppress(OSError):
                with open(_error_path(folder, rank) + ".tmp", "w") as f:
                    f.write(text)
                os.replace(_error_path(folder, rank) + ".tmp", _error_path(folder, rank))
        exit_rank(2 if isinstance(exc, ValueError) else 1)


def first_rank_error(folder, world):
    """``(rank, line)`` of the rank that reported its error first, or None."""
    found = []
    for r in range(world):
        path = _error_path(folder, r)
        with contextlib.suppress(OSError):
            with open(path, errors="replace") as f:
                found.append((os.stat(path).st_mtime, r, f.read().strip()))
    if not found:
        return None
    _, rank, line = min(found)
    return rank, line


def exit_rank(code: int) -> None:
    """End a torchrun rank without the interpreter's shutdown: its process group
    is already destroyed, and tearing down what remains of gloo's threads, or
    daemon threads still running, at interpreter exit can abort the process
    (SIGABRT, "terminate called without an active exception"), which torchrun
    would report as a failed rank."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(int(code or 0))


class Interrupted(KeyboardInterrupt):
    """SIGTERM, delivered as an exception so that ``finally`` blocks run."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Inside the block SIGTERM raises :class:`Interrupted` (a KeyboardInterrupt):
    workers are reaped and temporary files removed as on Ctrl-C."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(f"terminated by signal {signal.Signals(signum).name}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def stop_session(proc, grace: float = 10.0) -> None:
    """SIGINT to torchrun's session (it stops its ranks), then SIGKILL to it and
    to every rank it started (they may sit in sessions of their own, and a
    stopped one acts on nothing else)."""
    ranks = descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(grace)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    kill_all(ranks)
    proc.wait()


def summarise_failure(code, log, world, what) -> tuple[str, int | None]:
    """The rank torchrun's report gives as the root cause, and a message."""
    lines = log.strip().splitlines()
    start = next((i for i, ln in enumerate(lines) if "Root Cause" in ln), None)
    rank, details = None, []
    if start is not None:
        for ln in lines[start + 1:start + 12]:
            key = ln.strip().split(":", 1)[0].strip()
            if key in ("rank", "exitcode", "traceback"):
                details.append(ln.strip())
            if key == "rank" and rank is None:
                with contextlib.suppress(ValueError, IndexError):
                    rank = int(ln.split(":", 1)[1].split()[0])
    head = (f"{what(rank)} failed" if rank is not None
            else f"torchrun run of {world} ranks failed (exit {code})")
    tail = "\n".join(lines[-30:])
    return (f"{head}; torchrun stopped all {world} ranks. " + "; ".join(details)
            + f"\n--- torchrun log (tail) ---\n{tail}"), rank


def launch(module: str, argv: list, world: int, *, threads: int = 1, name: str = "run",
           prepare=None, collect=None, heartbeat_timeout: float | None = DEFAULT_TIMEOUT,
           start_timeout: float = 180.0, error_type=WorkerError, what=lambda r: f"rank {r}"):
    """Run ``python -m module *argv`` as ``world`` local torchrun ranks.

    ``prepare(folder)`` writes the ranks' inputs into the run folder before the
    start and may return extra arguments; ``collect(folder)`` reads the result
    after a clean exit (its return value is returned). ``what(rank)`` names a
    rank in messages; failures raise ``error_type``. A rank that has not
    beaten ``start_timeout`` seconds after the start is reported as not
    starting; one that stops beating, after ``heartbeat_timeout``."""
    folder = tempfile.mkdtemp(prefix=f"stablenets-{name}-")
    try:
        extra = list(prepare(folder) or []) if prepare is not None else []
        log_path = os.path.join(folder, "torchrun.log")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
               f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "--max-restarts=0", "-m", module, *argv, *extra]
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(threads)
        env[ENV_LAUNCHER] = str(os.getpid())
        env[ENV_RUN_DIR] = folder
        # torchrun's own temporary folders (torchelastic_*) inside the run folder:
        # removed with it, even when torchrun is killed before it cleans up.
        env["TMPDIR"] = folder
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        beats = FileHeartbeats(folder)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=die_with_parent_preexec)
            started, starting = time.monotonic(), True
            try:
                while proc.poll() is None:
                    time.sleep(0.1)
                    beats.check(range(world), heartbeat_timeout,
                                lambda r: f"{what(r)} (torchrun rank {r})")
                    if not starting:
                        continue
                    silent = [r for r in range(world) if beats.age(r) is None]
                    starting = bool(silent)  # every rank has beaten: the start is over
                    if silent and time.monotonic() - started > start_timeout:
                        raise WorkerError(f"{what(silent[0])} (torchrun rank {silent[0]}) did "
                                          f"not start within {start_timeout:.0f} s", silent[0])
            except BaseException as exc:
                stop_session(proc, grace=0.0 if isinstance(exc, WorkerError) else 10.0)
                if isinstance(exc, WorkerError):
                    raise error_type(str(exc), exc.worker) from None
                raise
        if proc.returncode != 0:
            own = first_rank_error(folder, world)
            if own is not None:
                raise error_type(f"{what(own[0])}: {own[1]}", own[0])
            with open(log_path, errors="replace") as f:
                text = f.read()
            message, rank = summarise_failure(proc.returncode, text, world, what)
            raise error_type(message, rank)
        return collect(folder) if collect is not None else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
