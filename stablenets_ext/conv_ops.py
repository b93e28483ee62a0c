"""The compiled convolutional-stack ops: fake kernels and autograd.

``torch.ops.stablenets.conv_{resnet,antisymmetric,leapfrog,verlet}_forward``
run a whole stack (the layer loop in C++, csrc/include/stablenets/conv_stack.h);
the matching ``*_backward`` ops differentiate it from stored states (and
``conv_{leapfrog,verlet}_backward_reversible`` from the final pair alone).
This module gives the dispatcher what it needs from Python: a fake kernel per
op (shapes and checks only, for ``torch.compile`` and ``opcheck``) and the
autograd formulas.

Double backward (``create_graph=True``) is not written in C++: the backward
then recomputes the stack from its (kept) inputs with the differentiable
per-layer reference (:mod:`stablenets_ext.conv`) and differentiates that, with
one warning. The reversible backward compares the initial state it rebuilt
with the true one and warns when reversibility was lost (tolerance and
measure shared with the dense stacks: ``ops.REBUILD_TOLERANCE``,
``ops.rebuild_error``).
"""

from __future__ import annotations

import warnings

import torch

from . import conv_reference
from . import ops as _ops  # loads stablenets_ext._C (the schemas and kernels)

STATE_SLOTS = {"resnet": 2, "antisymmetric": 2, "leapfrog": 2, "verlet": 4}
ARCHS = tuple(STATE_SLOTS)


# Probed once: a plain dict lookup is what torch.compile can trace through.
_KERNELS = _ops.probe_kernels("stablenets::conv_resnet_forward")


def has_kernel(device: torch.device | str) -> bool:
    """Whether fused conv-stack kernels were compiled for this device type."""
    kind = torch.device(device).type
    if kind == "cpu" and _ops.ENV_ERROR is not None:  # a bad STABLENETS_CPU_ISA
        raise _ops.ENV_ERROR
    return _KERNELS.get(kind, False)


_warned_double_backward: list[bool] = []


def _warn_double_backward():
    if not _warned_double_backward:
        _warned_double_backward.append(True)
        warnings.warn(
            "stablenets_ext conv stacks: double backward (create_graph=True) has no fused "
            "kernel; recomputing the stack with the differentiable per-layer reference "
            "(slower, same results)",
            RuntimeWarning,
            stacklevel=3,
        )


if _ops.compiled() and hasattr(torch.ops.stablenets, "conv_resnet_forward"):
    ops = torch.ops.stablenets

    # ---------------------------------------------------------------- fakes

    def _check_stack(y, weight, bias):
        torch._check(y.dim() == 4, lambda: f"y: expected a 4-D tensor (batch, channels, height, width), got shape {tuple(y.shape)}")
        torch._check(
            weight.dim() == 5 and weight.shape[1] == weight.shape[2] and weight.shape[3] == weight.shape[4],
            lambda: f"weight: expected shape (layers, channels, channels, k, k), got {tuple(weight.shape)}",
        )
        torch._check(weight.shape[0] > 0, lambda: "weight: expected at least one layer")
        torch._check(weight.shape[3] % 2 == 1, lambda: f"weight: expected an odd kernel size, got {weight.shape[3]}")
        torch._check(
            weight.shape[1] == y.shape[1],
            lambda: f"weight: expected channels = {y.shape[1]} (from y), got shape {tuple(weight.shape)}",
        )
        torch._check(
            bias.dim() == 2 and bias.shape[0] == weight.shape[0] and bias.shape[1] == weight.shape[1],
            lambda: f"bias: expected shape (layers, channels), got {tuple(bias.shape)}",
        )
        torch._check(y.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16),
                     lambda: f"y: expected float32, float64, bfloat16 or float16, got {y.dtype}")
        torch._check(
            weight.dtype == y.dtype and bias.dtype == y.dtype,
            lambda: f"weight, bias: expected the dtype of y ({y.dtype}), got {weight.dtype} and {bias.dtype}",
        )
        torch._check(
            weight.device == y.device and bias.device == y.device,
            lambda: f"weight, bias: expected the device of y ({y.device})",
        )

    def _check_like(t, name, y):
        torch._check(tuple(t.shape) == tuple(y.shape), lambda: f"{name}: expected shape {tuple(y.shape)}, got {tuple(t.shape)}")
        torch._check(t.dtype == y.dtype and t.device == y.device, lambda: f"{name}: expected dtype {y.dtype} on {y.device}")

    def _check_states(states, arch, grad, weight):
        slots = STATE_SLOTS[arch]
        torch._check(
            states.dim() == 6 and states.shape[1] == slots and tuple(states.shape[2:]) == tuple(grad.shape),
            lambda: f"states: expected shape (layers, {slots}, *{tuple(grad.shape)}), got {tuple(states.shape)}",
        )
        torch._check(states.shape[0] == weight.shape[0], lambda: "states: holds no stored states or does not match weight")

    def _states(y, weight, store, arch):
        layers = weight.shape[0] if store else 0
        return y.new_empty((layers, STATE_SLOTS[arch], *y.shape))

    def _grads(y, weight, bias, n_like_y):
        out = [y.new_empty(y.shape) for _ in range(n_like_y)]
        return (*out, weight.new_empty(weight.shape), bias.new_empty(bias.shape))

    @torch.library.register_fake("stablenets::conv_resnet_forward")
    def _(y, weight, bias, step, activation, store):
        _check_stack(y, weight, bias)
        return y.new_empty(y.shape), _states(y, weight, store, "resnet")

    @torch.library.register_fake("stablenets::conv_resnet_backward")
    def _(grad_out, states, weight, bias, step, activation):
        _check_stack(grad_out, weight, bias)
        _check_states(states, "resnet", grad_out, weight)
        return _grads(grad_out, weight, bias, 1)

    @torch.library.register_fake("stablenets::conv_antisymmetric_forward")
    def _(y, weight, bias, step, gamma, activation, store):
        _check_stack(y, weight, bias)
        return y.new_empty(y.shape), _states(y, weight, store, "antisymmetric")

    @torch.library.register_fake("stablenets::conv_antisymmetric_backward")
    def _(grad_out, states, weight, bias, step, gamma, activation):
        _check_stack(grad_out, weight, bias)
        _check_states(states, "antisymmetric", grad_out, weight)
        return _grads(grad_out, weight, bias, 1)

    def _fake_forward_two(arch, other_name):
        def fake(y, other, weight, bias, step, activation, store):
            _check_stack(y, weight, bias)
            _check_like(other, other_name, y)
            return y.new_empty(y.shape), y.new_empty(y.shape), _states(y, weight, store, arch)

        return fake

    def _fake_backward_two(arch, other_name):
        def fake(grad_y, grad_other, states, weight, bias, step, activation):
            _check_stack(grad_y, weight, bias)
            _check_like(grad_other, f"grad_{other_name}", grad_y)
            _check_states(states, arch, grad_y, weight)
            return _grads(grad_y, weight, bias, 2)

        return fake

    def _fake_backward_reversible(other_name):
        def fake(grad_y, grad_other, y, other, weight, bias, step, activation):
            _check_stack(grad_y, weight, bias)
            _check_like(grad_other, f"grad_{other_name}", grad_y)
            _check_like(y, "y", grad_y)
            _check_like(other, other_name, grad_y)
            return _grads(grad_y, weight, bias, 2) + (y.new_empty(y.shape), y.new_empty(y.shape))

        return fake

    for _arch, _other in (("leapfrog", "y_prev"), ("verlet", "z")):
        torch.library.register_fake(f"stablenets::conv_{_arch}_forward")(_fake_forward_two(_arch, _other))
        torch.library.register_fake(f"stablenets::conv_{_arch}_backward")(_fake_backward_two(_arch, _other))
        torch.library.register_fake(f"stablenets::conv_{_arch}_backward_reversible")(
            _fake_backward_reversible(_other)
        )

    # ------------------------------------------------------------- autograd

    def _zeros(y):
        """A zero gradient like ``y`` without an allocation of its size (the ops read
        gradients in any layout)."""
        return y.new_zeros(()).expand(y.shape)

    def _no_states(arch):
        return RuntimeError(
            f"stablenets::conv_{arch}_forward ran with store=False, so it kept no states for "
            "the backward; call it with store=True when gradients are needed"
        )

    def _reference_grads(ctx, fn, inputs, outputs_fn, cotangents):
        """Differentiable gradients of ``fn(*inputs)`` (double-backward fallback)."""
        _warn_double_backward()
        wanted = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[i]]
        with torch.enable_grad():
            # Views make each slot its own graph node: y may be passed twice (y_prev = y).
            inputs = [t.view_as(t) if t.requires_grad else t for t in inputs]
            outs = outputs_fn(fn(*inputs))
            pairs = [(o, c) for o, c in zip(outs, cotangents) if c is not None]
            got = torch.autograd.grad(
                [o for o, _ in pairs], [inputs[i] for i in wanted], [c for _, c in pairs],
                create_graph=True, allow_unused=True,
            )
        grads = [None] * len(inputs)
        for i, g in zip(wanted, got):
            grads[i] = torch.zeros_like(inputs[i]) if g is None else g
        return grads

    # The states output is for the backward only: marked non-differentiable and
    # with grads not materialised, autograd does not zero-fill a gradient of
    # the size of all states (which cost as much as a convolution per layer).

    # resnet / antisymmetric: one carried tensor.
    def _setup_one(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)
        y, weight, bias, step = inputs[:4]
        ctx.step = step
        ctx.rest = inputs[4:-1]  # (activation,) or (gamma, activation)
        ctx.stored = inputs[-1]
        ctx.save_for_backward(output[1], weight, bias, y)

    def _make_backward_one(arch, backward_op):
        def backward(ctx, grad_out, _grad_states):
            states, weight, bias, y = ctx.saved_tensors
            if not ctx.stored:
                raise _no_states(arch)
            if grad_out is None:
                grad_out = _zeros(y)
            if torch.is_grad_enabled():
                ref = conv_reference.REFERENCE[arch]
                if arch == "antisymmetric":
                    gamma, act = ctx.rest

                    def fn(y, w, b):
                        return ref(y, w, b, ctx.step, act, gamma)
                else:
                    (act,) = ctx.rest

                    def fn(y, w, b):
                        return ref(y, w, b, ctx.step, act)

                g = _reference_grads(ctx, fn, (y, weight, bias), lambda o: (o,), (grad_out,))
                return (*g, *(None,) * (2 + len(ctx.rest)))
            # any layout: the op reads the gradient as it is (converting it once to the
            # layout it runs in), so a broadcast one (from .sum()) is not materialised
            gy, gw, gb = backward_op(grad_out, states, weight, bias, ctx.step, *ctx.rest)
            return (gy, gw, gb) + (None,) * (2 + len(ctx.rest))

        return backward

    torch.library.register_autograd(
        "stablenets::conv_resnet_forward",
        _make_backward_one("resnet", ops.conv_resnet_backward.default),
        setup_context=_setup_one,
    )
    torch.library.register_autograd(
        "stablenets::conv_antisymmetric_forward",
        _make_backward_one("antisymmetric", ops.conv_antisymmetric_backward.default),
        setup_context=_setup_one,
    )

    # leapfrog / verlet: a pair of carried tensors; without stored states the
    # backward runs the integrator in reverse from the final pair. The inputs
    # are kept in both modes (references, not copies; flat in depth): for the
    # double-backward fallback and, in reversible mode, to check the rebuilt
    # initial state against them.
    def _setup_two(ctx, inputs, output):
        ctx.mark_non_differentiable(output[2])
        ctx.set_materialize_grads(False)
        y, other, weight, bias, step, activation, store = inputs
        ctx.step, ctx.activation, ctx.stored = step, activation, store
        if store:
            ctx.save_for_backward(y, other, weight, bias, output[2])
        else:
            ctx.save_for_backward(y, other, weight, bias, output[0], output[1])

    def _eager(t) -> bool:
        """Plain eager tensors (not traced, not fake, not under CUDA graph capture):
        only then may the backward read a number back from the device."""
        if torch.compiler.is_compiling() or type(t) is not torch.Tensor:
            return False
        return not (t.is_cuda and torch.cuda.is_current_stream_capturing())

    def _check_rebuilt(arch, rebuilt, seen):
        tol = _ops.REBUILD_TOLERANCE[seen[0].dtype]
        err = _ops.rebuild_error(rebuilt, seen)
        if err > tol:
            warnings.warn(
                f"stablenets conv_{arch} reversible backward: the initial state rebuilt by running "
                f"the stack in reverse is off by a relative error of {err:.1e} (> {tol:.1e}), so "
                "reversibility was lost (step too large, weights unstable, or too deep for the "
                "dtype) and the gradients are inaccurate. Use reversible=False to differentiate "
                "with stored states.",
                UserWarning,
                stacklevel=2,
            )

    def _make_backward_two(arch, stored_op, reversible_op):
        def backward(ctx, grad_a, grad_b, _grad_states):
            y, other, weight, bias, *kept = ctx.saved_tensors
            if torch.is_grad_enabled():
                ref = conv_reference.REFERENCE[arch]

                def fn(y, other, w, b):
                    return ref(y, w, b, ctx.step, ctx.activation, other, return_state=True)

                g = _reference_grads(ctx, fn, (y, other, weight, bias), tuple, (grad_a, grad_b))
                return (*g, None, None, None)
            if y.numel() == 0:  # batch 0: no example, no gradient (the op keeps no states)
                return (torch.zeros_like(y), torch.zeros_like(other), torch.zeros_like(weight),
                        torch.zeros_like(bias), None, None, None)
            grad_a = _zeros(y) if grad_a is None else grad_a
            grad_b = _zeros(y) if grad_b is None else grad_b
            if ctx.stored:
                (states,) = kept
                out = stored_op(grad_a, grad_b, states, weight, bias, ctx.step, ctx.activation)
            else:
                ya, yb = kept
                out = reversible_op(grad_a, grad_b, ya, yb, weight, bias, ctx.step, ctx.activation)
                if _eager(ya):
                    _check_rebuilt(arch, out[4:], (y, other))
                out = out[:4]
            return (*out, None, None, None)

        return backward

    torch.library.register_autograd(
        "stablenets::conv_leapfrog_forward",
        _make_backward_two("leapfrog", ops.conv_leapfrog_backward.default,
                           ops.conv_leapfrog_backward_reversible.default),
        setup_context=_setup_two,
    )
    torch.library.register_autograd(
        "stablenets::conv_verlet_forward",
        _make_backward_two("verlet", ops.conv_verlet_backward.default,
                           ops.conv_verlet_backward_reversible.default),
        setup_context=_setup_two,
    )
