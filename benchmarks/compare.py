"""Fused kernels against plain PyTorch, one table of medians and ratios.

    python benchmarks/compare.py [--shapes 1024x4x64,256x784x16] [--archs ...] [--reps R] [--rounds 3] [--no-compile]

For every shape (B x d x N) and architecture, float32, on the CPU (or --device):
  fused      the package's op (one call for the whole stack)
  eager      stablenets_ext.reference: a per-layer PyTorch loop over weight[j]
  compiled   torch.compile of that loop (fwd+bwd only; skipped with --no-compile)
  bare mm    the N matrix products alone (2N for leapfrog and Verlet), the floor
Each time is the median over --rounds rounds of the per-round median of --reps
back-to-back calls, all measured in this one run; the rounds visit the cases in
turn, so the ratios compare like with like on a noisy machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import stablenets_ext as sn
from stablenets_ext import functional as SF
from stablenets_ext import reference

ARCHS = ["resnet", "antisymmetric", "leapfrog", "verlet"]
GEMMS_PER_LAYER = {"resnet": 1, "antisymmetric": 1, "leapfrog": 2, "verlet": 2}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def round_medians(cases, device, reps, rounds, warmup=3):
    """Milliseconds of each case: the median over `rounds` of its per-round median of `reps`
    back-to-back calls. Rounds visit the cases in turn, so a slow spell of a shared machine
    lands on all of them; within a round a case runs back to back, as a training loop calls it
    (interleaving single calls of the fused ops with the eager loop's thousands of small
    allocations measured the allocator's state more than the ops)."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    sync(device)
    per_round = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - t0)
            per_round[name].append(statistics.median(times))
    return {name: 1e3 * statistics.median(v) for name, v in per_round.items()}


def inputs(B, d, N, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, d, generator=g).to(device)
    w = (torch.randn(N, d, d, generator=g) / d**0.5).to(device).requires_grad_()
    b = (0.1 * torch.randn(N, d, generator=g)).to(device).requires_grad_()
    return y, w, b


def bench_one(arch, B, d, N, device, reps, rounds, compile_):
    y, w, b = inputs(B, d, N, device)
    fused = lambda *a: SF.FUNCTIONS[arch](*a, 0.1, "tanh", impl="fused")  # noqa: E731
    eager = lambda *a: reference.FUNCTIONS[arch](*a, 0.1, "tanh")  # noqa: E731

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn(y, w, b)
        return run

    def fwd_bwd(fn):
        def run():
            w.grad = b.grad = None
            fn(y, w, b).sum().backward()
        return run

    wd = w.detach()
    k = GEMMS_PER_LAYER[arch]

    def bare():
        with torch.no_grad():
            for j in range(N):
                for _ in range(k):
                    torch.mm(y, wd[j].t())

    cases = {"fused_fwd": fwd(fused), "eager_fwd": fwd(eager), "bare_mm": bare,
             "fused_fb": fwd_bwd(fused), "eager_fb": fwd_bwd(eager)}
    if compile_:
        torch._dynamo.reset()
        cases["compiled_fb"] = fwd_bwd(torch.compile(eager))
    return round_medians(cases, device, reps, rounds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1024x4x64,256x784x16")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=0, help="repetitions (default: 31 small, 7 large)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    print(f"# stablenets-ext {sn.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, device {device}, float32, tanh, step 0.1")
    header = (f"{'arch':14s} {'B x d x N':>13s} | {'fwd fused':>9s} {'eager':>8s} {'x':>6s} {'bare mm':>8s} "
              f"{'fused/mm':>8s} | {'f+b fused':>9s} {'eager':>8s} {'x':>6s} {'compiled':>8s} {'x':>6s}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes.split(","):
        B, d, N = (int(v) for v in shape.split("x"))
        reps = args.reps or (31 if B * d * d * N < 5e7 else 7)
        for arch in args.archs.split(","):
            r = bench_one(arch, B, d, N, device, reps, args.rounds, not args.no_compile)
            comp = r.get("compiled_fb")
            comp_s = f"{comp:8.3f} {comp / r['fused_fb']:5.2f}x" if comp else f"{'-':>8s} {'-':>6s}"
            print(f"{arch:14s} {shape:>13s} | {r['fused_fwd']:9.3f} {r['eager_fwd']:8.3f} "
                  f"{r['eager_fwd'] / r['fused_fwd']:5.1f}x {r['bare_mm']:8.3f} {r['fused_fwd'] / r['bare_mm']:7.2f}x | "
                  f"{r['fused_fb']:9.3f} {r['eager_fb']:8.3f} {r['eager_fb'] / r['fused_fb']:5.1f}x {comp_s}",
                  flush=True)
    print("times in ms (median); x = baseline / fused; fused/mm = fused forward / bare matrix products")


if __name__ == "__main__":
    main()
