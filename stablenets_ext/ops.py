"""The compiled ops, as ``torch.ops.stablenets.*``, with fake kernels and autograd.

Loading ``stablenets_ext._C`` registers the schemas and the CPU (and, where
built, CUDA) kernels with the dispatcher. This module adds what the
dispatcher needs from Python: a fake kernel per op (shapes only, for
``torch.compile`` and ``opcheck``) and autograd formulas whose backward calls
the matching backward op.
"""

from __future__ import annotations

import torch

from . import _cpu_isa

try:
    from . import _C  # noqa: F401  (registers torch.ops.stablenets.* and the CUDA kernels)

    LOAD_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None
    LOAD_ERROR = exc

# The CPU kernels, built once per instruction set: the best this CPU runs, or
# STABLENETS_CPU_ISA's choice (an impossible choice raises here).
CPU_ISA: str | None = _cpu_isa.load() if _C is not None else None

STATE_SLOTS = {"resnet": 2, "antisymmetric": 2, "leapfrog": 2, "verlet": 4}


def compiled() -> bool:
    return _C is not None


def _probe_kernels() -> dict[str, bool]:
    if _C is None:
        return {"cpu": False, "cuda": False}
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {dev: has("stablenets::resnet_forward", key) for dev, key in (("cpu", "CPU"), ("cuda", "CUDA"))}


# Probed once: a plain dict lookup is what torch.compile can trace through.
_KERNELS = _probe_kernels()


def has_kernel(device: torch.device | str) -> bool:
    """Whether fused kernels were compiled for this device type."""
    return _KERNELS.get(torch.device(device).type, False)


def compiled_devices() -> list[str]:
    return [dev for dev in ("cpu", "cuda") if has_kernel(dev)]


if _C is not None:
    ops = torch.ops.stablenets

    # ---------------------------------------------------------------- fakes

    def _states(y, weight, store, arch):
        layers = weight.shape[0] if store else 0
        return y.new_empty((layers, STATE_SLOTS[arch], y.shape[0], y.shape[1]))

    def _grads(y, weight, bias, n_like_y):
        out = [y.new_empty(y.shape) for _ in range(n_like_y)]
        return (*out, weight.new_empty(weight.shape), bias.new_empty(bias.shape))

    @torch.library.register_fake("stablenets::resnet_forward")
    def _(y, weight, bias, step, activation, store):
        return y.new_empty(y.shape), _states(y, weight, store, "resnet")

    @torch.library.register_fake("stablenets::resnet_backward")
    def _(grad_out, states, weight, bias, step, activation):
        return _grads(grad_out, weight, bias, 1)

    @torch.library.register_fake("stablenets::antisymmetric_forward")
    def _(y, weight, bias, step, gamma, activation, store):
        return y.new_empty(y.shape), _states(y, weight, store, "antisymmetric")

    @torch.library.register_fake("stablenets::antisymmetric_backward")
    def _(grad_out, states, weight, bias, step, gamma, activation):
        return _grads(grad_out, weight, bias, 1)

    @torch.library.register_fake("stablenets::leapfrog_forward")
    def _(y, y_prev, weight, bias, step, activation, store):
        return y.new_empty(y.shape), y.new_empty(y.shape), _states(y, weight, store, "leapfrog")

    @torch.library.register_fake("stablenets::leapfrog_backward")
    def _(grad_y, grad_y_prev, states, weight, bias, step, activation):
        return _grads(grad_y, weight, bias, 2)

    @torch.library.register_fake("stablenets::leapfrog_backward_reversible")
    def _(grad_y, grad_y_prev, y, y_prev, weight, bias, step, activation):
        return _grads(grad_y, weight, bias, 2) + (y.new_empty(y.shape), y.new_empty(y.shape))

    @torch.library.register_fake("stablenets::verlet_forward")
    def _(y, z, weight, bias, step, activation, store):
        return y.new_empty(y.shape), y.new_empty(y.shape), _states(y, weight, store, "verlet")

    @torch.library.register_fake("stablenets::verlet_backward")
    def _(grad_y, grad_z, states, weight, bias, step, activation):
        return _grads(grad_y, weight, bias, 2)

    @torch.library.register_fake("stablenets::verlet_backward_reversible")
    def _(grad_y, grad_z, y, z, weight, bias, step, activation):
        return _grads(grad_y, weight, bias, 2) + (y.new_empty(y.shape), y.new_empty(y.shape))

    # ------------------------------------------------------------- autograd

    def _zeros_if_none(grad, like):
        return torch.zeros_like(like) if grad is None else grad

    def _no_states(arch):
        return RuntimeError(
            f"stablenets::{arch}_forward ran with store=False, so it kept no states for the "
            "backward; call it with store=True when gradients are needed"
        )

    # resnet / antisymmetric: one carried tensor.
    def _setup_one(ctx, inputs, output):
        y, weight, bias, step = inputs[:4]
        ctx.step = step
        ctx.rest = inputs[4:-1]  # (activation,) or (gamma, activation)
        ctx.stored = inputs[-1]
        ctx.save_for_backward(output[1], weight, bias)

    def _make_backward_one(arch, backward_op):
        def backward(ctx, grad_out, _grad_states):
            states, weight, bias = ctx.saved_tensors
            if not ctx.stored:
                raise _no_states(arch)
            gy, gw, gb = backward_op(grad_out.contiguous(), states, weight, bias, ctx.step, *ctx.rest)
            return (gy, gw, gb) + (None,) * (2 + len(ctx.rest))

        return backward

    torch.library.register_autograd(
        "stablenets::resnet_forward",
        _make_backward_one("resnet", ops.resnet_backward.default),
        setup_context=_setup_one,
    )
    torch.library.register_autograd(
        "stablenets::antisymmetric_forward",
        _make_backward_one("antisymmetric", ops.antisymmetric_backward.default),
        setup_context=_setup_one,
    )

    # leapfrog / verlet: a pair of carried tensors; without stored states the
    # backward runs the integrator in reverse from the final pair.
    def _setup_two(ctx, inputs, output):
        y, other, weight, bias, step, activation, store = inputs
        ctx.step, ctx.activation, ctx.stored = step, activation, store
        if store:
            ctx.save_for_backward(output[2], weight, bias)
        else:
            ctx.save_for_backward(output[0], output[1], weight, bias)

    def _make_backward_two(stored_op, reversible_op):
        def backward(ctx, grad_a, grad_b, _grad_states):
            saved = ctx.saved_tensors
            like = saved[0][0, 0] if ctx.stored else saved[0]  # a (B, d) tensor
            grad_a = _zeros_if_none(grad_a, like).contiguous()
            grad_b = _zeros_if_none(grad_b, like).contiguous()
            if ctx.stored:
                states, weight, bias = saved
                ga, gb_, gw, gbias = stored_op(grad_a, grad_b, states, weight, bias, ctx.step, ctx.activation)
            else:
                ya, yb, weight, bias = saved
                ga, gb_, gw, gbias, _y0, _yb0 = reversible_op(
                    grad_a, grad_b, ya, yb, weight, bias, ctx.step, ctx.activation
                )
            return ga, gb_, gw, gbias, None, None, None

        return backward

    torch.library.register_autograd(
        "stablenets::leapfrog_forward",
        _make_backward_two(ops.leapfrog_backward.default, ops.leapfrog_backward_reversible.default),
        setup_context=_setup_two,
    )
    torch.library.register_autograd(
        "stablenets::verlet_forward",
        _make_backward_two(ops.verlet_backward.default, ops.verlet_backward_reversible.default),
        setup_context=_setup_two,
    )
