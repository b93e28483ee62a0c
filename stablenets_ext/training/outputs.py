"""Where results go: output paths checked before any training, JSON that stays
valid when a run diverges (non-finite numbers become null), atomic writes."""

from __future__ import annotations

import json
import math
import os


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
