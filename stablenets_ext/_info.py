from __future__ import annotations

import torch

__version__ = "0.1.0"


def info() -> dict:
    """What this install is and runs (``stablenets info`` prints it).

    Returns:
        dict: ``stablenets_ext`` and ``torch`` versions, ``torch_cuda``,
        ``cuda_available``, ``compiled`` (whether the extension loaded),
        ``compiled_devices`` (devices with fused kernels), ``cpu_isa`` (the CPU kernel
        build that runs: generic, avx2, avx512), ``cpu_cache`` (the CPU block cache)
        and ``load_error`` (why the extension did not load, or None).
    """
    from . import ops

    return {
        "stablenets_ext": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "compiled": ops.compiled(),
        "compiled_devices": ops.compiled_devices(),
        "cpu_isa": ops.CPU_ISA,
        "cpu_cache": _cache_line(ops),
        "load_error": None if ops.LOAD_ERROR is None else str(ops.LOAD_ERROR),
    }


def _cache_line(ops) -> str | None:
    try:
        stats = ops.cpu_cache_stats()
    except RuntimeError as exc:  # a bad STABLENETS_CPU_CACHE_MB: say so, as every CPU op will
        return f"error: {str(exc).splitlines()[0]}"
    if stats is None:
        return None
    if stats["cap"] == 0:
        return "off (STABLENETS_CPU_CACHE_MB=0)"
    return f"cap {stats['cap'] >> 20} MiB, holding {stats['held'] >> 20} MiB in {stats['blocks']} blocks"
