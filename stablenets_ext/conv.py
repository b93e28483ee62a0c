"""Convolutional stacks for image data, on ATen ops (no fused kernels).

The state ``Y`` is ``(B, C, H, W)``; layer ``j`` owns a 3x3 (odd ``k``) kernel
``K_j = weight[j]`` of shape ``(C, C, k, k)`` and a per-channel bias
``b_j = bias[j]``. ``K Y`` is ``conv2d(Y, K)`` with "same" padding and
``K^T Y`` its true adjoint, ``conv_transpose2d(Y, K)`` with the same kernel,
so each update is the dense one of ARCHITECTURE.md with matrices replaced by
convolutions:

- resnet:        ``Y <- Y + h act(K_j Y + b_j)``
- antisymmetric: ``Y <- Y + h act(A_j Y + b_j)``, ``A_j = (K_j - K_j^T - gamma I) / 2``
- leapfrog:      ``Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 K_j^T act(K_j Y_j + b_j)``
- verlet:        ``Z <- Z - h act(K_j Y + b_j)``, then ``Y <- Y + h act(K_j^T Z + b_j)``

The functions take and return the same state as their dense twins
(``y_prev``/``z``, ``return_state``), so a stack can be run a slice of layers
at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import reference


def _pad(weight):
    return weight.shape[-1] // 2


def _conv(y, k, b=None):
    return F.conv2d(y, k, b, padding=_pad(k))


def _conv_t(y, k, b=None):
    return F.conv_transpose2d(y, k, b, padding=_pad(k))


def antisymmetric_kernel(weight, gamma):
    """Kernels of ``(K - K^T - gamma I) / 2``: the adjoint of a convolution is the
    convolution with the channel-transposed, spatially flipped kernel."""
    adj = weight.transpose(-4, -3).flip(-1, -2)
    out = 0.5 * (weight - adj)
    c = _pad(weight)
    eye = torch.eye(weight.shape[-3], dtype=weight.dtype, device=weight.device)
    out[..., c, c] = out[..., c, c] - 0.5 * gamma * eye
    return out


def conv_resnet(y, weight, bias, step=0.1, activation="tanh"):
    act = reference.activation_fn(activation)
    for j in range(weight.shape[0]):
        y = y + step * act(_conv(y, weight[j], bias[j]))
    return y


def conv_antisymmetric(y, weight, bias, step=0.1, activation="tanh", gamma=0.01):
    return conv_resnet(y, antisymmetric_kernel(weight, gamma), bias, step, activation)


def conv_leapfrog(y, weight, bias, step=0.1, activation="tanh", y_prev=None, return_state=False):
    act = reference.activation_fn(activation)
    prev = y if y_prev is None else y_prev
    h2 = step * step
    for j in range(weight.shape[0]):
        nxt = 2 * y - prev - h2 * _conv_t(act(_conv(y, weight[j], bias[j])), weight[j])
        prev, y = y, nxt
    return (y, prev) if return_state else y


def conv_verlet(y, weight, bias, step=0.1, activation="tanh", z=None, return_state=False):
    act = reference.activation_fn(activation)
    if z is None:
        z = torch.zeros_like(y)
    for j in range(weight.shape[0]):
        z = z - step * act(_conv(y, weight[j], bias[j]))
        y = y + step * act(_conv_t(z, weight[j], bias[j]))
    return (y, z) if return_state else y


FUNCTIONS = {
    "resnet": conv_resnet,
    "antisymmetric": conv_antisymmetric,
    "leapfrog": conv_leapfrog,
    "verlet": conv_verlet,
}


class _ConvStack(nn.Module):
    arch = ""

    def __init__(self, features, layers, step=0.1, activation="tanh", *, kernel_size=3,
                 impl="auto", device=None, dtype=None):
        super().__init__()
        if not isinstance(features, int) or isinstance(features, bool) or features < 1:
            raise ValueError(f"features: expected a positive int (channels), got {features!r}")
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"layers: expected a positive int, got {layers!r}")
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step) or step <= 0:
            raise ValueError(f"step: expected a finite positive number, got {step!r}")
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd positive int, got {kernel_size!r}")
        reference.activation_fn(activation)
        self.features, self.layers, self.kernel_size = features, layers, kernel_size
        # impl is kept for a uniform interface: convolutions always run on ATen.
        self.step, self.activation, self.impl = float(step), activation, impl
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(layers, features, features, kernel_size, kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(layers, features, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.features * self.kernel_size ** 2)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)

    def extra_repr(self):
        return (f"channels={self.features}, layers={self.layers}, kernel_size={self.kernel_size}, "
                f"step={self.step}, activation={self.activation!r}")


class ConvResNetStack(_ConvStack):
    arch = "resnet"

    def forward(self, y):
        return conv_resnet(y, self.weight, self.bias, self.step, self.activation)


class ConvAntisymmetricStack(_ConvStack):
    arch = "antisymmetric"

    def __init__(self, features, layers, step=0.1, activation="tanh", gamma=0.01, **kw):
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma: expected a finite number >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        super().__init__(features, layers, step, activation, **kw)

    def forward(self, y):
        return conv_antisymmetric(y, self.weight, self.bias, self.step, self.activation, self.gamma)

    def extra_repr(self):
        return super().extra_repr() + f", gamma={self.gamma}"


class ConvLeapfrogStack(_ConvStack):
    arch = "leapfrog"

    def __init__(self, features, layers, step=0.1, activation="tanh", *, reversible=False, **kw):
        self.reversible = bool(reversible)  # accepted for symmetry; autograd stores states
        super().__init__(features, layers, step, activation, **kw)

    def forward(self, y, y_prev=None, return_state=False):
        return conv_leapfrog(y, self.weight, self.bias, self.step, self.activation, y_prev, return_state)


class ConvVerletStack(_ConvStack):
    arch = "verlet"

    def __init__(self, features, layers, step=0.1, activation="tanh", *, reversible=False, **kw):
        self.reversible = bool(reversible)
        super().__init__(features, layers, step, activation, **kw)

    def forward(self, y, z=None, return_state=False):
        return conv_verlet(y, self.weight, self.bias, self.step, self.activation, z, return_state)


CONV_STACKS = {
    "resnet": ConvResNetStack,
    "antisymmetric": ConvAntisymmetricStack,
    "leapfrog": ConvLeapfrogStack,
    "verlet": ConvVerletStack,
}
