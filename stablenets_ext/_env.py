"""The environment variables this package reads, checked in one place so that
every command can refuse a bad value with one line naming the variable
(exit 2) before it does anything else."""

from __future__ import annotations

import os

CACHE_ENV = "STABLENETS_CPU_CACHE_MB"
CONV_LAYOUT_ENV = "STABLENETS_CONV_CHANNELS_LAST"


def problems() -> list[str]:
    """One line per variable set to a value this package cannot use."""
    out = []
    cache = os.environ.get(CACHE_ENV)
    if cache:  # the rule of csrc/cpu/block_cache.cpp (cap_from_env)
        if not (cache.isascii() and cache.isdigit() and len(cache) <= 9):
            out.append(f"{CACHE_ENV}: expected a whole number of megabytes (0 turns the CPU "
                       f"block cache off), got {cache!r}")
    layout = os.environ.get(CONV_LAYOUT_ENV)
    if layout and layout not in ("0", "1"):  # the rule of csrc/cpu/conv.cpp (channels_last)
        out.append(f"{CONV_LAYOUT_ENV}: expected 1 (channels-last inside the CPU conv ops, the "
                   f"default) or 0 (NCHW), got {layout!r}")
    from . import _cpu_isa, ops

    isa = os.environ.get(_cpu_isa.ENV, "").strip().lower()
    if getattr(ops, "ENV_ERROR", None) is not None:  # the loader's own verdict
        out.append(" ".join(str(ops.ENV_ERROR).split()))
    elif isa and isa != "none" and isa not in _cpu_isa.ORDER:
        out.append(f"{_cpu_isa.ENV}={isa!r}: expected one of {list(_cpu_isa.ORDER)} or 'none'")
    return out
