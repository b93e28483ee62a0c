"""Mixed precision on the CPU: the stacks in bfloat16 against our own float32 fused op.

    python benchmarks/bench_amp.py [--archs resnet,verlet] [--shapes wide,narrow,conv]
                                   [--reps 11] [--rounds 5]

Issue 20's speed targets, forward+backward (module call, loss, backward; the whole
training step of the stack), medians from one run:
  dense (256, 784, 16)            bf16 >= 1.6x faster than float32
  dense (1024, 4, 64)             bf16 no slower than float32
  conv  (64, 16, 28, 28, 32)      under bf16 autocast >= 1.3x faster than float32
(dense shapes are (batch, features, layers); conv (batch, channels, height, width, layers)).

Columns: f32 (parameters and inputs float32), bf16 autocast (float32 parameters, the step
under torch.autocast("cpu", bfloat16), as a training loop runs), bf16 cast (the module
and inputs cast with .bfloat16()), and the ratios f32 / bf16 (above 1: bf16 is faster).
"""

from __future__ import annotations

import argparse
import platform

import torch
from compare import round_medians  # benchmarks/ is on sys.path when run as a script

import stablenets_ext as sn
from stablenets_ext import conv, ops

DENSE = {"resnet": sn.ResNetStack, "antisymmetric": sn.AntisymmetricStack,
         "leapfrog": sn.LeapfrogStack, "verlet": sn.VerletStack}
CONV = {"resnet": conv.ConvResNetStack, "antisymmetric": conv.ConvAntisymmetricStack,
        "leapfrog": conv.ConvLeapfrogStack, "verlet": conv.ConvVerletStack}
SHAPES = {"wide": ("dense", (256, 784, 16)), "narrow": ("dense", (1024, 4, 64)),
          "conv": ("conv", (64, 16, 28, 28, 32))}


def step_fn(module, x, autocast_dtype=None):
    x = x.detach().requires_grad_()

    def run():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        if autocast_dtype is None:
            out = module(x)
        else:
            with torch.autocast("cpu", dtype=autocast_dtype):
                out = module(x)
        out.float().square().mean().backward()

    return run


def cases(kind, shape, arch):
    g = torch.Generator().manual_seed(0)
    if kind == "dense":
        B, d, N = shape
        m = DENSE[arch](d, N, impl="fused")
        x = torch.randn(B, d, generator=g)
    else:
        B, C, H, W, N = shape
        m = CONV[arch](C, N, impl="fused")
        x = torch.randn(B, C, H, W, generator=g)
    mb = DENSE[arch](*(shape[1:2] + shape[2:3]), impl="fused") if kind == "dense" else \
        CONV[arch](shape[1], shape[-1], impl="fused")
    mb.load_state_dict(m.state_dict())
    mb = mb.bfloat16()
    return {
        "f32": step_fn(m, x),
        "bf16 autocast": step_fn(m, x, torch.bfloat16),
        "bf16 cast": step_fn(mb, x.bfloat16()),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="resnet,verlet")
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma-separated, from {', '.join(f'{k} {v[0]}{v[1]}' for k, v in SHAPES.items())}")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    shapes = [x.strip() for x in args.shapes.split(",") if x.strip()]
    bad = [x for x in shapes if x not in SHAPES]
    if bad or not shapes:
        p.error(f"--shapes: expected a comma-separated list of {list(SHAPES)}, got {args.shapes!r}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, CPU kernels: {ops.CPU_ISA}")
    print(f"{'shape':>22} {'arch':>13} {'f32 ms':>9} {'ac ms':>9} {'cast ms':>9} "
          f"{'f32/ac':>7} {'f32/cast':>8}")
    for kind, shape in (SHAPES[x] for x in shapes):
        for arch in args.archs.split(","):
            t = round_medians(cases(kind, shape, arch), torch.device("cpu"), args.reps, args.rounds)
            f, a, c = t["f32"], t["bf16 autocast"], t["bf16 cast"]
            print(f"{kind + str(shape):>22} {arch:>13} {f:9.2f} {a:9.2f} {c:9.2f} "
                  f"{f / a:7.2f} {f / c:8.2f}")


if __name__ == "__main__":
    main()
