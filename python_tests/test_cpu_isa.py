"""Run-time choice of the CPU kernel build (generic, AVX2, AVX-512).

Every variant this machine can run passes the same kernel tests: the default
process runs the whole suite on the best variant, and here each other variant
reruns the numerical core (fused vs reference, gradients, float32 accuracy,
reversible mode) in a subprocess with STABLENETS_CPU_ISA set.
"""

import os
import subprocess
import sys

import pytest

from stablenets_ext import _cpu_isa, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNABLE = [isa for isa in _cpu_isa.supported() if isa in _cpu_isa.built()]

CORE = [
    "python_tests/test_ops.py::test_matches_reference_float64",
    "python_tests/test_ops.py::test_float32_error_like_pytorch",
    "python_tests/test_ops.py::test_gradients_match_reference",
    "python_tests/test_ops.py::test_non_contiguous_inputs",
    "python_tests/test_reversible.py::test_reversible_matches_stored",
]


def _env(isa, **extra):
    env = dict(os.environ)
    env["STABLENETS_CPU_ISA"] = isa
    env.update(extra)
    return env


def test_best_variant_is_loaded():
    assert ops.CPU_ISA == RUNNABLE[0], (ops.CPU_ISA, RUNNABLE)
    assert ops.has_kernel("cpu")


@pytest.mark.parametrize("isa", [i for i in _cpu_isa.ORDER])
def test_forced_variant_is_loaded_or_refused(isa):
    # refused at the first use of the CPU kernels (the import itself succeeds, so
    # that the command line can report the variable as one line)
    code = "from stablenets_ext import ops; ops.has_kernel('cpu'); print(ops.CPU_ISA)"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(isa), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if isa in RUNNABLE:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == isa
    else:  # refused with an error that names the variable, never silently replaced
        assert proc.returncode != 0
        assert "STABLENETS_CPU_ISA" in proc.stderr


def test_unknown_variant_is_refused():
    code = "import stablenets_ext; stablenets_ext.ops.has_kernel('cpu')"
    proc = subprocess.run([sys.executable, "-c", code], env=_env("sse9"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "STABLENETS_CPU_ISA='sse9'" in proc.stderr


def test_none_loads_no_cpu_kernels():
    code = "from stablenets_ext import ops; print(ops.CPU_ISA, ops.has_kernel('cpu'))"
    proc = subprocess.run([sys.executable, "-c", code], env=_env("none"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["None", "False"]


@pytest.mark.parametrize("isa", RUNNABLE[1:])
def test_every_variant_passes_the_kernel_tests(isa):
    """The variants not loaded by default, through the same numerical tests."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-k", "not cuda",
           *CORE, "python_tests/test_precision.py"]
    env = _env(isa, STABLENETS_PRECISION_WIDTHS="1,2,3,4,5,7,8,16,31,32,33,40,64")
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
