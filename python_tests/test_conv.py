"""Convolutional stacks: fused ops against the per-layer reference, gradients,
opcheck, reversible mode, bad inputs, batch norm."""

import warnings

import pytest
import torch

from stablenets_ext import conv, conv_ops, models as M, reference

from conftest import DEVICES

pytestmark = pytest.mark.skipif(not conv_ops.has_kernel("cpu"), reason="extension not built")

ARCHS = ["resnet", "antisymmetric", "leapfrog", "verlet"]
TWO_STATE = {"leapfrog": "y_prev", "verlet": "z"}
# Every named activation of the reference is fused on every path.
ACTS = sorted(reference.ACTIVATIONS)
# (kernel size, channels, height, width): k 1/3/5, odd and even sizes, channels 1..32.
SHAPES = [(1, 1, 5, 4), (3, 2, 7, 7), (3, 5, 6, 8), (5, 8, 5, 6), (3, 32, 4, 5), (5, 3, 9, 7),
          # whole and partial 16 x 16 tiles of the NCHW <-> channels-last transposes (conv.cpp)
          (3, 16, 4, 4), (1, 33, 5, 7)]
OPS = torch.ops.stablenets


def make(B, C, H, W, N, k, dtype, device, scale=1.0):
    g = dict(dtype=dtype, device=device)
    y = torch.randn(B, C, H, W, **g)
    w = torch.randn(N, C, C, k, k, **g) * (scale / (C * k * k) ** 0.5)
    b = torch.randn(N, C, **g) * 0.3
    return y, w, b


def run(arch, y, w, b, step, act, impl, state=None, reversible=False, gamma=0.05):
    """Every output of the stack (both carried tensors for leapfrog/verlet)."""
    fn = conv.FUNCTIONS[arch]
    if arch in TWO_STATE:
        return fn(y, w, b, step, act, state, True, reversible=reversible, impl=impl)
    if arch == "antisymmetric":
        return (fn(y, w, b, step, act, gamma, impl=impl),)
    return (fn(y, w, b, step, act, impl=impl),)


def outputs_and_grads(arch, y, w, b, step, act, impl, state=None, reversible=False, seed=3):
    leaves = [t.detach().clone().requires_grad_() for t in (y, w, b)]
    st = None if state is None else state.detach().clone().requires_grad_()
    outs = run(arch, *leaves, step, act, impl, st, reversible)
    gen = torch.Generator(device=y.device).manual_seed(seed)
    cot = [torch.randn(o.shape, generator=gen, dtype=o.dtype, device=o.device) for o in outs]
    torch.autograd.backward(outs, cot)
    grads = [t.grad for t in leaves] + ([st.grad] if st is not None else [])
    return [o.detach() for o in outs], grads


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def state_for(arch, y):
    if arch == "leapfrog":
        return y + 0.1 * torch.randn_like(y)
    if arch == "verlet":
        return 0.1 * torch.randn_like(y)
    return None


# ------------------------------------------------------- fused vs reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "k{}c{}_{}x{}".format(*s))
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_matches_reference(arch, act, shape, device):
    k, C, H, W = shape
    y, w, b = make(2, C, H, W, 3, k, torch.float64, device)
    state = state_for(arch, y)
    want = outputs_and_grads(arch, y, w, b, 0.2, act, "reference", state)
    got = outputs_and_grads(arch, y, w, b, 0.2, act, "fused", state)
    for g, r in zip(got[0] + got[1], want[0] + want[1]):
        assert rel(g, r) < 1e-10
    # float32: judged against the error the reference itself makes in float32
    f32 = [t.float() if t is not None else None for t in (y, w, b, state)]
    got32 = outputs_and_grads(arch, *f32[:3], 0.2, act, "fused", f32[3])
    ref32 = outputs_and_grads(arch, *f32[:3], 0.2, act, "reference", f32[3])
    for g, r, exact in zip(got32[0] + got32[1], ref32[0] + ref32[1], want[0] + want[1]):
        err_ref = rel(r.double(), exact)
        assert rel(g.double(), exact) <= 10 * err_ref + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_is_used_and_modules_match(arch, device):
    stack = conv.CONV_STACKS[arch](4, 3, 0.1, device=device, dtype=torch.float64)
    ref = conv.CONV_STACKS[arch](4, 3, 0.1, impl="reference", device=device, dtype=torch.float64)
    ref.load_state_dict(stack.state_dict())
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path warns about nothing
        out = stack(x)
    assert torch.allclose(out, ref(x), atol=1e-12)
    assert "impl='auto'" in repr(stack)
    assert repr(stack).startswith(f"{type(stack).__name__}(features=4, layers=3,")  # as the argument


# ------------------------------------------------------ gradcheck / opcheck


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_gradcheck(arch, device):
    y, w, b = make(1, 2, 4, 3, 2, 3, torch.float64, device)
    state = state_for(arch, y)
    ins = [t.requires_grad_() for t in (y, w, b) + ((state,) if state is not None else ())]
    modes = [False, True] if arch in TWO_STATE else [False]
    for reversible in modes:
        def fn(*a):
            return run(arch, a[0], a[1], a[2], 0.2, "tanh", "fused", a[3] if len(a) > 3 else None,
                       reversible)
        assert torch.autograd.gradcheck(fn, ins)


ALL_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
                "test_aot_dispatch_dynamic")


def _op_samples(arch, device, requires_grad=True):
    y, w, b = make(2, 3, 5, 4, 2, 3, torch.float64, device)
    rg = (lambda t: t.requires_grad_()) if requires_grad else (lambda t: t)
    y, w, b = rg(y), rg(w), rg(b)
    if arch == "resnet":
        return [(y, w, b, 0.1, "tanh", s) for s in (True, False)]
    if arch == "antisymmetric":
        return [(y, w, b, 0.1, 0.05, "relu", s) for s in (True, False)]
    st = rg(state_for(arch, y.detach()))
    return [(y, st, w, b, 0.1, "tanh", s) for s in (True, False)]


@pytest.mark.parametrize("arch", ARCHS)
def test_opcheck_forward_and_backward_ops(arch):
    fwd = getattr(OPS, f"conv_{arch}_forward").default
    for args in _op_samples(arch, "cpu"):
        # store=False keeps no states for the backward: only the non-autograd checks apply.
        tests = ALL_OPCHECKS if args[-1] else ("test_schema", "test_faketensor")
        torch.library.opcheck(fwd, args, test_utils=tests)
    args = _op_samples(arch, "cpu", requires_grad=False)[0]
    outs = fwd(*args)
    g = torch.randn_like(outs[0])
    bwd = getattr(OPS, f"conv_{arch}_backward").default
    if arch in TWO_STATE:
        y, st, w, b, h, act, _ = args
        torch.library.opcheck(bwd, (g, g.clone(), outs[2], w, b, h, act))
        rev = getattr(OPS, f"conv_{arch}_backward_reversible").default
        torch.library.opcheck(rev, (g, g.clone(), outs[0], outs[1], w, b, h, act))
    else:
        w, b = args[1], args[2]
        torch.library.opcheck(bwd, (g, outs[1], w, b, *args[3:-1]))


# ------------------------------------------------------------- reversible


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["tanh", "relu"])
@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_reversible_gradients_equal_stored(arch, act, device):
    y, w, b = make(3, 4, 6, 5, 24, 3, torch.float64, device)
    state = state_for(arch, y)
    stored = outputs_and_grads(arch, y, w, b, 0.1, act, "fused", state, reversible=False)
    rev = outputs_and_grads(arch, y, w, b, 0.1, act, "fused", state, reversible=True)
    for r, s in zip(rev[0] + rev[1], stored[0] + stored[1]):
        assert rel(r, s) < 1e-8
    # float32, deeper: rounding only
    f = [t.float() for t in (y, w, b, state)]
    stored = outputs_and_grads(arch, *f[:3], 0.1, "tanh", "fused", f[3], reversible=False)
    rev = outputs_and_grads(arch, *f[:3], 0.1, "tanh", "fused", f[3], reversible=True)
    for r, s in zip(rev[1], stored[1]):
        assert rel(r, s) < 1e-4


def _saved_bytes(arch, N, reversible, C=4, k=3):
    y = torch.randn(2, C, 6, 6, requires_grad=True)
    w = (torch.randn(N, C, C, k, k) * 0.1).requires_grad_()
    b = torch.zeros(N, C, requires_grad=True)
    params = {w.data_ptr(), b.data_ptr()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in params:
            seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        conv.FUNCTIONS[arch](y, w, b, 0.1, reversible=reversible).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_saved_bytes_flat_in_depth(arch):
    state = 2 * 4 * 6 * 6 * 4
    shallow, deep = _saved_bytes(arch, 4, True), _saved_bytes(arch, 64, True)
    # the final pair and the inputs (leapfrog: y_prev = y; verlet: y and z = 0)
    assert shallow == deep <= (3 if arch == "leapfrog" else 4) * state
    stored = _saved_bytes(arch, 64, False)
    assert deep <= 0.05 * stored
    assert _saved_bytes(arch, 4, False) < stored


@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_reversible_module_and_options_that_cannot_be_honoured(arch):
    cls = conv.CONV_STACKS[arch]
    m = cls(3, 4, 0.1, reversible=True).double()
    assert "reversible=True" in repr(m)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    m(x).sum().backward()
    assert m.weight.grad is not None
    with pytest.raises(ValueError, match="batch_norm"):
        cls(3, 4, reversible=True, batch_norm=True)
    with pytest.raises(ValueError, match="impl='reference'"):
        cls(3, 4, reversible=True, impl="reference")
    y, w, b = make(2, 3, 5, 5, 2, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="reversible"):
        conv.FUNCTIONS[arch](y, w, b, reversible=True, impl="reference")
    with pytest.raises(ValueError, match="reversible"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conv.FUNCTIONS[arch](y, w, b, 0.1, torch.nn.Tanh(), reversible=True)
    # a step far too large for the weights: the rebuilt input is off, and it says so
    big = (torch.randn(24, 3, 3, 3, 3) * 3).requires_grad_()
    out = conv.FUNCTIONS[arch](y, big, torch.zeros(24, 3), 1.5, "relu", reversible=True)
    with pytest.warns(UserWarning, match="reversibility was lost"):
        out.sum().backward()


# ------------------------------------------------ fallbacks: double backward, forward AD, callables


@pytest.mark.parametrize("arch", ARCHS)
def test_double_backward_falls_back_to_the_reference(arch):
    y, w, b = make(1, 1, 3, 3, 2, 3, torch.float64, "cpu")
    state = state_for(arch, y)
    ins = [t.requires_grad_() for t in (y, w, b) + ((state,) if state is not None else ())]

    for reversible in ([False, True] if arch in TWO_STATE else [False]):
        def fn(*a):
            return run(arch, a[0], a[1], a[2], 0.2, "tanh", "fused", a[3] if len(a) > 3 else None,
                       reversible)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert torch.autograd.gradgradcheck(fn, ins)


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_mode_ad_falls_back_to_the_reference(arch):
    y, w, b = make(2, 2, 4, 4, 2, 3, torch.float64, "cpu")
    t = torch.randn_like(y)
    fn = conv.FUNCTIONS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _, jvp = torch.autograd.functional.jvp(lambda y: fn(y, w, b, 0.1), y, t)
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            out = fn(fwAD.make_dual(y, t), w, b, 0.1)
            tangent = fwAD.unpack_dual(out).tangent
    assert torch.allclose(tangent, jvp, atol=1e-10)


def test_callable_activation_runs_on_the_reference_with_a_warning():
    y, w, b = make(2, 3, 4, 4, 2, 3, torch.float64, "cpu")
    conv._warned.clear()
    with pytest.warns(RuntimeWarning, match="callable"):
        out = conv.conv_verlet(y, w, b, 0.1, torch.nn.ReLU())
    assert torch.allclose(out, conv.conv_verlet(y, w, b, 0.1, "relu"), atol=1e-12)


# -------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_inputs_are_named(arch):
    y, w, b = make(2, 3, 5, 5, 2, 3, torch.float32, "cpu")
    fn = conv.FUNCTIONS[arch]
    with pytest.raises(ValueError, match="weight: expected channels = 4"):
        fn(torch.randn(2, 4, 5, 5), w, b)
    with pytest.raises(ValueError, match="y: expected a 4-D tensor"):
        fn(torch.randn(2, 3, 5), w, b)
    _, w4, b4 = make(2, 3, 5, 5, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="odd kernel size"):
        fn(y, w4, b4)
    with pytest.raises(ValueError, match="bias: expected shape"):
        fn(y, w, b[:, :2])
    with pytest.raises(ValueError, match="dtype"):
        fn(y.double(), w, b)
    if arch in TWO_STATE:
        with pytest.raises(ValueError, match=TWO_STATE[arch]):
            fn(y, w, b, 0.1, "tanh", torch.randn(2, 3, 5, 4))
    # the compiled op checks too, with the same names
    op = getattr(OPS, f"conv_{arch}_forward")
    extra = (0.05,) if arch == "antisymmetric" else ()
    st = (y,) if arch in TWO_STATE else ()
    y4 = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="weight: expected channels"):
        op(y4, *((y4,) if st else ()), w, b, 0.1, *extra, "tanh", False)
    with pytest.raises(ValueError, match="odd kernel size"):
        op(y, *st, w4, b4, 0.1, *extra, "tanh", False)
    with pytest.raises(ValueError, match="activation"):
        op(y, *st, w, b, 0.1, *extra, "swish-ish", False)
    if arch in TWO_STATE:
        with pytest.raises(ValueError, match=TWO_STATE[arch]):
            op(y, torch.randn(2, 3, 5, 4), w, b, 0.1, "tanh", False)
        bwd = getattr(OPS, f"conv_{arch}_backward")
        with pytest.raises(ValueError, match="states"):
            bwd(y, y, torch.empty(0, 2, 2, 3, 5, 5), w, b, 0.1, "tanh")


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match="kernel_size"):
        conv.ConvVerletStack(3, 2, kernel_size=4)
    with pytest.raises(ValueError, match="impl"):
        conv.ConvResNetStack(3, 2, impl="fast")
    with pytest.raises(ValueError, match="batch_norm"):
        conv.ConvResNetStack(3, 2, batch_norm="yes")


# --------------------------------------------------------------- batch norm


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_norm_trains_and_saves(arch, tmp_path):
    torch.manual_seed(0)
    m = M.StableNet(f"conv-{arch}", (1, 6, 6), 3, 3, width=4, pool=2, batch_norm=True)
    halves = 2 if arch == "verlet" else 1
    assert m.stack.norm_weight.shape == (3, halves, 4)
    x = torch.randn(24, 1, 6, 6)
    target = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    losses = []
    for _ in range(25):
        loss = m.loss(m(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert m.stack.norm_mean.abs().sum() > 0  # running statistics were kept
    path = tmp_path / "m.pt"
    torch.save({"config": m.config(), "state": m.state_dict()}, path)
    saved = torch.load(path)
    assert saved["config"]["batch_norm"] is True
    m2 = M.StableNet.from_config(saved["config"])
    m2.load_state_dict(saved["state"])
    m.eval(), m2.eval()
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
        assert torch.allclose(m.head(m.trajectory(x)[-1]), m(x), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_reversible_backward_returns_the_rebuilt_inputs(arch, device):
    y, w, b = make(2, 3, 5, 6, 16, 3, torch.float64, device)
    state = state_for(arch, y)
    a, c, _ = getattr(OPS, f"conv_{arch}_forward")(y, state, w, b, 0.1, "silu", False)
    g = torch.randn_like(y)
    out = getattr(OPS, f"conv_{arch}_backward_reversible")(g, g, a, c, w, b, 0.1, "silu")
    assert len(out) == 6
    assert rel(out[4], y) < 1e-10 and rel(out[5], state) < 1e-10


def test_compiles_fullgraph_and_reports_its_kernel():
    m = conv.ConvVerletStack(3, 3, 0.1, reversible=True).double()
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    assert torch.allclose(out, m(x), atol=1e-12)
    assert conv.kernel_used("auto", "cpu") == "fused"
    assert conv.kernel_used("auto", "cpu", batch_norm=True) == "reference"
    assert conv.kernel_used("reference", "cpu") == "reference"


# ------------------------------------------------------------------ layouts


@pytest.mark.parametrize("arch", ARCHS)
def test_any_input_layout_gives_nchw_outputs_and_the_same_results(arch):
    # The CPU ops run channels-last inside (STABLENETS_CONV_CHANNELS_LAST, default 1):
    # NCHW, channels-last and strided inputs and cotangents give the reference's results,
    # returned NCHW; y_prev = y (the same tensor) is served once.
    y, w, b = make(3, 4, 5, 6, 2, 3, torch.float64, "cpu")
    state = state_for(arch, y)
    want = outputs_and_grads(arch, y, w, b, 0.2, "tanh", "reference", state)
    for fmt in ("nchw", "channels_last", "strided"):
        def lay(t):
            if t is None or fmt == "nchw":
                return t
            if fmt == "channels_last":
                return t.contiguous(memory_format=torch.channels_last)
            return torch.stack([t, 2 * t], dim=-1)[..., 0]  # a non-contiguous view of t
        leaves = [t.detach().requires_grad_() for t in (lay(y), w, b)]
        st = lay(state).detach().requires_grad_() if state is not None else None
        outs = run(arch, *leaves, 0.2, "tanh", "fused", st)
        assert all(o.is_contiguous() for o in outs)
        gen = torch.Generator().manual_seed(3)
        cot = [lay(torch.randn(o.shape, generator=gen, dtype=o.dtype)) for o in outs]
        torch.autograd.backward(outs, cot)
        grads = [t.grad for t in leaves] + ([st.grad] if st is not None else [])
        for g, r in zip([o.detach() for o in outs] + grads, want[0] + want[1]):
            assert rel(g, r) < 1e-10, fmt
    if arch == "leapfrog":  # y_prev omitted: y itself
        y1 = y.detach().requires_grad_()
        y2 = y.detach().requires_grad_()
        conv.conv_leapfrog(y1, w, b, 0.2, "tanh", impl="fused").sum().backward()
        conv.conv_leapfrog(y2, w, b, 0.2, "tanh", impl="reference").sum().backward()
        assert rel(y1.grad, y2.grad) < 1e-10


_NCHW_CHECK = r"""
import torch
from stablenets_ext import conv
torch.manual_seed(0)
for arch in ("resnet", "antisymmetric", "leapfrog", "verlet"):
    for rev in ((False, True) if arch in ("leapfrog", "verlet") else (False,)):
        y = torch.randn(2, 3, 5, 4, dtype=torch.float64)
        w = torch.randn(2, 3, 3, 3, 3, dtype=torch.float64) / 5
        b = torch.randn(2, 3, dtype=torch.float64) / 3
        got, want = [], []
        for impl, out in (("fused", got), ("reference", want)):
            ins = [t.detach().requires_grad_() for t in (y, w, b)]
            kw = {"reversible": rev} if arch in ("leapfrog", "verlet") else {}
            if impl == "reference":
                kw = {}
            conv.FUNCTIONS[arch](*ins, 0.2, "tanh", impl=impl, **kw).sum().backward()
            out += [t.grad for t in ins]
        assert all(torch.allclose(g, r, atol=1e-12) for g, r in zip(got, want)), arch
print("ok")
"""


def test_nchw_layout_and_a_bad_layout_value(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(conv.__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "nchw_check.py"
    script.write_text(_NCHW_CHECK)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=dict(env, STABLENETS_CONV_CHANNELS_LAST="0"), timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    bad = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=dict(env, STABLENETS_CONV_CHANNELS_LAST="yes"), timeout=300)
    assert bad.returncode != 0
    assert "STABLENETS_CONV_CHANNELS_LAST: expected 1" in bad.stderr
