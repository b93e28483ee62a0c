"""No silent wrong gradients: double backward, forward-mode AD, torch.func, fake
kernels (meta tensors, mixed devices), dynamic shapes, lost reversibility."""

import warnings

import pytest
import torch
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

import stablenets_ext as sn
from stablenets_ext import functional as SF
from stablenets_ext import ops, reference

from conftest import DEVICES

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="extension not built")

ARCHS = ["resnet", "antisymmetric", "leapfrog", "verlet"]
KEY = {"leapfrog": "y_prev", "verlet": "z"}
# (arch, reversible): every stack, and the two that have a reversible backward both ways.
MODES = [(a, False) for a in ARCHS] + [("leapfrog", True), ("verlet", True)]
MODE_IDS = [f"{a}-{'reversible' if r else 'stored'}" for a, r in MODES]


def make(B, d, N, device="cpu", dtype=torch.float64, scale=1.0):
    y = torch.randn(B, d, dtype=dtype, device=device)
    w = torch.randn(N, d, d, dtype=dtype, device=device) * (scale / d**0.5)
    b = torch.randn(N, d, dtype=dtype, device=device) * 0.5
    return y, w, b


def stack_fn(arch, reversible, impl="fused", act="tanh", step=0.3):
    """The stack as a function of all its tensor inputs, returning every output."""
    fn = SF.FUNCTIONS[arch]
    if arch in KEY:
        return lambda y, w, b, s: fn(y, w, b, step, act, impl=impl, return_state=True,
                                     reversible=reversible, **{KEY[arch]: s})
    return lambda y, w, b: fn(y, w, b, step, act, impl=impl)


def inputs_for(arch, device="cpu", B=4, d=3, N=3):
    y, w, b = make(B, d, N, device)
    args = [y, w, b] + ([torch.randn_like(y) * 0.5] if arch in KEY else [])
    return [t.requires_grad_() for t in args]


def module_pair(arch, reversible, d=3, N=4, device="cpu"):
    kw = {"reversible": reversible} if arch in KEY else {}
    fused = sn.layers.STACKS[arch](d, N, step=0.3, impl="fused", **kw).to(device).double()
    ref = sn.layers.STACKS[arch](d, N, step=0.3, impl="reference").to(device).double()
    ref.load_state_dict(fused.state_dict())
    return fused, ref


@pytest.fixture
def quiet():
    """The reference-path warning is tested once, below; elsewhere it is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="stablenets_ext: a torch.func transform")
        yield


# ------------------------------------------------------------ double backward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,reversible", MODES, ids=MODE_IDS)
def test_gradgradcheck(device, arch, reversible):
    inputs = inputs_for(arch, device)
    assert torch.autograd.gradgradcheck(stack_fn(arch, reversible), inputs)


@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
@pytest.mark.parametrize("reversible", [False, True])
def test_gradgradcheck_default_state(arch, reversible):
    """y_prev / z omitted: y feeds two op inputs (leapfrog), z is a fresh zero tensor."""
    y, w, b = make(4, 3, 3)
    fn = SF.FUNCTIONS[arch]
    f = lambda y, w, b: fn(y, w, b, 0.3, impl="fused", reversible=reversible)  # noqa: E731
    assert torch.autograd.gradgradcheck(f, [t.requires_grad_() for t in (y, w, b)])


@pytest.mark.parametrize("arch,reversible", MODES, ids=MODE_IDS)
def test_double_backward_equals_reference(arch, reversible):
    """The issue's repro: a gradient penalty through a module, w.r.t. input and weight."""
    fused, ref = module_pair(arch, reversible)
    x = torch.randn(8, 3, dtype=torch.float64)
    out = []
    for m in (fused, ref):
        y = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(m(y).square().sum(), y, create_graph=True)
        out.append(torch.autograd.grad(g.square().sum(), (y, m.weight, m.bias)))
    for a, r in zip(*out):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, r)


# ---------------------------------------------------------- forward-mode AD


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,reversible", MODES, ids=MODE_IDS)
def test_forward_ad_and_batched_gradcheck(device, arch, reversible, quiet):
    """Forward mode, vmap over it, and vmap over the backward (batched gradients)."""
    inputs = inputs_for(arch, device)
    assert torch.autograd.gradcheck(stack_fn(arch, reversible), inputs, check_forward_ad=True,
                                    check_batched_forward_grad=True, check_batched_grad=True)


@pytest.mark.parametrize("arch,reversible", MODES, ids=MODE_IDS)
def test_batched_grad_outputs_and_vectorized_jacobian(arch, reversible, quiet):
    fused, ref = module_pair(arch, reversible)
    x = torch.randn(3, 3, dtype=torch.float64)
    got = torch.autograd.functional.jacobian(fused, x, vectorize=True)
    torch.testing.assert_close(got, torch.autograd.functional.jacobian(ref, x))
    y = x.clone().requires_grad_()
    out = fused(y)
    basis = torch.eye(out.numel(), dtype=out.dtype).reshape(-1, *out.shape)
    (rows,) = torch.autograd.grad(out, y, basis, is_grads_batched=True)
    torch.testing.assert_close(rows.reshape(*out.shape, *y.shape), got)


@pytest.mark.parametrize("arch,reversible", MODES, ids=MODE_IDS)
def test_dual_tensor_tangent_equals_reference(arch, reversible, quiet):
    fused, ref = module_pair(arch, reversible)
    x, t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(fused(fwAD.make_dual(x, t)))
        want = fwAD.unpack_dual(ref(fwAD.make_dual(x, t)))
    assert got.tangent is not None
    torch.testing.assert_close(got.primal, want.primal)
    torch.testing.assert_close(got.tangent, want.tangent)


# -------------------------------------------------------------- torch.func

TRANSFORMS = {
    "jacfwd": jacfwd,
    "jacrev": jacrev,
    "hessian": lambda f: hessian(lambda x: f(x).square().sum()),
    "grad": lambda f: grad(lambda x: f(x).sin().sum()),
}


@pytest.mark.parametrize("arch,reversible", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_func_transform_equals_reference(arch, reversible, name, quiet):
    fused, ref = module_pair(arch, reversible)
    T = TRANSFORMS[name]
    x = torch.randn(2, 3, dtype=torch.float64)
    got, want = T(fused)(x), T(ref)(x)
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want)
    xs = torch.randn(3, 2, 3, dtype=torch.float64)  # vmap of the transform
    torch.testing.assert_close(vmap(T(fused))(xs), vmap(T(ref))(xs))


@pytest.mark.parametrize("arch,reversible", MODES, ids=MODE_IDS)
def test_func_grad_over_parameters_and_vmap(arch, reversible, quiet):
    fused, ref = module_pair(arch, reversible)
    x = torch.randn(6, 3, dtype=torch.float64)

    def loss(m):
        return lambda p, x: functional_call(m, p, (x,)).square().sum()

    params = {k: v.detach() for k, v in fused.named_parameters()}
    got, want = grad(loss(fused))(params, x), grad(loss(ref))(params, x)
    for k in params:
        torch.testing.assert_close(got[k], want[k])
    # per-example gradients, the usual vmap(grad) idiom
    got = vmap(grad(loss(fused)), in_dims=(None, 0))(params, x[:, None])
    want = vmap(grad(loss(ref)), in_dims=(None, 0))(params, x[:, None])
    for k in params:
        torch.testing.assert_close(got[k], want[k])
    torch.testing.assert_close(vmap(fused)(x[:, None]), vmap(ref)(x[:, None]))


def test_transforms_warn_once(monkeypatch):
    monkeypatch.setattr(SF, "_warned_reasons", set())
    fused, _ = module_pair("verlet", False)
    x = torch.randn(2, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jacfwd(fused)(x)
        jacrev(fused)(x)
        fused(x)  # plain call: fused, no warning
    msgs = [str(w.message) for w in caught if "reference" in str(w.message)]
    assert len(msgs) == 1 and "torch.func" in msgs[0]


@pytest.mark.parametrize("name", ["jacfwd", "jacrev", "grad"])
def test_raw_ops_refuse_transforms_by_name(name):
    """Below the functional layer nothing can reroute: the raw ops refuse, never return zeros."""
    st = torch.ops.stablenets
    y, w, b = make(2, 3, 2)
    s = st.resnet_forward(y, w, b, 0.1, "tanh", True)[1]
    T = {"jacfwd": jacfwd, "jacrev": jacrev, "grad": lambda f: grad(lambda x: f(x).sum())}[name]
    calls = {
        "verlet_forward": lambda x: st.verlet_forward(x, x, w, b, 0.1, "tanh", True)[0],
        "resnet_backward": lambda x: st.resnet_backward(x, s, w, b, 0.1, "tanh")[0],
    }
    for op, f in calls.items():
        with pytest.raises(RuntimeError, match=f"stablenets::{op}"):
            T(f)(y)
    with fwAD.dual_level():
        with pytest.raises(RuntimeError, match="stablenets::leapfrog_forward.*forward-mode"):
            st.leapfrog_forward(fwAD.make_dual(y, y), y, w, b, 0.1, "tanh", False)


def test_raw_backward_op_refuses_to_be_differentiated():
    st = torch.ops.stablenets
    y, w, b = make(2, 3, 2)
    s = st.resnet_forward(y, w, b, 0.1, "tanh", True)[1]
    with pytest.raises(RuntimeError, match="stablenets::resnet_backward is not differentiable"):
        st.resnet_backward(torch.randn_like(y).requires_grad_(), s, w, b, 0.1, "tanh")
    with torch.no_grad():  # no gradient wanted: fine
        st.resnet_backward(torch.randn_like(y).requires_grad_(), s, w, b, 0.1, "tanh")


# ---------------------------------------------------------------- callables


@pytest.mark.parametrize("arch", ARCHS)
def test_callable_activation_runs_on_reference(arch, monkeypatch):
    monkeypatch.setattr(SF, "_warned_reasons", set())
    y, w, b = make(5, 3, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for act in (torch.nn.ReLU(), torch.sin):
            got = SF.FUNCTIONS[arch](y, w, b, 0.2, act)  # impl="fused" refuses a callable
            torch.testing.assert_close(got, reference.FUNCTIONS[arch](y, w, b, 0.2, act))
            m = sn.layers.STACKS[arch](3, 4, step=0.2, activation=act).double()
            x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
            m(x).sum().backward()
            assert x.grad is not None and m.weight.grad is not None
    assert len([w for w in caught if "callable" in str(w.message)]) == 1
    assert "activation=sin," in repr(sn.layers.STACKS[arch](3, 4, activation=torch.sin))


def test_callable_module_activation_parameters_train():
    m = sn.VerletStack(3, 4, activation=torch.nn.PReLU())
    assert "activation.weight" in dict(m.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(torch.randn(5, 3)).sum().backward()
    assert m.activation.weight.grad is not None


@pytest.mark.parametrize("act", sorted(reference.ACTIVATIONS))
def test_every_named_activation_fused_equals_reference(act):
    """The one list in reference.ACTIVATIONS is what the fused kernels accept."""
    for arch in ARCHS:
        y, w, b = make(6, 5, 3)
        args = [t.clone().requires_grad_() for t in (y, w, b)]
        got = SF.FUNCTIONS[arch](*args, 0.3, act, impl="fused")
        want = reference.FUNCTIONS[arch](y, w, b, 0.3, act)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda *a: SF.FUNCTIONS[arch](*a, 0.3, act, impl="fused"), args)


def test_bad_activation_still_rejected():
    for bad in ("gelu", 3, None):
        with pytest.raises(ValueError, match="activation"):
            SF.resnet(*make(2, 3, 1), 0.1, bad)
        with pytest.raises(ValueError, match="activation"):
            sn.ResNetStack(3, 2, activation=bad)


# ------------------------------------------------- fake kernels: meta, devices


def _raw_cases(device="cpu"):
    """(op, args, indices of tensor args) for each of the ten raw ops, all valid."""
    st = torch.ops.stablenets
    y, w, b = make(5, 4, 3, device, torch.float32)
    z, g = torch.randn_like(y), torch.randn_like(y)
    s2 = st.resnet_forward(y, w, b, 0.1, "tanh", True)[1]
    lf = st.leapfrog_forward(y, z, w, b, 0.1, "tanh", True)
    vf = st.verlet_forward(y, z, w, b, 0.1, "tanh", True)
    return [
        (st.resnet_forward, (y, w, b, 0.1, "tanh", True)),
        (st.resnet_backward, (g, s2, w, b, 0.1, "tanh")),
        (st.antisymmetric_forward, (y, w, b, 0.1, 0.01, "tanh", True)),
        (st.antisymmetric_backward, (g, s2, w, b, 0.1, 0.01, "tanh")),
        (st.leapfrog_forward, (y, z, w, b, 0.1, "tanh", True)),
        (st.leapfrog_backward, (g, g.clone(), lf[2], w, b, 0.1, "tanh")),
        (st.leapfrog_backward_reversible, (g, g.clone(), lf[0], lf[1], w, b, 0.1, "tanh")),
        (st.verlet_forward, (y, z, w, b, 0.1, "tanh", True)),
        (st.verlet_backward, (g, g.clone(), vf[2], w, b, 0.1, "tanh")),
        (st.verlet_backward_reversible, (g, g.clone(), vf[0], vf[1], w, b, 0.1, "tanh")),
    ]


def _tensor_slots(args):
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]


def _name(case):
    return case[0]._qualified_op_name.split("::")[-1]


def test_meta_calls_match_real_shapes():
    cases = _raw_cases()
    assert len({_name(c) for c in cases}) == 10
    for op, args in cases:
        real = op(*args)
        meta = op(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
        assert len(real) == len(meta), _name((op, args))
        for r, m in zip(real, meta):
            assert m.device.type == "meta" and m.shape == r.shape and m.dtype == r.dtype


def test_mixed_meta_and_cpu_calls_raise():
    """One tensor argument on meta, the rest on the CPU: every op refuses, naming a device."""
    for op, args in _raw_cases():
        for i in _tensor_slots(args):
            mixed = list(args)
            mixed[i] = args[i].to("meta")
            with pytest.raises(ValueError, match="device"):
                op(*mixed)


@pytest.mark.parametrize("device", ["meta", pytest.param("cpu", id="cpu")])
def test_bad_shapes_dtypes_and_scalars_raise_everywhere(device):
    """The fake kernels (meta) check what the real ones (cpu) check, with the same messages."""
    for op, args in _raw_cases():
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        for i in _tensor_slots(args):
            for bad in (args[i][..., :1], args[i].double(), args[i].int()):
                broken = list(args)
                broken[i] = bad
                with pytest.raises(ValueError):
                    op(*broken)
        for i, a in enumerate(args):
            if isinstance(a, str):
                broken = list(args)
                broken[i] = "softsign"
                with pytest.raises(ValueError, match="activation"):
                    op(*broken)
            elif isinstance(a, float):
                broken = list(args)
                broken[i] = float("nan")
                with pytest.raises(ValueError, match="step|gamma"):
                    op(*broken)


def test_meta_and_cpu_messages_agree():
    y, w, b = make(5, 4, 3, "cpu", torch.float32)
    st = torch.ops.stablenets
    msgs = []
    for dev in ("cpu", "meta"):
        with pytest.raises(ValueError) as err:
            st.resnet_forward(y.to(dev), w[:, :3, :3].to(dev), b.to(dev), 0.1, "tanh", True)
        msgs.append(str(err.value).splitlines()[0])
    assert msgs[0] == msgs[1]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_cpu_and_cuda_calls_raise():
    for op, args in _raw_cases("cuda"):
        for i in _tensor_slots(args):
            for other in ("cpu", "meta"):
                mixed = list(args)
                mixed[i] = args[i].to(other)
                with pytest.raises((ValueError, RuntimeError), match="device|Expected all tensors"):
                    op(*mixed)


# ------------------------------------------------------ compile and export


@pytest.mark.parametrize("reversible", [False, True])
def test_compile_dynamic_matches_eager(reversible):
    """Each module under torch.compile(fullgraph=True, dynamic=True), two batch sizes."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(*(
        sn.layers.STACKS[a](5, 3, step=0.2, impl="fused", **({"reversible": reversible} if a in KEY else {}))
        for a in ARCHS)).double()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    for B in (7, 12):
        x = torch.randn(B, 5, dtype=torch.float64, requires_grad=True)
        out, want = compiled(x), model(x)
        torch.testing.assert_close(out, want)
        (g_c,) = torch.autograd.grad(out.square().sum(), x)
        (g_e,) = torch.autograd.grad(want.square().sum(), x)
        torch.testing.assert_close(g_c, g_e)


def test_export_with_dynamic_batch():
    model = torch.nn.Sequential(*(sn.layers.STACKS[a](5, 3, step=0.2, impl="fused") for a in ARCHS))
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(model, (torch.randn(4, 5),), dynamic_shapes=({0: batch},))
    for B in (3, 9):
        x = torch.randn(B, 5)
        torch.testing.assert_close(ep.module()(x), model(x))


# --------------------------------------------------------- reversibility


def _reversible_grads(arch, N, h, dtype, scale=1.0, d=8, B=96):
    if not ops.REBUILDS[arch]:
        pytest.skip("this build's reversible backward does not return the rebuilt state")
    y, w, b = make(B, d, N, dtype=dtype, scale=scale)
    b *= 0.2
    state = torch.randn_like(y) * 0.1 + (y if arch == "leapfrog" else 0)
    leaves = [t.requires_grad_() for t in (y, w, b, state)]
    out = stack_fn(arch, True, step=h)(*leaves)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.autograd.backward(out, [torch.randn_like(o) for o in out])
    return [w for w in caught if "reversib" in str(w.message)]


@pytest.mark.parametrize("arch,scale", [("leapfrog", 1.0), ("verlet", 3.0)])
def test_lost_reversibility_warns(arch, scale):
    caught = _reversible_grads(arch, 256, 0.5, torch.float32, scale)
    assert len(caught) == 1 and issubclass(caught[0].category, UserWarning)
    assert "reversible=False" in str(caught[0].message)


@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
@pytest.mark.parametrize("dtype,N,h", [(torch.float32, 64, 0.05), (torch.float64, 256, 0.1)])
def test_stable_stack_does_not_warn(arch, dtype, N, h):
    assert _reversible_grads(arch, N, h, dtype) == []


@pytest.mark.parametrize("act", sorted(reference.ACTIVATIONS))
def test_every_named_activation_wide_matches_reference(act):
    """The wide CPU path (d > 32: ATen products, each layer's state written into its slot, silu's
    kept pre-activation) for every activation, stored and reversible, against the reference."""
    for arch in ARCHS:
        for reversible in (False, True) if arch in ("leapfrog", "verlet") else (False,):
            y, w, b = make(7, 40, 3)
            kw = {"reversible": True} if reversible else {}
            args = [t.clone().requires_grad_() for t in (y, w, b)]
            got = SF.FUNCTIONS[arch](*args, 0.3, act, impl="fused", **kw)
            ref_args = [t.clone().requires_grad_() for t in (y, w, b)]
            want = reference.FUNCTIONS[arch](*ref_args, 0.3, act)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
            cot = torch.randn_like(want)
            got_g = torch.autograd.grad(got, args, cot)
            want_g = torch.autograd.grad(want, ref_args, cot)
            for name, g, r in zip(("y", "weight", "bias"), got_g, want_g):
                torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-10, msg=f"{arch} {act} {name} rev={reversible}")


# ------------------------------------------------- the C++ autograd path (issue 22)


@pytest.mark.parametrize("arch,reversible", MODES, ids=MODE_IDS)
def test_module_call_goes_straight_to_the_cpp_formula(arch, reversible):
    """A module's output hangs off the C++ node (csrc/autograd.cpp), no Python wrapper in
    between; its gradients match the reference's and a second backward through a kept
    graph still works."""
    fused, ref = module_pair(arch, reversible, d=5, N=6)
    x = torch.randn(9, 5, dtype=torch.float64)
    out = fused(x)
    assert "StateBackward" in out.grad_fn.name()
    cot = torch.randn_like(out)
    got = torch.autograd.grad(out, (fused.weight, fused.bias), cot, retain_graph=True)
    again = torch.autograd.grad(out, (fused.weight, fused.bias), cot)
    want = torch.autograd.grad(ref(x), (ref.weight, ref.bias), cot)
    for g, a, w in zip(got, again, want):
        torch.testing.assert_close(g, w)
        torch.testing.assert_close(a, w)


def test_no_grad_and_inference_mode_record_nothing():
    m = sn.VerletStack(4, 3, step=0.2, impl="fused").double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        assert m(x).grad_fn is None
    with torch.inference_mode():
        assert m(x).grad_fn is None
    assert m(x).grad_fn is not None


def test_unused_outputs_and_partial_needs():
    """Only the second state used; only some inputs need a gradient."""
    y, w, b = make(6, 3, 4)
    z = torch.randn_like(y).requires_grad_()
    w.requires_grad_()
    for reversible in (False, True):
        for fn in (SF.leapfrog, SF.verlet):
            key = "y_prev" if fn is SF.leapfrog else "z"
            _, state = fn(y, w, b, 0.3, impl="fused", return_state=True, reversible=reversible, **{key: z})
            got = torch.autograd.grad(state.sum(), (z, w))
            ref = reference.FUNCTIONS["leapfrog" if fn is SF.leapfrog else "verlet"]
            _, rs = ref(y, w, b, 0.3, "tanh", z, return_state=True)
            want = torch.autograd.grad(rs.sum(), (z, w))
            for g, r in zip(got, want):
                torch.testing.assert_close(g, r)


@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_lost_reversibility_warns_on_every_backward(arch):
    """The check runs in the C++ backward on every CPU call, not only the first."""
    if not ops.REBUILDS[arch]:
        pytest.skip("this build's reversible backward does not return the rebuilt state")
    m = sn.layers.STACKS[arch](8, 256, step=0.5, impl="fused", reversible=True)
    with torch.no_grad():
        m.weight.mul_(3.0 * 8**0.5)
    x = torch.randn(96, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            m(x).sum().backward()
        ops.flush_reversibility_checks()  # nothing pending on the CPU: no more warnings
    lost = [w for w in caught if "reversibility was lost" in str(w.message)]
    assert len(lost) == 3 and all(issubclass(w.category, UserWarning) for w in lost)
    assert f"stablenets {arch} reversible backward" in str(lost[0].message)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_lost_reversibility_warns_on_cuda(arch):
    """On CUDA the check is read back without a host sync, on one call in 16: a run of 16
    lost backwards warns by the time flush_reversibility_checks() returns."""
    m = sn.layers.STACKS[arch](8, 256, step=0.5, impl="fused", reversible=True).cuda()
    with torch.no_grad():
        m.weight.mul_(3.0 * 8**0.5)
    x = torch.randn(96, 8, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(16):
            m(x).sum().backward()
        ops.flush_reversibility_checks()
    assert any("reversibility was lost" in str(w.message) for w in caught)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch,reversible", MODES, ids=MODE_IDS)
def test_module_step_captures_in_a_cuda_graph(arch, reversible):
    """A module forward + backward captured once and replayed on new data gives the eager
    gradients (the reversible check stays off while capturing)."""
    kw = {"reversible": reversible} if arch in KEY else {}
    m = sn.layers.STACKS[arch](16, 4, step=0.2, impl="fused", **kw).cuda()
    static_x = torch.randn(64, 16, device="cuda")

    def step():
        m(static_x).square().sum().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            m.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    m.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    x = torch.randn_like(static_x)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    got = (m.weight.grad.clone(), m.bias.grad.clone())
    m.zero_grad(set_to_none=True)
    m(x).square().sum().backward()
    torch.testing.assert_close(got[0], m.weight.grad)
    torch.testing.assert_close(got[1], m.bias.grad)
    ops.flush_reversibility_checks()
