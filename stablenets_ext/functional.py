"""Functional forms of the four stacks: checked arguments, then fused or reference.

``impl`` is ``"auto"`` (fused where a kernel was compiled for the device, else
the plain-PyTorch reference with one warning), ``"fused"`` (error if no kernel)
or ``"reference"``.

The fused ops serve first-order reverse-mode autograd (and, through their
backward, double backward). Whatever else can reach them would get wrong
answers, so these run on the reference, whatever ``impl`` says, with one
warning per cause:

- ``torch.func`` transforms (``grad``, ``jacrev``, ``jacfwd``, ``hessian``,
  ``vmap``, ``jvp``) and forward-mode AD (``torch.autograd.forward_ad`` dual
  tensors);
- an activation given as a Python callable (``nn.ReLU()``, ``torch.sin``)
  instead of one of the names in ``reference.ACTIVATIONS``.
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
    if y.dim() != 2:
        raise ValueError(f"y: expected a 2-D tensor (batch, features), got shape {tuple(y.shape)}")
    if weight.dim() != 3 or weight.shape[1] != weight.shape[2]:
        raise ValueError(
            f"weight: expected shape (layers, features, features), got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight: expected at least one layer, got 0 layers")
    if weight.shape[1] != y.shape[1]:
        raise ValueError(
            f"weight: expected features = {y.shape[1]} (from y of shape {tuple(y.shape)}), "
            f"got shape {tuple(weight.shape)}"
        )
    if tuple(bias.shape) != (weight.shape[0], weight.shape[1]):
        raise ValueError(
            f"bias: expected shape {(weight.shape[0], weight.shape[1])} = (layers, features), "
            f"got {tuple(bias.shape)}"
        )
    check_rest(y, weight, bias, step, activation, gamma=gamma, state=state, state_name=state_name)


def check_rest(y, weight, bias, step, activation, *, gamma=None, state=None, state_name=None):
    """The checks that do not depend on the layout of y and weight (dense or
    convolutional, see :func:`stablenets_ext.conv.check_args`): parameters on y's
    dtype and device, the carried state like y, the scalars, the activation."""
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t.dtype != y.dtype and not autocast_casts(y, t):
            raise ValueError(f"{name}: expected the dtype of y ({y.dtype}), got {t.dtype}")
        if t.device != y.device:
            raise ValueError(f"{name}: expected the device of y ({y.device}), got {t.device}")
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
    if reason is not None:
        _warn_once(reason, _REASONS[reason])
        return False
    return use_fused(impl, y.device)


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
    """Forward-Euler ResNet stack: ``Y <- Y + h act(Y K_j^T + b_j)``."""
    check_args(y, weight, bias, step, activation)
    if not _fused(impl, activation, y, weight, bias):
        return reference.resnet(y, weight, bias, step, activation)
    store = _needs_grad(y, weight, bias)
    return _ops.ops.resnet_forward(y, weight, bias, float(step), activation, store)[0]


def antisymmetric(y, weight, bias, step=0.1, activation="tanh", *, gamma=0.01, impl="auto"):
    """Antisymmetric stack: ResNet with ``A_j = (K_j - K_j^T - gamma I) / 2``."""
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
    """Second-order (leapfrog) stack. ``y_prev`` is ``Y_{-1}`` (default ``y``).

    Returns ``Y_N``, or ``(Y_N, Y_{N-1})`` with ``return_state=True``. With
    ``reversible=True`` the backward rebuilds the states from the last two
    instead of storing all of them (memory independent of depth)."""
    check_args(y, weight, bias, step, activation, state=y_prev, state_name="y_prev")
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
    """Hamiltonian (Verlet) stack. ``z`` is ``Z_{-1/2}`` (default zeros).

    Returns ``Y_N``, or ``(Y_N, Z_{N-1/2})`` with ``return_state=True``.
    ``reversible=True`` as for :func:`leapfrog`."""
    check_args(y, weight, bias, step, activation, state=z, state_name="z")
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
