"""The compiled convolutional-stack ops: fake kernels.

``torch.ops.stablenets.conv_{resnet,antisymmetric,leapfrog,verlet}_forward``
run a whole stack (the layer loop in C++, csrc/include/stablenets/conv_stack.h);
the matching ``*_backward`` ops differentiate it from stored states (and
``conv_{leapfrog,verlet}_backward_reversible`` from the final pair alone).
This module gives the dispatcher what it needs from Python: a fake kernel per
op (shapes and checks only, for ``torch.compile`` and ``opcheck``).

The autograd formulas are the dense stacks' C++ ones (csrc/autograd.cpp), which
serve the conv ops too. Double backward (``create_graph=True``) has no fused
formula: the backward then recomputes the stack from its (kept) inputs with the
differentiable per-layer reference (:mod:`stablenets_ext.conv_reference`, through
``ops._reference_vjp``) and differentiates that, with one warning. The
reversible backward compares the initial state it rebuilt with the true one and
warns when reversibility was lost (tolerance and measure shared with the dense
stacks: ``ops.REBUILD_TOLERANCE``).
"""

from __future__ import annotations

import torch

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
            _ops.params_dtype_ok(y, weight, bias),
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
