"""The compiled ops, as ``torch.ops.stablenets.*``, with fake kernels and autograd.

Loading ``stablenets_ext._C`` registers the schemas and the CPU (and, where
built, CUDA) kernels with the dispatcher. This module adds what the
dispatcher needs from Python: a fake kernel per op (shapes, checked as the
real kernels check them, for ``torch.compile``, ``opcheck`` and meta tensors)
and, for the autograd formulas, which live in C++ (csrc/autograd.cpp, the
Autograd key: a module call goes from the dispatcher straight into them), the
function their backward calls back when it must itself be differentiable.

The backward ops are not themselves differentiable. When a backward runs
with ``create_graph=True`` (double backward: gradient penalties,
Hessian-vector products) it recomputes through :mod:`.reference` instead, so
higher derivatives are exact rather than silently zero. Forward-mode AD and
``torch.func`` transforms are routed to the reference one level up, in
:mod:`.functional`, which sees the transform before any op runs.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch.autograd import forward_ad as _fwad

from . import conv_reference, reference

from . import _cpu_isa
from . import autocast as _autocast

try:
    from . import _C  # noqa: F401  (registers torch.ops.stablenets.* and the CUDA kernels)

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None
    LOAD_ERROR = exc

# The CPU kernels, built once per instruction set: the best this CPU runs, or
# STABLENETS_CPU_ISA's choice. An impossible choice is kept in ENV_ERROR, not
# raised at import: every command reports it as one line (_env.problems), and
# has_kernel("cpu") raises it, so no CPU stack silently runs another variant.
try:
    CPU_ISA: str | None = _cpu_isa.load() if _C is not None else None
    ENV_ERROR: Exception | None = None
except (ValueError, RuntimeError) as _exc:
    CPU_ISA, ENV_ERROR = None, _exc

STATE_SLOTS = {"resnet": 2, "antisymmetric": 2, "leapfrog": 2, "verlet": 4}


def cpu_cache_stats() -> dict | None:
    """The CPU block cache of the loaded kernels (csrc/cpu/block_cache.h), or None without one.

    Forward states and weight gradients of 1 MiB and more come from it, so a training loop does
    not page-fault them in again at every step. Keys: ``held`` and ``cap`` (bytes), ``hits``,
    ``misses``, ``blocks``. ``STABLENETS_CPU_CACHE_MB`` sets the cap (default 512, 0 turns it off).
    """
    if CPU_ISA is None or not hasattr(torch.ops.stablenets, "cpu_cache_stats"):
        return None
    held, cap, hits, misses, blocks = torch.ops.stablenets.cpu_cache_stats()
    return {"held": held, "cap": cap, "hits": hits, "misses": misses, "blocks": blocks}


def cpu_cache_empty() -> None:
    """Release every block the CPU block cache holds (as ``torch.cuda.empty_cache`` does for CUDA)."""
    if CPU_ISA is not None and hasattr(torch.ops.stablenets, "cpu_cache_empty"):
        torch.ops.stablenets.cpu_cache_empty()


def compiled() -> bool:
    return _C is not None


def probe_kernels(op: str) -> dict[str, bool]:
    """Which devices have a kernel registered for ``op`` (e.g. ``"stablenets::resnet_forward"``)."""
    if _C is None:
        return {"cpu": False, "cuda": False}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {dev: has(op, key) for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


# Probed once: a plain dict lookup is what torch.compile can trace through.
_KERNELS = probe_kernels("stablenets::resnet_forward")


def has_kernel(device: torch.device | str) -> bool:
    """Whether fused kernels were compiled for this device type."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    if kind == "cpu" and ENV_ERROR is not None:
        raise ENV_ERROR
    return _KERNELS.get(kind, False)


def compiled_devices() -> list[str]:
    return [dev for dev in ("cpu", "cuda") if has_kernel(dev)]


# -------------------------------------------------------------------- checks
#
# The Python twins of csrc/include/stablenets/checks.h, same conditions and
# messages, raising ValueError as TORCH_CHECK_VALUE does, and written to trace:
# torch.compile (dynamic=True too) and torch.export see no math.isfinite and no
# data-dependent branch.


def require(cond, msg) -> None:
    """Raise ``ValueError(msg())`` unless ``cond``.

    A symbolic condition (fake kernels under torch.compile, torch.export) becomes
    a runtime assert through ``torch._check_value`` instead of a guard. Dynamo
    sees symbolic values as plain numbers and takes the plain branch, where it
    guards; it could not take the other, since it only accepts ``torch._check``
    messages whose closures hold constants."""
    if isinstance(cond, torch.SymBool):
        torch._check_value(cond, msg)
    elif not cond:
        raise ValueError(msg())


def check_number(value, name: str, *, allow_zero: bool = False) -> None:
    """``value`` finite and ``> 0`` (``>= 0`` with ``allow_zero``); NaN fails both."""
    what = "a finite number >= 0" if allow_zero else "a finite positive number"

    def msg():
        return f"{name}: expected {what}, got {value}"

    # No math.isfinite: it cannot take the SymFloat torch.compile(dynamic=True) passes.
    require(value >= 0 if allow_zero else value > 0, msg)
    require(value < math.inf, msg)


def check_activation(activation) -> None:
    require(
        isinstance(activation, str) and activation in reference.ACTIVATIONS,
        lambda: "activation: expected one of "
        + ", ".join(f"'{a}'" for a in reference.ACTIVATIONS) + f", got '{activation}'",
    )


def params_dtype_ok(y, weight, bias) -> bool:
    """Whether an op takes ``weight`` and ``bias`` with ``y`` by dtype: both of y's dtype,
    or both float32 with a bfloat16/float16 ``y`` on the CPU (autocast hands the float32
    parameters over uncast: stablenets_ext/autocast.py), as csrc/include/stablenets/checks.h
    rules for every op, dense and conv."""
    if weight.dtype == y.dtype and bias.dtype == y.dtype:
        return True
    return (y.dtype in (torch.bfloat16, torch.float16) and y.device.type == "cpu"
            and weight.dtype == bias.dtype == torch.float32)


def _check_float_tensor(t, name):
    require(
        t.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
        lambda: f"{name}: expected a float32, float64, bfloat16 or float16 tensor, got {t.dtype}",
    )


def _check_stack(y, weight, bias):
    _check_float_tensor(y, "y")
    _check_float_tensor(weight, "weight")
    _check_float_tensor(bias, "bias")
    require(
        y.dim() == 2, lambda: f"y: expected a 2-D tensor (batch, features), got shape {list(y.shape)}"
    )
    require(
        weight.dim() == 3,
        lambda: f"weight: expected shape (layers, features, features), got {list(weight.shape)}",
    )
    require(
        weight.shape[1] == weight.shape[2],
        lambda: f"weight: expected shape (layers, features, features), got {list(weight.shape)}",
    )
    require(
        weight.shape[0] > 0, lambda: f"weight: expected at least one layer, got shape {list(weight.shape)}"
    )
    require(
        weight.shape[1] == y.shape[1],
        lambda: f"weight: expected features = {y.shape[1]} (from y of shape {list(y.shape)}), "
        f"got shape {list(weight.shape)}",
    )
    bias_msg = (lambda: f"bias: expected shape ({weight.shape[0]}, {weight.shape[1]}) = "
                f"(layers, features), got {list(bias.shape)}")
    require(bias.dim() == 2, bias_msg)
    require(bias.shape[0] == weight.shape[0], bias_msg)
    require(bias.shape[1] == weight.shape[1], bias_msg)
    require(
        params_dtype_ok(y, weight, bias),
        lambda: f"weight, bias: expected the dtype of y ({y.dtype}), got {weight.dtype} and {bias.dtype}",
    )
    require(
        weight.device == y.device and bias.device == y.device,
        lambda: f"weight, bias: expected the device of y ({y.device}), got {weight.device} and "
        f"{bias.device}",
    )


def _check_like(t, name, y):
    _check_float_tensor(t, name)
    require(t.dim() == y.dim(),
                       lambda: f"{name}: expected shape {list(y.shape)}, got {list(t.shape)}")
    for a, b in zip(t.shape, y.shape):
        require(a == b, lambda: f"{name}: expected shape {list(y.shape)}, got {list(t.shape)}")
    require(t.dtype == y.dtype, lambda: f"{name}: expected dtype {y.dtype}, got {t.dtype}")
    require(t.device == y.device, lambda: f"{name}: expected device {y.device}, got {t.device}")


def _check_states(states, slots, grad, weight):
    def msg():
        return (f"states: expected shape (layers, {slots}, {grad.shape[0]}, {grad.shape[1]}), "
                f"got {list(states.shape)}")

    require(states.dim() == 4, msg)
    require(states.shape[1] == slots, msg)
    require(states.shape[2] == grad.shape[0], msg)
    require(states.shape[3] == grad.shape[1], msg)
    require(
        states.shape[0] == weight.shape[0],
        lambda: "states: holds no stored states (the forward ran with store=False) or does not match "
        f"weight; expected {weight.shape[0]} layers, got {states.shape[0]}",
    )
    require(states.dtype == grad.dtype and states.device == grad.device,
            lambda: "states: expected dtype and device of the gradient")


# ------------------------------------------------------------ reversibility

# Relative error of the rebuilt initial state above which the reversible
# backward is judged to have lost reversibility: sqrt(eps), half the digits.
# A stable stack rebuilds to about eps * depth; measured on leapfrog (float32,
# d = 8-64, 96 rows) the gradients' relative error is about ten times the
# rebuilt state's (3e-5 at N = 256, h = 0.05; 1e-3 -> 1e-2 at N = 1024,
# h = 0.1; O(1) -> 3-10 at N = 256, h = 0.5).
# bfloat16/float16 inputs rebuild in float32 (csrc/include/stablenets/reduced_precision.h)
# from a final pair rounded to their dtype, so their own sqrt(eps) applies. The check itself
# (the relative error over the pair) is C++: csrc/autograd.cpp, rebuild_error_cpu / check_cuda.
REBUILD_TOLERANCE = {dt: torch.finfo(dt).eps ** 0.5
                     for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}


def flush_reversibility_checks() -> None:
    """Wait for the reversibility checks still pending and warn for those that failed.

    A reversible backward (leapfrog, Verlet) checks the initial pair it rebuilt against
    the one the forward saw and warns when reversibility was lost. On the CPU it checks
    every call, at once. On CUDA it checks one call in 16 without a host sync: the error
    is read back after the fact and the warning comes at a later backward, or here.
    """
    if _C is not None:
        _C.flush_reversibility_checks()


def transform_active(tensors) -> bool:
    """Whether a torch.func transform or forward-mode AD (a dual tensor) is in play,
    which the fused ops do not serve."""
    if torch._C._are_functorch_transforms_active():
        return True
    return _fwad._current_level >= 0 and any(
        isinstance(t, torch.Tensor) and _fwad.unpack_dual(t).tangent is not None for t in tensors
    )


if _C is not None:
    ops = torch.ops.stablenets

    # Whether the reversible backward ops also return the rebuilt initial state
    # (the 6-output schemas); older builds return the four gradients only.
    REBUILDS = {
        arch: len(getattr(ops, f"{arch}_backward_reversible").default._schema.returns) == 6
        for arch in ("leapfrog", "verlet")
    }

    # ---------------------------------------------------------------- fakes

    def _states(y, weight, store, arch):
        layers = weight.shape[0] if store else 0
        return y.new_empty((layers, STATE_SLOTS[arch], y.shape[0], y.shape[1]))

    def _grads(y, weight, bias, n_like_y):
        out = [y.new_empty(y.shape) for _ in range(n_like_y)]
        return (*out, weight.new_empty(weight.shape), bias.new_empty(bias.shape))

    @torch.library.register_fake("stablenets::resnet_forward")
    def _(y, weight, bias, step, activation, store):
        _check_stack(y, weight, bias)
        check_number(step, "step")
        check_activation(activation)
        return y.new_empty(y.shape), _states(y, weight, store, "resnet")

    @torch.library.register_fake("stablenets::resnet_backward")
    def _(grad_out, states, weight, bias, step, activation):
        _check_stack(grad_out, weight, bias)
        _check_states(states, 2, grad_out, weight)
        check_number(step, "step")
        check_activation(activation)
        return _grads(grad_out, weight, bias, 1)

    @torch.library.register_fake("stablenets::antisymmetric_forward")
    def _(y, weight, bias, step, gamma, activation, store):
        _check_stack(y, weight, bias)
        check_number(step, "step")
        check_number(gamma, "gamma", allow_zero=True)
        check_activation(activation)
        return y.new_empty(y.shape), _states(y, weight, store, "antisymmetric")

    @torch.library.register_fake("stablenets::antisymmetric_backward")
    def _(grad_out, states, weight, bias, step, gamma, activation):
        _check_stack(grad_out, weight, bias)
        _check_states(states, 2, grad_out, weight)
        check_number(step, "step")
        check_number(gamma, "gamma", allow_zero=True)
        check_activation(activation)
        return _grads(grad_out, weight, bias, 1)

    def _fake_two_forward(arch, other_name):
        def fake(y, other, weight, bias, step, activation, store):
            _check_stack(y, weight, bias)
            _check_like(other, other_name, y)
            check_number(step, "step")
            check_activation(activation)
            return y.new_empty(y.shape), y.new_empty(y.shape), _states(y, weight, store, arch)

        return fake

    def _fake_two_backward(arch, other_name):
        def fake(grad_a, grad_b, states, weight, bias, step, activation):
            _check_stack(grad_a, weight, bias)
            _check_like(grad_b, f"grad_{other_name}", grad_a)
            _check_states(states, STATE_SLOTS[arch], grad_a, weight)
            check_number(step, "step")
            check_activation(activation)
            return _grads(grad_a, weight, bias, 2)

        return fake

    def _fake_two_reversible(arch, other_name):
        def fake(grad_a, grad_b, a, b, weight, bias, step, activation):
            _check_stack(grad_a, weight, bias)
            _check_like(grad_b, f"grad_{other_name}", grad_a)
            _check_like(a, "y", grad_a)
            _check_like(b, other_name, grad_a)
            check_number(step, "step")
            check_activation(activation)
            grads = _grads(grad_a, weight, bias, 2)
            if REBUILDS[arch]:
                return (*grads, a.new_empty(a.shape), a.new_empty(a.shape))
            return grads

        return fake

    for _arch, _other in (("leapfrog", "y_prev"), ("verlet", "z")):
        torch.library.register_fake(f"stablenets::{_arch}_forward")(_fake_two_forward(_arch, _other))
        torch.library.register_fake(f"stablenets::{_arch}_backward")(_fake_two_backward(_arch, _other))
        torch.library.register_fake(f"stablenets::{_arch}_backward_reversible")(
            _fake_two_reversible(_arch, _other)
        )

    # ------------------------------------------------------------- autograd
    #
    # The formulas are C++ (csrc/autograd.cpp). A backward that must itself be
    # differentiable (create_graph=True, or a transform over the backward: vmap of it,
    # batched gradients, autograd.grad(is_grads_batched=True),
    # autograd.functional.jacobian(vectorize=True)) calls back _reference_vjp.

    def _reference_fn(arch, step, gamma, act):
        """The op's forward as a function of its tensor inputs, in plain PyTorch
        (``arch`` ``"conv_..."``: the conv stack's)."""
        if arch.startswith("conv_"):
            _warn_conv_double_backward()
            ref = conv_reference.REFERENCE[arch[5:]]
            if arch == "conv_resnet":
                return lambda y, w, b: (ref(y, w, b, step, act),)
            if arch == "conv_antisymmetric":
                return lambda y, w, b: (ref(y, w, b, step, act, gamma),)
            return lambda y, s, w, b: ref(y, w, b, step, act, s, return_state=True)
        if arch == "resnet":
            return lambda y, w, b: (reference.resnet(y, w, b, step, act),)
        if arch == "antisymmetric":
            return lambda y, w, b: (reference.antisymmetric(y, w, b, step, act, gamma),)
        if arch == "leapfrog":
            return lambda y, yp, w, b: reference.leapfrog(y, w, b, step, act, yp, return_state=True)
        return lambda y, z, w, b: reference.verlet(y, w, b, step, act, z, return_state=True)

    _warned_conv_double_backward: list[bool] = []

    def _warn_conv_double_backward():
        if not _warned_conv_double_backward:
            _warned_conv_double_backward.append(True)
            warnings.warn(
                "stablenets_ext conv stacks: double backward (create_graph=True) has no fused "
                "kernel; recomputing the stack with the differentiable per-layer reference "
                "(slower, same results)",
                RuntimeWarning,
                stacklevel=2,
            )

    def _reference_vjp(arch, inputs, grads, step, gamma, act, needs):
        """The backward as a differentiable function of the inputs and of ``grads`` (None:
        an output nobody used), by recomputing the forward through the reference; the
        gradient of each input marked in ``needs``, None for the others.

        Each input enters through its own view, so an input passed twice (leapfrog's
        default ``y_prev = y``) gets its own partial derivative per slot."""
        with torch.enable_grad():
            leaves = [t.view_as(t) if n else t.detach() for t, n in zip(inputs, needs)]
            fn = _reference_fn(arch, step, gamma, act)
            low = {t.dtype for t in leaves} & {torch.bfloat16, torch.float16}
            if low and any(t.dtype == torch.float32 for t in leaves):
                # float32 parameters of a bf16/fp16 stack (the CPU ops take them, as CPU
                # autocast hands them over): the reference in float32, as the op computes,
                # its outputs rounded to the data's dtype, as the op's are
                (low,) = low
                outs = [o.to(low) for o in fn(*(t.float() for t in leaves))]
            else:
                outs = fn(*leaves)
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
            wanted = [t for t, n in zip(leaves, needs) if n]
            if not pairs or not wanted:
                return [None] * len(inputs)
            got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                           create_graph=True, allow_unused=True))
        return [next(got) if n else None for n in needs]

    _C.set_reference_vjp(_reference_vjp)

    # torch.autocast: C++ kernels (csrc/autocast.cpp) above Autograd serve eager calls;
    # the Python dispatcher (torch.compile, torch.export) takes these.
    _LIB = torch.library.Library("stablenets", "FRAGMENT")  # noqa: TOR901
    _autocast.register(_LIB, _autocast.op_names())
