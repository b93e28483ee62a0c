"""Convolutional stacks: fused ops against the per-layer eager loop, and reversible
against stored mode.

    python benchmarks/bench_conv.py [--device cpu|cuda] [--threads 2]
        [--shape 64,16,28,28] [--layers 32] [--archs resnet,antisymmetric,leapfrog,verlet]
        [--rev-layers 32,128] [--repeats 5] [--rounds 5] [--skip-speed] [--skip-reversible]

Speed: median time of forward and of forward+backward (float32) for the fused
op (``impl="fused"``) and the per-layer eager loop (``impl="reference"``:
ATen convolutions, autograd storing every intermediate), and their ratio, from
``--rounds`` rounds that time both sides back to back (alternating which goes
first), ``--repeats`` calls each.

Reversible (leapfrog, Verlet): bytes autograd saves for the backward (every
packed tensor except the parameters, counted with saved_tensors_hooks), peak
memory growth of one forward+backward (CPU: the process's peak RSS above the
RSS before the step, each measurement in a fresh subprocess, with the peak
reset through /proc/self/clear_refs; CUDA: torch.cuda.max_memory_allocated
above the allocation before the step; both after a one-layer warm-up of the
same shapes), and time, against stored mode.
Issue 12's targets (CPU, float32, 2 threads): fused fwd+bwd >= 1.3x the eager
loop; reversible saved bytes <= 5% of stored at N = 32 and 128, peak growth
<= 20% of stored mode's, time <= 1.6x stored mode's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from stablenets_ext import conv  # noqa: E402

TWO = {"leapfrog", "verlet"}


def make(arch, shape, layers, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = shape
    y = torch.randn(B, C, H, W, generator=g, dtype=dtype).to(device)
    w = (torch.randn(layers, C, C, 3, 3, generator=g, dtype=dtype) / (9 * C) ** 0.5).to(device)
    b = (0.1 * torch.randn(layers, C, generator=g, dtype=dtype)).to(device)
    return y, w.requires_grad_(), b.requires_grad_()


def call(arch, y, w, b, impl, reversible=False):
    fn = conv.FUNCTIONS[arch]
    if arch in TWO:
        return fn(y, w, b, 0.1, "tanh", reversible=reversible, impl=impl)
    return fn(y, w, b, 0.1, "tanh", impl=impl)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter


def median_time(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = CLOCK()
        fn()
        sync(device)
        times.append(CLOCK() - t0)
    return statistics.median(times)


def step_fn(arch, y, w, b, impl, reversible=False, backward=True):
    def run():
        w.grad = b.grad = y.grad = None
        out = call(arch, y, w, b, impl, reversible)
        if backward:
            out.sum().backward()
        return out

    return run


def speed(args):
    print(f"\n## Fused vs per-layer eager loop, float32, {args.device}, threads={torch.get_num_threads()}, "
          f"(B, C, H, W) = {args.shape}, N = {args.layers}, {args.rounds} interleaved rounds of "
          f"{args.repeats} calls, {args.clock} clock\n")
    print("| arch | fused fwd ms | eager fwd ms | fwd ratio | fused fwd+bwd ms | eager fwd+bwd ms | fwd+bwd ratio |")
    print("|---|---|---|---|---|---|---|")
    # One untimed round first: the first stack measured otherwise pays for the
    # process's memory growth and the convolution primitives' creation.
    for arch in args.archs:
        y, w, b = make(arch, args.shape, args.layers, args.device)
        for impl in ("fused", "reference"):
            step_fn(arch, y.requires_grad_(), w, b, impl)()
    for arch in args.archs:
        y, w, b = make(arch, args.shape, args.layers, args.device)
        y.requires_grad_()
        # Rounds alternate which side runs first, and each round times both sides back
        # to back: the machine's drift (other tenants, clocks, the allocator's state)
        # then falls on both alike, where one block of fused calls followed by one block
        # of eager calls let it fall on one side only. Each time is the median of
        # `repeats` calls; each figure the median over rounds, each ratio the median of
        # the rounds' ratios.
        times = {(impl, kind): [] for impl in ("fused", "reference") for kind in ("fwd", "bwd")}
        for r in range(args.rounds):
            for impl in (("fused", "reference") if r % 2 == 0 else ("reference", "fused")):
                with torch.no_grad():
                    times[impl, "fwd"].append(
                        median_time(step_fn(arch, y, w, b, impl, backward=False), args.device, args.repeats))
                times[impl, "bwd"].append(median_time(step_fn(arch, y, w, b, impl), args.device, args.repeats))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = {kind: statistics.median(e / f for f, e in zip(times["fused", kind], times["reference", kind]))
                 for kind in ("fwd", "bwd")}
        print(f"| {arch} | {med['fused', 'fwd'] * 1e3:.1f} | {med['reference', 'fwd'] * 1e3:.1f} | "
              f"{ratio['fwd']:.2f}x | {med['fused', 'bwd'] * 1e3:.1f} | {med['reference', 'bwd'] * 1e3:.1f} | "
              f"{ratio['bwd']:.2f}x |", flush=True)


def saved_bytes(arch, y, w, b, reversible):
    pids = {w.data_ptr(), b.data_ptr()}
    seen = {}

    def pack(t):
        if t.data_ptr() not in pids:
            seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call(arch, y, w, b, "fused", reversible)
    out.sum().backward()
    return sum(seen.values())


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth_child(arch, shape, layers, reversible, device, threads):
    """Runs in a fresh process: bytes of peak memory growth of one forward+backward."""
    torch.set_num_threads(threads)
    # Warm up on one layer of the same shapes: the first call pages in library
    # code and builds oneDNN/cuDNN primitives, tens of MB that are not the step's.
    y1, w1, b1 = make(arch, shape, 1, device)
    call(arch, y1.requires_grad_(), w1, b1, "fused", reversible).sum().backward()
    del y1, w1, b1
    y, w, b = make(arch, shape, layers, device)
    y.requires_grad_()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call(arch, y, w, b, "fused", reversible).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    base = _status_kb("VmRSS")
    call(arch, y, w, b, "fused", reversible).sum().backward()
    return (_status_kb("VmHWM") - base) * 1024


def peak_growth(args, arch, layers, reversible):
    cmd = [sys.executable, os.path.abspath(__file__), "--_child",
           json.dumps([arch, args.shape, layers, reversible, args.device, args.threads])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def reversible(args):
    print(f"\n## Reversible vs stored (fused, float32, {args.device}, threads={torch.get_num_threads()}, "
          f"(B, C, H, W) = {args.shape}, median of {args.repeats})\n")
    print("| arch | N | saved MB stored | saved MB rev | saved ratio | peak growth MB stored | "
          "peak growth MB rev | peak ratio | time ms stored | time ms rev | time ratio | max rel grad err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in [a for a in args.archs if a in TWO]:
        for layers in args.rev_layers:
            y, w, b = make(arch, args.shape, layers, args.device)
            y.requires_grad_()
            sb = {r: saved_bytes(arch, y, w, b, r) for r in (False, True)}
            grads = {}
            for r in (False, True):
                y.grad = w.grad = b.grad = None
                call(arch, y, w, b, "fused", r).sum().backward()
                grads[r] = [t.grad.clone() for t in (y, w, b)]
            err = max(((a - s).norm() / s.norm()).item() for a, s in zip(grads[True], grads[False]))
            pk = {r: peak_growth(args, arch, layers, r) for r in (False, True)}
            tm = {r: median_time(step_fn(arch, y, w, b, "fused", r), args.device, args.repeats) for r in (False, True)}
            mb = 1 / 2**20
            print(f"| {arch} | {layers} | {sb[False] * mb:.1f} | {sb[True] * mb:.1f} | "
                  f"{sb[True] / sb[False] * 100:.1f}% | {pk[False] * mb:.1f} | {pk[True] * mb:.1f} | "
                  f"{pk[True] / max(pk[False], 1) * 100:.1f}% | {tm[False] * 1e3:.1f} | {tm[True] * 1e3:.1f} | "
                  f"{tm[True] / tm[False]:.2f}x | {err:.1e} |", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shape", default="64,16,28,28", help="B,C,H,W")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--archs", default="resnet,antisymmetric,leapfrog,verlet")
    p.add_argument("--rev-layers", default="32,128")
    p.add_argument("--repeats", type=int, default=5, help="calls timed per round (their median)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds of fused and eager calls (speed; median over rounds)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="process: CPU time of this process (a rough guide on a busy machine, "
                        "where wall-clock ratios are noise; with threads > 1 it counts spinning)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-reversible", action="store_true")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        arch, shape, layers, rev, device, threads = json.loads(args._child)
        print(peak_growth_child(arch, tuple(shape), layers, rev, device, threads))
        return 0
    torch.set_num_threads(args.threads)
    if args.clock == "process":
        global CLOCK
        CLOCK = time.process_time
    args.shape = tuple(int(s) for s in args.shape.split(","))
    args.archs = args.archs.split(",")
    args.rev_layers = [int(n) for n in args.rev_layers.split(",")]
    for name in ("repeats", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name}: expected a positive integer, got {getattr(args, name)}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    if not conv._cops.has_kernel(args.device):
        p.error(f"--device {args.device}: no fused conv kernel compiled for it")
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if torch.device(args.device).type == "cuda" else ""))
    if not args.skip_speed:
        speed(args)
    if not args.skip_reversible:
        reversible(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
