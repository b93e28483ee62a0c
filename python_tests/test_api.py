"""Public API: modules, impl selection, bad input, info."""

import math
import subprocess
import sys
import warnings

import pytest
import torch

import stablenets_ext as sn
from stablenets_ext import functional as SF
from stablenets_ext import ops

from conftest import DEVICES

ARCHS = ["resnet", "antisymmetric", "leapfrog", "verlet"]
STACKS = {
    "resnet": sn.ResNetStack,
    "antisymmetric": sn.AntisymmetricStack,
    "leapfrog": sn.LeapfrogStack,
    "verlet": sn.VerletStack,
}
fused_only = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="extension not built")


@pytest.mark.parametrize("arch", ARCHS)
def test_module_shapes_and_repr(arch):
    m = STACKS[arch](5, 7, step=0.2, activation="relu")
    assert m.weight.shape == (7, 5, 5) and m.bias.shape == (7, 5)
    assert m(torch.randn(3, 5)).shape == (3, 5)
    r = repr(m)
    assert "features=5" in r and "layers=7" in r and "relu" in r


@fused_only
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_module_fused_equals_reference(device, arch):
    m = STACKS[arch](6, 9, impl="fused").to(device).double()
    y = torch.randn(13, 6, dtype=torch.float64, device=device)
    m_ref = STACKS[arch](6, 9, impl="reference").to(device).double()
    m_ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(y), m_ref(y))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_modules_train(device, arch):
    """A few Adam steps lower a regression loss."""
    m = STACKS[arch](4, 8, step=0.3).to(device)
    head = torch.nn.Linear(4, 1).to(device)
    x = torch.randn(128, 4, device=device)
    target = (x[:, :1] * x[:, 1:2]).sin()
    opt = torch.optim.Adam(list(m.parameters()) + list(head.parameters()), lr=2e-2)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(head(m(x)), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert m.weight.grad is not None and m.bias.grad is not None


@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_state_carries_across_a_cut(arch):
    """Two halves with the carried state equal one whole stack."""
    m = STACKS[arch](4, 10)
    y = torch.randn(5, 4)
    fn = SF.FUNCTIONS[arch]
    key = "y_prev" if arch == "leapfrog" else "z"
    whole = fn(y, m.weight, m.bias, m.step, return_state=True)
    a = fn(y, m.weight[:4], m.bias[:4], m.step, return_state=True)
    b = fn(a[0], m.weight[4:], m.bias[4:], m.step, return_state=True, **{key: a[1]})
    for w, p in zip(whole, b):
        torch.testing.assert_close(w, p)


def _args(d=4, N=3, B=5):
    return torch.randn(B, d), torch.randn(N, d, d), torch.randn(N, d)


BAD = [
    ("y", lambda y, w, b: (y[:, :3], w, b)),
    ("y", lambda y, w, b: (y[None], w, b)),
    ("weight", lambda y, w, b: (y, w[:, :, :3], b)),
    ("weight", lambda y, w, b: (y, w[0], b)),
    ("bias", lambda y, w, b: (y, w, b[:2])),
    ("bias", lambda y, w, b: (y, w, b[:, :3])),
    ("weight", lambda y, w, b: (y, w.double(), b)),
    ("bias", lambda y, w, b: (y, w, b.double())),
    ("y", lambda y, w, b: (y.long(), w, b)),
    ("weight", lambda y, w, b: (y, w.int(), b)),
    ("weight", lambda y, w, b: (y, w[:0], b[:0])),
]


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name,bad", BAD)
def test_bad_tensors_name_the_argument(impl, arch, name, bad):
    y, w, b = bad(*_args())
    with pytest.raises((ValueError, TypeError), match=name):
        SF.FUNCTIONS[arch](y, w, b, 0.1, impl=impl)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("step", [0.0, -0.1, math.inf, math.nan])
def test_bad_step(arch, step):
    with pytest.raises(ValueError, match="step"):
        SF.FUNCTIONS[arch](*_args(), step)
    with pytest.raises(ValueError, match="step"):
        STACKS[arch](4, 3, step=step)


@pytest.mark.parametrize("arch", ARCHS)
def test_bad_activation_and_impl(arch):
    with pytest.raises(ValueError, match="activation"):
        SF.FUNCTIONS[arch](*_args(), 0.1, "softsign")
    with pytest.raises(ValueError, match="activation"):
        STACKS[arch](4, 3, activation="gelu")
    with pytest.raises(ValueError, match="impl"):
        SF.FUNCTIONS[arch](*_args(), 0.1, impl="fast")
    with pytest.raises(ValueError, match="layers"):
        STACKS[arch](4, 0)
    with pytest.raises(ValueError, match="features"):
        STACKS[arch](0, 3)


def test_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        SF.antisymmetric(*_args(), 0.1, gamma=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        sn.AntisymmetricStack(4, 3, gamma=-0.5)


@pytest.mark.parametrize("arch,key", [("leapfrog", "y_prev"), ("verlet", "z")])
def test_bad_carried_state(arch, key):
    y, w, b = _args()
    with pytest.raises(ValueError, match=key):
        SF.FUNCTIONS[arch](y, w, b, 0.1, **{key: torch.randn(5, 3)})
    with pytest.raises(ValueError, match=key):
        SF.FUNCTIONS[arch](y, w, b, 0.1, **{key: torch.randn(5, 4).double()})


@fused_only
def test_op_level_checks_name_the_argument():
    """Direct op calls (bypassing Python checks) fail cleanly too."""
    y, w, b = _args()
    st = torch.ops.stablenets
    with pytest.raises(ValueError, match="bias"):
        st.resnet_forward(y, w, b[:, :2], 0.1, "tanh", False)
    with pytest.raises(ValueError, match="activation"):
        st.verlet_forward(y, y, w, b, 0.1, "swish", False)
    with pytest.raises(ValueError, match="step"):
        st.leapfrog_forward(y, y, w, b, float("nan"), "tanh", False)
    with pytest.raises(ValueError, match="gamma"):
        st.antisymmetric_forward(y, w, b, 0.1, -1.0, "tanh", False)
    with pytest.raises(ValueError, match="states"):
        st.resnet_backward(y, torch.empty(0, 2, 5, 4), w, b, 0.1, "tanh")
    with pytest.raises(ValueError, match="y_prev"):
        st.leapfrog_forward(y, y[:2], w, b, 0.1, "tanh", False)


@fused_only
def test_backward_without_states_is_a_clear_error():
    y, w, b = _args()
    w.requires_grad_()
    out = torch.ops.stablenets.resnet_forward(y, w, b, 0.1, "tanh", False)[0]
    with pytest.raises(RuntimeError, match="store=False"):
        out.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_devices_name_the_argument():
    y, w, b = _args()
    with pytest.raises(ValueError, match="weight"):
        SF.resnet(y, w.cuda(), b)


def test_fused_without_kernel_is_an_error_and_auto_warns_once(monkeypatch):
    monkeypatch.setattr(ops, "has_kernel", lambda device: False)
    monkeypatch.setattr(SF, "_warned_devices", set())
    with pytest.raises(RuntimeError, match="no compiled kernel"):
        SF.resnet(*_args(), impl="fused")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SF.resnet(*_args())
        SF.resnet(*_args())
    assert len([w for w in caught if "reference" in str(w.message)]) == 1


def test_info():
    info = sn.info()
    assert info["stablenets_ext"] == sn.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["compiled_devices"], list)
    if ops.compiled():
        assert "cpu" in info["compiled_devices"]


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "stablenets_ext", "info"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sn.__version__ in out.stdout and torch.__version__ in out.stdout


# ------------------------------------------------ one public face (issue 23)


def test_top_level_exports_conv_stacks_and_models():
    from stablenets_ext import (ConvAntisymmetricStack, ConvLeapfrogStack, ConvResNetStack,
                                ConvVerletStack, StableNet, double_layers)

    assert ConvVerletStack is sn.conv.ConvVerletStack and StableNet is sn.models.StableNet
    assert double_layers is sn.models.double_layers
    assert {ConvResNetStack, ConvAntisymmetricStack, ConvLeapfrogStack} <= set(
        sn.conv.CONV_STACKS.values())
    for name in sn.__all__:
        assert hasattr(sn, name), name


def _conv(arch):
    return sn.conv.CONV_STACKS[arch]


TWO = ["leapfrog", "verlet"]


@pytest.mark.parametrize("kind", ["dense", "conv"])
@pytest.mark.parametrize("arch", TWO)
def test_reversible_that_cannot_be_honoured_is_refused_alike(kind, arch):
    """Module and function, dense and conv: the same refusal, in the same words."""
    cls = STACKS[arch] if kind == "dense" else _conv(arch)
    fn = SF.FUNCTIONS[arch] if kind == "dense" else sn.conv.FUNCTIONS[arch]
    if kind == "dense":
        y, w, b = torch.randn(3, 4), torch.randn(2, 4, 4), torch.randn(2, 4)
    else:
        y, w, b = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 3, 3, 3) / 9, torch.randn(2, 3)
    messages = []
    for make in (lambda: cls(3, 2, activation=torch.sin, reversible=True),
                 lambda: fn(y, w, b, 0.1, torch.sin, reversible=True),
                 lambda: cls(3, 2, impl="reference", reversible=True),
                 lambda: fn(y, w, b, 0.1, reversible=True, impl="reference")):
        with pytest.raises(ValueError, match=r"^reversible=True cannot be honoured: ") as err:
            make()
        assert "reversible=False" in str(err.value)
        messages.append(str(err.value))
    assert "callable" in messages[0] and messages[0] == messages[1]
    assert "impl='reference'" in messages[2] and messages[2] == messages[3]
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=r"^reversible: expected True or False"):
            cls(3, 2, reversible=bad)
        with pytest.raises(ValueError, match=r"^reversible: expected True or False"):
            fn(y, w, b, 0.1, reversible=bad)


def test_reversible_refused_on_a_device_without_a_kernel(monkeypatch):
    monkeypatch.setattr(ops, "_KERNELS", {"cpu": False, "cuda": False})
    y, w, b = torch.randn(3, 4), torch.randn(2, 4, 4), torch.randn(2, 4)
    with pytest.raises(ValueError, match="reversible=True cannot be honoured: no fused kernel"):
        SF.verlet(y, w, b, 0.1, reversible=True)


@pytest.mark.parametrize("cls", [sn.ResNetStack, sn.AntisymmetricStack, sn.ConvResNetStack,
                                 sn.ConvAntisymmetricStack])
def test_stacks_without_a_reversible_mode_refuse_it(cls):
    with pytest.raises(ValueError, match=r"^reversible=True cannot be honoured: .*no reversible mode"):
        cls(8, 2, reversible=True)
    with pytest.raises(ValueError, match="reversible: expected True or False"):
        cls(8, 2, reversible="yes")
    assert cls(8, 2, reversible=False).layers == 2  # the uniform keyword is accepted
    with pytest.raises(ValueError, match=r"^reversible=True cannot be honoured: .*no reversible mode"):
        sn.StableNet("resnet", 4, 2, 2, reversible=True)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_fused_with_a_callable_activation_is_refused(kind):
    if kind == "dense":
        fn, y, w, b = SF.verlet, torch.randn(3, 4), torch.randn(2, 4, 4), torch.randn(2, 4)
        cls = sn.VerletStack
    else:
        fn, cls = sn.conv.conv_verlet, sn.ConvVerletStack
        y, w, b = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 3, 3, 3) / 9, torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"^impl='fused': the activation sin is a Python callable"):
        fn(y, w, b, 0.1, torch.sin, impl="fused")
    with pytest.raises(ValueError, match=r"^impl='fused': the activation ReLU is a Python callable"):
        cls(3, 2, activation=torch.nn.ReLU(), impl="fused")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert fn(y, w, b, 0.1, torch.sin).shape == y.shape  # impl="auto": the reference


@fused_only
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_torchscript_is_refused_naming_torch_export(kind):
    if kind == "dense":
        model, x = sn.StableNet("verlet", 4, 3, 2, width=4), torch.randn(2, 4)
    else:
        model, x = sn.StableNet("conv-verlet", (1, 6, 6), 3, 2, width=2), torch.randn(2, 1, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the argument checks
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="torch.export"):
                torch.jit.trace(model, (x,))
        with pytest.raises(RuntimeError, match="torch.jit.script is not supported.*torch.export"):
            torch.jit.script(model)
        with pytest.raises(RuntimeError, match="torch.export"):
            torch.jit.script(model.stack)
    # the deployment path the errors name works, and agrees with eager
    model.eval()
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), model(x))
    # the reference path is plain PyTorch: tracing it records nothing stateful
    ref = sn.VerletStack(4, 2, impl="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the argument checks
        traced = torch.jit.trace(ref, (torch.randn(2, 4),))
    xs = torch.randn(5, 4)
    torch.testing.assert_close(traced(xs), ref(xs))


def test_fused_with_batch_norm_is_refused():
    with pytest.raises(ValueError, match=r"^impl='fused': batch normalisation"):
        sn.ConvVerletStack(3, 2, batch_norm=True, impl="fused")
    m = sn.ConvVerletStack(3, 2, batch_norm=True)
    y = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match=r"^impl='fused': batch normalisation"):
        sn.conv.conv_verlet(y, m.weight, m.bias, 0.1, impl="fused", norm=m.norm())
