"""Convolutional stacks for image data: fused ops, with a per-layer reference twin.

The state ``Y`` is ``(B, C, H, W)``; layer ``j`` owns a ``k x k`` (odd ``k``)
kernel ``K_j = weight[j]`` of shape ``(C, C, k, k)`` and a per-channel bias
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
at a time. ``impl`` chooses the fused op (``torch.ops.stablenets.conv_*``, the
layer loop in C++: ATen/oneDNN/cuDNN convolutions plus one fused elementwise
pass per convolution, see :mod:`stablenets_ext.conv_ops`) or the per-layer
reference (:mod:`stablenets_ext.conv_reference`), exactly as in :mod:`stablenets_ext.functional`.

``reversible=True`` (leapfrog, Verlet) keeps only the final pair for the
backward and rebuilds the states by running the integrator backwards: saved
memory independent of depth. It needs the fused op; where it cannot be
honoured (reference path, batch norm, a Python-callable activation, forward-mode
AD) it raises.

Batch normalisation (``norm=`` in the functions, ``batch_norm=True`` in the
modules) normalises every pre-activation per channel, ``act(BN_j(K_j Y + b_j))``
(Verlet: one normalisation per half step), as the original research code did.
It is outside the stability theory (the layer map then depends on the batch)
and runs on the reference path only.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from . import conv_ops as _cops
from . import functional, reference
from .conv_reference import (  # noqa: F401  (re-exported: part of this module's interface)
    REFERENCE,
    ConvNorm,
    antisymmetric_kernel,
    reference_antisymmetric,
    reference_leapfrog,
    reference_resnet,
    reference_verlet,
)

IMPLS = ("auto", "fused", "reference")
_warned: set[str] = set()


def _warn_once(key, message):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# ------------------------------------------------------------------ checks


def check_args(y, weight, bias, step, activation, *, gamma=None, state=None, state_name=None):
    """Raise a ValueError/TypeError naming the first bad argument."""
    functional.check_tensor(y, "y")
    functional.check_tensor(weight, "weight")
    functional.check_tensor(bias, "bias")
    if y.dim() != 4:
        raise ValueError(
            f"y: expected a 4-D tensor (batch, channels, height, width), got shape {tuple(y.shape)}"
        )
    if weight.dim() != 5 or weight.shape[1] != weight.shape[2] or weight.shape[3] != weight.shape[4]:
        raise ValueError(
            f"weight: expected shape (layers, channels, channels, k, k), got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight: expected at least one layer, got 0 layers")
    if weight.shape[3] % 2 == 0:
        raise ValueError(
            f"weight: expected an odd kernel size k ('same' padding k // 2 keeps the image size), "
            f"got k = {weight.shape[3]}"
        )
    if weight.shape[1] != y.shape[1]:
        raise ValueError(
            f"weight: expected channels = {y.shape[1]} (from y of shape {tuple(y.shape)}), "
            f"got shape {tuple(weight.shape)}"
        )
    if tuple(bias.shape) != (weight.shape[0], weight.shape[1]):
        raise ValueError(
            f"bias: expected shape {(weight.shape[0], weight.shape[1])} = (layers, channels), "
            f"got {tuple(bias.shape)}"
        )
    # dtype, device, carried state, step, gamma, activation: as the dense stacks
    functional.check_rest(y, weight, bias, step, activation, gamma=gamma, state=state,
                          state_name=state_name)


def _has_tangent(*tensors) -> bool:
    unpack = torch.autograd.forward_ad.unpack_dual
    return any(t is not None and unpack(t).tangent is not None for t in tensors)


def _use_fused(arch, impl, device, activation, norm, reversible, tensors) -> bool:
    """Fused op or reference? Raises where ``reversible`` cannot be honoured."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    why_not = None
    if norm is not None:
        why_not = "batch normalisation (batch_norm=True) runs on the per-layer reference path"
    elif not isinstance(activation, str):
        why_not = "a Python-callable activation runs on the per-layer reference path"
        _warn_once(f"callable:{type(activation).__name__}",
                   f"stablenets_ext conv_{arch}: activation {activation!r} is a Python callable, "
                   "which has no fused kernel; using the per-layer reference (slower)")
    elif impl == "reference":
        why_not = "impl='reference' was asked for"
    elif _has_tangent(*tensors):
        why_not = "forward-mode AD has no fused formula"
        _warn_once("forward_ad", f"stablenets_ext conv_{arch}: forward-mode AD has no fused "
                   "formula; using the differentiable per-layer reference (slower, same results)")
    elif not _cops.has_kernel(device):
        why = f" ({_cops._ops.LOAD_ERROR})" if _cops._ops.LOAD_ERROR is not None else ""
        why_not = f"no fused conv kernel was compiled for device '{device.type}'{why}"
        if impl == "fused":
            raise RuntimeError(f"impl='fused': {why_not}; use impl='auto' or 'reference', or "
                               "rebuild the extension for this device")
        if not reversible:
            _warn_once(f"device:{device.type}", f"stablenets_ext: {why_not}; using the per-layer "
                       "reference implementation of the conv stacks (slower, same results)")
    if why_not is None:
        return True
    if reversible:
        raise ValueError(
            f"reversible=True: conv_{arch} can only rebuild states in the fused op, but "
            f"{why_not}; use reversible=False"
        )
    return False


def kernel_used(impl="auto", device="cpu", *, activation="tanh", batch_norm=False) -> str:
    """``"fused"`` or ``"reference"``: what a conv stack with these settings runs on
    ``device`` (for reports such as the CLI's)."""
    if (impl == "reference" or batch_norm or not isinstance(activation, str)
            or not _cops.has_kernel(device)):
        return "reference"
    return "fused"


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# -------------------------------------------------------------- functions


def conv_resnet(y, weight, bias, step=0.1, activation="tanh", *, impl="auto", norm=None):
    """Forward-Euler conv stack ``Y <- Y + h act(K_j Y + b_j)``."""
    check_args(y, weight, bias, step, activation)
    if not _use_fused("resnet", impl, y.device, activation, norm, False, (y, weight, bias)):
        return reference_resnet(y, weight, bias, step, activation, norm=norm)
    store = _needs_grad(y, weight, bias)
    return _cops.ops.conv_resnet_forward(y, weight, bias, float(step), activation, store)[0]


def conv_antisymmetric(y, weight, bias, step=0.1, activation="tanh", gamma=0.01, *, impl="auto",
                       norm=None):
    """Conv ResNet stack with kernels ``(K_j - K_j^T - gamma I) / 2``."""
    check_args(y, weight, bias, step, activation, gamma=gamma)
    if not _use_fused("antisymmetric", impl, y.device, activation, norm, False, (y, weight, bias)):
        return reference_antisymmetric(y, weight, bias, step, activation, gamma, norm=norm)
    store = _needs_grad(y, weight, bias)
    return _cops.ops.conv_antisymmetric_forward(y, weight, bias, float(step), float(gamma),
                                                activation, store)[0]


def conv_leapfrog(y, weight, bias, step=0.1, activation="tanh", y_prev=None, return_state=False, *,
                  reversible=False, impl="auto", norm=None):
    """Second-order conv stack. ``y_prev`` is ``Y_{-1}`` (default ``y``). Returns
    ``Y_N`` or, with ``return_state=True``, ``(Y_N, Y_{N-1})``."""
    check_args(y, weight, bias, step, activation, state=y_prev, state_name="y_prev")
    if not _use_fused("leapfrog", impl, y.device, activation, norm, reversible, (y, y_prev, weight, bias)):
        out = reference_leapfrog(y, weight, bias, step, activation, y_prev, True, norm=norm)
    else:
        prev = y if y_prev is None else y_prev
        store = _needs_grad(y, prev, weight, bias) and not reversible
        out = functional.run_pair_op(_cops.ops.conv_leapfrog_forward, (y, prev, weight, bias),
                                     (float(step), activation, store), reversible=reversible)
    return tuple(out) if return_state else out[0]


def conv_verlet(y, weight, bias, step=0.1, activation="tanh", z=None, return_state=False, *,
                reversible=False, impl="auto", norm=None):
    """Hamiltonian (Verlet) conv stack. ``z`` is ``Z_{-1/2}`` (default zeros).
    Returns ``Y_N`` or, with ``return_state=True``, ``(Y_N, Z_{N-1/2})``."""
    check_args(y, weight, bias, step, activation, state=z, state_name="z")
    if not _use_fused("verlet", impl, y.device, activation, norm, reversible, (y, z, weight, bias)):
        out = reference_verlet(y, weight, bias, step, activation, z, True, norm=norm)
    else:
        z0 = torch.zeros_like(y) if z is None else z
        store = _needs_grad(y, z0, weight, bias) and not reversible
        out = functional.run_pair_op(_cops.ops.conv_verlet_forward, (y, z0, weight, bias),
                                     (float(step), activation, store), reversible=reversible)
    return tuple(out) if return_state else out[0]


FUNCTIONS = {
    "resnet": conv_resnet,
    "antisymmetric": conv_antisymmetric,
    "leapfrog": conv_leapfrog,
    "verlet": conv_verlet,
}


# ------------------------------------------------------------------ modules


class _ConvStack(nn.Module):
    """Parameters of a conv stack over the functions above.

    ``kernel_size``: odd int >= 1 (default 3). ``batch_norm=True`` adds a
    per-layer ``BatchNorm2d`` on every pre-activation (parameters
    ``norm_weight``/``norm_bias`` and running ``norm_mean``/``norm_var`` of shape
    ``(layers, halves, channels)``); such a stack runs on the reference path and
    is not reversible."""

    arch = ""
    halves = 1

    def __init__(self, features, layers, step=0.1, activation="tanh", *, kernel_size=3,
                 batch_norm=False, impl="auto", device=None, dtype=None):
        super().__init__()
        if not isinstance(features, int) or isinstance(features, bool) or features < 1:
            raise ValueError(f"features: expected a positive int (channels), got {features!r}")
        if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
            raise ValueError(f"layers: expected a positive int, got {layers!r}")
        if not isinstance(step, (int, float)) or isinstance(step, bool) or not math.isfinite(step) or step <= 0:
            raise ValueError(f"step: expected a finite positive number, got {step!r}")
        if (not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1
                or kernel_size % 2 == 0):
            raise ValueError(f"kernel_size: expected an odd positive int, got {kernel_size!r}")
        if not isinstance(batch_norm, bool):
            raise ValueError(f"batch_norm: expected True or False, got {batch_norm!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
        reference.activation_fn(activation)
        self.features, self.layers, self.kernel_size = features, layers, kernel_size
        self.step, self.activation, self.impl = float(step), activation, impl
        self.batch_norm = batch_norm
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(layers, features, features, kernel_size, kernel_size, **kw))
        self.bias = nn.Parameter(torch.empty(layers, features, **kw))
        if batch_norm:
            shape = (layers, self.halves, features)
            self.norm_weight = nn.Parameter(torch.ones(shape, **kw))
            self.norm_bias = nn.Parameter(torch.zeros(shape, **kw))
            self.register_buffer("norm_mean", torch.zeros(shape, **kw))
            self.register_buffer("norm_var", torch.ones(shape, **kw))
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.features * self.kernel_size ** 2)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.bias.uniform_(-bound, bound)
            if self.batch_norm:
                self.norm_weight.fill_(1)
                self.norm_bias.zero_()
                self.norm_mean.zero_()
                self.norm_var.fill_(1)

    def norm(self):
        """The :class:`ConvNorm` of this stack (None without batch norm)."""
        if not self.batch_norm:
            return None
        if self.norm_weight.shape[0] != self.weight.shape[0]:
            raise RuntimeError(
                f"batch_norm: the stack has {self.weight.shape[0]} layers of weights but "
                f"{self.norm_weight.shape[0]} of batch-norm parameters; slice norm_weight, "
                "norm_bias, norm_mean and norm_var together with weight and bias"
            )
        return ConvNorm(self.norm_weight, self.norm_bias, self.norm_mean, self.norm_var, self.training)

    def extra_repr(self):
        s = (f"channels={self.features}, layers={self.layers}, kernel_size={self.kernel_size}, "
             f"step={self.step}, activation={self.activation!r}, impl={self.impl!r}")
        return s + (", batch_norm=True" if self.batch_norm else "")


class ConvResNetStack(_ConvStack):
    arch = "resnet"

    def forward(self, y):
        return conv_resnet(y, self.weight, self.bias, self.step, self.activation, impl=self.impl,
                           norm=self.norm())


class ConvAntisymmetricStack(_ConvStack):
    arch = "antisymmetric"

    def __init__(self, features, layers, step=0.1, activation="tanh", gamma=0.01, **kw):
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma: expected a finite number >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        super().__init__(features, layers, step, activation, **kw)

    def forward(self, y):
        return conv_antisymmetric(y, self.weight, self.bias, self.step, self.activation, self.gamma,
                                  impl=self.impl, norm=self.norm())

    def extra_repr(self):
        return super().extra_repr() + f", gamma={self.gamma}"


class _ConvTwoStateStack(_ConvStack):
    def __init__(self, features, layers, step=0.1, activation="tanh", *, reversible=False, **kw):
        if not isinstance(reversible, bool):
            raise ValueError(f"reversible: expected True or False, got {reversible!r}")
        if reversible and kw.get("batch_norm", False):
            raise ValueError(
                "reversible=True with batch_norm=True: batch normalisation depends on the batch "
                "statistics and cannot be run backwards; use one or the other"
            )
        if reversible and kw.get("impl", "auto") == "reference":
            raise ValueError("reversible=True with impl='reference': only the fused op rebuilds "
                             "states; use impl='auto' or 'fused'")
        if reversible and not isinstance(activation, str):
            raise ValueError("reversible=True needs a named activation (a Python callable runs on "
                             "the per-layer reference path, which stores every state)")
        self.reversible = reversible
        super().__init__(features, layers, step, activation, **kw)

    def extra_repr(self):
        return super().extra_repr() + f", reversible={self.reversible}"


class ConvLeapfrogStack(_ConvTwoStateStack):
    """``forward(y, y_prev=None, return_state=False)``; ``reversible=True`` rebuilds the
    states in the backward instead of storing them (memory independent of depth)."""

    arch = "leapfrog"

    def forward(self, y, y_prev=None, return_state=False):
        return conv_leapfrog(y, self.weight, self.bias, self.step, self.activation, y_prev, return_state,
                             reversible=self.reversible, impl=self.impl, norm=self.norm())


class ConvVerletStack(_ConvTwoStateStack):
    """``forward(y, z=None, return_state=False)``; ``reversible`` as for
    :class:`ConvLeapfrogStack`."""

    arch = "verlet"
    halves = 2

    def forward(self, y, z=None, return_state=False):
        return conv_verlet(y, self.weight, self.bias, self.step, self.activation, z, return_state,
                           reversible=self.reversible, impl=self.impl, norm=self.norm())


CONV_STACKS = {
    "resnet": ConvResNetStack,
    "antisymmetric": ConvAntisymmetricStack,
    "leapfrog": ConvLeapfrogStack,
    "verlet": ConvVerletStack,
}
