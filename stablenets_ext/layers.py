"""``nn.Module`` holders of the stack parameters over :mod:`stablenets_ext.functional`."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as SF
from . import reference


class _Stack(nn.Module):
    arch = ""

    def __init__(self, features, layers, step=0.1, activation="tanh", *, impl="auto",
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(features, int) or isinstance(features, bool) or features < 1:
            raise ValueError(f"features: expected a positive int, got {features!r}")
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"layers: expected a positive int, got {layers!r}")
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step) or step <= 0:
            raise ValueError(f"step: expected a finite positive number, got {step!r}")
        reference.activation_fn(activation)  # a name, or a callable (reference path only)
        if impl not in SF.IMPLS:
            raise ValueError(f"impl: expected one of {SF.IMPLS}, got {impl!r}")
        self.features, self.layers = features, layers
        self.step, self.activation, self.impl = float(step), activation, impl
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(layers, features, features, **kw))
        self.bias = nn.Parameter(torch.empty(layers, features, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's default, per layer.
        bound = 1.0 / math.sqrt(self.features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)

    def extra_repr(self):
        act = repr(self.activation)
        if not isinstance(self.activation, (str, nn.Module)):  # a function: its name, unquoted
            act = getattr(self.activation, "__name__", act)
        return (f"features={self.features}, layers={self.layers}, step={self.step}, "
                f"activation={act}, impl={self.impl!r}")


class ResNetStack(_Stack):
    """Forward-Euler residual stack: ``Y <- Y + h act(Y K_j^T + b_j)``."""

    arch = "resnet"

    def forward(self, y):
        return SF.resnet(y, self.weight, self.bias, self.step, self.activation, impl=self.impl)


class AntisymmetricStack(_Stack):
    """ResNet stack with antisymmetric weights ``(K_j - K_j^T - gamma I) / 2``."""

    arch = "antisymmetric"

    def __init__(self, features, layers, step=0.1, activation="tanh", gamma=0.01, **kw):
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma: expected a finite number >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        super().__init__(features, layers, step, activation, **kw)

    def forward(self, y):
        return SF.antisymmetric(y, self.weight, self.bias, self.step, self.activation,
                                gamma=self.gamma, impl=self.impl)

    def extra_repr(self):
        return super().extra_repr() + f", gamma={self.gamma}"


class _TwoStateStack(_Stack):
    def __init__(self, features, layers, step=0.1, activation="tanh", *, reversible=False, **kw):
        self.reversible = bool(reversible)
        super().__init__(features, layers, step, activation, **kw)

    def extra_repr(self):
        return super().extra_repr() + f", reversible={self.reversible}"


class LeapfrogStack(_TwoStateStack):
    """Second-order stack ``Y_{j+1} = 2Y_j - Y_{j-1} - h^2 act(Y_j K_j^T + b_j) K_j``.

    ``forward(y, y_prev=None, return_state=False)``; ``reversible=True`` makes
    the backward rebuild states instead of storing them."""

    arch = "leapfrog"

    def forward(self, y, y_prev=None, return_state=False):
        return SF.leapfrog(y, self.weight, self.bias, self.step, self.activation, y_prev=y_prev,
                           return_state=return_state, reversible=self.reversible, impl=self.impl)


class VerletStack(_TwoStateStack):
    """Hamiltonian stack: ``Z <- Z - h act(Y K_j + b_j)``, ``Y <- Y + h act(Z K_j^T + b_j)``.

    ``forward(y, z=None, return_state=False)``; ``reversible`` as for
    :class:`LeapfrogStack`."""

    arch = "verlet"

    def forward(self, y, z=None, return_state=False):
        return SF.verlet(y, self.weight, self.bias, self.step, self.activation, z=z,
                         return_state=return_state, reversible=self.reversible, impl=self.impl)


STACKS = {
    "resnet": ResNetStack,
    "antisymmetric": AntisymmetricStack,
    "leapfrog": LeapfrogStack,
    "verlet": VerletStack,
}
