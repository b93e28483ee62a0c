"""Convolutional stacks for image data: fused ops, with a per-layer reference twin.

The state ``Y`` is ``(B, C, H, W)``; layer ``j`` owns a ``k x k`` (odd ``k``)
kernel ``K_j = weight[j]`` of shape ``(C, C, k, k)`` and a per-channel bias
``b_j = bias[j]``. ``K Y`` is ``conv2d(Y, K)`` with "same" padding and
``K^T Y`` its true adjoint, ``conv_transpose2d(Y, K)`` with the same kernel,
so each update is the dense one (:mod:`stablenets_ext.layers`) with matrices
replaced by convolutions:

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
honoured (``impl="reference"``, batch norm, a Python-callable activation, a
device without a kernel) it is refused with a ValueError, as for the dense
stacks. Under forward-mode AD the differentiable reference runs (one warning).

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


_BN_FUSED = ("impl='fused': batch normalisation (batch_norm=True) has no fused kernel; use "
             "impl='auto' or 'reference' (which run it on the per-layer reference path)")


def _use_fused(arch, impl, device, activation, norm, reversible, tensors) -> bool:
    """Fused op or reference? Refuses (ValueError naming ``reversible``) a
    ``reversible=True`` that these settings cannot honour, as the dense stacks do."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    functional.check_reversible(reversible, activation, impl, batch_norm=norm is not None)
    if norm is not None:
        if impl == "fused":
            raise ValueError(_BN_FUSED)
        return False  # batch normalisation: the per-layer reference
    if not isinstance(activation, str):
        if impl == "fused":
            raise functional.fused_refused_for_callable(activation)
        _warn_once(f"callable:{type(activation).__name__}",
                   f"stablenets_ext conv_{arch}: activation {activation!r} is a Python callable, "
                   "which has no fused kernel; using the per-layer reference (slower)")
        return False
    if impl == "reference":
        return False
    if _has_tangent(*tensors):
        # as the dense stacks under forward-mode AD: the differentiable reference runs
        # (it stores its states, whatever ``reversible`` says: reversible=True is a plan
        # for the reverse-mode backward, which this call does not use)
        _warn_once("forward_ad", f"stablenets_ext conv_{arch}: forward-mode AD has no fused "
                   "formula; using the differentiable per-layer reference (slower, same results)")
        return False
    if _cops._ops.transform_active(tensors):  # as the dense stacks (functional.py)
        _warn_once("transform", f"stablenets_ext conv_{arch}: a torch.func transform (grad, "
                   "jacrev, jacfwd, hessian, vmap, jvp) is active; the fused kernels serve "
                   "reverse-mode autograd only, so the per-layer reference runs instead (same "
                   "results, slower)")
        return False
    if not _cops.has_kernel(device):
        why = f" ({_cops._ops.LOAD_ERROR})" if _cops._ops.LOAD_ERROR is not None else ""
        why_not = f"no fused conv kernel was compiled for device '{device.type}'{why}"
        if reversible:
            raise functional.reversible_refused(why_not)
        if impl == "fused":
            raise RuntimeError(f"impl='fused': {why_not}; use impl='auto' or 'reference', or "
                               "rebuild the extension for this device")
        _warn_once(f"device:{device.type}", f"stablenets_ext: {why_not}; using the per-layer "
                   "reference implementation of the conv stacks (slower, same results)")
        return False
    if torch.jit.is_tracing():
        raise RuntimeError(functional.TRACE_REFUSED)
    return True


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
    """Forward-Euler conv stack ``Y <- Y + h act(K_j Y + b_j)``.

    Args:
        y (Tensor): ``(B, C, H, W)`` state ``Y_0``, float32, float64, bfloat16 or float16.
        weight (Tensor): ``(N, C, C, k, k)``, layer ``j``'s kernel ``K_j`` (odd ``k``,
            "same" padding); the dtype and device of ``y``.
        bias (Tensor): ``(N, C)``, layer ``j``'s per-channel ``b_j``.
        step (float): the step ``h > 0`` (default 0.1); chosen as for the dense stacks
            (:class:`stablenets_ext.VerletStack`).
        activation (str or callable): a name from ``reference.ACTIVATIONS`` (default
            ``"tanh"``; fused), or a Python callable (reference path).
        impl (str): ``"auto"`` (default), ``"fused"`` or ``"reference"``, as in
            :mod:`stablenets_ext.functional`.
        norm (ConvNorm, optional): batch normalisation of every pre-activation (what
            ``batch_norm=True`` modules pass); reference path only.

    Returns:
        Tensor: ``Y_N``, the shape, dtype and device of ``y``.

    Example:
        >>> import torch
        >>> from stablenets_ext import conv
        >>> w, b = torch.randn(2, 3, 3, 3, 3) / 9, torch.zeros(2, 3)
        >>> conv.conv_resnet(torch.randn(1, 3, 8, 8), w, b, 0.1).shape
        torch.Size([1, 3, 8, 8])
    """
    check_args(y, weight, bias, step, activation)
    if not _use_fused("resnet", impl, y.device, activation, norm, False, (y, weight, bias)):
        return reference_resnet(y, weight, bias, step, activation, norm=norm)
    store = _needs_grad(y, weight, bias)
    return _cops.ops.conv_resnet_forward(y, weight, bias, float(step), activation, store)[0]


def conv_antisymmetric(y, weight, bias, step=0.1, activation="tanh", gamma=0.01, *, impl="auto",
                       norm=None):
    """Conv ResNet stack with kernels ``A_j = (K_j - K_j^T - gamma I) / 2``
    (``K^T`` the adjoint convolution).

    Args:
        y (Tensor): ``(B, C, H, W)`` state ``Y_0``, float32, float64, bfloat16 or float16.
        weight (Tensor): ``(N, C, C, k, k)``, layer ``j``'s kernel ``K_j`` (odd ``k``,
            "same" padding); the dtype and device of ``y``.
        bias (Tensor): ``(N, C)``, layer ``j``'s per-channel ``b_j``.
        step (float): the step ``h > 0`` (default 0.1); chosen as for the dense stacks
            (:class:`stablenets_ext.VerletStack`).
        activation (str or callable): a name from ``reference.ACTIVATIONS`` (default
            ``"tanh"``; fused), or a Python callable (reference path).
        gamma (float): damping ``>= 0`` (default 0.01).
        impl (str): ``"auto"`` (default), ``"fused"`` or ``"reference"``, as in
            :mod:`stablenets_ext.functional`.
        norm (ConvNorm, optional): batch normalisation of every pre-activation (what
            ``batch_norm=True`` modules pass); reference path only.

    Returns:
        Tensor: ``Y_N``, the shape, dtype and device of ``y``.
    """
    check_args(y, weight, bias, step, activation, gamma=gamma)
    if not _use_fused("antisymmetric", impl, y.device, activation, norm, False, (y, weight, bias)):
        return reference_antisymmetric(y, weight, bias, step, activation, gamma, norm=norm)
    store = _needs_grad(y, weight, bias)
    return _cops.ops.conv_antisymmetric_forward(y, weight, bias, float(step), float(gamma),
                                                activation, store)[0]


def conv_leapfrog(y, weight, bias, step=0.1, activation="tanh", y_prev=None, return_state=False, *,
                  reversible=False, impl="auto", norm=None):
    """Second-order (leapfrog) conv stack
    ``Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 K_j^T act(K_j Y_j + b_j)``.

    Args:
        y (Tensor): ``(B, C, H, W)`` state ``Y_0``, float32, float64, bfloat16 or float16.
        weight (Tensor): ``(N, C, C, k, k)``, layer ``j``'s kernel ``K_j`` (odd ``k``,
            "same" padding); the dtype and device of ``y``.
        bias (Tensor): ``(N, C)``, layer ``j``'s per-channel ``b_j``.
        step (float): the step ``h > 0`` (default 0.1); chosen as for the dense stacks
            (:class:`stablenets_ext.VerletStack`).
        activation (str or callable): a name from ``reference.ACTIVATIONS`` (default
            ``"tanh"``; fused), or a Python callable (reference path).
        y_prev (Tensor, optional): ``Y_{-1}``, like ``y``; default ``y``.
        return_state (bool): return ``(Y_N, Y_{N-1})`` instead of ``Y_N`` (default False).
        reversible (bool): rebuild the states in the backward instead of storing them
            (default False); refused (ValueError) where only the reference can run.
        impl (str): ``"auto"`` (default), ``"fused"`` or ``"reference"``, as in
            :mod:`stablenets_ext.functional`.
        norm (ConvNorm, optional): batch normalisation of every pre-activation (what
            ``batch_norm=True`` modules pass); reference path only.

    Returns:
        Tensor ``Y_N``, or the pair ``(Y_N, Y_{N-1})`` with ``return_state=True``.
    """
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
    """Hamiltonian (Verlet) conv stack: ``Z <- Z - h act(K_j Y + b_j)``, then
    ``Y <- Y + h act(K_j^T Z + b_j)``.

    Args:
        y (Tensor): ``(B, C, H, W)`` state ``Y_0``, float32, float64, bfloat16 or float16.
        weight (Tensor): ``(N, C, C, k, k)``, layer ``j``'s kernel ``K_j`` (odd ``k``,
            "same" padding); the dtype and device of ``y``.
        bias (Tensor): ``(N, C)``, layer ``j``'s per-channel ``b_j``.
        step (float): the step ``h > 0`` (default 0.1); chosen as for the dense stacks
            (:class:`stablenets_ext.VerletStack`).
        activation (str or callable): a name from ``reference.ACTIVATIONS`` (default
            ``"tanh"``; fused), or a Python callable (reference path).
        z (Tensor, optional): ``Z_{-1/2}``, like ``y``; default zeros.
        return_state (bool): return ``(Y_N, Z_{N-1/2})`` instead of ``Y_N`` (default False).
        reversible (bool): rebuild the states in the backward instead of storing them
            (default False); refused (ValueError) where only the reference can run.
        impl (str): ``"auto"`` (default), ``"fused"`` or ``"reference"``, as in
            :mod:`stablenets_ext.functional`.
        norm (ConvNorm, optional): batch normalisation of every pre-activation (what
            ``batch_norm=True`` modules pass); reference path only.

    Returns:
        Tensor ``Y_N``, or the pair ``(Y_N, Z_{N-1/2})`` with ``return_state=True``.
    """
    check_args(y, weight, bias, step, activation, state=z, state_name="z")
    if not _use_fused("verlet", impl, y.device, activation, norm, reversible, (y, z, weight, bias)):
        out = reference_verlet(y, weight, bias, step, activation, z, True, norm=norm)
    else:
        # Z_{-1/2} = 0 without an allocation of its own (the op reads any layout)
        z0 = y.new_zeros(()).expand(y.shape) if z is None else z
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


_CARGS = """
        features (int): channels ``C`` of the state ``Y`` of shape ``(B, C, H, W)``
            (height and width are kept: "same" padding).
        layers (int): number of layers ``N``; each owns a ``(C, C, k, k)`` kernel and a
            ``(C,)`` bias.
        step (float): the step ``h`` (default 0.1), chosen as for the dense stacks
            (:class:`stablenets_ext.VerletStack`): ``h`` times the largest eigenvalue
            modulus of the layer Jacobian (here the convolution's operator norm) well
            below 1 to 2, total time ``N * h`` of order 1 to 10.
        activation (str or callable): one of ``"tanh"`` (default), ``"relu"``,
            ``"identity"``, ``"sigmoid"``, ``"softplus"``, ``"leaky_relu"``, ``"silu"``
            (fused), or a Python callable (per-layer reference path, one warning;
            refused with ``impl="fused"`` or ``reversible=True``).
        gamma (float): antisymmetric stacks only: damping ``>= 0`` (default 0.01).
        kernel_size (int): odd kernel size ``k`` (default 3).
        batch_norm (bool): False (default); True normalises every pre-activation per
            channel (parameters ``norm_weight``/``norm_bias``, running ``norm_mean``/
            ``norm_var`` of shape ``(layers, halves, C)``). Outside the stability
            theory; runs the per-layer reference path; not reversible.
        impl (str): ``"auto"`` (default), ``"fused"`` or ``"reference"``, as for the
            dense stacks.
        device (torch.device, optional): device of the parameters.
        dtype (torch.dtype, optional): ``torch.float32`` (default), ``torch.float64``,
            ``torch.bfloat16`` or ``torch.float16`` (mixed precision: float32 inside)."""

_CREV = """
        reversible (bool): False (default) stores every state for the backward; True
            rebuilds them by running the stack backwards (backward memory independent of
            depth, about one more forward of time). Refused (ValueError) with
            ``batch_norm=True``, ``impl="reference"``, a callable activation or a device
            without a kernel."""

_CNOREV = """
        reversible (bool): must be False (accepted so that code can pass the same keywords
            to every stack); True raises ValueError: this stack has no reversible mode."""


class _ConvStack(nn.Module):
    """Parameters of a conv stack over the functions above."""

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
        if impl == "fused" and not isinstance(activation, str):
            raise functional.fused_refused_for_callable(activation)
        if impl == "fused" and batch_norm:
            raise ValueError(_BN_FUSED)
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
        """Draw ``weight`` and ``bias`` uniformly in ``+-1/sqrt(features k^2)`` (as
        ``nn.Conv2d``); batch norm back to identity."""
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

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every submodule before compiling
        raise RuntimeError(f"{type(self).__name__}: {functional.SCRIPT_REFUSED}")

    def extra_repr(self):
        s = (f"features={self.features}, layers={self.layers}, kernel_size={self.kernel_size}, "
             f"step={self.step}, activation={self.activation!r}, impl={self.impl!r}")
        return s + (", batch_norm=True" if self.batch_norm else "")




def _conv_no_reversible(cls_name, reversible):
    if reversible is not False:
        if reversible is not True:
            raise ValueError(f"reversible: expected True or False, got {reversible!r}")
        raise functional.reversible_refused(
            f"{cls_name} has no reversible mode (a forward-Euler step cannot be run backwards "
            "exactly; ConvLeapfrogStack and ConvVerletStack can)", path=False)


class ConvResNetStack(_ConvStack):
    """Forward-Euler conv stack: ``Y <- Y + h act(K_j Y + b_j)`` on ``(B, C, H, W)``
    states.

    Example:
        >>> import torch, stablenets_ext as sn
        >>> stack = sn.ConvResNetStack(4, 3, step=0.1)
        >>> stack(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    arch = "resnet"

    def __init__(self, features, layers, step=0.1, activation="tanh", *, kernel_size=3,
                 batch_norm=False, impl="auto", reversible=False, device=None, dtype=None):
        _conv_no_reversible(type(self).__name__, reversible)
        super().__init__(features, layers, step, activation, kernel_size=kernel_size,
                         batch_norm=batch_norm, impl=impl, device=device, dtype=dtype)

    __init__.__doc__ = ("A forward-Euler conv stack.\n\n    Args:"
                        + _CARGS.replace(_CARGS[_CARGS.index("        gamma"):_CARGS.index("        kernel_size")], "")
                        + _CNOREV + "\n    ")

    def forward(self, y):
        """Run the ``layers`` layers.

        Args:
            y (Tensor): ``(B, features, H, W)``, the parameters' dtype and device.

        Returns:
            Tensor: ``Y_N``, same shape, dtype and device.
        """
        return conv_resnet(y, self.weight, self.bias, self.step, self.activation, impl=self.impl,
                           norm=self.norm())


class ConvAntisymmetricStack(_ConvStack):
    """Conv stack with antisymmetric kernels ``A_j = (K_j - K_j^T - gamma I) / 2``.

    Example:
        >>> import torch, stablenets_ext as sn
        >>> stack = sn.ConvAntisymmetricStack(4, 3, step=0.1, gamma=0.01)
        >>> stack(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    arch = "antisymmetric"

    def __init__(self, features, layers, step=0.1, activation="tanh", gamma=0.01, *,
                 kernel_size=3, batch_norm=False, impl="auto", reversible=False, device=None,
                 dtype=None):
        if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma: expected a finite number >= 0, got {gamma!r}")
        _conv_no_reversible(type(self).__name__, reversible)
        self.gamma = float(gamma)
        super().__init__(features, layers, step, activation, kernel_size=kernel_size,
                         batch_norm=batch_norm, impl=impl, device=device, dtype=dtype)

    __init__.__doc__ = "An antisymmetric conv stack.\n\n    Args:" + _CARGS + _CNOREV + "\n    "

    def forward(self, y):
        """Run the ``layers`` layers.

        Args:
            y (Tensor): ``(B, features, H, W)``, the parameters' dtype and device.

        Returns:
            Tensor: ``Y_N``, same shape, dtype and device.
        """
        return conv_antisymmetric(y, self.weight, self.bias, self.step, self.activation, self.gamma,
                                  impl=self.impl, norm=self.norm())

    def extra_repr(self):
        return super().extra_repr() + f", gamma={self.gamma}"


class _ConvTwoStateStack(_ConvStack):
    def __init__(self, features, layers, step=0.1, activation="tanh", *, kernel_size=3,
                 batch_norm=False, impl="auto", reversible=False, device=None, dtype=None):
        functional.check_reversible(reversible, activation, impl, batch_norm=batch_norm is True)
        self.reversible = reversible
        super().__init__(features, layers, step, activation, kernel_size=kernel_size,
                         batch_norm=batch_norm, impl=impl, device=device, dtype=dtype)

    __init__.__doc__ = ("A leapfrog or Verlet conv stack.\n\n    Args:"
                        + _CARGS.replace(_CARGS[_CARGS.index("        gamma"):_CARGS.index("        kernel_size")], "")
                        + _CREV + "\n    ")

    def extra_repr(self):
        return super().extra_repr() + f", reversible={self.reversible}"


class ConvLeapfrogStack(_ConvTwoStateStack):
    """Second-order conv stack ``Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 K_j^T act(K_j Y_j + b_j)``;
    ``reversible=True`` rebuilds the states in the backward instead of storing them.

    Example:
        >>> import torch, stablenets_ext as sn
        >>> stack = sn.ConvLeapfrogStack(4, 6, step=0.1, reversible=True)
        >>> stack(torch.randn(2, 4, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    arch = "leapfrog"

    def forward(self, y, y_prev=None, return_state=False):
        """Run the ``layers`` layers.

        Args:
            y (Tensor): ``(B, features, H, W)`` state ``Y_0``, the parameters' dtype and
                device.
            y_prev (Tensor, optional): ``Y_{-1}``, like ``y``; default ``y``.
            return_state (bool): also return ``Y_{N-1}`` (default False).

        Returns:
            Tensor ``Y_N``, or the pair ``(Y_N, Y_{N-1})`` with ``return_state=True``.
        """
        return conv_leapfrog(y, self.weight, self.bias, self.step, self.activation, y_prev, return_state,
                             reversible=self.reversible, impl=self.impl, norm=self.norm())


class ConvVerletStack(_ConvTwoStateStack):
    """Hamiltonian (Verlet) conv stack: ``Z <- Z - h act(K_j Y + b_j)``, then
    ``Y <- Y + h act(K_j^T Z + b_j)``; ``reversible=True`` rebuilds the states in the
    backward instead of storing them.

    Example:
        >>> import torch, stablenets_ext as sn
        >>> stack = sn.ConvVerletStack(4, 6, step=0.1)
        >>> y, z = stack(torch.randn(2, 4, 8, 8), return_state=True)
        >>> stack(y, z).shape            # continue the same trajectory
        torch.Size([2, 4, 8, 8])
    """

    arch = "verlet"
    halves = 2

    def forward(self, y, z=None, return_state=False):
        """Run the ``layers`` layers.

        Args:
            y (Tensor): ``(B, features, H, W)`` state ``Y_0``, the parameters' dtype and
                device.
            z (Tensor, optional): ``Z_{-1/2}``, like ``y``; default zeros.
            return_state (bool): also return ``Z_{N-1/2}`` (default False).

        Returns:
            Tensor ``Y_N``, or the pair ``(Y_N, Z_{N-1/2})`` with ``return_state=True``.
        """
        return conv_verlet(y, self.weight, self.bias, self.step, self.activation, z, return_state,
                           reversible=self.reversible, impl=self.impl, norm=self.norm())


CONV_STACKS = {
    "resnet": ConvResNetStack,
    "antisymmetric": ConvAntisymmetricStack,
    "leapfrog": ConvLeapfrogStack,
    "verlet": ConvVerletStack,
}
