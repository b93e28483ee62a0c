"""Run python_tests/test_cuda.py against the CUDA kernel sources emulated on the CPU.

A development check for machines without a GPU (see cpu_emulator.cpp): builds
the emulator with torch.utils.cpp_extension (about a minute), registers it as
the stablenets CPU backend in this process (and as stablenets_ext._C: the
package's own is not loaded), and runs the CUDA tests with their device switched to the CPU. Tests
that need a real GPU (CUDA graphs, CPU-vs-CUDA, mixed devices) are deselected.
Slow: every emulated block runs one OS thread per CUDA thread.

    python csrc/cuda/testing/run_emulated.py [-k EXPR] [other pytest args]

Set SN_EMULATOR_BUILD=<folder> to keep the build between runs.
"""

from __future__ import annotations

import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))

CONFTEST = '''
import importlib.machinery, importlib.util, os, sys, torch
lib = os.environ["SN_EMULATOR_LIB"]
torch.ops.load_library(lib)
# The emulator library is also the stablenets_ext._C module (ops.cpp's PyInit__C,
# the C++ autograd and autocast kernels), as the package's own _C would be.
loader = importlib.machinery.ExtensionFileLoader("stablenets_ext._C", lib)
module = importlib.util.module_from_spec(importlib.util.spec_from_loader("stablenets_ext._C", loader))
sys.modules["stablenets_ext._C"] = module
sys.path.insert(0, os.environ["SN_ROOT"])
import stablenets_ext.ops as ops
assert ops.has_kernel("cpu"), "emulator did not register"
'''


def build(build_dir):
    from torch.utils.cpp_extension import load

    load(
        name="sn_cuda_emulator",
        sources=[os.path.join(ROOT, "csrc", name) for name in ("ops.cpp", "autograd.cpp", "autocast.cpp")]
        + [os.path.join(HERE, "cpu_emulator.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cuda")],
        extra_cflags=["-O1", "-pthread", "-Wno-unknown-pragmas"],
        extra_ldflags=["-pthread"],
        build_directory=build_dir,
        is_python_module=False,
    )
    return os.path.join(build_dir, "sn_cuda_emulator.so")


def main(argv):
    import pytest

    work = tempfile.mkdtemp(prefix="sn_emulated_")
    # SN_EMULATOR_BUILD: a build folder to keep between runs (ninja rebuilds what changed).
    build_dir = os.environ.get("SN_EMULATOR_BUILD") or os.path.join(work, "build")
    os.makedirs(build_dir, exist_ok=True)
    lib = build(build_dir)
    src = open(os.path.join(ROOT, "python_tests", "test_cuda.py")).read()
    for old, new in [
        ("not torch.cuda.is_available()", "False"),
        ('DEVICE = torch.device("cuda")', 'DEVICE = torch.device("cpu")'),
        ('ops.has_kernel("cuda")', 'ops.has_kernel("cpu")'),
        ('o.device.type == "cuda"', 'o.device.type == "cpu"'),
    ]:
        assert old in src, f"test_cuda.py changed: {old!r} not found"
        src = src.replace(old, new)
    with open(os.path.join(work, "test_cuda_emulated.py"), "w") as f:
        f.write(src)
    with open(os.path.join(work, "conftest.py"), "w") as f:
        f.write(CONFTEST)
    os.environ["SN_EMULATOR_LIB"] = lib
    os.environ["SN_ROOT"] = ROOT
    os.environ["STABLENETS_CPU_ISA"] = "none"  # the emulator is the CPU backend here
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # GPU-only, or too slow emulated (deep: 64 blocks x 256 threads x 320 layers).
    gpu_only = "not graph and not cpu_and_cuda and not mixed_devices and not deep"
    args = ["-q", "-p", "no:cacheprovider", "--rootdir", work, work]
    if "-k" in argv:
        i = argv.index("-k")
        argv = argv[:i] + ["-k", f"({argv[i + 1]}) and {gpu_only}"] + argv[i + 2:]
    else:
        argv = ["-k", gpu_only] + argv
    return pytest.main(args + argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
