"""Reversible (memory-constant) backward against stored states, leapfrog and Verlet.

    python benchmarks/bench_reversible.py [--depths 64,256,1024,4096] [--features 64] [--batch 1024]

For each depth N: bytes saved for backward (every tensor autograd packs, counted
with torch.autograd.graph.saved_tensors_hooks; parameters listed apart since
they exist anyway), peak device memory of forward+backward on a GPU
(torch.cuda.max_memory_allocated), median time of forward+backward, and the
relative error of the reversible gradients against the stored-mode gradients
in float32 and float64 (float64 up to --max-depth-f64 to bound memory).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import stablenets_ext as sn
from stablenets_ext import functional as SF


def saved_bytes(fn, params):
    """(bytes of saved non-parameter tensors, bytes of saved parameters)."""
    pids = {p.data_ptr() for p in params}
    seen = {}

    def pack(t):
        key = (t.data_ptr(), t.numel(), t.dtype)
        seen[key] = (t.numel() * t.element_size(), t.data_ptr() in pids)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    act = sum(b for b, is_p in seen.values() if not is_p)
    par = sum(b for b, is_p in seen.values() if is_p)
    return act, par, out


def grads(arch, y, w, b, h, reversible):
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_()
    out = SF.FUNCTIONS[arch](y, w, b, h, "tanh", reversible=reversible, return_state=True, impl="fused")
    torch.autograd.backward(out, [torch.ones_like(out[0]), torch.zeros_like(out[1])])
    return torch.cat([w.grad.flatten(), b.grad.flatten()])


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="64,256,1024,4096")
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--step", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max-depth-f64", type=int, default=1024)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    d, B, h = args.features, args.batch, args.step
    print(f"# stablenets-ext {sn.__version__}, torch {torch.__version__}, device {dev}, "
          f"{torch.get_num_threads()} threads, B={B}, d={d}, h={h}, tanh")
    hdr = (f"{'arch':9s} {'N':>5s} | {'saved stored MB':>15s} {'saved rev MB':>12s} {'ratio':>7s} {'params MB':>9s} | "
           f"{'peak stored MB':>14s} {'peak rev MB':>11s} | {'t stored ms':>11s} {'t rev ms':>9s} {'ratio':>6s} | "
           f"{'err f32':>8s} {'err f64':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for N in (int(v) for v in args.depths.split(",")):
        for arch in ("leapfrog", "verlet"):
            g = torch.Generator().manual_seed(N)
            y = torch.randn(B, d, generator=g).to(dev)
            w = (torch.randn(N, d, d, generator=g) / d**0.5).to(dev).requires_grad_()
            b = (0.1 * torch.randn(N, d, generator=g)).to(dev).requires_grad_()
            row = {}
            for rev in (False, True):
                fn = lambda: SF.FUNCTIONS[arch](y, w, b, h, "tanh", reversible=rev, impl="fused")  # noqa: E731
                act, par, out = saved_bytes(fn, [w, b])
                del out
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    fn().sum().backward()
                    torch.cuda.synchronize()
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                else:
                    peak = float("nan")
                times = []
                for _ in range(args.reps):
                    w.grad = b.grad = None
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    fn().sum().backward()
                    if dev.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row[rev] = (act / 2**20, par / 2**20, peak, 1e3 * statistics.median(times))
            err32 = rel(grads(arch, y, w, b, h, True), grads(arch, y, w, b, h, False))
            if N <= args.max_depth_f64:
                y64, w64, b64 = (t.detach().double() for t in (y, w, b))
                err64 = f"{rel(grads(arch, y64, w64, b64, h, True), grads(arch, y64, w64, b64, h, False)):8.1e}"
            else:
                err64 = f"{'-':>8s}"
            s, r = row[False], row[True]
            print(f"{arch:9s} {N:5d} | {s[0]:15.1f} {r[0]:12.2f} {r[0] / s[0]:6.1%} {s[1]:9.1f} | "
                  f"{s[2]:14.1f} {r[2]:11.1f} | {s[3]:11.1f} {r[3]:9.1f} {r[3] / s[3]:5.2f}x | {err32:8.1e} {err64}",
                  flush=True)
            del y, w, b
    print("saved = bytes autograd keeps for backward, parameters excluded (shown apart); "
          "peak = device memory high-water mark of one forward+backward above what was allocated before; "
          "err = ||g_rev - g_stored|| / ||g_stored|| over all weight and bias gradients")


if __name__ == "__main__":
    main()
