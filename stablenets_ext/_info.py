from __future__ import annotations

import torch

__version__ = "0.1.0"


def info() -> dict:
    """Version, torch version, and which devices have compiled kernels."""
    from . import ops

    return {
        "stablenets_ext": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "compiled": ops.compiled(),
        "compiled_devices": ops.compiled_devices(),
        "cpu_isa": ops.CPU_ISA,
        "load_error": None if ops.LOAD_ERROR is None else str(ops.LOAD_ERROR),
    }
