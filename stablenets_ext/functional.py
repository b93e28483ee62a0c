"""Functional forms of the four stacks: checked arguments, then fused or reference.

``impl`` is ``"auto"`` (fused where a kernel was compiled for the device, else
the plain-PyTorch reference with one warning), ``"fused"`` (error if no kernel,
or if the activation is a Python callable) or ``"reference"``.

The fused ops serve first-order reverse-mode autograd (and, through their
backward, double backward). Whatever else can reach them would get wrong
answers, so these run on the reference with one warning per cause:

- ``torch.func`` transforms (``grad``, ``jacrev``, ``jacfwd``, ``hessian``,
  ``vmap``, ``jvp``) and forward-mode AD (``torch.autograd.forward_ad`` dual
  tensors), whatever ``impl`` and ``reversible`` say: these are ways of
  differentiating, not settings of the stack (``reversible=True`` is a plan for
  the reverse-mode backward, which such a call does not use);
- an activation given as a Python callable (``nn.ReLU()``, ``torch.sin``)
  instead of one of the names in ``reference.ACTIVATIONS`` (refused with
  ``impl="fused"`` and with ``reversible=True``).

``torch.jit.trace`` and ``torch.jit.script`` are refused with an error; deploy
with ``torch.export.export`` (or use ``torch.compile``).
"""

from __future__ import annotations

import math
import warnings

import torch

from . import ops as _ops
from . import reference

IMPLS = ("auto", "fused", "reference")
_warned_devices: set[str] = set()
_warned_reasons: set[str] = set()


# ------------------------------------------------------------------ checks
#
# Plain ifs, which torch.compile (dynamic=True too) traces into guards and
# torch.export into guards or asserts. No math.isfinite: it cannot take the
# SymFloat a dynamic step becomes.

_NUMBER = (int, float, torch.SymInt, torch.SymFloat)


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(t, name):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name}: expected a float32, float64, bfloat16 or float16 tensor, got {t.dtype}"
        )


def autocast_casts(y, t) -> bool:
    """Whether torch.autocast will cast ``y`` and ``t`` to one dtype before the op runs
    (both autocast-eligible: floating point but not float64, and autocast on for y's
    device), so that their dtypes may differ here."""
    return (
        torch.is_autocast_enabled(y.device.type)
        and y.dtype != torch.float64
        and t.dtype != torch.float64
    )


def check_scalar(value, name, *, allow_zero=False):
    if isinstance(value, (bool, torch.Tensor)) or not isinstance(value, _NUMBER):
        raise TypeError(f"{name}: expected a Python number, got {type(value).__name__}")
    if not ((value >= 0 if allow_zero else value > 0) and value < math.inf):  # NaN fails too
        what = "a finite number >= 0" if allow_zero else "a finite positive number"
        raise ValueError(f"{name}: expected {what}, got {value}")


def check_args(y, weight, bias, step, activation, *, gamma=None, state=None, state_name=None):
    """Raise a ValueError/TypeError naming the first bad argument."""
    check_tensor(y, "y")
    check_tensor(weight, "weight")
    check_tensor(bias, "bias")
    ys, ws = y.shape, weight.shape
    if len(ys) != 2:
        raise ValueError(f"y: expected a 2-D tensor (batch, features), got shape {tuple(ys)}")
    if len(ws) != 3 or ws[1] != ws[2]:
        raise ValueError(f"weight: expected shape (layers, features, features), got {tuple(ws)}")
    if ws[0] == 0:
        raise ValueError("weight: expected at least one layer, got 0 layers")
    if ws[1] != ys[1]:
        raise ValueError(
            f"weight: expected features = {ys[1]} (from y of shape {tuple(ys)}), "
            f"got shape {tuple(ws)}"
        )
    if bias.shape != ws[:2]:
        raise ValueError(
            f"bias: expected shape {tuple(ws[:2])} = (layers, features), "
            f"got {tuple(bias.shape)}"
        )
    check_rest(y, weight, bias, step, activation, gamma=gamma, state=state, state_name=state_name)


def check_rest(y, weight, bias, step, activation, *, gamma=None, state=None, state_name=None):
    """The checks that do not depend on the layout of y and weight (dense or
    convolutional, see :func:`stablenets_ext.conv.check_args`): parameters on y's
    dtype and device, the carried state like y, the scalars, the activation."""
    dtype, device = y.dtype, y.device
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t.dtype != dtype and not autocast_casts(y, t):
            raise ValueError(f"{name}: expected the dtype of y ({dtype}), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}: expected the device of y ({device}), got {t.device}")
    if state is not None:
        check_tensor(state, state_name)
        if state.shape != y.shape:
            raise ValueError(
                f"{state_name}: expected the shape of y {tuple(y.shape)}, got {tuple(state.shape)}"
            )
        if (state.dtype != y.dtype and not autocast_casts(y, state)) or state.device != y.device:
            raise ValueError(
                f"{state_name}: expected dtype {y.dtype} on {y.device}, "
                f"got {state.dtype} on {state.device}"
            )
    check_scalar(step, "step")
    if gamma is not None:
        check_scalar(gamma, "gamma", allow_zero=True)
    reference.activation_fn(activation)


def _warn_once(key, message, category=UserWarning):
    # warnings.warn cannot be traced by torch.compile; eager runs warn for it.
    if key in _warned_reasons or torch.compiler.is_compiling():
        return
    _warned_reasons.add(key)
    warnings.warn(message, category, stacklevel=4)


def _reference_reason(activation, tensors):
    """Why the fused ops cannot serve this call, or None when they can."""
    if not isinstance(activation, str):
        return "callable"
    if _ops.transform_active(tensors):
        return "transform"
    return None


_REASONS = {
    "transform": (
        "stablenets_ext: a torch.func transform (grad, jacrev, jacfwd, hessian, vmap, jvp) or "
        "forward-mode AD is active; the fused kernels serve reverse-mode autograd only, so the "
        "plain-PyTorch reference implementation runs instead (same results, slower)"
    ),
    "callable": (
        "stablenets_ext: activation is a Python callable; the fused kernels take only the names "
        f"{sorted(reference.ACTIVATIONS)}, so the plain-PyTorch reference implementation runs "
        "instead (slower)"
    ),
}


# ------------------------------------------------------- options refused
#
# One rule for every stack, dense and conv, module and function: an option
# that cannot be honoured is refused, with these words.

FUSED_ACTIVATIONS = tuple(sorted(reference.ACTIVATIONS))

TRACE_REFUSED = (
    "torch.jit.trace cannot record the stablenets_ext fused ops faithfully: whether the forward "
    "stores the states for the backward depends on grad mode, which a trace would freeze. "
    "To deploy, use torch.export.export(model, (x,)) (or torch.compile); torch.jit.script is "
    "not supported either"
)


SCRIPT_REFUSED = (
    "torch.jit.script is not supported: the stacks call custom ops through Python (checked "
    "arguments, keyword-only options, a grad-mode-dependent choice to store states), which "
    "TorchScript cannot compile. To deploy, use torch.export.export(model, (x,)) (or "
    "torch.compile); torch.jit.trace is refused too"
)


def _activation_name(activation) -> str:
    return getattr(activation, "__name__", None) or type(activation).__name__


def check_reversible(reversible, activation="tanh", impl="auto", device=None, *,
                     batch_norm=False) -> None:
    """Raise a ValueError naming ``reversible`` when it is not a bool, or when it is True
    but these settings cannot honour it (only the fused op rebuilds the states in the
    backward; the reference path stores every state). ``device=None``: not checked."""
    if reversible is False:
        return
    if reversible is not True:
        raise ValueError(f"reversible: expected True or False, got {reversible!r}")
    if batch_norm:
        why = ("batch normalisation (batch_norm=True) depends on the batch statistics and "
               "cannot be run backwards")
    elif not isinstance(activation, str):
        why = (f"the activation {_activation_name(activation)} is a Python callable, which runs "
               f"on the reference path (fused activations: {', '.join(FUSED_ACTIVATIONS)})")
    elif impl == "reference":
        why = "impl='reference' runs the reference path"
    elif device is not None and not _ops.has_kernel(device):
        why = f"no fused kernel was compiled for device '{torch.device(device).type}'"
    else:
        return
    raise reversible_refused(why)


def reversible_refused(why: str, *, path: bool = True) -> ValueError:
    """The one wording of a refused ``reversible=True`` (``path``: the reason is the path
    the call would run on, not the architecture)."""
    how = (" only the fused op rebuilds the states in the backward (the reference path "
           "stores every state).") if path else ""
    return ValueError(f"reversible=True cannot be honoured: {why};{how} Use reversible=False")


def fused_refused_for_callable(activation) -> ValueError:
    return ValueError(
        f"impl='fused': the activation {_activation_name(activation)} is a Python callable, which "
        f"has no fused kernel (fused activations: {', '.join(FUSED_ACTIVATIONS)}); use a named "
        "activation, or impl='auto' to run it on the reference path"
    )


def use_fused(impl: str, device: torch.device) -> bool:
    if impl == "reference":
        return False
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if _ops.has_kernel(device):
        return True
    if impl == "fused":
        why = f" ({_ops.LOAD_ERROR})" if _ops.LOAD_ERROR is not None else ""
        raise RuntimeError(
            f"impl='fused': stablenets_ext has no compiled kernel for device '{device.type}'"
            f"{why}; compiled for: {_ops.compiled_devices() or 'none'}. Use impl='auto' or "
            "'reference', or rebuild the extension for this device."
        )
    if device.type not in _warned_devices:
        _warned_devices.add(device.type)
        warnings.warn(
            f"stablenets_ext: no compiled kernel for device '{device.type}'; using the "
            "plain-PyTorch reference implementation (slower, same results)",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def _fused(impl, activation, y, *tensors) -> bool:
    """Whether this call runs the fused op (checks ``impl`` first, as before)."""
    if impl == "reference":
        return False
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    reason = _reference_reason(activation, (y, *tensors))
    if reason == "callable" and impl == "fused":
        raise fused_refused_for_callable(activation)
    if reason is not None:
        _warn_once(reason, _REASONS[reason])
        return False
    fused = use_fused(impl, y.device)
    if fused and torch.jit.is_tracing():
        raise RuntimeError(TRACE_REFUSED)
    return fused


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


REDUCED_DTYPES = (torch.bfloat16, torch.float16)


def run_pair_op(op, tensors, rest, *, reversible):
    """``op(*tensors, *rest)[:2]`` for the leapfrog and Verlet ops (dense and conv).

    Reversible mode on bfloat16/float16 tensors runs the op in float32 and returns the
    pair in their dtype: the backward then rebuilds the states from a float32 final pair
    (from a pair rounded to bf16, every rebuilt state of a deep stack would carry that
    rounding back). Under torch.autocast the op's autocast kernel does the same
    (stablenets_ext.autocast)."""
    y = tensors[0]
    if (reversible and y.dtype in REDUCED_DTYPES and _needs_grad(*tensors)
            and not torch.is_autocast_enabled(y.device.type)):
        out = op(*(t.float() for t in tensors), *rest)
        return out[0].to(y.dtype), out[1].to(y.dtype)
    return op(*tensors, *rest)[:2]


# -------------------------------------------------------------- functions


def resnet(y, weight, bias, step=0.1, activation="tanh", *, impl="auto"):
    """Forward-Euler ResNet stack: ``Y <- Y + h act(Y K_j^T + b_j)`` for ``j = 0..N-1``.

    Args:
        y (Tensor): ``(B, d)`` state ``Y_0``, float32, float64, bfloat16 or float16, on any device (fused
            where a kernel was compiled for it).
        weight (Tensor): ``(N, d, d)``, layer ``j``'s ``K_j`` in the ``nn.Linear``
            layout (``Y K_j^T``); the dtype and device of ``y``.
        bias (Tensor): ``(N, d)``, layer ``j``'s ``b_j``.
        step (float): the step ``h > 0`` (default 0.1); see the stacks in
            :mod:`stablenets_ext.layers` for how to choose it.
        activation (str or callable): a name from ``reference.ACTIVATIONS`` (default
            ``"tanh"``; fused), or a Python callable (reference path).
        impl (str): ``"auto"`` (default), ``"fused"`` or ``"reference"`` (see the module).

    Returns:
        Tensor: ``Y_N``, the shape, dtype and device of ``y``.

    Example:
        >>> import torch
        >>> from stablenets_ext import functional as F
        >>> w, b = torch.randn(3, 8, 8) / 8, torch.zeros(3, 8)
        >>> F.resnet(torch.randn(2, 8), w, b, 0.1).shape
        torch.Size([2, 8])
    """
    check_args(y, weight, bias, step, activation)
    if not _fused(impl, activation, y, weight, bias):
        return reference.resnet(y, weight, bias, step, activation)
    store = _needs_grad(y, weight, bias)
    return _ops.ops.resnet_forward(y, weight, bias, float(step), activation, store)[0]


def antisymmetric(y, weight, bias, step=0.1, activation="tanh", *, gamma=0.01, impl="auto"):
    """Antisymmetric stack: ResNet with ``A_j = (K_j - K_j^T - gamma I) / 2``,
    ``Y <- Y + h act(Y A_j^T + b_j)``.

    Args:
        y (Tensor): ``(B, d)`` state ``Y_0``, float32, float64, bfloat16 or float16, on any device (fused
            where a kernel was compiled for it).
        weight (Tensor): ``(N, d, d)``, layer ``j``'s ``K_j`` in the ``nn.Linear``
            layout (``Y K_j^T``); the dtype and device of ``y``.
        bias (Tensor): ``(N, d)``, layer ``j``'s ``b_j``.
        step (float): the step ``h > 0`` (default 0.1); see the stacks in
            :mod:`stablenets_ext.layers` for how to choose it.
        activation (str or callable): a name from ``reference.ACTIVATIONS`` (default
            ``"tanh"``; fused), or a Python callable (reference path).
        gamma (float): damping ``>= 0`` subtracted on the diagonal (default 0.01).
        impl (str): ``"auto"`` (default), ``"fused"`` or ``"reference"`` (see the module).

    Returns:
        Tensor: ``Y_N``, the shape, dtype and device of ``y``.
    """
    check_args(y, weight, bias, step, activation, gamma=gamma)
    if not _fused(impl, activation, y, weight, bias):
        return reference.antisymmetric(y, weight, bias, step, activation, gamma)
    store = _needs_grad(y, weight, bias)
    out = _ops.ops.antisymmetric_forward(y, weight, bias, float(step), float(gamma), activation, store)
    return out[0]


def leapfrog(
    y, weight, bias, step=0.1, activation="tanh", *, y_prev=None, return_state=False,
    reversible=False, impl="auto",
):
    """Second-order (leapfrog) stack:
    ``Y_{j+1} = 2 Y_j - Y_{j-1} - h^2 act(Y_j K_j^T + b_j) K_j``.

    Args:
        y (Tensor): ``(B, d)`` state ``Y_0``, float32, float64, bfloat16 or float16, on any device (fused
            where a kernel was compiled for it).
        weight (Tensor): ``(N, d, d)``, layer ``j``'s ``K_j`` in the ``nn.Linear``
            layout (``Y K_j^T``); the dtype and device of ``y``.
        bias (Tensor): ``(N, d)``, layer ``j``'s ``b_j``.
        step (float): the step ``h > 0`` (default 0.1); see the stacks in
            :mod:`stablenets_ext.layers` for how to choose it.
        activation (str or callable): a name from ``reference.ACTIVATIONS`` (default
            ``"tanh"``; fused), or a Python callable (reference path).
        y_prev (Tensor, optional): ``Y_{-1}``, like ``y``; default ``y`` (zero initial
            velocity). Give the state a previous call returned to continue it.
        return_state (bool): return ``(Y_N, Y_{N-1})`` instead of ``Y_N`` (default False).
        reversible (bool): False (default) stores every state for the backward; True
            keeps the last two and rebuilds the rest backwards (memory independent of
            depth). Refused (ValueError) where only the reference can run: a callable
            activation, ``impl="reference"``, a device without a kernel.
        impl (str): ``"auto"`` (default), ``"fused"`` or ``"reference"`` (see the module).

    Returns:
        Tensor ``Y_N``, or the pair ``(Y_N, Y_{N-1})`` with ``return_state=True``.

    Example:
        >>> import torch
        >>> from stablenets_ext import functional as F
        >>> w, b = torch.randn(6, 8, 8) / 8, torch.zeros(6, 8)
        >>> y0 = torch.randn(2, 8)
        >>> y3, prev = F.leapfrog(y0, w[:3], b[:3], 0.1, return_state=True)
        >>> y6 = F.leapfrog(y3, w[3:], b[3:], 0.1, y_prev=prev)   # = the whole stack
        >>> torch.allclose(y6, F.leapfrog(y0, w, b, 0.1), atol=1e-6)
        True
    """
    check_args(y, weight, bias, step, activation, state=y_prev, state_name="y_prev")
    check_reversible(reversible, activation, impl, y.device)
    if not _fused(impl, activation, y, weight, bias, y_prev):
        out = reference.leapfrog(y, weight, bias, step, activation, y_prev, return_state=True)
    else:
        prev = y if y_prev is None else y_prev
        grads = (y, weight, bias) if y_prev is None else (y, prev, weight, bias)
        store = _needs_grad(*grads) and not reversible
        out = run_pair_op(_ops.ops.leapfrog_forward, (y, prev, weight, bias),
                          (float(step), activation, store), reversible=reversible)
    return tuple(out) if return_state else out[0]


def verlet(
    y, weight, bias, step=0.1, activation="tanh", *, z=None, return_state=False,
    reversible=False, impl="auto",
):
    """Hamiltonian (Verlet) stack: ``Z <- Z - h act(Y K_j + b_j)``, then
    ``Y <- Y + h act(Z K_j^T + b_j)``.

    Args:
        y (Tensor): ``(B, d)`` state ``Y_0``, float32, float64, bfloat16 or float16, on any device (fused
            where a kernel was compiled for it).
        weight (Tensor): ``(N, d, d)``, layer ``j``'s ``K_j`` in the ``nn.Linear``
            layout (``Y K_j^T``); the dtype and device of ``y``.
        bias (Tensor): ``(N, d)``, layer ``j``'s ``b_j``.
        step (float): the step ``h > 0`` (default 0.1); see the stacks in
            :mod:`stablenets_ext.layers` for how to choose it.
        activation (str or callable): a name from ``reference.ACTIVATIONS`` (default
            ``"tanh"``; fused), or a Python callable (reference path).
        z (Tensor, optional): ``Z_{-1/2}``, like ``y``; default zeros. Give the state a
            previous call returned to continue it.
        return_state (bool): return ``(Y_N, Z_{N-1/2})`` instead of ``Y_N`` (default False).
        reversible (bool): False (default) stores every state for the backward; True
            keeps the last two and rebuilds the rest backwards (memory independent of
            depth). Refused (ValueError) where only the reference can run: a callable
            activation, ``impl="reference"``, a device without a kernel.
        impl (str): ``"auto"`` (default), ``"fused"`` or ``"reference"`` (see the module).

    Returns:
        Tensor ``Y_N``, or the pair ``(Y_N, Z_{N-1/2})`` with ``return_state=True``.
    """
    check_args(y, weight, bias, step, activation, state=z, state_name="z")
    check_reversible(reversible, activation, impl, y.device)
    if not _fused(impl, activation, y, weight, bias, z):
        out = reference.verlet(y, weight, bias, step, activation, z, return_state=True)
    else:
        z0 = torch.zeros_like(y) if z is None else z
        store = _needs_grad(y, z0, weight, bias) and not reversible
        out = run_pair_op(_ops.ops.verlet_forward, (y, z0, weight, bias),
                          (float(step), activation, store), reversible=reversible)
    return tuple(out) if return_state else out[0]


FUNCTIONS = {
    "resnet": resnet,
    "antisymmetric": antisymmetric,
    "leapfrog": leapfrog,
    "verlet": verlet,
}
