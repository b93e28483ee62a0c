"""GPU benchmark of the fused CUDA stacks against plain PyTorch.

For each shape (batch B, features d, layers N) and every architecture, float32
with TF32 off, prints the median time per call (CUDA events around every call,
after warm-up) of:

  fused    stablenets_ext.functional.<arch>(impl="fused")
  eager    stablenets_ext.reference.<arch> (the per-layer PyTorch loop)
  compile  torch.compile(reference, fullgraph=True), compiled once per arch and
           shape; its forward is the training graph's forward (it saves
           activations), so that one compilation serves both columns
  graph    the eager loop captured in a CUDA graph and replayed
  gemm     the bare GEMMs the stack cannot avoid: N (2N for leapfrog/verlet) in
           the forward, 3N (6N) forward + backward

Forward runs without autograd (no states stored), except compile as noted;
forward+backward computes the gradients of every input with torch.autograd.grad.
Ratios are others / fused (above 1: fused is faster), and fused / gemm.

    python benchmarks/gpu_bench.py [--budget 170] [--no-compile] [--shapes 1024x4x64,...]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

ARCHS = ("resnet", "antisymmetric", "leapfrog", "verlet")
PAIR = ("leapfrog", "verlet")
# Ordered so the torch.compile budget goes first where a target depends on it.
SHAPES = ((256, 784, 16), (1024, 4, 64), (4096, 1024, 16))
STEP, ACT, GAMMA = 0.1, "tanh", 0.01

# The targets: (shape, mode, column, minimum speedup of fused over it).
TARGETS = [
    ((1024, 4, 64), "fwd", "eager", 50.0),
    ((1024, 4, 64), "fwd+bwd", "eager", 30.0),
    ((256, 784, 16), "fwd+bwd", "eager", 2.0),
    ((256, 784, 16), "fwd+bwd", "compile", 1.4),
    ((4096, 1024, 16), "fwd", "gemm", 1 / 1.1),  # fused within 1.1x of the bare GEMMs
]


def time_us(fn, target_s=0.25, min_reps=10, max_reps=300, warmup=3):
    """Median GPU-visible time per call, in microseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    est = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, target_s / max(est, 1e-6))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def cuda_graph(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def make_inputs(arch, B, d, N, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.randn(B, d, device="cuda", generator=g)
    other = torch.randn(B, d, device="cuda", generator=g) * 0.5 if arch in PAIR else None
    W = torch.randn(N, d, d, device="cuda", generator=g) / math.sqrt(d)
    b = torch.randn(N, d, device="cuda", generator=g) * 0.1
    return y, other, W, b


def stack_fns(arch):
    """(fused, reference) callables (y, other, W, b) -> tuple of outputs."""
    from stablenets_ext import functional as F
    from stablenets_ext import reference as R

    if arch == "resnet":
        return (lambda y, o, W, b: (F.resnet(y, W, b, STEP, ACT, impl="fused"),),
                lambda y, o, W, b: (R.resnet(y, W, b, STEP, ACT),))
    if arch == "antisymmetric":
        return (lambda y, o, W, b: (F.antisymmetric(y, W, b, STEP, ACT, gamma=GAMMA,
                                                    impl="fused"),),
                lambda y, o, W, b: (R.antisymmetric(y, W, b, STEP, ACT, GAMMA),))
    if arch == "leapfrog":
        return (lambda y, o, W, b: tuple(F.leapfrog(y, W, b, STEP, ACT, y_prev=o,
                                                    return_state=True, impl="fused")),
                lambda y, o, W, b: tuple(R.leapfrog(y, W, b, STEP, ACT, y_prev=o,
                                                    return_state=True)))
    return (lambda y, o, W, b: tuple(F.verlet(y, W, b, STEP, ACT, z=o, return_state=True,
                                              impl="fused")),
            lambda y, o, W, b: tuple(R.verlet(y, W, b, STEP, ACT, z=o, return_state=True)))


def forward_only(stack, inputs):
    def fn():
        with torch.no_grad():
            return stack(*inputs)
    return fn


def forward_backward(stack, inputs, leaves, cots):
    def fn():
        with torch.enable_grad():
            outs = stack(*inputs)
            return torch.autograd.grad(outs, leaves, cots)
    return fn


def gemm_fn(y, W, count):
    N = W.shape[0]
    out = torch.empty_like(y)
    Wt = [W[j % N].t() for j in range(count)]

    def fn():
        for w in Wt:
            torch.mm(y, w, out=out)
    return fn


def bench_arch(arch, shape, args, t_start):
    B, d, N = shape
    fused, ref = stack_fns(arch)
    y, other, W, b = make_inputs(arch, B, d, N)
    inputs = [y, other, W, b]
    leaves = [t.requires_grad_(True) for t in inputs if t is not None]
    n_out = 2 if arch in PAIR else 1
    cots = [torch.randn(B, d, device="cuda") for _ in range(n_out)]
    gemms = 2 * N if arch in PAIR else N
    res = {"fwd": {}, "fwd+bwd": {}}

    def put(mode, col, fn):
        try:
            res[mode][col] = fn()
        except Exception as exc:  # keep the table going; say what broke
            res[mode][col] = None
            print(f"  [{arch} {shape} {mode} {col}] failed: {type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200]}", flush=True)

    put("fwd", "fused", lambda: time_us(forward_only(fused, inputs)))
    put("fwd+bwd", "fused", lambda: time_us(forward_backward(fused, inputs, leaves, cots)))
    put("fwd", "eager", lambda: time_us(forward_only(ref, inputs)))
    put("fwd+bwd", "eager", lambda: time_us(forward_backward(ref, inputs, leaves, cots)))

    def graph_time(fn):
        graph = cuda_graph(fn)
        try:
            return time_us(graph.replay)
        finally:
            del graph

    put("fwd", "graph", lambda: graph_time(forward_only(ref, inputs)))
    put("fwd+bwd", "graph", lambda: graph_time(forward_backward(ref, inputs, leaves, cots)))
    with torch.no_grad():
        put("fwd", "gemm", lambda: time_us(gemm_fn(y.detach(), W.detach(), gemms)))
        put("fwd+bwd", "gemm", lambda: time_us(gemm_fn(y.detach(), W.detach(), 3 * gemms)))

    if args.no_compile or time.perf_counter() - t_start > args.budget:
        res["fwd"]["compile"] = res["fwd+bwd"]["compile"] = "skip"
    else:
        torch._dynamo.reset()
        compiled = torch.compile(ref, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        put("fwd+bwd", "compile",
            lambda: time_us(forward_backward(compiled, inputs, leaves, cots)))
        res["compile_s"] = time.perf_counter() - t0

        def train_forward():
            with torch.enable_grad():
                return compiled(*inputs)
        put("fwd", "compile", lambda: time_us(train_forward))
        del compiled
    torch.cuda.empty_cache()
    return res


def fmt(v, width=9):
    if v is None:
        return "fail".rjust(width)
    if isinstance(v, str):
        return v.rjust(width)
    return (f"{v:.1f}" if v < 1e4 else f"{v:.0f}").rjust(width)


def ratio(a, b):
    if not isinstance(a, float) or not isinstance(b, float) or b <= 0:
        return None
    return a / b


def print_table(shape, rows):
    B, d, N = shape
    cols = ("fused", "eager", "compile", "graph", "gemm")
    print(f"\n### B={B} d={d} N={N}  (float32, TF32 off; median us per call)")
    head = (f"{'arch':<14}{'mode':<9}" + "".join(c.rjust(10) for c in cols)
            + "  eager/fused compile/fused graph/fused fused/gemm")
    print(head)
    print("-" * len(head))
    for arch, res in rows:
        for mode in ("fwd", "fwd+bwd"):
            r = res[mode]
            f = r.get("fused")
            line = f"{arch:<14}{mode:<9}" + "".join(fmt(r.get(c), 10) for c in cols)
            rs = [ratio(r.get("eager"), f), ratio(r.get("compile"), f), ratio(r.get("graph"), f),
                  ratio(f, r.get("gemm"))]
            line += "  " + "".join(
                (f"{x:.2f}x" if x is not None else "-").rjust(w)
                for x, w in zip(rs, (11, 14, 12, 11)))
            print(line)
        if "compile_s" in res:
            print(f"{'':<14}(compile + compiled runs took {res['compile_s']:.0f} s)")
    sys.stdout.flush()


def check_targets(all_rows):
    print("\n### Targets (fused speedup over the column; gemm: fused within 1.1x)")
    ok_all, checked = True, 0
    for shape, mode, col, need in TARGETS:
        for arch, res in all_rows.get(shape, []):
            r = res[mode]
            f, o = r.get("fused"), r.get(col)
            x = ratio(o, f)
            if x is None:
                verdict = "n/a"
            else:
                verdict = "ok" if x >= need else "MISS"
                ok_all &= x >= need
                checked += 1
            shown = f"{x:.2f}x" if x is not None else "-"
            print(f"  B={shape[0]} d={shape[1]} N={shape[2]} {arch:<14}{mode:<8} vs {col:<8}"
                  f" need >= {need:.2f}x  got {shown:>9}  {verdict}")
    return ok_all if checked else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=170.0,
                   help="seconds after which torch.compile columns are skipped")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                   help="comma-separated BxDxN")
    p.add_argument("--archs", default=",".join(ARCHS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device")
        return 2
    from stablenets_ext import ops

    if not ops.has_kernel("cuda"):
        print(f"gpu_bench: stablenets_ext has no CUDA kernels ({ops.LOAD_ERROR})")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"CUDA {torch.version.cuda}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    archs = [a for a in args.archs.split(",") if a]
    t_start = time.perf_counter()
    all_rows = {}
    for shape in shapes:
        rows = []
        for arch in archs:
            rows.append((arch, bench_arch(arch, shape, args, t_start)))
        all_rows[shape] = rows
        print_table(shape, rows)
    ok = check_targets(all_rows)
    verdict = {True: "all met", False: "NOT all met", None: "none measured"}[ok]
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; targets {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
