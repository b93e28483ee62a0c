"""Process plumbing shared by the parallel trainers: start methods, shared
memory strategy, thread counts, ports, exit descriptions, reaping, watchdogs."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time

import torch
import torch.multiprocessing as tmp

START_METHODS = ("spawn", "forkserver")


@contextlib.contextmanager
def fd_sharing():
    """torch's ``file_descriptor`` sharing strategy inside the block: its
    segments are unlinked from ``/dev/shm`` as soon as they exist and live as
    long as some process holds the descriptor, so no kill -9 can strand a file
    there (``file_system`` would leave named segments)."""
    old = tmp.get_sharing_strategy()
    if old == "file_descriptor" or "file_descriptor" not in tmp.get_all_sharing_strategies():
        yield
        return
    tmp.set_sharing_strategy("file_descriptor")
    try:
        yield
    finally:
        tmp.set_sharing_strategy(old)


@contextlib.contextmanager
def sigint_ignored():
    """Children started inside inherit SIG_IGN for SIGINT, so Ctrl-C (sent to the
    whole process group) is the coordinator's alone to handle."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def process_state(pid: int) -> str:
    """'stopped', 'running', 'sleeping', 'zombie'... from /proc (Linux), or ''."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return {"R": "running", "S": "sleeping", "D": "in uninterruptible wait", "T": "stopped",
            "t": "stopped by a debugger", "Z": "zombie"}.get(state, state)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; [] elsewhere)."""
    parents = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out.extend(kids)
        todo.extend(kids)
    return out


def kill_all(pids) -> None:
    """SIGKILL each process (a stopped one too), ignoring those already gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def mp_context(start_method: str = "spawn", preload=()):
    """A spawn or forkserver context (never fork: torch's threads and CUDA do not
    survive it). The forkserver imports ``preload`` once and forks every later
    worker from it: much cheaper starts when one process trains repeatedly."""
    if start_method not in START_METHODS:
        raise ValueError(f"start_method: expected one of {START_METHODS}, got {start_method!r}")
    ctx = tmp.get_context(start_method)
    if start_method == "forkserver" and preload:
        ctx.set_forkserver_preload(list(preload))
    return ctx


def set_threads(threads: int) -> None:
    torch.set_num_threads(max(1, int(threads)))
    with contextlib.suppress(RuntimeError):  # only settable before any parallel work
        torch.set_num_interop_threads(1)


def free_port(host: str = "127.0.0.1") -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def reap(procs, grace: float = 3.0) -> None:
    """Wait ``grace`` seconds for ``multiprocessing`` processes to leave, then
    SIGTERM (with SIGCONT, so a stopped one acts on it), then SIGKILL."""
    started = [p for p in procs if p.pid is not None]
    deadline = time.monotonic() + grace
    for p in started:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in started:
        if p.is_alive():
            p.terminate()
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGCONT)
    for p in started:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_with_parent(pid: int | None = None, on_exit=None) -> None:
    """Start a daemon thread that ends this process (``os._exit(1)``) as soon as
    process ``pid`` (default: the parent) is gone; ``on_exit()`` runs first
    (e.g. removing a run folder the dead launcher can no longer remove)."""
    pid = os.getppid() if pid is None else int(pid)

    def alive() -> bool:
        return pid_alive(pid)

    def watch():
        fd = None
        with contextlib.suppress(AttributeError, OSError):
            fd = os.pidfd_open(pid)
        while True:
            if fd is not None:
                select.select([fd], [], [], 5.0)
            else:
                time.sleep(0.5)
            if (fd is not None and select.select([fd], [], [], 0)[0]) or not alive() \
                    or (pid_is_parent and os.getppid() != pid):
                break
        if on_exit is not None:
            with contextlib.suppress(Exception):
                on_exit()
        os._exit(1)

    pid_is_parent = pid == os.getppid()
    if not alive():
        watch()
    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()


def die_with_parent_preexec():
    """``preexec_fn`` for ``subprocess.Popen`` (Linux): the child gets SIGKILL
    when the process that started it dies, even by kill -9."""
    import ctypes

    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@contextlib.contextmanager
def reporting_to(conn, index: int, quiet=()):
    """In a worker: an exception inside the block goes back to the coordinator
    as ``("error", index, traceback)`` and the worker exits with status 1;
    exceptions in ``quiet`` (the coordinator hanging up) end it silently. The
    pipe is closed on the way out."""
    import traceback

    try:
        yield
    except quiet:
        pass
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", index, traceback.format_exc()))
        raise SystemExit(1)
    finally:
        with contextlib.suppress(Exception):
            conn.close()
