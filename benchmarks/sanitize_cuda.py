"""A small forward + backward of every CUDA op, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 1 python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck --error-exitcode 1 \
        python benchmarks/sanitize_cuda.py --narrow-only

Covers both regimes (narrow: one launch per stack, several padded widths and a
partial last row tile; wide: per-layer cuBLAS + fused elementwise), float32,
bfloat16 and float16 (the narrow kernels over 16-bit memory) and float64, stored
and reversible backwards, and (without --narrow-only) deep narrow stacks whose
backward runs in several layer chunks. Without the caching allocator every
tensor is its own cudaMalloc, so memcheck sees out-of-bounds accesses exactly.
Also compares against the float64 reference (run on the CPU), so a silent wrong
answer fails too.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

ARCHS = ("resnet", "antisymmetric", "leapfrog", "verlet")
PAIR = ("leapfrog", "verlet")


def run(arch, y, o, W, b, impl, reversible, act, h):
    from stablenets_ext import functional as F

    if arch == "resnet":
        return (F.resnet(y, W, b, h, act, impl=impl),)
    if arch == "antisymmetric":
        return (F.antisymmetric(y, W, b, h, act, gamma=0.05, impl=impl),)
    if arch == "leapfrog":
        return tuple(F.leapfrog(y, W, b, h, act, y_prev=o, return_state=True,
                                reversible=reversible, impl=impl))
    return tuple(F.verlet(y, W, b, h, act, z=o, return_state=True, reversible=reversible,
                          impl=impl))


def one(arch, B, d, N, dtype, reversible, act, h=0.2):
    g = torch.Generator().manual_seed(B * 1000 + d)
    y = torch.randn(B, d, generator=g, dtype=torch.float64)
    o = torch.randn(B, d, generator=g, dtype=torch.float64) if arch in PAIR else None
    W = torch.randn(N, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(N, d, generator=g, dtype=torch.float64) * 0.2
    results = []
    # fused on the GPU; the float64 reference on the CPU (keeps the sanitized
    # run down to the fused kernels), both on the same (dtype-valued) inputs
    y, o, W, b = (None if t is None else t.to(dtype).double() for t in (y, o, W, b))
    for impl, device, dt in (("fused", "cuda", dtype), ("reference", "cpu", torch.float64)):
        xs = [None if t is None else t.to(device, dt).requires_grad_(True) for t in (y, o, W, b)]
        # the reference stores every state: it refuses reversible=True
        outs = run(arch, *xs, impl, reversible and impl == "fused", act, h)
        loss = sum((out * out).sum() for out in outs)
        grads = torch.autograd.grad(loss, [t for t in xs if t is not None])
        results.append([t.detach().double().cpu() for t in (*outs, *grads)])
    # reduced dtypes: inputs rounded to the dtype, float32 inside, results rounded
    tol = {torch.float32: 1e-3, torch.float64: 1e-9}.get(dtype, 8 * torch.finfo(dtype).eps)
    for a, r in zip(*results):
        err = (a - r).abs().max().item() / (1.0 + r.abs().max().item())
        if not err <= tol:
            raise AssertionError(f"{arch} B={B} d={d} N={N} {dtype} rev={reversible}: "
                                 f"relative error {err:.2e}")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--narrow-only", action="store_true",
                   help="only the one-launch kernels (for racecheck, which is slow)")
    p.add_argument("--max-seconds", type=float, default=0.0,
                   help="stop starting new runs after this long (0: no limit) and say how "
                        "many of all ran, so a slow sanitizer ends with a verdict")
    args = p.parse_args(argv)
    from stablenets_ext import ops

    if not torch.cuda.is_available():
        print("sanitize_cuda: no CUDA device")
        return 2
    if not ops.has_kernel("cuda"):
        print(f"sanitize_cuda: stablenets_ext has no CUDA kernels ({ops.LOAD_ERROR})")
        return 2
    # (B, d, N): narrow widths 4/8/16/32/64 padded and exact, a partial tile;
    # wide just past the switch. Every width and architecture in float32
    # first, then bfloat16/float16 (their own kernels: 16-bit loads and stores),
    # then float64, so a time limit cuts the repeats, not the coverage.
    shapes = [(37, 3, 3), (70, 16, 2), (33, 29, 3), (20, 64, 2), (50, 7, 2)]
    if not args.narrow_only:
        shapes += [(9, 70, 2)]
    runs = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for B, d, N in shapes:
            for arch in ARCHS:
                for rev in ((False, True) if arch in PAIR else (False,)):
                    act = ("tanh", "relu", "identity")[len(runs) % 3]
                    runs.append(((arch, B, d, N, dtype, rev, act), {}))
    if not args.narrow_only:
        # Deep enough for the backward's partial weight gradients to be walked
        # in layer chunks (narrow_host.h: budget 16 MB, here 3 blocks).
        for arch, rev in (("resnet", False), ("leapfrog", True), ("verlet", False)):
            runs.insert(len(runs) // 2, ((arch, 40, 64, 400, torch.float32, rev, "tanh"),
                                         {"h": 0.05}))
        # and in bfloat16: the adjoints cross the chunks in float32 scratch
        for arch, rev in (("leapfrog", False), ("verlet", False)):
            runs.insert(len(runs) // 2, ((arch, 40, 64, 400, torch.bfloat16, rev, "tanh"),
                                         {"h": 0.05}))
    t0 = time.perf_counter()
    done = 0
    for a, kw in runs:
        if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
            break
        one(*a, **kw)
        done += 1
    torch.cuda.synchronize()
    if done < len(runs):
        print(f"sanitize_cuda: {done} of {len(runs)} forward+backward runs OK "
              f"(stopped at the {args.max_seconds:.0f} s limit)")
    else:
        print(f"sanitize_cuda: {done} forward+backward runs OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
