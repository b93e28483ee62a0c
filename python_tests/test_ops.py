"""Fused kernels against the plain-PyTorch reference: values, gradients, opcheck, compile."""

import itertools

import pytest
import torch

import stablenets_ext as sn
from stablenets_ext import functional as SF
from stablenets_ext import ops, reference

from conftest import DEVICES

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="extension not built")

ARCHS = ["resnet", "antisymmetric", "leapfrog", "verlet"]
TWO_STATE = {"leapfrog": "y_prev", "verlet": "z"}
ACTS = ["tanh", "relu", "identity"]


def make(B, d, N, dtype, device, scale=1.0):
    y = torch.randn(B, d, dtype=dtype, device=device)
    w = torch.randn(N, d, d, dtype=dtype, device=device) * (scale / d**0.5)
    b = torch.randn(N, d, dtype=dtype, device=device) * 0.5
    return y, w, b


def run(arch, y, w, b, step, act, impl, state=None, reversible=False):
    """Every output of the stack (both carried tensors for leapfrog/verlet)."""
    fn = SF.FUNCTIONS[arch]
    if arch in TWO_STATE:
        kw = {TWO_STATE[arch]: state, "return_state": True}
        if impl != "reference":
            kw["reversible"] = reversible
        return fn(y, w, b, step, act, impl=impl, **kw)
    return (fn(y, w, b, step, act, impl=impl),)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


SHAPES = [(1, 1, 1), (1, 4, 3), (7, 3, 5), (65, 5, 4), (130, 16, 3), (33, 32, 2), (17, 33, 2), (9, 50, 3),
          (3, 784, 2)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("B,d,N", SHAPES)
def test_matches_reference_float64(device, arch, B, d, N):
    for act in ACTS:
        y, w, b = make(B, d, N, torch.float64, device)
        state = torch.randn_like(y) if arch in TWO_STATE else None
        got = run(arch, y, w, b, 0.3, act, "fused", state)
        want = run(arch, y, w, b, 0.3, act, "reference", state)
        for g, r in zip(got, want):
            assert g.shape == r.shape and g.dtype == r.dtype
            torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("B,d,N", [(1024, 4, 64), (64, 784, 3), (100, 24, 40)])
def test_float32_error_like_pytorch(device, arch, B, d, N):
    """float32 error against float64 is judged against the error plain PyTorch
    makes in float32, not against a constant picked to pass."""
    for act in ACTS:
        y, w, b = make(B, d, N, torch.float64, device)
        exact = run(arch, y, w, b, 0.1, act, "reference")
        f32 = [t.float() for t in (y, w, b)]
        fused = run(arch, *f32, 0.1, act, "fused")
        plain = run(arch, *f32, 0.1, act, "reference")
        for e, f, p in zip(exact, fused, plain):
            err_fused, err_plain = rel(f.double(), e), rel(p.double(), e)
            assert err_fused <= 4 * err_plain + 2e-6, (act, err_fused, err_plain)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("reversible", [False, True])
@pytest.mark.parametrize("d", [3, 40])
def test_gradients_match_reference(device, arch, reversible, d):
    if reversible and arch not in TWO_STATE:
        pytest.skip("reversible mode exists for leapfrog and verlet")
    for act in ACTS:
        y, w, b = make(37, d, 6, torch.float64, device)
        state = torch.randn_like(y) if arch in TWO_STATE else None
        leaves = [t.requires_grad_() for t in (y, w, b)] + ([state.requires_grad_()] if state is not None else [])
        weights = None
        grads = []
        for impl in ("fused", "reference"):
            outs = run(arch, y, w, b, 0.25, act, impl, state, reversible)
            if weights is None:
                weights = [torch.randn_like(o) for o in outs]
            loss = sum((o * c).sum() for o, c in zip(outs, weights))
            grads.append(torch.autograd.grad(loss, leaves))
        for g, r in zip(*grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("reversible", [False, True])
@pytest.mark.parametrize("d", [2, 34])
def test_gradcheck(device, arch, reversible, d):
    if reversible and arch not in TWO_STATE:
        pytest.skip("reversible mode exists for leapfrog and verlet")
    y, w, b = make(5, d, 3, torch.float64, device)
    state = torch.randn_like(y) if arch in TWO_STATE else None
    inputs = [y, w, b] + ([state] if state is not None else [])
    inputs = [t.requires_grad_() for t in inputs]
    fn = SF.FUNCTIONS[arch]

    def f(*args):
        if arch in TWO_STATE:
            return fn(*args[:3], 0.3, "tanh", impl="fused", return_state=True, reversible=reversible,
                      **{TWO_STATE[arch]: args[3]})
        return fn(*args, 0.3, "tanh", impl="fused")

    # Full Jacobians for the narrow case; random projections (fast mode) keep the
    # wide case (about 3,500 inputs) quick.
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=d > 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_default_state_gradient(device, arch):
    """With y_prev / z omitted the gradient flows through y's double role."""
    y, w, b = make(6, 3, 4, torch.float64, device)
    y.requires_grad_()
    fn = SF.FUNCTIONS[arch]
    assert torch.autograd.gradcheck(lambda t: fn(t, w, b, 0.3, impl="fused"), [y])


def _op_cases(device):
    d, N, B = 5, 3, 9
    y, w, b = make(B, d, N, torch.float32, device)
    z = torch.randn_like(y)
    g = torch.randn_like(y)
    st = ops.ops
    cases = []
    for store in (True, False):
        rg = store  # store=False keeps no states: only a no-grad call is valid
        a = [t.clone().requires_grad_(rg) for t in (y, w, b)]
        cases.append((st.resnet_forward.default, (*a, 0.1, "tanh", store)))
        cases.append((st.antisymmetric_forward.default, (*a, 0.1, 0.01, "relu", store)))
        cases.append((st.leapfrog_forward.default, (a[0], z.clone().requires_grad_(rg), *a[1:], 0.1, "tanh", store)))
        cases.append((st.verlet_forward.default, (a[0], z.clone().requires_grad_(rg), *a[1:], 0.1, "identity", store)))
    states2 = st.resnet_forward(y, w, b, 0.1, "tanh", True)[1]
    cases.append((st.resnet_backward.default, (g, states2, w, b, 0.1, "tanh")))
    cases.append((st.antisymmetric_backward.default, (g, states2, w, b, 0.1, 0.01, "tanh")))
    lf = st.leapfrog_forward(y, z, w, b, 0.1, "tanh", True)
    cases.append((st.leapfrog_backward.default, (g, g.clone(), lf[2], w, b, 0.1, "tanh")))
    cases.append((st.leapfrog_backward_reversible.default, (g, g.clone(), lf[0], lf[1], w, b, 0.1, "tanh")))
    vf = st.verlet_forward(y, z, w, b, 0.1, "tanh", True)
    cases.append((st.verlet_backward.default, (g, g.clone(), vf[2], w, b, 0.1, "tanh")))
    cases.append((st.verlet_backward_reversible.default, (g, g.clone(), vf[0], vf[1], w, b, 0.1, "tanh")))
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    cases = _op_cases(device)
    names = {op.name() for op, _ in cases}
    assert len(names) == 10  # every op in csrc/ops.cpp
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_torch_compile_fullgraph(device, arch):
    torch._dynamo.reset()
    mod = sn.layers.STACKS[arch](6, 5, step=0.2, impl="fused").to(device).double()
    y = torch.randn(11, 6, dtype=torch.float64, device=device, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    out = compiled(y)
    ref = mod(y)
    torch.testing.assert_close(out, ref)
    (g_c,) = torch.autograd.grad(out.sum(), y)
    (g_e,) = torch.autograd.grad(ref.sum(), y)
    torch.testing.assert_close(g_c, g_e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_non_contiguous_inputs(device, arch):
    y, w, b = make(20, 6, 4, torch.float64, device)
    yt = torch.randn(6, 20, dtype=torch.float64, device=device).t()  # non-contiguous
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)
    bt = torch.randn(6, 4, dtype=torch.float64, device=device).t()
    assert not (yt.is_contiguous() or wt.is_contiguous() or bt.is_contiguous())
    got = run(arch, yt, wt, bt, 0.2, "tanh", "fused")
    want = run(arch, yt.contiguous(), wt.contiguous(), bt.contiguous(), 0.2, "tanh", "reference")
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("arch", ARCHS)
def test_no_grad_stores_nothing(arch):
    y, w, b = make(10, 4, 7, torch.float32, "cpu")
    w.requires_grad_()
    seen = []

    def pack(t):
        seen.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.no_grad():
            run(arch, y, w, b, 0.1, "tanh", "fused")
    assert seen == []


def test_empty_batch():
    y, w, b = make(0, 4, 3, torch.float32, "cpu")
    for arch in ARCHS:
        for o in run(arch, y, w, b, 0.1, "tanh", "fused"):
            assert o.shape == (0, 4)


def test_torch_compile_inductor_all_stacks():
    """The default (inductor) backend, once over a model chaining all four stacks."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(*(sn.layers.STACKS[a](6, 4, step=0.2, impl="fused") for a in ARCHS))
    y = torch.randn(11, 6, requires_grad=True)
    out = torch.compile(model, fullgraph=True)(y)
    torch.testing.assert_close(out, model(y))
    (g_c,) = torch.autograd.grad(out.sum(), y)
    (g_e,) = torch.autograd.grad(model(y).sum(), y)
    torch.testing.assert_close(g_c, g_e)
