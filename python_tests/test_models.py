import pytest
import torch

from stablenets_ext import conv, conv_reference, models as M
from stablenets_ext.layers import STACKS


def dense_input(b=7):
    return torch.randn(b, 2)


@pytest.mark.parametrize("arch", M.DENSE_ARCHS)
def test_stablenet_dense_structure(arch):
    torch.manual_seed(0)
    m = M.StableNet(arch, 2, 3, 5, width=4, step=0.2, impl="reference")
    assert isinstance(m.lift, M.ZeroPad) and isinstance(m.stack, STACKS[arch])
    assert m.stack.weight.shape == (5, 4, 4) and m.classifier.in_features == 4
    assert m.layers == 5 and m.step == 0.2 and m.width == 4
    x = dense_input()
    out = m(x)
    assert out.shape == (7, 3)
    y0 = m.lift_input(x)
    assert torch.equal(y0[:, :2], x) and torch.all(y0[:, 2:] == 0)
    # forward = classifier(stack(lift(x))), and the per-layer trajectory ends where forward does
    assert torch.allclose(m.head(m.trajectory(x)[-1]), out, atol=1e-6)
    assert m.trajectory(x).shape == (6, 7, 4)
    m.loss(out, torch.zeros(7, dtype=torch.long)).backward()
    assert m.stack.weight.grad is not None


def test_stablenet_lift_rules():
    assert isinstance(M.StableNet("resnet", 8, 2, 2, width=4).lift, torch.nn.Linear)
    assert isinstance(M.StableNet("resnet", 2, 2, 2, width=4, lift=True).lift, torch.nn.Linear)
    assert M.StableNet("resnet", 64, 10, 2).width == 64
    with pytest.raises(ValueError, match="width"):
        M.StableNet("resnet", 8, 2, 2, width=4, lift=False)
    # image inputs to a dense arch are flattened
    m = M.StableNet("verlet", (1, 3, 3), 2, 2, width=12)
    assert m(torch.randn(4, 1, 3, 3)).shape == (4, 2)


def test_stablenet_config_round_trip():
    m = M.StableNet("antisymmetric", 2, 2, 3, width=4, step=0.3, gamma=0.2, impl="reference")
    m2 = M.StableNet.from_config(m.config())
    m2.load_state_dict(m.state_dict())
    x = dense_input()
    assert m2.stack.gamma == 0.2
    assert torch.equal(m(x), m2(x))


@pytest.mark.parametrize("kwargs,name", [
    ({"arch": "densenet"}, "arch"),
    ({"classes": 0}, "classes"),
    ({"layers": 0}, "layers"),
    ({"width": -1}, "width"),
    ({"impl": "fast"}, "impl"),
    ({"features": (1, 2)}, "features"),
    ({"arch": "conv-verlet"}, "arch"),  # conv arch on 2-D data
])
def test_stablenet_bad_arguments(kwargs, name):
    args = {"arch": "verlet", "features": 2, "classes": 2, "layers": 2, "width": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        M.StableNet(**args)


@pytest.mark.parametrize("arch", M.CONV_ARCHS)
def test_conv_stablenet(arch):
    torch.manual_seed(0)
    m = M.StableNet(arch, (3, 8, 8), 10, 3, width=6, step=0.1, pool=2)
    assert m.stack.weight.shape == (3, 6, 6, 3, 3)
    x = torch.randn(2, 3, 8, 8)
    out = m(x)
    assert out.shape == (2, 10)
    assert torch.allclose(m.head(m.trajectory(x)[-1]), out, atol=1e-6)
    out.sum().backward()
    assert m.stack.weight.grad.abs().sum() > 0


def test_conv_transpose_is_the_adjoint_and_antisymmetric_kernel():
    torch.manual_seed(0)
    k = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    x, y = torch.randn(2, 4, 6, 5, dtype=torch.float64), torch.randn(2, 4, 6, 5, dtype=torch.float64)
    assert torch.allclose((conv_reference.conv(x, k) * y).sum(), (x * conv_reference.conv_t(y, k)).sum())
    a = conv_reference.antisymmetric_kernel(k, 0.0)
    assert abs(float((conv_reference.conv(x, a) * x).sum())) < 1e-10  # <x, A x> = 0
    a = conv_reference.antisymmetric_kernel(k, 0.3)
    want = 0.5 * (conv_reference.conv(x, k) - conv_reference.conv_t(x, k) - 0.3 * x)
    assert torch.allclose(conv_reference.conv(x, a), want)


def test_conv_verlet_second_half_step_is_the_adjoint():
    torch.manual_seed(0)
    w, b = torch.randn(1, 3, 3, 3, 3, dtype=torch.float64), torch.randn(1, 3, dtype=torch.float64)
    y = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    h = 0.1
    z = -h * torch.tanh(conv_reference.conv(y, w[0], b[0]))
    want = y + h * torch.tanh(torch.nn.functional.conv_transpose2d(z, w[0], b[0], padding=1))
    got, gz = conv.conv_verlet(y, w, b, h, "tanh", return_state=True)
    assert torch.allclose(got, want) and torch.allclose(gz, z)


def test_interpolate_layers():
    p = torch.tensor([0.0, 4.0, 8.0])
    assert M.interpolate_layers(p).tolist() == [0.0, 1.0, 3.0, 5.0, 7.0, 8.0]
    q = torch.randn(5, 2, 2)
    assert M.interpolate_layers(q).shape == (10, 2, 2)
    const = torch.ones(3, 4)
    assert torch.equal(M.interpolate_layers(const), torch.ones(6, 4))  # no leftovers


@pytest.mark.parametrize("arch", M.ARCHS)
def test_double_layers_keeps_the_function(arch):
    torch.manual_seed(0)
    image = M.is_conv(arch)
    features = (2, 4, 4) if image else 2
    m = M.StableNet(arch, features, 2, 16, width=4, step=0.05, impl="reference").double()
    with torch.no_grad():  # a smooth-in-time network, as the smoothness regulariser makes them
        m.stack.weight.copy_(m.stack.weight[:1].expand_as(m.stack.weight) * 2)
        t = torch.linspace(0, 1, 16, dtype=torch.float64).view(16, *[1] * (m.stack.weight.dim() - 1))
        m.stack.weight.add_(t * 0.5)
        m.stack.bias.copy_(m.stack.bias[:1].expand_as(m.stack.bias))
    d = M.double_layers(m)
    assert d.layers == 32 and d.step == pytest.approx(0.025) and d.impl == m.impl
    assert d.stack.weight.dtype == torch.float64
    assert torch.equal(d.classifier.weight, m.classifier.weight)
    x = torch.randn(16 if image else 64, *((2, 4, 4) if image else (2,)), dtype=torch.float64)
    with torch.no_grad():
        ya, yb = m.stack(m.lift_input(x)), d.stack(d.lift_input(x))
    rel = float((ya - yb).norm() / (ya - m.lift_input(x)).norm())
    assert rel < 0.05, rel
    with torch.no_grad():
        assert torch.allclose(d(x), m(x), atol=0.05)


def test_conv_stablenet_options_and_config_round_trip():
    torch.manual_seed(0)
    m = M.StableNet("conv-leapfrog", (2, 7, 6), 4, 3, width=5, kernel_size=5, lift="learned",
                    pool="flatten", reversible=True)
    assert isinstance(m.lift, torch.nn.Conv2d) and m.lift.kernel_size == (5, 5)
    assert m.stack.weight.shape == (3, 5, 5, 5, 5) and m.stack.reversible
    assert m.classifier.in_features == 5 * 7 * 6  # the whole feature map
    cfg = m.config()
    assert cfg["kernel_size"] == 5 and cfg["pool"] == 0 and cfg["lift"] is True
    assert cfg["reversible"] is True and cfg["batch_norm"] is False
    m2 = M.StableNet.from_config(cfg)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(3, 2, 7, 6)
    assert torch.equal(m(x), m2(x))
    m(x).sum().backward()
    assert m.stack.weight.grad.abs().sum() > 0
    # pool=1 is global average pooling; lift="pad" zero-pads channels
    g = M.StableNet("conv-resnet", (2, 7, 6), 4, 2, width=5, pool=1, lift="pad")
    assert isinstance(g.lift, M.ZeroPad) and g.classifier.in_features == 5
    assert M.StableNet("conv-resnet", (2, 7, 6), 4, 2).config()["pool"] == 4


@pytest.mark.parametrize("kwargs,name", [
    ({"arch": "conv-resnet", "reversible": True}, "reversible"),
    ({"arch": "conv-verlet", "reversible": True, "batch_norm": True}, "batch_norm"),
    ({"arch": "conv-verlet", "kernel_size": 4}, "kernel_size"),
    ({"arch": "conv-verlet", "pool": -1}, "pool"),
    ({"arch": "conv-verlet", "lift": "maybe"}, "lift"),
    ({"arch": "verlet", "features": 2, "kernel_size": 3}, "kernel_size"),
    ({"arch": "verlet", "features": 2, "batch_norm": True}, "batch_norm"),
    ({"arch": "verlet", "features": 2, "pool": 2}, "pool"),
    ({"arch": "resnet", "features": 2, "reversible": True}, "reversible"),
])
def test_stablenet_option_errors(kwargs, name):
    args = {"features": (1, 4, 4), "classes": 2, "layers": 2, "width": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        M.StableNet(**args)


def test_dense_reversible_goes_to_the_stack():
    m = M.StableNet("verlet", 2, 2, 3, width=4, reversible=True)
    assert m.stack.reversible and m.config()["reversible"] is True
    assert "reversible" not in M.StableNet("verlet", 2, 2, 3, width=4).config()


def test_double_layers_with_batch_norm():
    m = M.StableNet("conv-verlet", (1, 5, 5), 2, 4, width=3, pool=1, batch_norm=True)
    with torch.no_grad():
        m.stack.norm_mean.normal_()
    d = M.double_layers(m)
    assert d.stack.norm_mean.shape == (8, 2, 3) and d.stack.batch_norm
    assert torch.equal(d.stack.norm_mean[::2][:1], m.stack.norm_mean[:1])
