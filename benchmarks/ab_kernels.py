"""A/B timing of the fused CPU kernels of two builds of this package, in one run.

    python benchmarks/ab_kernels.py OLD_TREE NEW_TREE [--rounds 7] [--shape 1024x4x64]

Each tree is a checkout with its extension built in place. The two builds
register the same op names, so they cannot share a process: each round runs
one short subprocess per tree, alternating (old, new, old, new, ...), and the
table gives the median over rounds of each tree's per-round median. The ratio
new/old compares like with like on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, statistics, torch
torch.set_num_threads(int(sys.argv[1]))
B, d, N = map(int, sys.argv[2].split("x"))
from stablenets_ext import functional as F
res = {}
for arch in sys.argv[3].split(","):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(B, d, generator=g)
    W = (torch.randn(N, d, d, generator=g) / d**0.5).requires_grad_()
    b = torch.zeros(N, d, requires_grad=True)
    f = getattr(F, arch)
    def fwd():
        with torch.no_grad():
            f(y, W, b, 0.1, "tanh", impl="fused")
    def fwdbwd():
        out = f(y, W, b, 0.1, "tanh", impl="fused")
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    for name, fn in (("fwd", fwd), ("fwd+bwd", fwdbwd)):
        for _ in range(5):
            fn()
        ts = []
        for _ in range(int(sys.argv[4])):
            t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
        res[f"{arch} {name}"] = statistics.median(ts) * 1e3
print(json.dumps(res))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", default="1024x4x64")
    ap.add_argument("--archs", default="leapfrog")
    args = ap.parse_args()
    runs = {"old": [], "new": []}
    for _ in range(args.rounds):
        for key in ("old", "new"):
            tree = os.path.abspath(getattr(args, key))
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), args.shape, args.archs,
                                  str(args.reps)], env=env, cwd=tree, capture_output=True, text=True,
                                 check=True).stdout
            runs[key].append(json.loads(out.strip().splitlines()[-1]))
    print(f"shape {args.shape}, float32, {args.threads} threads, {args.rounds} alternating rounds "
          f"x {args.reps} reps (ms, median of per-round medians)")
    print(f"{'case':<24}{'old':>10}{'new':>10}{'new/old':>10}")
    for case in runs["old"][0]:
        o = statistics.median(r[case] for r in runs["old"])
        n = statistics.median(r[case] for r in runs["new"])
        print(f"{case:<24}{o:>10.3f}{n:>10.3f}{n / o:>10.3f}")


if __name__ == "__main__":
    main()
