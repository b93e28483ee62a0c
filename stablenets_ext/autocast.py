"""``torch.autocast`` for every stablenets op: the policy, for the Python dispatcher.

Under ``torch.autocast(device_type, dtype=...)`` each op (dense and conv, forward
and backward, stored and reversible) runs with autocast off after its floating
tensor arguments are cast:

- forward ops: to the autocast dtype ("lower precision" policy), so the stacks
  take what the layers before them hand over (an ``nn.Linear`` under autocast
  returns bfloat16 from float32 inputs) and return the autocast dtype, as
  ``nn.Linear`` and ``nn.Conv2d`` do;
- backward ops: to the widest dtype among them ("promote" policy; nothing is
  cast when they agree, as they do when autograd calls them), so a
  ``loss.backward()`` run inside the autocast region differentiates in the
  precision the forward ran in;
- on the CPU every op leaves ``weight`` and ``bias`` in float32 (forward and
  backward: a backward promotes its other tensors among themselves). The op returns
  float32 parameter gradients, each rounded once (the narrow dense stacks read the
  parameters as float32 and sum their gradients in float32; the wide ones cast the
  weight for their bfloat16 GEMMs and sum the bias gradient in float32; the conv ops
  cast the kernels while laying them out for oneDNN), where autocast's cast
  parameters would get a bfloat16 gradient per use, summed in bfloat16; and a
  training step makes no cast op of them, nor of their gradients.

float64 tensors are left alone, as autocast leaves them (a float64 stack under
autocast then refuses the cast parameters by name, as ``F.linear`` would).

The kernels of bfloat16/float16 calls compute in float32 and store in the
reduced dtype (csrc/include/stablenets/reduced_precision.h). One case runs in
float32 outright: a reversible forward (leapfrog or Verlet forward with
``store=False`` while gradients are wanted), whose final pair is what the
backward rebuilds every state from; it is kept in float32 and only the
returned pair is cast.

Eager calls run this policy in C++ (csrc/autocast.cpp: AutocastCPU and
AutocastCUDA kernels registered with ``TORCH_LIBRARY_IMPL``, no Python per
call). ``torch.compile`` and ``torch.export`` trace with the Python dispatcher,
which takes the Python kernels registered here with ``OpOverload.py_impl`` for
the same keys; python_tests/test_amp.py checks that both agree.
"""

from __future__ import annotations

import torch

DEVICE_TYPES = ("cpu", "cuda")

# Forward ops carrying a pair, whose store=False forward is the reversible one.
PAIR_FORWARDS = ("leapfrog_forward", "verlet_forward", "conv_leapfrog_forward",
                 "conv_verlet_forward")


def _autocast_eligible(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64


# Tensors at least this large (the CPU kernels' block cache's smallest block) are
# cast on the CPU with stablenets::cpu_cast, which writes into that cache and casts
# the gradient back the same way: with .to() a training step's weight cast and its
# float32 gradient were fresh blocks page-faulted in every step (csrc/cpu/block_cache.cpp).
_CACHED_CAST_MIN_BYTES = 1 << 20


def _cast_one(a, dtype):
    if (a.device.type == "cpu" and a.numel() * dtype.itemsize >= _CACHED_CAST_MIN_BYTES
            and hasattr(torch.ops.stablenets, "cpu_cast")):
        return torch.ops.stablenets.cpu_cast(a, dtype)
    return a.to(dtype)


def _cast(args, dtype, keep=frozenset()):
    return tuple(_cast_one(a, dtype) if i not in keep and _autocast_eligible(a) and a.dtype != dtype
                 else a for i, a in enumerate(args))


def _param_positions(name, op, device_type):
    """Positions of ``weight`` and ``bias`` where the op takes them in float32 under
    autocast, uncast: every op on the CPU (csrc/autocast.cpp); else none."""
    if device_type != "cpu":
        return frozenset()
    return frozenset(i for i, a in enumerate(op._schema.arguments) if a.name in ("weight", "bias"))


def _register_cpu_cast(lib) -> None:
    """Fake kernel and autograd of stablenets::cpu_cast (the gradient cast back, cached too)."""
    if not hasattr(torch.ops.stablenets, "cpu_cast"):
        return

    def fake(x, dtype):
        return torch.empty(x.shape, dtype=dtype, device=x.device)

    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    def backward(ctx, grad):
        return torch.ops.stablenets.cpu_cast(grad, ctx.dtype), None

    torch.library.register_fake("stablenets::cpu_cast", fake, lib=lib)
    torch.library.register_autograd("stablenets::cpu_cast", backward, setup_context=setup_context,
                                    lib=lib)


def _reversible_with_grad(name, args) -> bool:
    return (name in PAIR_FORWARDS and args[-1] is False and torch.is_grad_enabled()
            and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args))


def _widest(args, keep=frozenset()):
    dtypes = [a.dtype for i, a in enumerate(args) if i not in keep and _autocast_eligible(a)]
    return max(dtypes, key=lambda t: torch.finfo(t).bits) if dtypes else None


def _make_kernel(name, op, device_type):
    params = _param_positions(name, op, device_type)
    if not name.endswith("_forward"):
        def backward_kernel(*args):
            dtype = _widest(args, params)
            keep = params if dtype != torch.float32 else frozenset()
            with torch.autocast(device_type, enabled=False):
                return op(*_cast(args, dtype, keep))

        return backward_kernel

    def kernel(*args):
        dtype = torch.get_autocast_dtype(device_type)
        if _reversible_with_grad(name, args):
            with torch.autocast(device_type, enabled=False):
                out = op(*_cast(args, torch.float32))
            return tuple(o.to(dtype) if _autocast_eligible(o) else o for o in out)
        with torch.autocast(device_type, enabled=False):
            return op(*_cast(args, dtype, params))

    return kernel


def register(lib: torch.library.Library, names) -> None:
    """Give each op ``stablenets::<name>`` in ``names`` its autocast kernels for the Python
    dispatcher (the C++ ones, csrc/autocast.cpp, serve eager calls), and
    stablenets::cpu_cast its fake kernel and autograd, in ``lib``."""
    _register_cpu_cast(lib)
    for name in names:
        op = getattr(torch.ops.stablenets, name).default
        for device_type in DEVICE_TYPES:
            if not torch.amp.is_autocast_available(device_type):
                continue
            key = "AutocastCUDA" if device_type == "cuda" else "AutocastCPU"
            dispatch_key = getattr(torch._C.DispatchKey, key)
            op.py_kernels.pop(dispatch_key, None)
            op.py_impl(dispatch_key)(_make_kernel(name, op, device_type))


def op_names() -> list[str]:
    """Every op of the stablenets library this build has (dense and conv, forward and backward)."""
    names = []
    for prefix in ("", "conv_"):
        for arch in ("resnet", "antisymmetric", "leapfrog", "verlet"):
            names += [f"{prefix}{arch}_forward", f"{prefix}{arch}_backward"]
            if arch in ("leapfrog", "verlet"):
                names.append(f"{prefix}{arch}_backward_reversible")
    return [name for name in names if hasattr(torch.ops.stablenets, name)]
