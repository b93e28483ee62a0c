"""Float32 accuracy of the fused CPU kernels, judged against plain PyTorch.

For every width 1..64 (the narrow tile path and the wide GEMM path), every
architecture and both backward modes, the fused float32 error against a float64
run of the same stack must be at most 1.5x the error that plain PyTorch
(``impl="reference"``) makes in float32 on the same inputs. Checked for the
output, the input gradient and the weight gradient.

Weight gradients are allowed 2.5x (stored mode): they are sums over the
batch of two terms that partly cancel (leapfrog: -h^2 act(P)^T lam + G^T Y),
reduced in another order than PyTorch's GEMMs, and the generic (no-FMA) build
of the CPU kernels rounds each product separately where PyTorch's own kernels
fuse them; measured 1.0-1.4x on AVX-512, up to 2.3x generic at d = 1 (single
draws). In reversible mode they are built from states rebuilt through
Y_{j-1} = 2 Y_j - Y_{j+1} - h^2 act(P_j) K_j, whose rounding the reference
(which stores every state) never sees: up to 1.7x on AVX-512 and 3.4x generic
at d = 1 (single draws), 2.5x once over 3 draws; allowed 4x.

STABLENETS_PRECISION_WIDTHS=1,2,33 limits the widths (test_cpu_isa.py reruns
this file for every CPU kernel build with a sample of widths).
"""

import os

import pytest
import torch

import stablenets_ext as sn

from stablenets_ext import ops

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="no compiled CPU kernels")

STACKS = {
    "resnet": sn.ResNetStack,
    "antisymmetric": sn.AntisymmetricStack,
    "leapfrog": sn.LeapfrogStack,
    "verlet": sn.VerletStack,
}
CASES = [(a, False) for a in STACKS] + [("leapfrog", True), ("verlet", True)]
WIDTHS = (
    [int(w) for w in os.environ["STABLENETS_PRECISION_WIDTHS"].split(",")]
    if os.environ.get("STABLENETS_PRECISION_WIDTHS")
    else list(range(1, 65))
)


def _rel(a, ref):
    # relative error; absolute where the exact value is 0 (d = 1 antisymmetric weights)
    scale = ref.norm().item()
    return (a.double() - ref).norm().item() / (scale if scale > 0 else 1.0)


def _errors(arch, reversible, d, impl, m64, y64, g64, exact):
    kw = {"impl": impl}
    if arch in ("leapfrog", "verlet") and impl != "reference":
        kw["reversible"] = reversible  # the reference stores every state: no reversible mode
    m = STACKS[arch](d, 24, **kw)
    m.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    y = y64.detach().float().requires_grad_()
    out = m(y)
    gy, gw = torch.autograd.grad(out, (y, m.weight), g64.float())
    return [_rel(a, b) for a, b in zip((out, gy, gw), exact)]


DRAWS = 3  # independent inputs per case: errors are summed over them (a ratio of two
# single small-sample errors has long tails; at d = 1 a weight gradient is 24 numbers)


def _case_errors(arch, reversible, d, gen):
    m64 = STACKS[arch](d, 24, impl="reference").double()
    with torch.no_grad():  # default-like init, redrawn from the test's generator
        m64.weight.copy_(torch.randn(m64.weight.shape, generator=gen, dtype=torch.float64) / d**0.5)
        m64.bias.copy_(0.1 * torch.randn(m64.bias.shape, generator=gen, dtype=torch.float64))
    y64 = torch.randn(128, d, generator=gen, dtype=torch.float64, requires_grad=True)
    out64 = m64(y64)
    g64 = torch.randn(out64.shape, generator=gen, dtype=torch.float64)
    exact = (out64, *torch.autograd.grad(out64, (y64, m64.weight), g64))
    fused = _errors(arch, reversible, d, "fused", m64, y64, g64, exact)
    ref = _errors(arch, reversible, d, "reference", m64, y64, g64, exact)
    return fused, ref


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("arch,reversible", CASES, ids=[f"{a}-{'rev' if r else 'stored'}" for a, r in CASES])
def test_float32_error_no_worse_than_pytorch(arch, reversible, d):
    gen = torch.default_generator  # fresh inputs each run (conftest seeds and reports it)
    fused, ref = [0.0] * 3, [0.0] * 3
    for _ in range(DRAWS):
        f, r = _case_errors(arch, reversible, d, gen)
        fused = [a + b for a, b in zip(fused, f)]
        ref = [a + b for a, b in zip(ref, r)]
    limits = [1.5, 1.5, 4.0 if reversible else 2.5]
    for name, f, r, lim in zip(("output", "grad y", "grad weight"), fused, ref, limits):
        # The floor keeps exact cases (identity-like d=1 stacks) from dividing by ~0.
        assert f <= lim * max(r, DRAWS * 1e-7), (
            f"{name}: fused {f / DRAWS:.3g} vs PyTorch {r / DRAWS:.3g} (mean of {DRAWS}; limit {lim}x)")


@pytest.mark.parametrize("arch", ["leapfrog"])
def test_deep_leapfrog_float32(arch):
    """At depth the narrow leapfrog used to lose 5x plain PyTorch's accuracy. The error
    of a 2048-layer stack varies a lot from draw to draw: summed over 8 draws, within 2x
    (summed over 4 draws against 1.5x, about one fresh seed in 20 failed, on every ISA
    variant; over 8 draws the generic build still reached 1.63x once in 25)."""
    gen = torch.default_generator
    d, n = 8, 2048
    errs = {"fused": 0.0, "reference": 0.0}
    for _ in range(8):
        m64 = sn.LeapfrogStack(d, n, step=0.05, impl="reference").double()
        with torch.no_grad():
            m64.weight.copy_(torch.randn(m64.weight.shape, generator=gen, dtype=torch.float64) / d**0.5)
        y64 = torch.randn(64, d, generator=gen, dtype=torch.float64)
        exact = m64(y64)
        for impl in errs:
            m = sn.LeapfrogStack(d, n, step=0.05, impl=impl)
            m.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
            with torch.no_grad():
                errs[impl] += _rel(m(y64.float()), exact)
    assert errs["fused"] <= 2.0 * errs["reference"], errs
