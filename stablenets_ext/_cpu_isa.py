"""Load the CPU kernels built for the best instruction set this CPU runs.

setup.py compiles the CPU kernels once per instruction set, each into its own
library (``_cpu_generic``, ``_cpu_avx2``, ``_cpu_avx512``), as torch does for
its own CPU kernels. Exactly one is loaded: the best one this CPU supports, or
the one named by ``STABLENETS_CPU_ISA`` (``generic``, ``avx2``, ``avx512``),
which tests use to run every variant the machine has. A forced variant the CPU
cannot run, or that was not built, is refused with an error naming the variable
rather than silently replaced. ``STABLENETS_CPU_ISA=none`` loads none (for
development tools that register their own CPU backend, such as the CUDA
emulator in csrc/cuda/testing/).
"""

from __future__ import annotations

import importlib.machinery
import os

import torch

ENV = "STABLENETS_CPU_ISA"
ORDER = ("avx512", "avx2", "generic")  # best first
_FLAGS = {
    "avx512": {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma"},
    "avx2": {"avx2", "fma"},
    "generic": set(),
}


def supported() -> list[str]:
    """The variants this CPU can run, best first."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(f.read().split())
    except OSError:  # not Linux: ask torch, which probes the CPU itself
        cap = torch.backends.cpu.get_cpu_capability().lower()
        words = _FLAGS["avx512"] if cap.startswith("avx512") else (_FLAGS["avx2"] if cap == "avx2" else set())
    return [isa for isa in ORDER if _FLAGS[isa] <= words]


def _library(isa: str) -> str | None:
    # Only this package's own folder: an import search could find another
    # checkout's build through an editable install's finder.
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, f"_cpu_{isa}{suffix}")
        if os.path.exists(path):
            return path
    return None


def built() -> list[str]:
    """The variants this installation has, best first."""
    return [isa for isa in ORDER if _library(isa) is not None]


def choose() -> str | None:
    """The variant to load: forced by the environment, else the best one built and runnable."""
    forced = os.environ.get(ENV, "").strip().lower()
    have, can = built(), supported()
    if forced == "none":
        return None
    if forced:
        if forced not in ORDER:
            raise ValueError(f"{ENV}={forced!r}: expected one of {list(ORDER)} or 'none'")
        if forced not in can:
            raise RuntimeError(
                f"{ENV}={forced!r}: this CPU cannot run it (it runs {can}); unset {ENV} to pick automatically"
            )
        if forced not in have:
            raise RuntimeError(
                f"{ENV}={forced!r}: this installation has no {forced} build of the CPU kernels "
                f"(built: {have}); rebuild with STABLENETS_CPU_ISAS including {forced!r}"
            )
        return forced
    for isa in have:
        if isa in can:
            return isa
    return None


def load() -> str | None:
    """Load the chosen variant (registers the CPU kernels); returns its name, or None if none is built."""
    isa = choose()
    if isa is not None:
        torch.ops.load_library(_library(isa))
    return isa
