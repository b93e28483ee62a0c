"""Error of the conv stacks under bfloat16 autocast, against PyTorch's own, over many draws.

For each arch (and leapfrog/Verlet reversible), ``--draws`` times: a float64 stack on random
weights and a bf16-valued input is the exact answer; the fused stack and the per-layer
reference (plain PyTorch) run the same float32 parameters under
``torch.autocast("cpu", dtype=torch.bfloat16)``; the ratio fused error / PyTorch error is
taken for the output and the input, weight and bias gradients (the relative 2-norm error, a
fixed non-uniform cotangent). Prints the worst and the median ratio per case: issue 20's
target is at most 1 (``python_tests/test_amp.py`` checks one draw per case, with slack).

    python benchmarks/amp_error.py --draws 30
"""

from __future__ import annotations

import argparse
import statistics

import torch

from stablenets_ext import conv

CONV = {"resnet": conv.ConvResNetStack, "antisymmetric": conv.ConvAntisymmetricStack,
        "leapfrog": conv.ConvLeapfrogStack, "verlet": conv.ConvVerletStack}
CASES = [(a, False) for a in CONV] + [("leapfrog", True), ("verlet", True)]
NAMES = ("output", "grad y", "grad weight", "grad bias")


def stack(arch, reversible, impl, channels=4, layers=6):
    kw = {"impl": impl}
    if arch in ("leapfrog", "verlet") and impl == "fused":
        kw["reversible"] = reversible  # the per-layer reference stores every state
    return CONV[arch](channels, layers, **kw)


def outputs_and_grads(m, y):
    y = y.detach().clone().requires_grad_()
    out = m(y)
    out.float().backward(torch.ones_like(out, dtype=torch.float32).cos())
    return [out, y.grad, m.weight.grad, m.bias.grad]


def rel(a, ref):
    return (a.double() - ref).norm().item() / max(ref.norm().item(), 1e-30)


def ratios(arch, reversible, seed):
    torch.manual_seed(seed)
    m64 = stack(arch, False, "reference").double()
    y = torch.randn(8, 4, 7, 7).bfloat16()
    exact = outputs_and_grads(m64, y.double())
    errs = {}
    for impl in ("fused", "reference"):
        m = stack(arch, reversible, impl)
        m.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = outputs_and_grads(m, y)
        errs[impl] = [rel(a, e) for a, e in zip(got, exact)]
    return [f / p for f, p in zip(errs["fused"], errs["reference"])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=30)
    args = p.parse_args(argv)
    print(f"# conv stacks (8, 4, 7, 7), 6 layers, bf16 autocast on the CPU, {args.draws} draws: "
          "fused error / PyTorch autocast error")
    print(f"{'arch':14s} {'mode':10s} | " + " ".join(f"{n:>11s}" for n in NAMES)
          + " | " + " ".join(f"{n:>11s}" for n in NAMES))
    print(f"{'':25s} | {'worst':^47s} | {'median':^47s}")
    for arch, reversible in CASES:
        r = [ratios(arch, reversible, seed) for seed in range(args.draws)]
        worst = [max(x[i] for x in r) for i in range(4)]
        med = [statistics.median(x[i] for x in r) for i in range(4)]
        mode = "reversible" if reversible else "stored"
        print(f"{arch:14s} {mode:10s} | " + " ".join(f"{v:11.2f}" for v in worst) + " | "
              + " ".join(f"{v:11.2f}" for v in med))


if __name__ == "__main__":
    main()
