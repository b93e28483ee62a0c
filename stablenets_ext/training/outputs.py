"""Where results go: output paths checked before any training (a real file
is created and removed in the target folder; two outputs on one path and a
file this package did not write are refused), JSON that stays valid when a
run diverges (non-finite numbers become null), atomic writes, and the
leftovers of runs killed mid-write (stale locks, temporary files of dead
processes) cleared."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re

from .runtime.processes import pid_alive


class OutputPathError(ValueError):
    """An output path that cannot be written; the message names the option."""


def _writable_folder(folder: str, option: str, path: str) -> None:
    """``folder`` exists and is writable, or can be created."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise OutputPathError(f"{option}: cannot write {path!r}: {probe!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(f"{option}: cannot write {path!r}: folder {probe!r} is not writable")
    # os.access trusts the permission bits (and root passes them all): only
    # writing tells, e.g. /proc, a read-only mount, a full disk.
    trial = os.path.join(probe, f".stablenets-probe{os.getpid()}")
    try:
        fd = os.open(trial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OutputPathError(f"{option}: cannot write {path!r}: creating a file in folder "
                              f"{probe!r} fails ({exc.strerror})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.remove(trial)


def check_distinct(paths: dict, allowed=()) -> None:
    """``paths``: {option: path or None}. Refuse two options on one file
    (``allowed``: pairs of options that may share one, e.g. --resume/--save)."""
    seen = {}
    for option, path in paths.items():
        if path is None or path is True or path is False:
            continue
        real = os.path.realpath(os.fspath(path))
        other = seen.get(real)
        if other is not None and (other, option) not in allowed \
                and (option, other) not in allowed:
            raise OutputPathError(f"{option}: {os.fspath(path)!r} is also the path of {other}; "
                                  f"give each its own file")
        seen.setdefault(real, option)


def check_ours(path, option: str, ours, what: str) -> None:
    """Refuse to overwrite an existing, non-empty ``path`` unless ``ours(path)``
    says this package wrote it (a checkpoint, a history, a cache)."""
    path = os.fspath(path)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    try:
        mine = bool(ours(path))
    except Exception:  # unreadable: not something this package wrote
        mine = False
    if not mine:
        raise OutputPathError(f"{option}: {path!r} exists and is not {what}; it would be "
                              f"overwritten: give another path or remove it first")


def check_trainer_outputs(checkpoint=None, history_path=None) -> None:
    """The Python trainers' outputs (``train``, ``train_multilevel``, ``train_sg``,
    ``train_pvd``), before any training: a ``checkpoint`` or ``history_path`` that
    would overwrite an existing file this package did not write is refused
    (:class:`OutputPathError`, a ValueError naming the argument), as the command
    line refuses ``--save`` and ``--history``."""
    from .checkpoint import is_checkpoint

    if checkpoint is not None:
        check_ours(checkpoint, "checkpoint", is_checkpoint, "a stablenets checkpoint")
    if history_path is not None:
        check_ours(history_path, "history_path", is_history, "a stablenets history (JSON)")


def is_history(path) -> bool:
    """A JSON history written by ``stablenets train --history``."""
    with open(path) as f:
        obj = json.load(f)
    return isinstance(obj, dict) and isinstance(obj.get("history"), dict)


def clean_stale(path) -> list:
    """Remove what runs killed while writing ``path`` left behind: its
    ``.lock`` when no process holds the lock, and temporary files
    (``<name>.tmp<pid>``, ``.<name>.tmp<pid>``) of processes that are gone.
    Returns the removed paths."""
    path = os.path.abspath(os.fspath(path))
    folder, base = os.path.split(path)
    removed = []
    lock = path + ".lock"
    if os.path.isfile(lock):
        with contextlib.suppress(OSError):
            fd = os.open(lock, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds it
                os.remove(lock)
                removed.append(lock)
            except OSError:
                pass
            finally:
                os.close(fd)
    pattern = re.compile(r"^\.?" + re.escape(base) + r"\.tmp(\d+)$")
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            m = pattern.match(name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))
                    removed.append(os.path.join(folder, name))
    return removed


def check_file(path, option: str) -> None:
    """``path`` can be written as a file (before the run that will write it)."""
    path = os.fspath(path)
    if not path:
        raise OutputPathError(f"{option}: empty path")
    if os.path.isdir(path) or path.endswith(os.sep):
        raise OutputPathError(f"{option}: {path!r} is a folder; give a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise OutputPathError(f"{option}: {path!r} exists and is not writable")
    _writable_folder(os.path.dirname(os.path.abspath(path)), option, path)


def check_folder(path, option: str) -> None:
    """``path`` is, or can become, a writable folder."""
    path = os.fspath(path)
    if not path:
        raise OutputPathError(f"{option}: empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputPathError(f"{option}: {path!r} is a file; give a folder")
    _writable_folder(path, option, path)
    _probe_create(path, option)


def _probe_create(path: str, option: str) -> None:
    """Create the missing folders of ``path``, then remove them again: the one sure test
    where ``os.access`` says yes but ``mkdir`` fails (``/proc``, read-only mounts)."""
    missing, probe = [], os.path.abspath(path)
    while not os.path.exists(probe):
        missing.append(probe)  # deepest first
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not missing:
        return
    try:
        os.makedirs(missing[0])
    except OSError as exc:
        raise OutputPathError(
            f"{option}: cannot create folder {path!r}: {exc.strerror or exc}") from None
    finally:
        for folder in missing:
            try:
                os.rmdir(folder)
            except OSError:
                pass


def json_safe(obj):
    """``(copy of obj with every NaN/inf float replaced by None, whether any was)``."""
    found = False

    def walk(v):
        nonlocal found
        if isinstance(v, float) and not math.isfinite(v):
            found = True
            return None
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    return walk(obj), found


def dumps(obj, **kw) -> str:
    """Strict JSON (``allow_nan=False``) after :func:`json_safe`."""
    return json.dumps(json_safe(obj)[0], allow_nan=False, **kw)


def write_json(path, obj) -> None:
    """Strict JSON, written atomically (a temporary file, then a rename)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(dumps(obj, indent=1))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
