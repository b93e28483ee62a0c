"""CUDA kernels against the plain-PyTorch reference (skipped without a GPU).

Float32 results are judged against the error the reference itself makes in
float32 (both measured against a float64 reference), not against a constant
picked to pass. Inputs are fresh random draws; the seed is in every message.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from stablenets_ext import functional as F
from stablenets_ext import ops, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = torch.device("cuda")
ARCHS = ("resnet", "antisymmetric", "leapfrog", "verlet")
PAIR = ("leapfrog", "verlet")  # archs that carry a second state tensor
ACTS = ("tanh", "relu", "identity")
GAMMA = 0.05
# (batch, features, layers): both sides of the narrow/wide switch (d <= 64 runs
# in one launch, wider per layer on cuBLAS), d = 1, B = 1, odd sizes, several
# row tiles, padded widths.
SHAPES = [
    (1, 1, 1),
    (7, 3, 5),
    (33, 4, 8),
    (130, 13, 3),
    (257, 16, 4),
    (5, 33, 3),
    (300, 64, 2),
    (9, 65, 3),
    (17, 100, 2),
]


@pytest.fixture(autouse=True)
def _no_tf32():
    # The float32 baselines below assume full-precision GEMMs.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="module", autouse=True)
def _needs_kernels():
    if not ops.has_kernel("cuda"):
        pytest.fail(
            f"stablenets_ext has no CUDA kernels (compiled for {ops.compiled_devices()}, "
            f"load error: {ops.LOAD_ERROR}); build with a CUDA toolkit"
        )


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)


def make_inputs(arch, B, d, N, seed, dtype=torch.float64, device=DEVICE):
    """(y, other, weight, bias) in float64 on `device`, then cast to dtype."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, d, generator=g, dtype=torch.float64)
    other = torch.randn(B, d, generator=g, dtype=torch.float64) * 0.5 if arch in PAIR else None
    W = torch.randn(N, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(N, d, generator=g, dtype=torch.float64) * 0.3
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(y), cast(other), cast(W), cast(b)


def run(arch, y, other, W, b, step, act, impl, reversible=False):
    """The stack through the public functional API; always a tuple of outputs."""
    if arch == "resnet":
        return (F.resnet(y, W, b, step, act, impl=impl),)
    if arch == "antisymmetric":
        return (F.antisymmetric(y, W, b, step, act, gamma=GAMMA, impl=impl),)
    if arch == "leapfrog":
        return tuple(
            F.leapfrog(y, W, b, step, act, y_prev=other, return_state=True,
                       reversible=reversible, impl=impl)
        )
    return tuple(
        F.verlet(y, W, b, step, act, z=other, return_state=True, reversible=reversible,
                 impl=impl)
    )


def leaves(y, other, W, b):
    return [t for t in (y, other, W, b) if t is not None]


def outputs_and_grads(arch, inputs, step, act, impl, cotangents, reversible=False):
    xs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    outs = run(arch, *xs, step, act, impl, reversible=reversible)
    loss = sum((o * c.to(o.dtype)).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, leaves(*xs))
    return [o.detach() for o in outs], [g.detach() for g in grads]


def max_abs(t):
    return t.abs().max().item() if t.numel() else 0.0


def check_against(got, ref64, ref32, what, seed, floor32=2e-6):
    """got (any dtype) vs the float64 reference; in float32 the allowance is
    a multiple of the float32 reference's own error (plus a small relative
    floor, since one sample of that error can come out small by luck)."""
    err = max_abs(got.double() - ref64)
    scale = 1.0 + max_abs(ref64)
    if got.dtype == torch.float64:
        tol = 1e-9 * scale
    else:
        ref_err = max_abs(ref32.double() - ref64)
        tol = 10.0 * ref_err + floor32 * scale
    assert err <= tol, f"{what}: max error {err:.3e} > {tol:.3e} (seed {seed})"


def compare_with_reference(arch, B, d, N, act, dtype, reversible=False, step=0.25):
    seed = fresh_seed()
    in64 = make_inputs(arch, B, d, N, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n_out = 2 if arch in PAIR else 1
    cot = [torch.randn(B, d, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(n_out)]
    ref_out, ref_grads = outputs_and_grads(arch, in64, step, act, "reference", cot)
    if dtype == torch.float64:
        r32_out, r32_grads = ref_out, ref_grads
        fin = in64
    else:
        fin = [None if t is None else t.float() for t in in64]
        r32_out, r32_grads = outputs_and_grads(arch, fin, step, act, "reference", cot)
    out, grads = outputs_and_grads(arch, fin, step, act, "fused", cot, reversible=reversible)
    tag = f"{arch} B={B} d={d} N={N} {act} {dtype} {'reversible' if reversible else 'stored'}"
    for i, (o, r, r32) in enumerate(zip(out, ref_out, r32_out)):
        assert o.dtype == dtype and o.device.type == "cuda"
        check_against(o, r, r32, f"{tag} output {i}", seed)
    names = ["y", "y_prev" if arch == "leapfrog" else "z", "weight", "bias"]
    if arch not in PAIR:
        names = ["y", "weight", "bias"]
    # The reversible backward rebuilds the states by running the stack in
    # reverse, which adds the rounding of that second pass (measured: up to
    # ~1e-5 relative in float32 for these shapes).
    floor = 3e-5 if reversible else 2e-6
    for name, gr, r, r32 in zip(names, grads, ref_grads, r32_grads):
        check_against(gr, r, r32, f"{tag} grad {name}", seed, floor32=floor)


# ------------------------------------------------------------- correctness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d-d%d-N%d" % s)
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_reference(arch, shape, act, dtype):
    compare_with_reference(arch, *shape, act, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B%d-d%d-N%d" % s)
@pytest.mark.parametrize("arch", PAIR)
def test_reversible_matches_reference(arch, shape, act, dtype):
    compare_with_reference(arch, *shape, act, dtype, reversible=True)


NEW_ACTS = ("sigmoid", "softplus", "leaky_relu", "silu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("act", NEW_ACTS)
@pytest.mark.parametrize("shape", [(33, 4, 8), (130, 13, 3), (300, 64, 2), (17, 100, 2)],
                         ids=lambda s: "B%d-d%d-N%d" % s)
@pytest.mark.parametrize("arch", ARCHS)
def test_more_activations_match_reference(arch, shape, act, dtype):
    compare_with_reference(arch, *shape, act, dtype)
    if arch in PAIR:
        compare_with_reference(arch, *shape, act, dtype, reversible=True)


@pytest.mark.parametrize("d", [5, 64, 80], ids=["narrow", "narrow64", "wide"])
@pytest.mark.parametrize("arch", PAIR)
def test_reversible_backward_returns_rebuilt_inputs(arch, d):
    """The reversible backward ops return the forward's inputs rebuilt from its outputs."""
    y, other, W, b = make_inputs(arch, 70, d, 12, fresh_seed())
    fwd = getattr(torch.ops.stablenets, f"{arch}_forward").default
    bwd = getattr(torch.ops.stablenets, f"{arch}_backward_reversible").default
    o0, o1, _ = fwd(y, other, W, b, 0.2, "tanh", False)
    outs = bwd(torch.randn_like(o0), torch.randn_like(o1), o0, o1, W, b, 0.2, "tanh")
    assert len(outs) == 6
    torch.testing.assert_close(outs[4], y, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(outs[5], other, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(1024, 4, 64), (256, 96, 6)], ids=["narrow", "wide"])
@pytest.mark.parametrize("arch", ARCHS)
def test_benchmark_shapes(arch, shape):
    compare_with_reference(arch, *shape, "tanh", torch.float32, step=0.1)


@pytest.mark.parametrize(
    "arch,reversible",
    [("resnet", False), ("antisymmetric", False), ("leapfrog", False), ("leapfrog", True),
     ("verlet", False), ("verlet", True)],
)
def test_deep_narrow_backward_in_chunks(arch, reversible):
    """B=1024, d=64, N=320, float64: the per-block partial weight gradients of
    this backward exceed its memory budget (csrc/cuda/narrow_host.h), so it runs
    on one block per row tile (64) and walks the layers in many chunks, the
    adjoints (and, reversible, the rebuilt states) carried between launches."""
    compare_with_reference(arch, 1024, 64, 320, "tanh", torch.float64, reversible=reversible,
                           step=0.05)


@pytest.mark.parametrize("d", [4, 70])
@pytest.mark.parametrize("arch", ARCHS)
def test_stored_states_layout(arch, d):
    """The CUDA backend's states (N, S, B, d), row-major in both regimes:
    [Y_j, P_j] or [Y_j, P1_j, Z_{j+1/2}, P2_j] with P the pre-activations
    (csrc/ops.cpp leaves the layout inside a slot to each backend)."""
    B, N, h = 11, 3, 0.3
    y, other, W, b = make_inputs(arch, B, d, N, fresh_seed())
    K = reference.antisymmetric_weight(W, GAMMA) if arch == "antisymmetric" else W
    act = torch.tanh
    expect = []
    Y, Z = y, other
    prev = other
    for j in range(N):
        if arch in ("resnet", "antisymmetric"):
            P = Y @ K[j].T + b[j]
            expect.append(torch.stack([Y, P]))
            Y = Y + h * act(P)
        elif arch == "leapfrog":
            P = Y @ K[j].T + b[j]
            expect.append(torch.stack([Y, P]))
            Y, prev = 2 * Y - prev - h * h * act(P) @ K[j], Y
        else:
            P1 = Y @ K[j] + b[j]
            Z = Z - h * act(P1)
            P2 = Z @ K[j].T + b[j]
            expect.append(torch.stack([Y, P1, Z, P2]))
            Y = Y + h * act(P2)
    expect = torch.stack(expect)
    o = torch.ops.stablenets
    if arch == "resnet":
        states = o.resnet_forward(y, W, b, h, "tanh", True)[1]
    elif arch == "antisymmetric":
        states = o.antisymmetric_forward(y, W, b, h, GAMMA, "tanh", True)[1]
    elif arch == "leapfrog":
        states = o.leapfrog_forward(y, other, W, b, h, "tanh", True)[2]
    else:
        states = o.verlet_forward(y, other, W, b, h, "tanh", True)[2]
    assert states.shape == expect.shape
    torch.testing.assert_close(states, expect, rtol=1e-10, atol=1e-10)
    # store=False keeps nothing
    if arch in PAIR:
        fwd = o.leapfrog_forward if arch == "leapfrog" else o.verlet_forward
        empty = fwd(y, other, W, b, h, "tanh", False)[2]
    elif arch == "resnet":
        empty = o.resnet_forward(y, W, b, h, "tanh", False)[1]
    else:
        empty = o.antisymmetric_forward(y, W, b, h, GAMMA, "tanh", False)[1]
    assert empty.shape == (0, expect.shape[1], B, d)


@pytest.mark.parametrize("d", [5, 80])
@pytest.mark.parametrize("arch", ARCHS)
def test_non_contiguous_inputs(arch, d):
    seed = fresh_seed()
    y, other, W, b = make_inputs(arch, 12, d, 3, seed)
    nc = lambda t: None if t is None else t.t().contiguous().t()  # noqa: E731
    Wt = W.transpose(1, 2).contiguous().transpose(1, 2)
    assert not nc(y).is_contiguous() and not Wt.is_contiguous()
    got = run(arch, nc(y), nc(other), Wt, b, 0.2, "tanh", "fused")
    ref = run(arch, y, other, W, b, 0.2, "tanh", "reference")
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10, msg=f"seed {seed}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [4, 70])
@pytest.mark.parametrize("arch", ARCHS)
def test_reduced_precision_is_float32_rounded(arch, d, dtype):
    """bfloat16/float16 ops run the float32 kernels on float32 copies and round what they
    return (csrc/include/stablenets/reduced_precision.h): outputs are exactly the float32
    results, rounded, on the same (reduced-precision) inputs; gradients, read from states
    stored in the reduced dtype, agree to a few units of its precision."""
    inputs = [t.to(dtype) if t is not None else None for t in make_inputs(arch, 33, d, 3, 0)]
    up = [t.float() if t is not None else None for t in inputs]
    cots = [torch.ones(33, d, device=DEVICE) for _ in range(2 if arch in PAIR else 1)]
    for reversible in (False, True) if arch in PAIR else (False,):
        o16, g16 = outputs_and_grads(arch, inputs, 0.1, "tanh", "fused", cots, reversible)
        o32, g32 = outputs_and_grads(arch, up, 0.1, "tanh", "fused", cots, reversible)
        eps = torch.finfo(dtype).eps
        for a, b in zip(o16, o32):
            assert a.dtype == dtype
            torch.testing.assert_close(a, b.to(dtype), rtol=0, atol=0)
        for a, b in zip(g16, g32):
            assert a.dtype == dtype
            assert (a.float() - b).norm() <= 8 * eps * b.norm(), (arch, d, reversible)


# ------------------------------------------- native reduced precision (narrow)
# bfloat16/float16 narrow stacks (d <= 64) run the narrow kernels over 16-bit memory
# (csrc/cuda/narrow_kernels.cuh: storage type S over float compute); wide ones run
# the float32 kernels on float32 copies (reduced_precision.h, InFloat32).

REDUCED = [torch.bfloat16, torch.float16]
# (B, d, N): padded widths 4, 16 and 64; partial row tiles
REDUCED_SHAPES = [(33, 4, 6), (70, 13, 4), (40, 64, 3)]


def emulator():
    """The CPU emulator's debug ops (csrc/cuda/testing/cpu_emulator.cpp), or None on a GPU."""
    ns = torch.ops.sn_emu
    return ns if hasattr(ns, "counters") else None


def reduced_op_runs(arch, inputs, h=0.1, act="tanh"):
    """[(op name, its result, the float32-copy path's result)] for every op of `arch`
    (forward with stored states; backward ops fed those states / outputs). The
    float32-copy result runs the op on float32 copies of the same arguments and
    rounds what it returns, as InFloat32 does."""
    o = torch.ops.stablenets
    y, other, W, b = inputs
    dtype = y.dtype
    g = torch.Generator().manual_seed(5)
    g0, g1 = (torch.randn(tuple(y.shape), generator=g).to(DEVICE, dtype) for _ in range(2))
    extra = (GAMMA,) if arch == "antisymmetric" else ()

    def both(name, *args):
        op = getattr(o, name)
        got = op(*args)
        up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
        return name, got, tuple(t.to(dtype) for t in op(*up))

    if arch in PAIR:
        f = both(f"{arch}_forward", y, other, W, b, h, act, True)
        return [f, both(f"{arch}_backward", g0, g1, f[1][2], W, b, h, act),
                both(f"{arch}_backward_reversible", g0, g1, f[1][0], f[1][1], W, b, h, act)]
    f = both(f"{arch}_forward", y, W, b, h, *extra, act, True)
    return [f, both(f"{arch}_backward", g0, f[1][1], W, b, h, *extra, act)]


def assert_float32_rounded(runs, dtype, what):
    """The native results equal the float32-copy path's: bitwise on the emulator
    (the same float arithmetic, both rounded to nearest even once); on a GPU within
    one unit of the dtype (nvcc may contract the two kernels' products differently)."""
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny  # tiny: subnormal unit / eps
    for name, got, ref in runs:
        assert len(got) == len(ref)
        for i, (a, e) in enumerate(zip(got, ref)):
            assert a.dtype == dtype and a.shape == e.shape, (what, name, i)
            if DEVICE.type == "cpu":
                assert torch.equal(a, e), f"{what} {name} output {i}"
            else:
                diff = (a.float() - e.float()).abs()
                unit = eps * e.float().abs().clamp_min(tiny)
                assert (diff <= unit).all(), f"{what} {name} output {i}"


@pytest.mark.parametrize("shape", REDUCED_SHAPES, ids=lambda s: "B%d-d%d-N%d" % s)
@pytest.mark.parametrize("dtype", REDUCED, ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_narrow_reduced_ops_are_the_float32_path_rounded_once(arch, dtype, shape):
    """Every op (forward, stored and reversible backward) in bfloat16/float16 returns
    what the float32 kernels return on float32 copies of its (reduced) arguments,
    rounded once: states, outputs, gradients and rebuilt inputs in the dtype, every
    product, the carried state, the adjoint and the weight-gradient sums in float32."""
    seed = fresh_seed()
    inputs = [t.to(dtype) if t is not None else None for t in make_inputs(arch, *shape, seed)]
    emu = emulator()
    before = emu.counters() if emu else None
    runs = reduced_op_runs(arch, inputs)
    assert_float32_rounded(runs, dtype, f"{arch} {shape} seed {seed}")
    if emu:  # one reduced-storage narrow launch per native op (one chunk each here)
        after = emu.counters()
        assert after[2] - before[2] == len(runs), (before, after)


def _copies_of_batch_tensors(fn, B):
    """The aten::_to_copy calls fn makes on tensors with a dimension of size B (the
    batch: inputs, outputs, states, gradients), found with the profiler: the
    float32-copy path converts each of them, the native path only weights and biases."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        fn()
    return [(e.name, e.input_shapes) for e in prof.events()
            if e.name == "aten::_to_copy" and e.input_shapes
            and B in (e.input_shapes[0] or [])]


@pytest.mark.parametrize("dtype", REDUCED, ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_narrow_reduced_runs_native_wide_on_float32_copies(arch, dtype):
    """Narrow bfloat16/float16 ops copy no batch-sized tensor to float32 (the weights
    only): they are served by the reduced-storage kernels, not by the float32-copy
    path. The same check on a wide stack (the float32-copy path) finds the copies, so
    the check can fail."""
    B = 37  # no other dimension here has this size
    for d, native in ((13, True), (70, False)):
        inputs = [t.to(dtype) if t is not None else None
                  for t in make_inputs(arch, B, d, 2, fresh_seed())]
        copies = _copies_of_batch_tensors(lambda: reduced_op_runs_native_only(arch, inputs), B)
        if native:
            assert copies == [], f"{arch} d={d}: float32 copies {copies}"
        else:
            assert copies, f"{arch} d={d}: expected the float32-copy path"


def reduced_op_runs_native_only(arch, inputs, h=0.1, act="tanh"):
    """Every op of `arch` in the inputs' dtype (as reduced_op_runs, without the float32 runs)."""
    o = torch.ops.stablenets
    y, other, W, b = inputs
    g0 = torch.ones_like(y)
    extra = (GAMMA,) if arch == "antisymmetric" else ()
    if arch in PAIR:
        f = getattr(o, f"{arch}_forward")(y, other, W, b, h, act, True)
        getattr(o, f"{arch}_backward")(g0, g0, f[2], W, b, h, act)
        getattr(o, f"{arch}_backward_reversible")(g0, g0, f[0], f[1], W, b, h, act)
    else:
        f = getattr(o, f"{arch}_forward")(y, W, b, h, *extra, act, True)
        getattr(o, f"{arch}_backward")(g0, f[1], W, b, h, *extra, act)


@pytest.mark.parametrize("shape", [(70, 13, 4), (40, 64, 3)], ids=lambda s: "B%d-d%d-N%d" % s)
@pytest.mark.parametrize("dtype", REDUCED, ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "arch,reversible",
    [("resnet", False), ("antisymmetric", False), ("leapfrog", False), ("leapfrog", True),
     ("verlet", False), ("verlet", True)],
)
def test_narrow_reduced_matches_reference(arch, reversible, dtype, shape):
    """Forward and backward through autograd (inputs and parameters in the dtype, as
    a module cast with .to(dtype) holds them) against the float64 reference on the
    same (dtype-valued) inputs. Outputs: within one rounding to the dtype (float32
    arithmetic inside; measured at most 0.45 eps * scale). Gradients, read from
    states stored in the dtype and returned in it: at most PyTorch's own error running
    the reference stack in the dtype or one unit eps * scale, whichever is larger, and
    never two (measured at most 0.45 eps * scale, PyTorch's 0.3-1.8)."""
    seed = fresh_seed()
    B, d, N = shape
    inputs = [t.to(dtype) if t is not None else None for t in make_inputs(arch, B, d, N, seed)]
    in64 = [t.double() if t is not None else None for t in inputs]
    g = torch.Generator().manual_seed(seed + 1)
    cot = [torch.randn(B, d, generator=g).to(DEVICE, dtype) for _ in range(2)]
    out, grads = outputs_and_grads(arch, inputs, 0.2, "tanh", "fused", cot, reversible)
    ref_out, ref_grads = outputs_and_grads(arch, in64, 0.2, "tanh", "reference",
                                           [c.double() for c in cot])
    _, plain_grads = outputs_and_grads(arch, inputs, 0.2, "tanh", "reference", cot)
    eps = torch.finfo(dtype).eps
    tag = f"{arch} {shape} {dtype} {'reversible' if reversible else 'stored'} seed {seed}"
    for i, (o, r) in enumerate(zip(out, ref_out)):
        assert o.dtype == dtype
        err = max_abs(o.double() - r)
        assert err <= eps * (1 + max_abs(r)), f"{tag} output {i}: {err:.3e}"
    for i, (gr, r, plain) in enumerate(zip(grads, ref_grads, plain_grads)):
        assert gr.dtype == dtype
        err, scale = max_abs(gr.double() - r), 1 + max_abs(r)
        plain_err = max_abs(plain.double() - r)
        assert err <= min(max(plain_err, eps * scale), 2 * eps * scale), (
            f"{tag} grad {i}: {err:.3e} (PyTorch in {dtype}: {plain_err:.3e})")


@pytest.mark.parametrize("arch", ARCHS)
def test_narrow_reduced_backward_in_chunks(arch):
    """A bfloat16 backward whose layers are walked in several launches (narrow_host.h,
    backward_plan): the adjoints and rebuilt states cross the chunks in float32, so
    the result is still the float32-copy path's, rounded once. The emulator forces
    chunks with a small partial budget; a GPU needs a deep stack."""
    emu = emulator()
    shape = (70, 13, 12) if emu else (1024, 64, 320)
    seed = fresh_seed()
    inputs = [t.to(torch.bfloat16) if t is not None else None
              for t in make_inputs(arch, *shape, seed)]
    if emu:
        emu.set_partial_budget(2 * 13 * 14 * 4 * 2)  # two blocks of two layers
    try:
        before = emu.counters() if emu else None
        runs = reduced_op_runs(arch, inputs, h=0.05)
        if emu:
            # forward: 1 launch; each backward: 12 layers / 2 per chunk = 6 launches
            expect = 1 + 6 * (len(runs) - 1)
            assert emu.counters()[2] - before[2] == expect
    finally:
        if emu:
            emu.set_partial_budget(64 << 20)
    assert_float32_rounded(runs, torch.bfloat16, f"{arch} {shape} seed {seed}")


@pytest.mark.parametrize("arch", ARCHS)
def test_narrow_reduced_falls_back_where_the_kernels_cannot_run(arch):
    """On a device whose shared memory cannot hold the narrow kernels' tiles (emulated:
    a tiny opt-in limit), a bfloat16 op takes the float32-copy path (there the wide
    path): the same results as float32 copies rounded, never a wrong one."""
    emu = emulator()
    if emu is None:
        pytest.skip("needs the CPU emulator's device limits")
    inputs = [t.to(torch.bfloat16) if t is not None else None
              for t in make_inputs(arch, 20, 13, 3, fresh_seed())]
    emu.set_limits(1024, 132)
    try:
        before = emu.counters()
        runs = reduced_op_runs(arch, inputs)
        assert emu.counters()[1] == before[1]  # no narrow launch at all
    finally:
        emu.set_limits(227 * 1024, 132)
    assert_float32_rounded(runs, torch.bfloat16, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_batch(arch):
    y, other, W, b = make_inputs(arch, 0, 6, 2, 0)
    xs = [t.requires_grad_(True) if t is not None else None for t in (y, other, W, b)]
    outs = run(arch, *xs, 0.1, "tanh", "fused")
    assert all(o.shape == (0, 6) for o in outs)
    grads = torch.autograd.grad(sum(o.sum() for o in outs), leaves(*xs))
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("d", [4, 70])
@pytest.mark.parametrize("arch", ARCHS)
def test_backward_is_deterministic(arch, d):
    """Weight gradients are reduced without atomics: bitwise repeatable."""
    seed = fresh_seed()
    inputs = make_inputs(arch, 333, d, 4, seed)
    cot = [torch.ones(333, d, device=DEVICE, dtype=torch.float64)] * 2
    _, g1 = outputs_and_grads(arch, inputs, 0.2, "tanh", "fused", cot)
    _, g2 = outputs_and_grads(arch, inputs, 0.2, "tanh", "fused", cot)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c), f"seed {seed}"


# ---------------------------------------------------------- gradcheck


GRADCHECK_CASES = [(4, 3, 2, False), (3, 70, 2, True)]  # (B, d, N, fast_mode)


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=["narrow", "wide"])
@pytest.mark.parametrize(
    "arch,reversible",
    [("resnet", False), ("antisymmetric", False), ("leapfrog", False), ("leapfrog", True),
     ("verlet", False), ("verlet", True)],
)
def test_gradcheck(arch, reversible, case):
    B, d, N, fast = case
    seed = fresh_seed()
    xs = [t.requires_grad_(True) for t in leaves(*make_inputs(arch, B, d, N, seed))]

    def f(*args):
        if arch in PAIR:
            y, other, W, b = args
        else:
            (y, W, b), other = args, None
        return run(arch, y, other, W, b, 0.3, "tanh", "fused", reversible=reversible)

    assert torch.autograd.gradcheck(f, xs, fast_mode=fast, atol=1e-6, rtol=1e-5), f"seed {seed}"


def test_gradcheck_identity_relu():
    seed = fresh_seed()
    for act in ("identity", "relu"):
        xs = [t.requires_grad_(True) for t in leaves(*make_inputs("verlet", 3, 5, 2, seed))]
        f = lambda y, z, W, b: run("verlet", y, z, W, b, 0.3, act, "fused")  # noqa: E731
        assert torch.autograd.gradcheck(f, xs, atol=1e-6, rtol=1e-5), f"{act} seed {seed}"


# ------------------------------------------------------------- opcheck


def op_calls(arch, y, other, W, b, h=0.2, act="tanh"):
    """(op, args) for the forward ops (both store modes) and their backward ops."""
    o = torch.ops.stablenets
    calls = []
    if arch == "resnet":
        fwd = lambda s: (o.resnet_forward.default, (y, W, b, h, act, s))  # noqa: E731
    elif arch == "antisymmetric":
        fwd = lambda s: (o.antisymmetric_forward.default, (y, W, b, h, GAMMA, act, s))  # noqa: E731
    elif arch == "leapfrog":
        fwd = lambda s: (o.leapfrog_forward.default, (y, other, W, b, h, act, s))  # noqa: E731
    else:
        fwd = lambda s: (o.verlet_forward.default, (y, other, W, b, h, act, s))  # noqa: E731
    calls += [fwd(True), fwd(False)]
    op, args = fwd(True)
    with torch.no_grad():
        out = op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    g = torch.randn_like(y)
    if arch == "resnet":
        calls.append((o.resnet_backward.default, (g, out[1], W, b, h, act)))
    elif arch == "antisymmetric":
        calls.append((o.antisymmetric_backward.default, (g, out[1], W, b, h, GAMMA, act)))
    else:
        name = arch
        calls.append((getattr(o, f"{name}_backward").default, (g, g * 0.5, out[2], W, b, h, act)))
        calls.append((getattr(o, f"{name}_backward_reversible").default,
                      (g, g * 0.5, out[0], out[1], W, b, h, act)))
    return calls


@pytest.mark.parametrize("arch", ARCHS)
def test_opcheck(arch):
    y, other, W, b = make_inputs(arch, 9, 5, 2, fresh_seed())
    for op, args in op_calls(arch, y, other, W, b):
        torch.library.opcheck(op, args)
    # The forward with inputs that require grad (autograd registration, AOT).
    # resnet/antisymmetric need stored states to differentiate.
    req = [t.clone().requires_grad_(True) if t is not None else None for t in (y, other, W, b)]
    for op, args in op_calls(arch, *req)[: 2 if arch in PAIR else 1]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("arch", ARCHS)
def test_opcheck_wide(arch):
    """The wide regime's outputs have the layouts the fake kernels promise."""
    y, other, W, b = make_inputs(arch, 6, 70, 1, fresh_seed())
    for op, args in op_calls(arch, y, other, W, b):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------- device handling


def test_cpu_and_cuda_agree():
    if not ops.has_kernel("cpu"):
        pytest.skip("no CPU kernels compiled")
    seed = fresh_seed()
    for arch in ARCHS:
        for d in (5, 70):
            cpu_in = make_inputs(arch, 20, d, 3, seed, device=torch.device("cpu"))
            cot = [torch.randn(20, d, dtype=torch.float64)] * 2
            for rev in ((False, True) if arch in PAIR else (False,)):
                oc, gc = outputs_and_grads(arch, cpu_in, 0.2, "tanh", "fused", cot, rev)
                og, gg = outputs_and_grads(arch, [None if t is None else t.to(DEVICE)
                                                  for t in cpu_in], 0.2, "tanh", "fused",
                                           [c.to(DEVICE) for c in cot], rev)
                for a, c in zip(oc + gc, og + gg):
                    torch.testing.assert_close(c.cpu(), a, rtol=1e-9, atol=1e-9,
                                               msg=f"{arch} d={d} rev={rev} seed {seed}")


def test_mixed_devices_name_the_argument():
    y, other, W, b = make_inputs("leapfrog", 4, 3, 2, 0)
    o = torch.ops.stablenets
    bad = (ValueError, RuntimeError)
    with pytest.raises(bad, match="weight"):
        o.resnet_forward(y, W.cpu(), b, 0.1, "tanh", False)
    with pytest.raises(bad, match="weight"):
        o.resnet_forward(y.cpu(), W, b, 0.1, "tanh", False)
    with pytest.raises(bad, match="bias"):
        o.verlet_forward(y, other, W, b.cpu(), 0.1, "tanh", False)
    with pytest.raises(bad, match="y_prev"):
        o.leapfrog_forward(y, other.cpu(), W, b, 0.1, "tanh", False)
    with pytest.raises(bad, match=r"\bz: expected"):
        o.verlet_forward(y, other.cpu(), W, b, 0.1, "tanh", False)
    states = o.leapfrog_forward(y, other, W, b, 0.1, "tanh", True)[2]
    with pytest.raises(bad, match="states"):
        o.leapfrog_backward(y, y, states.cpu(), W, b, 0.1, "tanh")
    with pytest.raises(bad, match="grad_y_prev"):
        o.leapfrog_backward(y, y.cpu(), states, W, b, 0.1, "tanh")
    with pytest.raises(bad, match="weight"):
        F.resnet(y, W.cpu(), b, impl="fused")
    with pytest.raises(bad, match="activation"):
        o.resnet_forward(y, W, b, 0.1, "gelu", False)


# ------------------------------------------------- graphs and compile


@pytest.mark.parametrize("d", [4, 80])
@pytest.mark.parametrize(
    "arch,reversible",
    [("resnet", False), ("antisymmetric", False), ("leapfrog", False), ("leapfrog", True),
     ("verlet", False), ("verlet", True)],
)
def test_cuda_graph_capture(arch, reversible, d):
    seed = fresh_seed()
    B, N = 64, 3
    y, other, W, b = make_inputs(arch, B, d, N, seed, dtype=torch.float32)
    W.requires_grad_(True)
    b.requires_grad_(True)
    static_y = y.clone()

    def step():
        outs = run(arch, static_y, other, W, b, 0.2, "tanh", "fused", reversible=reversible)
        loss = sum((o * o).sum() for o in outs)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            W.grad = b.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    W.grad = b.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    new_y = torch.randn_like(y)
    static_y.copy_(new_y)
    graph.replay()
    torch.cuda.synchronize()
    got = static_loss.item(), W.grad.clone(), b.grad.clone()

    W2, b2 = W.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    outs = run(arch, new_y, other, W2, b2, 0.2, "tanh", "fused", reversible=reversible)
    loss = sum((o * o).sum() for o in outs)
    loss.backward()
    assert math.isclose(got[0], loss.item(), rel_tol=1e-5), f"seed {seed}"
    torch.testing.assert_close(got[1], W2.grad, msg=f"seed {seed}")
    torch.testing.assert_close(got[2], b2.grad, msg=f"seed {seed}")


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_compile_fullgraph_ops(arch):
    """The ops themselves (fake kernels, autograd formulas) trace without breaks."""
    torch._dynamo.reset()
    y, other, W, b = make_inputs(arch, 16, 6, 3, fresh_seed(), dtype=torch.float32)
    o = torch.ops.stablenets

    def f(y, other, W, b):
        if arch == "resnet":
            outs = o.resnet_forward(y, W, b, 0.2, "tanh", True)[:1]
        elif arch == "antisymmetric":
            outs = o.antisymmetric_forward(y, W, b, 0.2, GAMMA, "tanh", True)[:1]
        elif arch == "leapfrog":
            outs = o.leapfrog_forward(y, other, W, b, 0.2, "tanh", False)[:2]
        else:
            outs = o.verlet_forward(y, other, W, b, 0.2, "tanh", True)[:2]
        return sum((t * t).sum() for t in outs)

    xs = [t.requires_grad_(True) if t is not None else None for t in (y, other, W, b)]
    cf = torch.compile(f, fullgraph=True)
    loss_c = cf(*xs)
    g_c = torch.autograd.grad(loss_c, leaves(*xs))
    loss_e = f(*xs)
    g_e = torch.autograd.grad(loss_e, leaves(*xs))
    torch.testing.assert_close(loss_c, loss_e)
    for a, c in zip(g_c, g_e):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("arch", ["resnet", "verlet"])
def test_torch_compile_fullgraph_functional(arch):
    """The public functional API compiles into one graph, forward and backward."""
    torch._dynamo.reset()
    y, other, W, b = make_inputs(arch, 16, 6, 3, fresh_seed(), dtype=torch.float32)
    xs = [t.requires_grad_(True) if t is not None else None for t in (y, other, W, b)]

    def f(y, other, W, b):
        return sum((t * t).sum() for t in run(arch, y, other, W, b, 0.2, "tanh", "fused"))

    cf = torch.compile(f, fullgraph=True)
    loss_c = cf(*xs)
    g_c = torch.autograd.grad(loss_c, leaves(*xs))
    loss_e = f(*xs)
    g_e = torch.autograd.grad(loss_e, leaves(*xs))
    torch.testing.assert_close(loss_c, loss_e)
    for a, c in zip(g_c, g_e):
        torch.testing.assert_close(a, c)
