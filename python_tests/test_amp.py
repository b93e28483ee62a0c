"""Mixed precision: the stacks under torch.autocast and in bfloat16/float16.

Accuracy is judged as test_precision.py judges float32: against a float64 run of
the same stack, the fused error must be at most the error plain PyTorch makes
(the reference stack, ``impl="reference"``) under the same autocast on the same
inputs. The fused kernels keep bf16/fp16 storage but compute and carry the
recurrence in float32 (csrc/include/stablenets/reduced_precision.h), so they
round a few times per call where plain PyTorch rounds every op of every layer.
"""

import warnings

import pytest
import torch

import stablenets_ext as sn
from conftest import DEVICES
from stablenets_ext import conv, ops

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="no compiled CPU kernels")

DENSE = {"resnet": sn.ResNetStack, "antisymmetric": sn.AntisymmetricStack,
         "leapfrog": sn.LeapfrogStack, "verlet": sn.VerletStack}
CONV = {"resnet": conv.ConvResNetStack, "antisymmetric": conv.ConvAntisymmetricStack,
        "leapfrog": conv.ConvLeapfrogStack, "verlet": conv.ConvVerletStack}
CASES = [(a, False) for a in DENSE] + [("leapfrog", True), ("verlet", True)]


@pytest.fixture(autouse=True)
def bf16_gemms_at_every_size(monkeypatch):
    """The wide stacks' bfloat16 GEMM kernels at the small sizes of these tests (by default
    calls below about 2-3 M multiply-adds per layer run on float32 copies, as faster:
    csrc/cpu/tile.h, bf16_gemm_min_work; test_small_bf16_gemms_run_in_float32 checks that)."""
    monkeypatch.setenv("STABLENETS_BF16_GEMM_MIN", "0")


def _stack(table, arch, reversible, *args, **kw):
    if arch in ("leapfrog", "verlet") and kw.get("impl") != "reference":
        kw["reversible"] = reversible  # the reference stores every state: no reversible mode
    return table[arch](*args, **kw)


def _rel(a, ref):
    return (a.double() - ref).norm().item() / max(ref.norm().item(), 1e-30)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch,reversible", CASES)
@pytest.mark.parametrize("d", [8, 48])  # narrow tile path and wide GEMM path
def test_dense_under_autocast(arch, reversible, d, dtype, device):
    """The issue's example: a stack after nn.Linear under autocast runs, returns the
    autocast dtype, and trains (float32 parameters get float32 gradients); the output
    agrees with the float32 stack to the dtype's accuracy."""
    m = _stack(DENSE, arch, reversible, d, 6, device=device)
    lin = torch.nn.Linear(d, d, device=device)
    x = torch.randn(33, d, device=device)
    with torch.autocast(device, dtype=dtype):
        y = m(lin(x))
    assert y.dtype == dtype
    with torch.no_grad():
        y32 = m(lin(x))
    assert _rel(y.detach(), y32.double()) < 16 * torch.finfo(dtype).eps
    y.float().square().sum().backward()
    for p in (*m.parameters(), *lin.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("arch,reversible", CASES)
def test_conv_under_autocast(arch, reversible):
    m = _stack(CONV, arch, reversible, 4, 3)
    c = torch.nn.Conv2d(2, 4, 3, padding=1)
    x = torch.randn(3, 2, 6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(c(x))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())


def test_every_op_has_autocast_kernels():
    from stablenets_ext import autocast

    names = autocast.op_names()
    assert len(names) == 20  # 10 dense + 10 conv
    for name in names:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"stablenets::{name}", key), (name, key)


def test_raw_op_under_autocast_returns_autocast_dtype():
    y, w, b = torch.randn(5, 8), torch.randn(3, 8, 8) * 0.3, torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, states = torch.ops.stablenets.resnet_forward(y, w, b, 0.1, "tanh", True)
        g16 = torch.ops.stablenets.resnet_backward(torch.ones(5, 8).bfloat16(), states,
                                                   w.bfloat16(), b.bfloat16(), 0.1, "tanh")
        # backward ops promote: float32 gradient and weights take the states up to float32
        g32 = torch.ops.stablenets.resnet_backward(torch.ones(5, 8), states, w, b, 0.1, "tanh")
    assert out.dtype == states.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in g16)
    assert all(t.dtype == torch.float32 for t in g32)


def _op_args(name, dtype=torch.float32, store=True, features=8):
    """Arguments for stablenets::<name>: float32 parameters, ``dtype`` data (``features``
    of a dense op's)."""
    conv_op = name.startswith("conv_")
    arch = name.removeprefix("conv_").split("_")[0]
    g = torch.Generator().manual_seed(1)
    shape = (2, 3, 5, 5) if conv_op else (5, features)
    c = shape[1]
    w = torch.randn((3, c, c, 3, 3) if conv_op else (3, c, c), generator=g) * 0.2
    b = torch.randn(3, c, generator=g) * 0.1
    y = torch.randn(shape, generator=g).to(dtype)
    extra = (0.01,) if arch == "antisymmetric" else ()
    fwd = getattr(torch.ops.stablenets, name.split("_backward")[0].removesuffix("_forward")
                  + "_forward").default
    pair = arch in ("leapfrog", "verlet")
    with torch.no_grad():
        out = fwd(*((y, y) if pair else (y,)), w.to(dtype), b.to(dtype), 0.1, *extra, "tanh",
                  True)
    if name.endswith("_forward"):
        return ((y, y.clone()) if pair else (y,)) + (w, b, 0.1, *extra, "tanh", store)
    gy = torch.ones(shape).to(dtype)
    if name.endswith("_backward_reversible"):
        return (gy, gy, out[0], out[1], w, b, 0.1, "tanh")
    if pair:
        return (gy, gy, out[2], w, b, 0.1, "tanh")
    return (gy, out[1], w, b, 0.1, *extra, "tanh")


@pytest.mark.parametrize("features", [8, 40])  # dense: narrow (parameters uncast) and wide
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_autocast_kernels_are_cpp_and_match_the_python_policy(monkeypatch, dtype, features):
    """Eager calls under autocast run the C++ kernels (csrc/autocast.cpp: no Python per
    call); the Python kernels torch.compile/export trace with (stablenets_ext.autocast)
    give the same dtypes and values, for every op."""
    from stablenets_ext import autocast

    python_kernels = {name: autocast._make_kernel(name, getattr(torch.ops.stablenets, name).default,
                                                  "cpu") for name in autocast.op_names()}

    def refuse(*args, **kw):
        raise AssertionError("an eager call under autocast entered the Python autocast policy")

    for name in autocast.op_names():
        op = getattr(torch.ops.stablenets, name).default
        args = _op_args(name, dtype, features=features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with monkeypatch.context() as mp:
                mp.setattr(autocast, "_cast", refuse)
                got = op(*args)
            want = python_kernels[name](*args)
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            assert g.dtype == w.dtype, name
            assert torch.equal(g, w), name


def test_eager_autocast_reversible_forward_runs_in_float32():
    """A reversible forward with gradients wanted keeps its final pair in float32 inside the
    op (the backward rebuilds every state from it) and returns the autocast dtype."""
    y = torch.randn(5, 8)
    w = (torch.randn(3, 8, 8) * 0.2).requires_grad_()
    b = torch.zeros(3, 8, requires_grad=True)
    op = torch.ops.stablenets.verlet_forward.default
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb, _ = op(y, torch.zeros_like(y), w, b, 0.1, "tanh", False)
    with torch.no_grad():
        fa, fb, _ = op(y, torch.zeros_like(y), w, b, 0.1, "tanh", False)
    assert ya.dtype == yb.dtype == torch.bfloat16
    assert torch.equal(ya, fa.bfloat16()) and torch.equal(yb, fb.bfloat16())


def test_dense_autocast_leaves_parameters_uncast():
    """Under CPU autocast a dense stack's weight and bias reach the op in float32: no cast
    of the parameters nor of their gradients (profiler), float32 gradients; two calls in
    one region give the same output."""
    m = sn.ResNetStack(8, 3)
    x = torch.randn(4, 8, requires_grad=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = m(x), m(x)
        (a.float().sum() + b.float().sum()).backward()
    param_shapes = [list(m.weight.shape), list(m.bias.shape)]
    casts = [e for e in prof.events() if e.name == "aten::_to_copy"]
    assert casts and all(list(e.input_shapes[0]) == list(x.shape) for e in casts), \
        [e.input_shapes[0] for e in casts]
    assert not [e for e in casts if list(e.input_shapes[0]) in param_shapes]
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)
    assert m.weight.grad.dtype == m.bias.grad.dtype == x.grad.dtype == torch.float32


def test_float64_untouched_by_autocast():
    m = sn.VerletStack(8, 4).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.randn(4, 8, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cast", ["bfloat16", "half"])
@pytest.mark.parametrize("arch,reversible", CASES)
def test_module_cast(arch, reversible, cast, device):
    """.bfloat16() / .half(): outputs and gradients in the parameters' dtype."""
    m = getattr(_stack(DENSE, arch, reversible, 40, 5, device=device), cast)()
    dtype = m.weight.dtype
    y = torch.randn(9, 40, dtype=dtype, device=device, requires_grad=True)
    out = m(y)
    assert out.dtype == dtype
    out.sum().backward()
    assert y.grad.dtype == dtype and m.weight.grad.dtype == dtype and m.bias.grad.dtype == dtype


@pytest.mark.parametrize("arch,reversible", [("resnet", False), ("verlet", True)])
def test_conv_module_cast(arch, reversible):
    m = _stack(CONV, arch, reversible, 3, 2).bfloat16()
    y = torch.randn(2, 3, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    m(y).float().sum().backward()
    assert y.grad.dtype == m.weight.grad.dtype == torch.bfloat16


def test_mixed_dtypes_refused_by_name():
    m = sn.ResNetStack(8, 2)
    with pytest.raises(ValueError, match="weight: expected the dtype of y"):
        m(torch.randn(3, 8, dtype=torch.bfloat16))  # the module outside autocast
    y, w, b = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(2, 8, 8), torch.randn(2, 8)
    op = torch.ops.stablenets.resnet_forward
    op(y, w, b, 0.1, "tanh", False)  # float32 parameters of a bf16 stack: taken (the op's contract)
    for bad in [(w, b.bfloat16()), (w.double(), b.double()), (w.half(), b.half())]:
        with pytest.raises(ValueError, match="weight, bias: expected the dtype of y .* or both float32"):
            op(y, *bad, 0.1, "tanh", False)
    with pytest.raises(ValueError, match="weight, bias: expected the dtype of y"):
        op(y.float(), w.bfloat16(), b.bfloat16(), 0.1, "tanh", False)  # float32 data, bf16 params


DENSE_OPS = [f"{a}_{k}" for a in DENSE for k in ("forward", "backward")] + [
    "leapfrog_backward_reversible", "verlet_backward_reversible"]


@pytest.mark.parametrize("features", [8, 40])  # narrow tiles; wide GEMMs (bf16) or float32 (fp16)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", DENSE_OPS)
def test_dense_ops_take_float32_parameters_of_a_reduced_stack(name, dtype, features):
    """On the CPU the dense ops take float32 weight and bias with bfloat16/float16 data
    (autocast hands them over uncast): y-like outputs in the data's dtype, float32 parameter
    gradients, no less accurate against float64 than the op on parameters cast to the
    data's dtype (what autocast passed before)."""
    op = getattr(torch.ops.stablenets, name)
    args = _op_args(name, dtype, features=features)  # reduced data and states, float32 params
    got = op(*args)
    exact = op(*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    cast = op(*(a.to(dtype) if isinstance(a, torch.Tensor) else a for a in args))
    is_param_grad = [False] * len(got)
    if "_backward" in name:
        first = 1 if name.split("_")[0] in ("resnet", "antisymmetric") else 2
        is_param_grad[first] = is_param_grad[first + 1] = True
    for g, c, e, param in zip(got, cast, exact, is_param_grad):
        assert g.dtype == (torch.float32 if param else dtype), name
        if e.numel() == 0:
            continue
        assert _rel(g, e) < (0.03 if dtype == torch.bfloat16 else 0.004)
        assert _rel(g, e) <= 1.05 * _rel(c, e) + 1e-3


@pytest.mark.parametrize("arch", list(CONV))
def test_conv_ops_take_float32_parameters_of_a_bf16_stack(arch):
    """On the CPU the conv ops take float32 weight and bias with bfloat16 data (autocast
    hands them over uncast) and return float32 parameter gradients: the float32 op's
    on the same inputs to bfloat16 accuracy, and those of the op on bf16-cast
    parameters up to the roundings the float32 gradients save."""
    name = f"conv_{arch}_backward"
    args = _op_args(name, torch.bfloat16)  # bf16 data and states, float32 parameters
    got = getattr(torch.ops.stablenets, name)(*args)
    n_like_y = 2 if arch in ("leapfrog", "verlet") else 1
    assert all(t.dtype == torch.bfloat16 for t in got[:n_like_y])
    assert all(t.dtype == torch.float32 for t in got[n_like_y:])
    exact = getattr(torch.ops.stablenets, name)(
        *(a.double() if isinstance(a, torch.Tensor) else a for a in args))
    cast = getattr(torch.ops.stablenets, name)(
        *(a.bfloat16() if isinstance(a, torch.Tensor) else a for a in args))
    for g, c, e in zip(got, cast, exact):
        assert _rel(g, e) < 0.02
        assert _rel(g, e) <= 1.05 * _rel(c, e) + 1e-3


def test_conv_autocast_leaves_parameters_uncast():
    """Under CPU autocast the conv stacks' parameters reach the op in float32: no cast of
    the weight (the op casts the kernels while laying them out) and float32 gradients."""
    m = conv.ConvLeapfrogStack(4, 3)
    y = torch.randn(2, 4, 6, 6)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(y)
            out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and m.weight.grad.dtype == torch.float32
    weight_casts = [e for e in prof.key_averages(group_by_input_shape=True)
                    if e.key == "aten::_to_copy" and e.input_shapes
                    and list(e.input_shapes[0]) == list(m.weight.shape)]
    assert not weight_casts, weight_casts


def test_conv_mixed_parameter_dtypes_refused_by_name():
    y = torch.randn(2, 3, 5, 5).bfloat16()
    w, b = torch.randn(2, 3, 3, 3, 3) * 0.1, torch.randn(2, 3)
    op = torch.ops.stablenets.conv_resnet_forward
    op(y, w, b, 0.1, "tanh", False)  # both float32: taken
    with pytest.raises(ValueError, match="weight, bias: expected the dtype of y .* or both float32"):
        op(y, w, b.bfloat16(), 0.1, "tanh", False)
    with pytest.raises(ValueError, match="weight, bias: expected the dtype of y .* or both float32"):
        op(y, w.double(), b.double(), 0.1, "tanh", False)
    with pytest.raises(ValueError, match="weight, bias: expected the dtype of y"):
        op(y.float(), w.bfloat16(), b.bfloat16(), 0.1, "tanh", False)  # float32 data, bf16 params


def _outputs_and_grads(m, y):
    y = y.detach().clone().requires_grad_()
    out = m(y)
    g = torch.ones_like(out, dtype=torch.float32).cos()  # a fixed, non-uniform cotangent
    out.float().backward(g)
    return [out, y.grad, m.weight.grad, m.bias.grad]


@pytest.mark.parametrize("arch,reversible", CASES)
@pytest.mark.parametrize("d", [16, 40])
def test_bf16_error_at_most_pytorch_autocast(arch, reversible, d):
    """Inputs in bfloat16, as a stack inside an autocast network receives them (from the
    nn.Linear or conv before it), float32 parameters, the same for both; the exact values
    are the float64 stack's on those same (bf16-valued) inputs. (Given float32 inputs,
    the reference's residual additions promote to float32 and it returns float32, while
    an autocast op returns the autocast dtype, as nn.Linear does; the last rounding to
    bfloat16 alone then costs 2^-9 relative.)"""
    m64 = _stack(DENSE, arch, reversible, d, 16, impl="reference").double()
    y_in = torch.randn(64, d).bfloat16()
    exact = _outputs_and_grads(m64, y_in.double())
    errs = {}
    for impl in ("fused", "reference"):
        m = _stack(DENSE, arch, reversible, d, 16, impl=impl)
        m.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _outputs_and_grads(m, y_in)
        errs[impl] = [_rel(a, e) for a, e in zip(got, exact)]
    # Output, input and weight gradients: at most PyTorch's error (measured 0.01-0.7x of it).
    # The bias gradient (a column sum of G) is at the floor both share: the bfloat16
    # cotangent the bf16 output hands back and the rounding of the returned gradient;
    # measured 0.14-1.07x of PyTorch's over 36 draws, so it is allowed 1.25x.
    for name, fused, plain, slack in zip(("output", "grad y", "grad weight", "grad bias"),
                                         errs["fused"], errs["reference"], (1, 1, 1, 1.25)):
        assert fused <= slack * plain, f"{name}: fused {fused:.2e} > {slack} x PyTorch autocast {plain:.2e}"


@pytest.mark.parametrize("activation", ["tanh", "silu"])
@pytest.mark.parametrize("arch,reversible", CASES)
def test_bf16_cast_wide_error_at_most_pytorch_bf16(arch, reversible, activation):
    """Modules cast with .bfloat16(), wide (d = 40 > the narrow tile width: bfloat16 GEMMs,
    with the carried states and adjoints in float32; silu keeps P, not act(P), in its
    states; a reversible stack that trains runs its op in float32, functional.run_pair_op,
    and the reversible op in bf16 is tested on its own below): output and every gradient
    against float64 at most the error of plain PyTorch running the reference stack in
    bfloat16 on the same (bf16-valued) parameters and inputs."""
    d, n = 40, 12
    m64 = _stack(DENSE, arch, reversible, d, n, activation=activation, impl="reference").double()
    with torch.no_grad():
        for p in m64.parameters():
            p.copy_(p.bfloat16().double())
    y_in = torch.randn(64, d).bfloat16()
    exact = _outputs_and_grads(m64, y_in.double())
    errs = {}
    for impl in ("fused", "reference"):
        m = _stack(DENSE, arch, reversible, d, n, activation=activation, impl=impl)
        m.load_state_dict(m64.state_dict())
        got = _outputs_and_grads(m.bfloat16(), y_in)
        assert all(t.dtype == torch.bfloat16 for t in got)
        errs[impl] = [_rel(a, e) for a, e in zip(got, exact)]
    # The bias gradient is at the floor both share, as in the autocast test above.
    for name, fused, plain, slack in zip(("output", "grad y", "grad weight", "grad bias"),
                                         errs["fused"], errs["reference"], (1, 1, 1, 1.25)):
        assert fused <= slack * plain, f"{name}: fused {fused:.2e} > {slack} x PyTorch bf16 {plain:.2e}"


@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_bf16_wide_reversible_backward_op(arch):
    """The reversible backward op itself in bfloat16, wide (bf16 GEMMs; the rebuilt pair and
    the adjoints carried in float32; the modules call it in float32 when they train, see
    functional.run_pair_op, so it is tested here on the op): its gradients against the
    float64 op on the same bf16-valued inputs are as accurate as the stored backward's
    against its float64 twin, and it rebuilds the inputs to bfloat16 accuracy."""
    ops = torch.ops.stablenets
    fwd, back = getattr(ops, f"{arch}_forward"), getattr(ops, f"{arch}_backward")
    rev = getattr(ops, f"{arch}_backward_reversible")
    B, d, n = 32, 40, 12

    def bf(*shape, scale=1.0):
        return (torch.randn(*shape) * scale).bfloat16().double()

    y0, w, b, g1, g2 = bf(B, d), bf(n, d, d, scale=d ** -0.5), bf(n, d, scale=0.1), bf(B, d), bf(B, d)
    p0 = y0.clone() if arch == "leapfrog" else torch.zeros_like(y0)
    h = (0.1, "tanh")
    y_n, p_n, states = fwd(y0, p0, w, b, *h, True)
    y_n, p_n = y_n.bfloat16(), p_n.bfloat16()  # the pair a bf16 forward hands over
    got = rev(g1.bfloat16(), g2.bfloat16(), y_n, p_n, w.bfloat16(), b.bfloat16(), *h)
    exact = rev(g1, g2, y_n.double(), p_n.double(), w, b, *h)
    assert all(t.dtype == torch.bfloat16 for t in got)
    _, _, sb = fwd(y0.bfloat16(), p0.bfloat16(), w.bfloat16(), b.bfloat16(), *h, True)
    stored = back(g1.bfloat16(), g2.bfloat16(), sb, w.bfloat16(), b.bfloat16(), *h)
    stored_exact = back(g1, g2, states, w, b, *h)
    for name, a, e, sa, se in zip(("grad y", "grad pair", "grad weight", "grad bias"), got, exact,
                                  stored, stored_exact):
        assert _rel(a, e) <= 1.5 * _rel(sa, se) + 1e-4, (name, _rel(a, e), _rel(sa, se))
    eps = torch.finfo(torch.bfloat16).eps
    assert _rel(got[4], exact[4]) < 2 * eps  # Y_0
    assert (got[5].double() - exact[5]).abs().max() < 4 * eps * y0.abs().max()  # the second input


@pytest.mark.parametrize("arch,reversible", CASES)
def test_conv_bf16_error_within_2x_pytorch_autocast(arch, reversible):
    """The conv stacks on the CPU run bfloat16 natively (oneDNN convolutions in bf16,
    elementwise passes in float32, states and the carried state in bf16 between layers,
    as PyTorch's autocast keeps them; reversible mode in float32). Under autocast they
    take the float32 parameters uncast and return float32 parameter gradients, each
    layer's terms summed in float32 (autocast's cast parameters get a bf16 gradient per
    use, summed in bf16); leapfrog carries its adjoints in float32. Measured over 30
    draws per case (benchmarks/amp_error.py, 2026-12-05, third session): the median ratio
    to PyTorch autocast's error is at most 1.01x for every output and gradient; the
    worst draws 1.03x (output), 1.02x (input gradient; leapfrog's was 1.39x with a bf16
    carry), 1.27x (leapfrog's weight gradient) and up to 1.62x (the bias gradients, at
    the floor the bf16 cotangent and the bf16 convolution outputs set for both; 1.77x
    before the float32 parameter gradients). So 1.25x is allowed for the output and the
    input gradient and 2x for the parameter gradients, not the dense stacks' "at most"."""
    # the per-layer reference stores every state (only the fused op runs reversibly)
    m64 = _stack(CONV, arch, False, 4, 6, impl="reference").double()
    y_in = torch.randn(8, 4, 7, 7).bfloat16()
    exact = _outputs_and_grads(m64, y_in.double())
    errs = {}
    for impl in ("fused", "reference"):
        m = _stack(CONV, arch, reversible and impl == "fused", 4, 6, impl=impl)
        m.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _outputs_and_grads(m, y_in)
        errs[impl] = [_rel(a, e) for a, e in zip(got, exact)]
    for name, fused, plain, slack in zip(("output", "grad y", "grad weight", "grad bias"),
                                         errs["fused"], errs["reference"], (1.25, 1.25, 2, 2)):
        assert fused <= slack * plain, \
            f"{name}: fused {fused:.2e} > {slack} x PyTorch autocast {plain:.2e}"


@pytest.mark.parametrize("activation", ["tanh", "silu"])  # act(P) stored; P stored (silu)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_narrow_reduced_ops_are_float32_rounded_once(arch, dtype, activation):
    """Narrow (d <= 32) leapfrog/Verlet ops in bfloat16/float16 run the float32 tile kernels
    over reduced-precision memory: forward, stored backward and reversible backward return
    exactly the float32 op's results on the same (reduced-valued) inputs, rounded once to
    the dtype. B = 70: a full tile and a partial one."""
    ops = torch.ops.stablenets
    fwd, back = getattr(ops, f"{arch}_forward"), getattr(ops, f"{arch}_backward")
    rev = getattr(ops, f"{arch}_backward_reversible")
    B, d, n = 70, 12, 5
    y, p, g1, g2 = (torch.randn(B, d).to(dtype) for _ in range(4))
    w, b = (torch.randn(n, d, d) * d ** -0.5).to(dtype), (torch.randn(n, d) * 0.1).to(dtype)
    h = (0.1, activation)

    def f32(*ts):
        return [t.float() for t in ts]

    out = fwd(y, p, w, b, *h, True)
    ref = fwd(*f32(y, p, w, b), *h, True)
    assert all(t.dtype == dtype for t in out)
    for a, e in zip(out, ref):
        assert torch.equal(a, e.to(dtype))
    got = back(g1, g2, out[2], w, b, *h)
    exact = back(*f32(g1, g2, out[2], w, b), *h)
    assert all(t.dtype == dtype for t in got)
    for a, e in zip(got, exact):
        assert torch.equal(a, e.to(dtype))
    got = rev(g1, g2, out[0], out[1], w, b, *h)
    exact = rev(*f32(g1, g2, out[0], out[1], w, b), *h)
    assert all(t.dtype == dtype for t in got)
    for a, e in zip(got, exact):  # gradients and the rebuilt pair (rebuilt in float32)
        assert torch.equal(a, e.to(dtype))


@pytest.mark.parametrize("d", [8, 40])  # narrow tiles; wide (bf16 GEMMs, float32 pair)
@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_bf16_reversible_deep_stack_rebuilds(arch, d):
    """Depth 1024, well-conditioned: the reversible backward in bfloat16 (module cast and
    autocast) rebuilds its states without the reversibility warning."""
    m = _stack(DENSE, arch, True, d, 1024, step=0.05)
    with torch.no_grad():
        m.weight.mul_(0.5)
    y = torch.randn(16, d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(y)
        out.float().sum().backward()
        mb = _stack(DENSE, arch, True, d, 1024, step=0.05).bfloat16()
        mb.load_state_dict(m.state_dict())
        mb(y.bfloat16()).float().sum().backward()
    assert torch.isfinite(m.weight.grad).all() and torch.isfinite(mb.weight.grad).all()
    # the same gradients as a float32 run, to bfloat16 accuracy
    m32 = _stack(DENSE, arch, True, d, 1024, step=0.05)
    m32.load_state_dict(m.state_dict())
    m32(y).sum().backward()
    assert _rel(m.weight.grad, m32.weight.grad.double()) < 0.05


def test_compile_under_autocast():
    m = sn.ResNetStack(8, 3)
    lin = torch.nn.Linear(8, 8)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(lin(x))

    x = torch.randn(4, 8)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, f(x))


@pytest.mark.filterwarnings("ignore:stablenets_ext conv stacks. double backward")
@pytest.mark.parametrize("make,shape", [
    (lambda: sn.LeapfrogStack(8, 3), (4, 8)),          # narrow dense
    (lambda: sn.VerletStack(40, 2), (4, 40)),          # wide dense
    (lambda: conv.ConvResNetStack(3, 2), (2, 3, 5, 5)),
], ids=["leapfrog-narrow", "verlet-wide", "conv-resnet"])
def test_double_backward_under_autocast_with_float32_parameters(make, shape):
    """create_graph=True under CPU autocast, where the float32 parameters reach the ops
    uncast: the differentiable backward (the reference recomputed in float32, its outputs
    rounded to bf16 as the op's are) gives second-order gradients close to the float32
    run's, float32 for the parameters."""
    torch.manual_seed(0)
    m, x = make(), torch.randn(*shape)

    def second_order(autocast):
        m.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m(xx)
        g, = torch.autograd.grad(out.float().square().sum(), xx, create_graph=True)
        g.square().sum().backward()
        return g.detach(), m.weight.grad.clone()

    g16, w16 = second_order(True)
    g32, w32 = second_order(False)
    assert w16.dtype == torch.float32
    assert _rel(g16, g32.double()) < 0.05 and _rel(w16, w32.double()) < 0.05


@pytest.mark.parametrize("arch", ["resnet", "verlet"])
def test_small_bf16_gemms_run_in_float32(monkeypatch, arch):
    """A wide bfloat16 stack whose GEMMs are too small for bf16 to pay (B d^2 below
    STABLENETS_BF16_GEMM_MIN, by default about 1 M per thread plus 1 M) runs on float32
    copies: the float32 op's results rounded once; above the line, the bf16 GEMM kernels
    (whose results differ). A bad value is refused by name."""
    monkeypatch.delenv("STABLENETS_BF16_GEMM_MIN")
    g = torch.Generator().manual_seed(0)
    y = torch.randn(16, 48, generator=g).bfloat16()  # 16 * 48^2 = 37 k multiply-adds
    w = (torch.randn(2, 48, 48, generator=g) * 0.2).bfloat16()
    b = (torch.randn(2, 48, generator=g) * 0.1).bfloat16()
    op = getattr(torch.ops.stablenets, f"{arch}_forward")
    pair = (y,) if arch == "resnet" else (y, torch.zeros_like(y))
    got = op(*pair, w, b, 0.1, "tanh", True)
    f32 = op(*(t.float() for t in pair), w.float(), b.float(), 0.1, "tanh", True)
    assert all(torch.equal(a, e.bfloat16()) for a, e in zip(got, f32))
    monkeypatch.setenv("STABLENETS_BF16_GEMM_MIN", "0")
    bf16 = op(*pair, w, b, 0.1, "tanh", True)
    assert not torch.equal(bf16[0], got[0])  # the bf16 GEMMs round their inputs' products
    assert _rel(bf16[0], f32[0].double()) < 0.02
    monkeypatch.setenv("STABLENETS_BF16_GEMM_MIN", "lots")
    with pytest.raises(ValueError, match="STABLENETS_BF16_GEMM_MIN: expected a whole number"):
        op(*pair, w, b, 0.1, "tanh", True)


def test_autocast_casts_large_inputs_through_the_cache():
    """Under CPU autocast, a tensor of 1 MB and more that is cast (here the float32 input;
    the parameters are not cast on the CPU) goes through stablenets::cpu_cast (into the
    kernels' block cache, its gradient cast back the same way): the same outputs and
    gradients as casting it with .to(). A wide stack's float32 parameters give float32
    gradients: the weight's as from its bfloat16 copy (the GEMMs run in bfloat16), the
    bias's summed in float32, unrounded."""
    m = sn.VerletStack(512, 3)
    x = torch.randn(1024, 512, requires_grad=True)  # bf16: 1 MB
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    fns = [type(f).__name__ for f, _ in out.grad_fn.next_functions if f]
    assert sum("cpu_cast" in f for f in fns) == 1, fns
    out.float().square().sum().backward()
    xb = x.detach().bfloat16().requires_grad_()
    w = m.weight.detach().bfloat16().requires_grad_()
    b = m.bias.detach().requires_grad_()
    y, z, _ = torch.ops.stablenets.verlet_forward(xb, torch.zeros(1024, 512).bfloat16(), w,
                                                  b.bfloat16(), m.step, "tanh", True)
    torch.testing.assert_close(out, y, rtol=0, atol=0)
    y.float().square().sum().backward()
    assert x.grad.dtype == m.weight.grad.dtype == m.bias.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, xb.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(m.weight.grad, w.grad.float(), rtol=0, atol=0)


def test_opcheck_cpu_cast():
    x = torch.randn(4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.stablenets.cpu_cast.default, (x, torch.bfloat16))
    torch.library.opcheck(torch.ops.stablenets.cpu_cast.default, (x.bfloat16(), torch.float32))


@pytest.mark.parametrize("params", [torch.bfloat16, torch.float32])  # float32: the CPU's mix
@pytest.mark.parametrize("d", [8, 40])
def test_opcheck_bf16(params, d):
    y = torch.randn(5, d, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(3, d, d) * 0.3).to(params).requires_grad_()
    b = torch.randn(3, d, dtype=params, requires_grad=True)
    for name, args in (("resnet_forward", (y, w, b, 0.1, "tanh", True)),
                       ("verlet_forward", (y, y.detach().clone(), w, b, 0.1, "tanh", True))):
        torch.library.opcheck(getattr(torch.ops.stablenets, name).default, args,
                              test_utils=("test_schema", "test_autograd_registration",
                                          "test_faketensor"))


# ------------------------------------------------------------------- training


def _cli_json(capsys, argv):
    from stablenets_ext import cli

    assert cli.main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    import json

    return json.loads(lines[-1])


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_amp_backprop(tmp_path, capsys, amp):
    """--amp trains (fp16 with a gradient scaler, saved in the checkpoint and resumed)."""
    ck = tmp_path / "ck.pt"
    argv = ["train", "--dataset", "ellipse", "--layers", "4", "--epochs", "2", "--quiet",
            "--json", "--threads", "1", "--amp", amp, "--save", str(ck)]
    line = _cli_json(capsys, argv)
    assert line["accuracy"] > 0.5
    state = torch.load(ck, map_location="cpu", weights_only=False)
    assert ("grad_scaler" in state) == (amp == "fp16")
    assert all(v.dtype == torch.float32 for k, v in state["model"].items() if v.is_floating_point())


def test_train_amp_changes_the_run_and_keeps_float32_parameters():
    from stablenets_ext import data as D
    from stablenets_ext.models import StableNet
    from stablenets_ext.training.backprop import engine

    torch.manual_seed(0)
    data = D.load_dataset("ellipse", seed=0)
    results = {}
    for amp in (None, "bf16"):
        torch.manual_seed(0)
        model = StableNet("verlet", data.features, data.classes, 4)
        r = engine.train(model, data, epochs=1, batch_size=64, lr=1e-2, quiet=True, amp=amp)
        results[amp] = (r["loss"], [p.detach().clone() for p in model.parameters()])
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert results[None][0] != results["bf16"][0]  # autocast was really on


def test_amp_refused_where_it_cannot_be_honoured():
    from stablenets_ext.training import TrainConfig
    from stablenets_ext.training.options import OptionError

    with pytest.raises(OptionError, match="amp: expected one of"):
        TrainConfig(amp="int8").check()
    from stablenets_ext.training.amp import check_device
    with pytest.raises(OptionError, match="amp: torch.autocast is not available on device 'meta'"):
        check_device("bf16", "meta")


def test_loss_scale_rule():
    """LossScale (SG's stages, PVD's workers) follows GradScaler's rule: halve and skip
    on inf/NaN, double after growth_interval finite steps, state saved and restored."""
    from stablenets_ext.training.amp import LossScale

    ls = LossScale(init_scale=8.0, growth_interval=3)
    assert ls.all_finite([torch.ones(3), None]) and not ls.all_finite([torch.tensor([1, float("inf")])])
    assert not ls.all_finite([torch.tensor([float("nan")])])
    ls.update(False)
    assert ls.scale == 4.0 and ls.skipped == 1
    for _ in range(3):
        ls.update(True)
    assert ls.scale == 8.0 and ls.good_steps == 0
    ls.update(True)
    other = LossScale()
    other.load_state_dict(ls.state_dict())
    assert (other.scale, other.good_steps, other.skipped) == (8.0, 1, 1)


# ------------------------------------------------- --amp with the SG and PVD trainers


class _Probe:
    """Records the dtypes of every Linear output (a global forward hook: it also
    sees the stage copies and PVD's functional_call) and whether autocast was on."""

    def __enter__(self):
        self.dtypes = set()

        def hook(module, args, out):
            if isinstance(module, torch.nn.Linear):
                self.dtypes.add(out.dtype)

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _digits_model(data, seed=0):
    from stablenets_ext.models import StableNet

    torch.manual_seed(seed)
    return StableNet("verlet", data.features, data.classes, 8, width=64, step=0.1)


@pytest.mark.parametrize("amp,sg_fit", [("bf16", "solve"), ("bf16", "adam"), ("fp16", "solve")])
def test_train_amp_sg(one_thread, amp, sg_fit):
    """SG under bf16/fp16: the stages' forwards run in that dtype (probe), the run
    differs from float32, it learns digits, parameters stay float32."""
    from stablenets_ext.training.amp import MODES

    from stablenets_ext import data as D
    from stablenets_ext.training.sg import train_sg
    from stablenets_ext.training.sg import stages as S

    data = D.load_dataset("digits")
    kw = dict(epochs=1, batch_size=64, lr=0.01, stages=2, quiet=True, sg_fit=sg_fit)
    crossing = set()
    forward = S.StageRunner.forward

    def spy(self, t, inputs, labels):
        out = forward(self, t, inputs, labels)
        crossing.update(o.dtype for o in out or ())
        return out

    S.StageRunner.forward = spy
    try:
        results = {}
        for mode in (None, amp):
            model = _digits_model(data)
            with _Probe() as probe:
                r = train_sg(model, data, amp=mode, **kw)
            results[mode] = r
            # evaluation and the SG modules stay float32; the stages' forwards not
            assert (MODES[amp] in probe.dtypes) == (mode == amp), probe.dtypes
            assert all(p.dtype == torch.float32 for p in model.parameters())
    finally:
        S.StageRunner.forward = forward
    assert crossing == {torch.float32}  # the states crossing the cut
    assert results[amp]["accuracy"] > 0.5, results[amp]["accuracy"]
    assert results[amp]["loss"] != results[None]["loss"]
    assert abs(results[amp]["accuracy"] - results[None]["accuracy"]) < 0.1


def _huge_loss_scales(monkeypatch):
    """Every LossScale made from now on starts at 2**60 (float16 overflows at once);
    returns the list they are appended to."""
    from stablenets_ext.training import amp as A

    init = A.LossScale.__init__
    seen = []

    def huge(self, init_scale=2.0 ** 60, **kw):
        init(self, init_scale=init_scale, **kw)
        seen.append(self)

    monkeypatch.setattr(A.LossScale, "__init__", huge)
    return seen


# a stage whose every step overflowed in the first epoch has not stepped its optimiser
# when its schedule steps: torch warns
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_train_amp_sg_fp16_skips_overflowing_steps(one_thread, monkeypatch):
    """fp16 SG from an absurd loss scale (2**60): the first steps overflow float16 and are
    skipped, the scale halves until the gradients are finite, the input gradients an
    overflowing stage hands upstream are not learnt from, and the run still learns."""
    from stablenets_ext import data as D
    from stablenets_ext.training.sg import train_sg

    seen = _huge_loss_scales(monkeypatch)
    data = D.load_dataset("digits")
    r = train_sg(_digits_model(data), data, epochs=2, batch_size=64, lr=0.01, stages=2,
                 quiet=True, amp="fp16")
    assert len(seen) == 2  # one per stage
    assert all(ls.skipped > 0 and ls.scale < 2.0 ** 60 for ls in seen), \
        [(ls.skipped, ls.scale) for ls in seen]
    assert r["accuracy"] > 0.5, r["accuracy"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_amp_sg_pipeline(one_thread, amp):
    """The stage processes (settings travel to each worker's StageRunner) learn
    under bf16 and fp16 too, with float32 parameters."""
    from stablenets_ext import data as D
    from stablenets_ext.training.sg import train_sg

    data = D.load_dataset("digits")
    model = _digits_model(data)
    r = train_sg(model, data, epochs=1, batch_size=64, lr=0.01, workers=2, threads=1,
                 quiet=True, amp=amp)
    assert r["accuracy"] > 0.5, r["accuracy"]
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("amp,backend", [("bf16", "sequential"), ("bf16", "process"),
                                         ("fp16", "sequential"), ("fp16", "process")])
def test_train_amp_pvd(one_thread, amp, backend):
    from stablenets_ext.training.amp import MODES

    from stablenets_ext import data as D
    from stablenets_ext.training import pvd

    data = D.load_dataset("digits")
    kw = dict(workers=2, backend=backend, iterations=2, inner_batches=15, lr=0.01, threads=1,
              start_method="forkserver")
    results = {}
    for mode in ((None, amp) if backend == "sequential" else (amp,)):
        model = _digits_model(data)
        with _Probe() as probe:
            results[mode] = pvd.train_pvd(model, data, amp=mode, **kw)
        if backend == "sequential":  # the workers' steps in bf16/fp16, sync/evaluation in float32
            want = {MODES[amp], torch.float32} if mode else {torch.float32}
            assert probe.dtypes == want, probe.dtypes
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert results[mode]["accuracy"] > 0.5, results[mode]["accuracy"]
    if backend == "sequential":
        assert results[amp]["history"]["digest"] != results[None]["history"]["digest"]


# a stage or worker whose every step overflowed in the first epoch has not stepped
def test_train_amp_pvd_fp16_skips_overflowing_steps(one_thread, monkeypatch):
    """fp16 PVD from an absurd loss scale: the direction's gradient sum is recomputed at
    lower scales until finite, overflowing subproblem steps are skipped, and it learns."""
    from stablenets_ext import data as D
    from stablenets_ext.training import pvd

    seen = _huge_loss_scales(monkeypatch)
    data = D.load_dataset("digits")
    r = pvd.train_pvd(_digits_model(data), data, workers=2, backend="sequential", iterations=2,
                      inner_batches=15, lr=0.01, threads=1, amp="fp16")
    assert len(seen) == 2 and all(ls.skipped > 0 for ls in seen), [ls.skipped for ls in seen]
    assert r["accuracy"] > 0.5, r["accuracy"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_amp_sg_pvd_cli(capsys, amp):
    """The CLI takes --amp bf16/fp16 for sg and pvd and reports float32 parameters."""
    for trainer, extra in (("sg", []), ("pvd", ["--backend", "sequential"])):
        line = _cli_json(capsys, ["train", "--dataset", "ellipse", "--layers", "4", "--epochs",
                                  "1", "--quiet", "--json", "--threads", "1", "--trainer",
                                  trainer, "--amp", amp, *extra])
        assert line["epochs" if trainer == "sg" else "iterations"] == 1
