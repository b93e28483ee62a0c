"""PVD: accuracy, measured parallel speed-up, and time to target against backprop.

For each dataset (default ellipse and swiss, their presets' model, learning
rate and batch size; seed 0):

1. **target**: PVD with P workers (process backend, 1 thread per worker) until
   the validation accuracy reaches ``--target`` or ``--iterations`` run out;
   then plain Adam backprop (``training.backprop``, same model, seed, lr and
   batch size, all the machine's threads) to the same target. Reported: PVD
   accuracy and iterations, seconds to the target for both (training time, no
   evaluation, no worker start-up: the PVD start-up is printed separately).
2. **speed-up**: the same PVD run for ``--speed-iterations`` iterations, once
   with the P subproblems in P processes and once one after another in this
   process (``backend="sequential"``: bit-for-bit the same iterates), repeated
   ``--repeat`` times alternately so that load from other users of the
   machine hits both alike. Reported: the median over iterations of
   sequential / parallel wall time of the subproblem phase, the total ratio,
   and the workers' CPU seconds (a parallel phase slower than its CPU time
   says the cores were busy with something else). Before and after, P plain
   busy-loop processes measure how many cores this session can get at all
   (``cores available``: the ceiling of any parallel speed-up at that moment;
   with Linux's autogroup scheduling a shared machine hands each session a fair
   slice, so another user's busy job halves it on 2 cores).

Targets (2-core machine): accuracy >= 95% on ellipse and swiss with P=2, and a
parallel phase >= 1.7x faster than the sequential one.

    python benchmarks/bench_pvd.py [--datasets ellipse,swiss] [--workers 2] [--sync hull]
                                   [--repeat 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from stablenets_ext import data as D, models as M, ops  # noqa: E402
from stablenets_ext.training import backprop, pvd  # noqa: E402
from stablenets_ext.training.presets import preset  # noqa: E402
from stablenets_ext.training.outputs import write_json  # noqa: E402


def build(data, cfg, seed=0):
    torch.manual_seed(seed)
    return M.StableNet(cfg["arch"], data.features, data.classes, cfg["layers"], width=cfg["width"],
                       step=cfg["step"], activation=cfg["activation"])


def pvd_kwargs(args, cfg):
    return dict(workers=args.workers, sync=args.sync, inner_epochs=args.inner_epochs,
                lr=cfg["lr"], batch_size=cfg["batch_size"], threads=args.threads, seed=0,
                start_method=args.start_method)


def target_run(name, data, cfg, args):
    res = pvd.train_pvd(build(data, cfg), data, iterations=args.iterations,
                        target_accuracy=args.target, **pvd_kwargs(args, cfg))
    bp = backprop.train(build(data, cfg), data, epochs=args.backprop_epochs,
                        batch_size=cfg["batch_size"], lr=cfg["lr"], target_accuracy=args.target,
                        seed=0, quiet=True)
    h = bp["history"]
    hit = next((i for i, a in enumerate(h["val_accuracy"]) if a >= args.target), None)
    return {
        "dataset": name, "arch": cfg["arch"], "layers": cfg["layers"], "width": cfg["width"],
        "workers": args.workers, "sync": args.sync, "inner_epochs": args.inner_epochs,
        "pvd_accuracy": res["accuracy"], "pvd_iterations": res["iterations"],
        "pvd_reached": res["reached_target"], "pvd_seconds_to_target": res["seconds_to_target"],
        "pvd_startup_seconds": res["startup_seconds"],
        "pvd_phase_seconds_total": res["phase_seconds_total"],
        "pvd_sync_seconds_total": res["sync_seconds_total"],
        "pvd_direction_seconds_total": res["direction_seconds_total"],
        "pvd_hull_chosen": sum(c == "hull" for c in res["history"]["sync_choice"]),
        "backprop_accuracy": bp["accuracy"], "backprop_epochs": bp["epochs"],
        "backprop_seconds_to_target": None if hit is None else float(sum(h["seconds"][:hit + 1])),
        "backprop_threads": torch.get_num_threads(),
    }


def speed_run(name, data, cfg, args):
    par, seq, same = [], [], True
    cpu, seq_cpu = [], []
    for _ in range(args.repeat):
        runs = {}
        for backend in ("process", "sequential"):
            r = pvd.train_pvd(build(data, cfg), data, backend=backend,
                              iterations=args.speed_iterations, **pvd_kwargs(args, cfg))
            runs[backend] = r
        par += runs["process"]["history"]["phase_seconds"]
        seq += runs["sequential"]["history"]["phase_seconds"]
        cpu += [max(c) for c in runs["process"]["history"]["worker_cpu_seconds"]]
        seq_cpu += [max(c) for c in runs["sequential"]["history"]["worker_cpu_seconds"]]
        same &= runs["process"]["history"]["digest"] == runs["sequential"]["history"]["digest"]
    ratios = [s / p for s, p in zip(seq, par)]
    return {
        "dataset": name, "workers": args.workers, "threads_per_worker": args.threads,
        "iterations": len(par), "parallel_phase_median": statistics.median(par),
        "sequential_phase_median": statistics.median(seq),
        "speedup_median": statistics.median(ratios), "speedup_total": sum(seq) / sum(par),
        "worker_cpu_median": statistics.median(cpu),
        "sequential_worker_cpu_median": statistics.median(seq_cpu), "same_iterates": same,
    }


def _spin(barrier, queue, loops):
    barrier.wait()
    t, c = time.perf_counter(), time.process_time()
    x = 0
    for i in range(loops):
        x += i * i
    queue.put((time.perf_counter() - t, time.process_time() - c))


def cores_available(processes, loops=3_000_000):
    """How many cores ``processes`` busy processes get right now: the sum of their
    CPU / wall ratios (pure Python loops, started together). On a machine shared
    with other users this, not the core count, bounds the parallel speed-up."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # the children run no torch code
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_spin, args=(barrier, queue, loops)) for _ in range(processes)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    return sum(c / w for w, c in out)


def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="ellipse,swiss")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--sync", choices=("best", "hull"), default="hull")
    p.add_argument("--inner-epochs", type=float, default=3.0)
    p.add_argument("--target", type=float, default=0.95)
    p.add_argument("--iterations", type=int, default=40, help="PVD iteration limit (target run)")
    p.add_argument("--backprop-epochs", type=int, default=200, help="backprop epoch limit")
    p.add_argument("--speed-iterations", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2, help="alternating parallel/sequential pairs")
    p.add_argument("--start-method", choices=("spawn", "forkserver"), default="spawn")
    p.add_argument("--skip", choices=("target", "speed"), action="append", default=[])
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# cores {os.cpu_count()}, load average {load:.1f}, torch {torch.__version__}, "
          f"fused kernels: {ops.compiled_devices() or 'none'}", flush=True)
    out = {"machine": {"cores": os.cpu_count(), "load_average": load}, "target": [], "speed": []}
    for name in args.datasets.split(","):
        data = D.load_dataset(name)
        cfg = preset(name)
        if "target" not in args.skip:
            t0 = time.perf_counter()
            r = target_run(name, data, cfg, args)
            out["target"].append(r)
            ratio = (r["pvd_seconds_to_target"] / r["backprop_seconds_to_target"]
                     if r["pvd_seconds_to_target"] and r["backprop_seconds_to_target"] else None)
            print(f"{name} {r['arch']} L={r['layers']} w={r['width']} P={r['workers']} "
                  f"sync={r['sync']}: PVD {100 * r['pvd_accuracy']:.1f}% after "
                  f"{r['pvd_iterations']} it, {fmt(r['pvd_seconds_to_target'])} s to "
                  f"{100 * args.target:.0f}% (+{r['pvd_startup_seconds']:.1f} s start-up); "
                  f"backprop {100 * r['backprop_accuracy']:.1f}% after {r['backprop_epochs']} ep, "
                  f"{fmt(r['backprop_seconds_to_target'])} s; PVD/backprop time {fmt(ratio)}x "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)
        if "speed" not in args.skip:
            t0 = time.perf_counter()
            before = cores_available(args.workers)
            s = speed_run(name, data, cfg, args)
            s["cores_available"] = min(before, cores_available(args.workers))
            out["speed"].append(s)
            print(f"{name} speed-up P={s['workers']} ({s['threads_per_worker']} thread/worker, "
                  f"{s['iterations']} phases): sequential {s['sequential_phase_median']:.3f} s / "
                  f"parallel {s['parallel_phase_median']:.3f} s = median {s['speedup_median']:.2f}x "
                  f"(total {s['speedup_total']:.2f}x; CPU s per subproblem: {s['worker_cpu_median']:.3f} in a "
                  f"worker, {s['sequential_worker_cpu_median']:.3f} inline; "
                  f"same iterates: {s['same_iterates']}; {s['workers']} busy processes got "
                  f"{s['cores_available']:.2f} cores) [{time.perf_counter() - t0:.0f} s]",
                  flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# load average at the end {load:.1f}")
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
