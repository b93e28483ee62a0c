"""What a backward costs against its forward: the raw fused ops alone, no autograd.

    python benchmarks/bwd_ratio.py [--shapes 1024x4x64] [--archs ...] [--reps 101] [--rounds 5]

For every shape (B x d x N) and architecture, float32, tanh, step 0.1, on the CPU:
  fwd        the forward op without states (inference, and the reversible mode's forward)
  fwd+st     the forward op keeping the states the stored backward reads (training)
  bwd        the stored backward op
  rev bwd    the reversible backward op (leapfrog and Verlet): it rebuilds the states from
             the outputs on its way down, so it redoes the forward's products
and the ratios bwd / fwd+st, bwd / fwd and rev bwd / fwd. Issue 15 asks for a stored backward of at
most 2x the forward and a reversible one of at most 3x.

Each round times every case --reps times in turn (interleaved), so a slow spell of the machine
hits all cases alike; a case's time is the median over rounds of its per-round median (ms).
"""

from __future__ import annotations

import argparse
import platform

import torch
from compare import round_medians  # benchmarks/ is on sys.path when run as a script

import stablenets_ext as sn
from stablenets_ext import ops

ARCHS = ["resnet", "antisymmetric", "leapfrog", "verlet"]
STEP, GAMMA = 0.1, 0.01


def cases(arch, B, d, N):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(B, d, generator=g)
    w = torch.randn(N, d, d, generator=g) / d**0.5
    b = 0.1 * torch.randn(N, d, generator=g)
    R = torch.ops.stablenets
    if arch in ("resnet", "antisymmetric"):
        extra = (GAMMA,) if arch == "antisymmetric" else ()
        fop, bop = getattr(R, arch + "_forward"), getattr(R, arch + "_backward")
        out = fop(y, w, b, STEP, *extra, "tanh", True)
        return {"fwd": lambda: fop(y, w, b, STEP, *extra, "tanh", False),
                "fwd+st": lambda: fop(y, w, b, STEP, *extra, "tanh", True),
                "bwd": lambda: bop(out[0], out[1], w, b, STEP, *extra, "tanh")}
    second = y.clone() if arch == "leapfrog" else torch.zeros_like(y)
    fop, bop = getattr(R, arch + "_forward"), getattr(R, arch + "_backward")
    rop = getattr(R, arch + "_backward_reversible")
    out = fop(y, second, w, b, STEP, "tanh", True)
    return {"fwd": lambda: fop(y, second, w, b, STEP, "tanh", False),
            "fwd+st": lambda: fop(y, second, w, b, STEP, "tanh", True),
            "bwd": lambda: bop(out[0], out[1], out[2], w, b, STEP, "tanh"),
            "rev bwd": lambda: rop(out[0], out[1], out[0], out[1], w, b, STEP, "tanh")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1024x4x64")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--reps", type=int, default=101)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    print(f"# stablenets-ext {sn.__version__}, torch {torch.__version__}, {platform.machine()}, cpu kernels "
          f"{ops.CPU_ISA}, {torch.get_num_threads()} threads, float32, tanh, {args.rounds} rounds x "
          f"{args.reps} reps, ms")
    head = (f"{'arch':14s} {'B x d x N':>11s} | {'fwd':>7s} {'fwd+st':>7s} {'bwd':>7s} {'rev bwd':>7s} | "
            f"{'bwd/fwd+st':>10s} {'bwd/fwd':>7s} {'rev/fwd':>7s}")
    print(head)
    print("-" * len(head))
    for shape in args.shapes.split(","):
        B, d, N = (int(v) for v in shape.split("x"))
        for arch in args.archs.split(","):
            with torch.no_grad():
                m = round_medians(cases(arch, B, d, N), torch.device("cpu"), args.reps, args.rounds)
            rev = m.get("rev bwd")
            rev_s = f"{rev:7.3f}" if rev else f"{'-':>7s}"
            rev_r = f"{rev / m['fwd']:6.2f}x" if rev else f"{'-':>7s}"
            print(f"{arch:14s} {shape:>11s} | {m['fwd']:7.3f} {m['fwd+st']:7.3f} {m['bwd']:7.3f} {rev_s} | "
                  f"{m['bwd'] / m['fwd+st']:9.2f}x {m['bwd'] / m['fwd']:6.2f}x {rev_r}", flush=True)


if __name__ == "__main__":
    main()
