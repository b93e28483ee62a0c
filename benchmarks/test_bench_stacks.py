"""pytest-benchmark: fused against the plain-PyTorch reference, forward and forward+backward.

    python -m pytest benchmarks/test_bench_stacks.py --benchmark-group-by=param:shape,param:arch

with the Python that has stablenets_ext and pytest-benchmark installed (``make test``
and ``make bench`` use the checkout's ``.venv/bin/python``).

Rows of one group differ only in `impl`, so pytest-benchmark's table compares them directly.
"""

import pytest
import torch

from stablenets_ext import functional as SF
from stablenets_ext import ops

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="extension not built")

SHAPES = {"1024x4x64": (1024, 4, 64), "256x784x16": (256, 784, 16)}
ARCHS = ["resnet", "antisymmetric", "leapfrog", "verlet"]


def _inputs(shape):
    B, d, N = SHAPES[shape]
    y = torch.randn(B, d)
    w = (torch.randn(N, d, d) / d**0.5).requires_grad_()
    b = (0.1 * torch.randn(N, d)).requires_grad_()
    return y, w, b


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward(benchmark, shape, arch, impl):
    y, w, b = _inputs(shape)
    fn = SF.FUNCTIONS[arch]

    def run():
        with torch.no_grad():
            return fn(y, w, b, 0.1, "tanh", impl=impl)

    benchmark(run)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_backward(benchmark, shape, arch, impl):
    y, w, b = _inputs(shape)
    fn = SF.FUNCTIONS[arch]

    def run():
        w.grad = b.grad = None
        fn(y, w, b, 0.1, "tanh", impl=impl).sum().backward()

    benchmark(run)
