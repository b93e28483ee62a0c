"""GPU benchmark of the fused CUDA stacks (issue 11's table), float32, TF32 off.

Every number is the median time per call in microseconds, CUDA events around
each call after warm-up; ratios are other / fused (above 1: fused is faster)
and come from this one run. Forward runs without autograd (no states kept);
forward+backward computes the gradients of every input with autograd.grad.

  fused     stablenets_ext.functional.<arch>(impl="fused")
  eager     stablenets_ext.reference.<arch>: the per-layer PyTorch loop
  graph     that eager loop captured in a CUDA graph and replayed
  compile   torch.compile(reference, fullgraph=True) (fwd+bwd only; one cold
            Inductor compile per architecture, dropped when < 60 s remain)
  gemm      the bare GEMMs a stack cannot avoid in its forward: N (2N for
            leapfrog / verlet) (B x d) @ (d x d) products, measured in this run
  odeint    torchdiffeq.odeint(method="euler") on the same resnet vector field
            (layer j's weights on [j h, (j+1) h)), the grid t = 0, h, .., N h
  memory    peak torch.cuda.max_memory_allocated of one forward+backward above
            what was allocated before it (reversible vs stored mode)

Sections run in order of what the issue needs most, each only while the
deadline allows; a skipped column or section says so in the table.
Results are (re)written to --json after every section, so a run that is cut
off keeps what it measured.

    python benchmarks/gpu_bench.py [--deadline 180] [--json bench.json] [--no-compile]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time

import torch

ARCHS = ("resnet", "antisymmetric", "leapfrog", "verlet")
PAIR = ("leapfrog", "verlet")
STEP, ACT, GAMMA = 0.1, "tanh", 0.01
SMALL, MID, WIDE = (1024, 4, 64), (256, 784, 16), (4096, 1024, 16)
DEV = "cuda"  # "cpu" with --smoke: a quick run of every code path, no GPU, no meaning
COMPILE_MIN_S = 60.0  # a cold Inductor compile is not started with less left

# (shape, mode, column, minimum ratio column / fused); "gemm": fused within 1.1x.
TARGETS = [
    (SMALL, "fwd", "eager", 50.0),
    (SMALL, "fwd", "graph", 10.0),
    (SMALL, "fwd+bwd", "eager", 30.0),
    (MID, "fwd+bwd", "eager", 2.0),
    (MID, "fwd+bwd", "compile", 1.4),
    (WIDE, "fwd", "gemm", 1 / 1.1),
    (WIDE, "fwd+bwd", "eager", 1.2),
]


class Clock:
    def __init__(self, deadline_s):
        self.t0 = time.perf_counter()
        self.deadline = deadline_s

    def left(self):
        return self.deadline - (time.perf_counter() - self.t0)

    def elapsed(self):
        return time.perf_counter() - self.t0


def time_us(fn, target_s=0.15, min_reps=5, max_reps=200, warmup=3):
    """Median device time per call, in microseconds (CUDA events per call)."""
    if DEV == "cpu":  # --smoke
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return 1e6 * statistics.median(ts)
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


def graphed(fn):
    """fn captured in a CUDA graph (after warm-up on a side stream); returns replay."""
    if DEV == "cpu":
        raise RuntimeError("no CUDA graphs without CUDA (--smoke)")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def make_inputs(arch, B, d, N, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    y = torch.randn(B, d, device=DEV, generator=g)
    other = torch.randn(B, d, device=DEV, generator=g) * 0.5 if arch in PAIR else None
    W = torch.randn(N, d, d, device=DEV, generator=g) / math.sqrt(d)
    b = torch.randn(N, d, device=DEV, generator=g) * 0.1
    return y, other, W, b


def stack_fns(arch, reversible=False):
    """(fused, reference): callables (y, other, W, b) -> tuple of outputs."""
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
                                                    return_state=True, reversible=reversible,
                                                    impl="fused")),
                lambda y, o, W, b: tuple(R.leapfrog(y, W, b, STEP, ACT, y_prev=o,
                                                    return_state=True)))
    return (lambda y, o, W, b: tuple(F.verlet(y, W, b, STEP, ACT, z=o, return_state=True,
                                              reversible=reversible, impl="fused")),
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


def forward_backward_bf16(stack, inputs, leaves, cots):
    """forward_backward under torch.autocast(bfloat16): the mixed-precision training step."""
    def fn():
        with torch.enable_grad():
            with torch.autocast(DEV, dtype=torch.bfloat16):
                outs = stack(*inputs)
            return torch.autograd.grad([o.float() for o in outs], leaves, cots)
    return fn


def gemm_fn(y, W, count):
    N = W.shape[0]
    out = torch.empty_like(y)
    Wt = [W[j % N].t() for j in range(count)]

    def fn():
        for w in Wt:
            torch.mm(y, w, out=out)
    return fn


class Bench:
    def __init__(self, args):
        self.args = args
        self.clock = Clock(args.deadline)
        self.rows = {}  # (shape, arch, mode) -> {column: us | "skip: why" | None}
        self.extra = {"odeint": {}, "reversible": [], "conv": {}}
        self.notes = []
        self.meta = {
            "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (--smoke)",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "dtype": "float32 (columns bf16, bf16 eager: under torch.autocast bfloat16)",
            "tf32": False,
        }

    # -- bookkeeping
    def put(self, shape, arch, mode, col, fn):
        row = self.rows.setdefault((shape, arch, mode), {})
        try:
            row[col] = fn()
        except Exception as exc:  # keep the table going; say what broke
            row[col] = None
            msg = f"{arch} {shape} {mode} {col}: {type(exc).__name__}: " \
                  f"{str(exc).splitlines()[0][:160] if str(exc) else ''}"
            self.notes.append(msg)
            print("  failed:", msg, flush=True)
        sync()

    def mark(self, shape, arch, mode, col, why):
        self.rows.setdefault((shape, arch, mode), {})[col] = f"skip: {why}"

    def save(self):
        if not self.args.json:
            return
        data = {
            "meta": self.meta,
            "elapsed_s": round(self.clock.elapsed(), 1),
            "rows": [{"B": s[0], "d": s[1], "N": s[2], "arch": a, "mode": m, **cols}
                     for (s, a, m), cols in self.rows.items()],
            "odeint": [{"shape": k, **v} for k, v in self.extra["odeint"].items()],
            "reversible": self.extra["reversible"],
            "conv": self.extra["conv"],
            "targets": self.targets(),
            "notes": self.notes,
        }
        with open(self.args.json, "w") as f:
            json.dump(data, f, indent=1)

    def section(self, name, need_s, fn):
        left = self.clock.left()
        if left < need_s:
            self.notes.append(f"section {name!r} skipped: {left:.0f} s left, needs ~{need_s:.0f} s")
            print(f"-- {name}: skipped ({left:.0f} s left)", flush=True)
            return
        t = time.perf_counter()
        print(f"-- {name} ({left:.0f} s left)", flush=True)
        try:
            fn()
            if DEV == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:  # one broken section must not lose the others
            msg = f"section {name!r} failed: {type(exc).__name__}: " \
                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}"
            self.notes.append(msg)
            print("  " + msg, flush=True)
            sync()
        print(f"   {name}: {time.perf_counter() - t:.1f} s", flush=True)
        self.save()

    # -- sections
    def stacks(self, shape, fwd_cols, bwd_cols):
        B, d, N = shape
        for arch in ARCHS:
            fused, ref = stack_fns(arch)
            y, other, W, b = make_inputs(arch, B, d, N)
            inputs = [y, other, W, b]
            leaves = [t.requires_grad_(True) for t in inputs if t is not None]
            cots = [torch.randn(B, d, device=DEV) for _ in range(2 if arch in PAIR else 1)]
            fw = {"fused": forward_only(fused, inputs), "eager": forward_only(ref, inputs)}
            fb = {"fused": forward_backward(fused, inputs, leaves, cots),
                  "eager": forward_backward(ref, inputs, leaves, cots)}
            for col in fwd_cols:
                if col == "graph":
                    self.put(shape, arch, "fwd", col, lambda: time_us(graphed(fw["eager"])))
                elif col == "gemm":
                    count = 2 * N if arch in PAIR else N
                    with torch.no_grad():
                        self.put(shape, arch, "fwd", col,
                                 lambda: time_us(gemm_fn(y.detach(), W.detach(), count)))
                else:
                    self.put(shape, arch, "fwd", col, lambda: time_us(fw[col]))
            for col in bwd_cols:
                if col in ("bf16", "bf16 eager"):
                    stack = fused if col == "bf16" else ref
                    self.put(shape, arch, "fwd+bwd", col,
                             lambda: time_us(forward_backward_bf16(stack, inputs, leaves, cots)))
                elif col == "graph":
                    self.put(shape, arch, "fwd+bwd", col, lambda: time_us(graphed(fb["eager"])))
                else:
                    self.put(shape, arch, "fwd+bwd", col, lambda: time_us(fb[col]))
            del fw, fb
            self.check_outputs(arch, fused, ref, inputs, shape)

    def check_outputs(self, arch, fused, ref, inputs, shape):
        """A wrong answer is not a speed-up: fused vs eager on the inputs just timed."""
        with torch.no_grad():
            a, r = fused(*inputs), ref(*inputs)
        err = max(((x - z).norm() / z.norm().clamp_min(1e-30)).item() for x, z in zip(a, r))
        if not err < 1e-3:
            self.notes.append(f"{arch} {shape}: fused vs eager relative error {err:.1e}")
            print(f"  WARNING {arch} {shape}: fused vs eager relative error {err:.1e}", flush=True)

    def compile_column(self, shape):
        B, d, N = shape
        for arch in ARCHS:
            left = self.clock.left()
            if self.args.no_compile or left < COMPILE_MIN_S:
                why = "--no-compile" if self.args.no_compile else f"<{COMPILE_MIN_S:.0f} s left"
                self.mark(shape, arch, "fwd+bwd", "compile", why)
                continue
            _, ref = stack_fns(arch)
            y, other, W, b = make_inputs(arch, B, d, N)
            inputs = [y, other, W, b]
            leaves = [t.requires_grad_(True) for t in inputs if t is not None]
            cots = [torch.randn(B, d, device=DEV) for _ in range(2 if arch in PAIR else 1)]
            torch._dynamo.reset()
            compiled = torch.compile(ref, fullgraph=True, dynamic=False)
            t = time.perf_counter()
            self.put(shape, arch, "fwd+bwd", "compile",
                     lambda: time_us(forward_backward(compiled, inputs, leaves, cots)))
            print(f"   compile {arch}: {time.perf_counter() - t:.0f} s with the compilation",
                  flush=True)
            del compiled
            self.save()

    def odeint(self, shape):
        import torchdiffeq

        B, d, N = shape
        fused, _ = stack_fns("resnet")
        y, _, W, b = make_inputs("resnet", B, d, N)
        t = torch.linspace(0.0, N * STEP, N + 1, device=DEV)
        calls = [0]

        def field(_t, x):  # Euler calls it once per step, in order: layer j at step j
            j = calls[0]
            calls[0] += 1
            return torch.tanh(x @ W[j].T + b[j])

        def solve(y0):
            calls[0] = 0
            out = torchdiffeq.odeint(field, y0, t, method="euler")[-1]
            assert calls[0] == N, f"euler evaluated the field {calls[0]} times, expected {N}"
            return out

        leaves = [y.requires_grad_(True), W.requires_grad_(True), b.requires_grad_(True)]
        cot = torch.randn(B, d, device=DEV)
        with torch.no_grad():
            want = fused(y, None, W, b)[0]
            err = ((solve(y) - want).norm() / want.norm()).item()
        def odeint_fwd():
            with torch.no_grad():
                return solve(y)

        res = {"fused fwd": time_us(forward_only(fused, [y, None, W, b])),
               "odeint fwd": time_us(odeint_fwd),
               "fused fwd+bwd": time_us(forward_backward(fused, [y, None, W, b], leaves, [cot])),
               "odeint fwd+bwd": time_us(lambda: torch.autograd.grad(solve(y), leaves, cot)),
               "rel_err_vs_fused": err,
               "torchdiffeq": getattr(torchdiffeq, "__version__", "?")}
        self.extra["odeint"]["x".join(map(str, shape))] = res

    def reversible(self, N, B=1024, d=64):
        for arch in PAIR:
            row = {"arch": arch, "B": B, "d": d, "N": N}
            for mode in ("stored", "reversible"):
                fused, _ = stack_fns(arch, reversible=mode == "reversible")
                y, other, W, b = make_inputs(arch, B, d, N)
                inputs = [y, other, W, b]
                leaves = [t.requires_grad_(True) for t in inputs]
                cots = [torch.randn(B, d, device=DEV) for _ in range(2)]
                fn = forward_backward(fused, inputs, leaves, cots)
                fn()
                sync()
                if DEV == "cuda":
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                grads = fn()
                sync()
                peak = torch.cuda.max_memory_allocated() - base if DEV == "cuda" else 1.0
                row[f"{mode} peak MB"] = peak / 2**20
                del grads
                row[f"{mode} us"] = time_us(fn, target_s=0.3)
            row["memory ratio"] = row["reversible peak MB"] / row["stored peak MB"]
            row["time ratio"] = row["reversible us"] / row["stored us"]
            self.extra["reversible"].append(row)

    def conv(self, B=64, C=16, H=32, N=8, k=3):
        """The fused convolutional stacks, when this build has them (another change)."""
        o = torch.ops.stablenets
        if not hasattr(o, "conv_resnet_forward"):
            self.extra["conv"] = {"skipped": "no conv_* ops in this build"}
            return
        try:
            from stablenets_ext import conv as sc
        except ImportError as exc:
            self.extra["conv"] = {"skipped": f"stablenets_ext.conv: {exc}"}
            return
        g = torch.Generator(device=DEV).manual_seed(0)
        y = torch.randn(B, C, H, H, device=DEV, generator=g)
        W = torch.randn(N, C, C, k, k, device=DEV, generator=g) / math.sqrt(C * k * k)
        b = torch.randn(N, C, device=DEV, generator=g) * 0.1
        res = {"shape": f"B={B} C={C} H=W={H} N={N} k={k}", "arch": "resnet"}
        try:
            with torch.no_grad():
                res["fused fwd"] = time_us(lambda: o.conv_resnet_forward(y, W, b, STEP, ACT, False))
                res["eager fwd"] = time_us(lambda: sc.conv_resnet(y, W, b, STEP, ACT))
                g_out = torch.randn_like(y)

                def fused_fb():
                    out, st = o.conv_resnet_forward(y, W, b, STEP, ACT, True)
                    return o.conv_resnet_backward(g_out, st, W, b, STEP, ACT)
                res["fused fwd+bwd"] = time_us(fused_fb)
            leaves = [y.requires_grad_(True), W.requires_grad_(True), b.requires_grad_(True)]
            res["eager fwd+bwd"] = time_us(
                lambda: torch.autograd.grad(sc.conv_resnet(*leaves, STEP, ACT), leaves, g_out))
        except Exception as exc:
            res["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        self.extra["conv"] = res

    # -- report
    def targets(self):
        out = []
        for shape, mode, col, need in TARGETS:
            for arch in ARCHS:
                r = self.rows.get((shape, arch, mode), {})
                x = ratio(r.get(col), r.get("fused"))
                out.append({"shape": "x".join(map(str, shape)), "arch": arch, "mode": mode,
                            "vs": col, "need": round(need, 3),
                            "got": None if x is None else round(x, 3),
                            "verdict": "n/a" if x is None else ("ok" if x >= need else "MISS")})
        return out

    def report(self):
        cols = ("fused", "eager", "graph", "compile", "gemm", "bf16", "bf16 eager")
        print("\n### Table: " + " | ".join(f"{k} {v}" for k, v in self.meta.items()))
        print("median us per call; ratios other/fused (gemm: fused/gemm)")
        for shape in (SMALL, MID, WIDE):
            print(f"\nB={shape[0]} d={shape[1]} N={shape[2]}")
            print(f"{'arch':<14}{'mode':<8}" + "".join(c.rjust(10) for c in cols)
                  + "   eager/f graph/f compile/f  f/gemm  f/bf16")
            for arch in ARCHS:
                for mode in ("fwd", "fwd+bwd"):
                    r = self.rows.get((shape, arch, mode))
                    if not r:
                        continue
                    f = r.get("fused")
                    line = f"{arch:<14}{mode:<8}" + "".join(fmt(r.get(c, "")) for c in cols)
                    rs = (ratio(r.get("eager"), f), ratio(r.get("graph"), f),
                          ratio(r.get("compile"), f), ratio(f, r.get("gemm")),
                          ratio(f, r.get("bf16")))
                    line += "  " + "".join(
                        (f"{x:.2f}x" if x is not None else "-").rjust(9) for x in rs)
                    print(line)
        print()
        for shape, res in self.extra["odeint"].items():
            print(f"torchdiffeq euler, resnet {shape}: " + ", ".join(
                f"{k} {v:.1f}" if k.endswith(("fwd", "bwd")) else (f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}")
                for k, v in res.items())
                  + f"; odeint/fused fwd {res['odeint fwd'] / res['fused fwd']:.1f}x,"
                    f" fwd+bwd {res['odeint fwd+bwd'] / res['fused fwd+bwd']:.1f}x")
        for row in self.extra["reversible"]:
            print(f"reversible vs stored, {row['arch']} B={row['B']} d={row['d']} N={row['N']}: "
                  f"peak MB {row['reversible peak MB']:.1f} vs {row['stored peak MB']:.1f} "
                  f"({100 * row['memory ratio']:.1f}%), us {row['reversible us']:.0f} vs "
                  f"{row['stored us']:.0f} ({row['time ratio']:.2f}x)")
        if self.extra["conv"]:
            print(f"\nconv: {self.extra['conv']}")
        print("\n### Targets (ratio column/fused, per architecture)")
        met = []
        groups = {}
        for t in self.targets():
            groups.setdefault((t["shape"], t["mode"], t["vs"], t["need"]), []).append(t)
            if t["verdict"] != "n/a":
                met.append(t["verdict"] == "ok")
        for (shape, mode, vs, need), ts in groups.items():
            got = ", ".join(f"{t['arch'][:5]} " + (f"{t['got']:.2f}x {t['verdict']}"
                                                   if t["got"] is not None else "n/a")
                            for t in ts)
            print(f"  {shape:<11} {mode:<7} vs {vs:<7} >= {need:5.2f}x: {got}")
        for row in self.extra["reversible"]:
            if row["N"] == 1024:
                ok = row["memory ratio"] <= 0.10 and row["time ratio"] <= 1.5
                met.append(ok)
                print(f"  reversible {row['arch']:<10} N=1024 memory <= 10% and time <= 1.5x of "
                      f"stored: {'ok' if ok else 'MISS'}")
        for n in self.notes:
            print("  note:", n)
        verdict = "none measured" if not met else ("all met" if all(met) else "NOT all met")
        print(f"\ntotal {self.clock.elapsed():.0f} s; targets {verdict}", flush=True)


def sync():
    if DEV == "cpu":
        return
    try:
        torch.cuda.synchronize()
    except Exception as exc:  # a sticky CUDA error: report it, do not hide the table
        print(f"  cuda synchronize failed: {type(exc).__name__}: {exc}", flush=True)


def fmt(v, width=10):
    if v is None:
        return "fail".rjust(width)
    if isinstance(v, str) and not v:  # not measured for this shape
        return "-".rjust(width)
    if isinstance(v, str):
        return "skip".rjust(width)
    return (f"{v:.1f}" if v < 1e4 else f"{v:.0f}").rjust(width)


def ratio(a, b):
    if not isinstance(a, float) or not isinstance(b, float) or b <= 0:
        return None
    return a / b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deadline", type=float, default=240.0,
                   help="seconds this run may take; sections and compile columns that would "
                        "not fit are skipped")
    p.add_argument("--json", default="", help="write the results here (after every section)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on the CPU: exercises every code path without a GPU; "
                        "the numbers mean nothing")
    args = p.parse_args(argv)
    global DEV, SMALL, MID, WIDE
    if args.smoke:
        DEV = "cpu"
        SMALL, MID, WIDE = (64, 4, 6), (16, 40, 3), (32, 80, 3)
        TARGETS[:] = [((SMALL, MID, WIDE)[[(1024, 4, 64), (256, 784, 16), (4096, 1024, 16)]
                                          .index(t[0])],) + t[1:] for t in TARGETS]
    elif not torch.cuda.is_available():
        print("gpu_bench: no CUDA device")
        return 77
    from stablenets_ext import ops

    if not ops.has_kernel(DEV):
        print(f"gpu_bench: stablenets_ext has no CUDA kernels ({ops.LOAD_ERROR})")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    bench = Bench(args)
    print(f"device: {bench.meta['device']}  torch {bench.meta['torch']}  CUDA {bench.meta['cuda']}",
          flush=True)
    name = "B={} d={} N={}".format
    bench.section(name(*SMALL), 20, lambda: bench.stacks(
        SMALL, ("fused", "eager", "graph"), ("fused", "eager", "bf16", "bf16 eager")))
    bench.section(name(*MID), 15, lambda: bench.stacks(
        MID, ("fused", "eager"), ("fused", "eager", "bf16", "bf16 eager")))
    bench.section(name(*WIDE), 20, lambda: bench.stacks(
        WIDE, ("fused", "gemm", "eager"), ("fused", "eager", "bf16", "bf16 eager")))
    try:
        import torchdiffeq  # noqa: F401
        for shape in (SMALL, MID):
            bench.section(f"torchdiffeq {shape}", 10, lambda s=shape: bench.odeint(s))
    except ImportError:
        bench.notes.append("torchdiffeq not installed: odeint rows skipped")
    for n in ((256, 1024) if DEV == "cuda" else (8, 16)):
        kw = {} if DEV == "cuda" else {"B": 64, "d": 8}
        bench.section(f"reversible N={n}", 10, lambda n=n, kw=kw: bench.reversible(n, **kw))
    bench.section("conv", 10, bench.conv)
    bench.section("torch.compile " + name(*MID), 0, lambda: bench.compile_column(MID))
    bench.save()
    bench.report()
    # A failed column is in the table and notes; a section that broke fails the step.
    return 1 if any(n.startswith("section") and "failed" in n for n in bench.notes) else 0


if __name__ == "__main__":
    sys.exit(main())
