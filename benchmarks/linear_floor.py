"""The floor of a module call: a one-layer stack against a plain nn.Linear, forward+backward.

    python benchmarks/linear_floor.py [--threads 1] [--batch 2] [--features 4] [--rounds 2]

Times ``module(y).sum().backward()`` (gradients reset to None first) for
``ResNetStack(features, 1)`` and ``nn.Linear(features, features)`` on a tiny batch, in the same
process, medians of 9 x 3000 steps: at this size the kernels cost almost nothing, so both times
are what PyTorch's module call, autograd graph and engine cost (issue 22's fixed overhead).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import stablenets_ext as sn


def median_us(fn, steps=3000, repeats=9, warmup=300):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - t0) / steps * 1e6)
    return statistics.median(times)


def step(module, y):
    def run():
        for p in module.parameters():
            p.grad = None
        module(y).sum().backward()

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--features", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    y = torch.randn(args.batch, args.features)
    stack, linear = sn.ResNetStack(args.features, 1), torch.nn.Linear(args.features, args.features)
    print(f"# {args.threads} thread(s), batch {args.batch}, features {args.features}")
    for _ in range(args.rounds):
        s, lin = median_us(step(stack, y)), median_us(step(linear, y))
        print(f"ResNetStack({args.features}, 1) f+b {s:.1f} us, nn.Linear f+b {lin:.1f} us, "
              f"difference {s - lin:.1f} us")


if __name__ == "__main__":
    main()
