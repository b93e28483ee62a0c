"""Error of the stacks under bfloat16 autocast, against PyTorch's own, over many draws.

For each arch (and leapfrog/Verlet reversible), ``--draws`` times: a float64 stack on random
weights and a bf16-valued input is the exact answer; the fused stack and the per-layer
reference (plain PyTorch) run the same float32 parameters under
``torch.autocast("cpu", dtype=torch.bfloat16)``; the ratio fused error / PyTorch error is
taken for the output and the input, weight and bias gradients (the relative 2-norm error, a
fixed non-uniform cotangent). Prints the worst and the median ratio per case: issue 20's
target is at most 1 (``python_tests/test_amp.py`` checks one draw per case, with slack).

    python benchmarks/amp_error.py --draws 30 [--kind conv|dense] [--features 16]

``--kind conv`` (default): conv stacks on (8, 4, 7, 7) inputs; ``--kind dense``: dense
stacks on (32, features) inputs (features <= 32: the CPU's narrow tile kernels; more:
the wide path, whose GEMMs run in bfloat16). Both with 6 layers.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import stablenets_ext as sn
from stablenets_ext import conv

CONV = {"resnet": conv.ConvResNetStack, "antisymmetric": conv.ConvAntisymmetricStack,
        "leapfrog": conv.ConvLeapfrogStack, "verlet": conv.ConvVerletStack}
DENSE = {"resnet": sn.ResNetStack, "antisymmetric": sn.AntisymmetricStack,
         "leapfrog": sn.LeapfrogStack, "verlet": sn.VerletStack}
CASES = [(a, False) for a in CONV] + [("leapfrog", True), ("verlet", True)]
NAMES = ("output", "grad y", "grad weight", "grad bias")


def stack(arch, reversible, impl, kind="conv", units=4, layers=6):
    kw = {"impl": impl}
    if arch in ("leapfrog", "verlet") and impl == "fused":
        kw["reversible"] = reversible  # the per-layer reference stores every state
    return (CONV if kind == "conv" else DENSE)[arch](units, layers, **kw)


def outputs_and_grads(m, y):
    y = y.detach().clone().requires_grad_()
    out = m(y)
    out.float().backward(torch.ones_like(out, dtype=torch.float32).cos())
    return [out, y.grad, m.weight.grad, m.bias.grad]


def rel(a, ref):
    return (a.double() - ref).norm().item() / max(ref.norm().item(), 1e-30)


def ratios(arch, reversible, seed, kind="conv", features=16):
    torch.manual_seed(seed)
    units = 4 if kind == "conv" else features
    m64 = stack(arch, False, "reference", kind, units).double()
    y = (torch.randn(8, 4, 7, 7) if kind == "conv" else torch.randn(32, features)).bfloat16()
    exact = outputs_and_grads(m64, y.double())
    errs = {}
    for impl in ("fused", "reference"):
        m = stack(arch, reversible, impl, kind, units)
        m.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = outputs_and_grads(m, y)
        errs[impl] = [rel(a, e) for a, e in zip(got, exact)]
    return [f / p for f, p in zip(errs["fused"], errs["reference"])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=30)
    p.add_argument("--kind", choices=("conv", "dense"), default="conv")
    p.add_argument("--features", type=int, default=16, help="of the dense stacks")
    args = p.parse_args(argv)
    if args.features < 1:
        p.error(f"--features: expected a positive integer, got {args.features}")
    shape = (8, 4, 7, 7) if args.kind == "conv" else (32, args.features)
    print(f"# {args.kind} stacks {shape}, 6 layers, bf16 autocast on the CPU, {args.draws} draws: "
          "fused error / PyTorch autocast error")
    print(f"{'arch':14s} {'mode':10s} | " + " ".join(f"{n:>11s}" for n in NAMES)
          + " | " + " ".join(f"{n:>11s}" for n in NAMES))
    print(f"{'':25s} | {'worst':^47s} | {'median':^47s}")
    for arch, reversible in CASES:
        r = [ratios(arch, reversible, seed, args.kind, args.features) for seed in range(args.draws)]
        worst = [max(x[i] for x in r) for i in range(4)]
        med = [statistics.median(x[i] for x in r) for i in range(4)]
        mode = "reversible" if reversible else "stored"
        print(f"{arch:14s} {mode:10s} | " + " ".join(f"{v:11.2f}" for v in worst) + " | "
              + " ".join(f"{v:11.2f}" for v in med))


if __name__ == "__main__":
    main()
