"""Time to accuracy at equal cores: backprop against the parallel trainers.

For one dataset and model, every trainer runs through the command line
(``python -m stablenets_ext train``) in a fresh process, on the same number of
cores (``--cores``, default 2):

============  ==============================================================
backprop-1t   plain backprop, one process, 1 thread
backprop-Nt   plain backprop, one process, N threads
ddp           data-parallel backprop, N torch.distributed ranks x 1 thread
sg            synthetic gradients, M = N stages, 1 thread per stage
pvd           parallel variable distribution, P = N blocks, 1 thread each
============  ==============================================================

Each run records the held-out (validation) accuracy after every epoch (PVD:
every iteration) against the training wall time, and stops at the target
accuracy. Reported per trainer, as medians over the seeds:

- **time to target**: training seconds (the trainers' own per-epoch wall
  times, evaluation excluded) until the first epoch at or above the target;
- **start-up**: the rest of the process's wall time (interpreter and torch
  import, data, worker processes or ranks starting, evaluation, shutdown),
  shown apart and added in the ``+start-up`` column;
- **where the time went** for the parallel trainers, summed up to the target:
  SG: each stage's compute and its idle time in the pipeline; PVD: direction,
  the workers' subproblem compute and their waiting in the parallel phase,
  and the synchronisation (coordinator alone); DDP: whatever split its
  history records (``*_seconds`` columns).

Targets (issue 24): SG at most 0.8x and PVD at most 1.5x the time of the
faster backprop; the script prints whether each is met.

    python benchmarks/time_to_accuracy.py --dataset digits --out /tmp/tta-digits
    python benchmarks/time_to_accuracy.py --dataset swiss --out /tmp/tta-swiss
    python benchmarks/time_to_accuracy.py --dataset mnist --data-root /work/data/mnist \\
        --out /tmp/tta-mnist [--model-args "--arch conv-verlet --layers 8 --width 16"]

``--target``: the accuracy (fraction or percent); default digits 0.97, swiss
0.95, and for mnist the backprop preset's final accuracy less 0.5 points
(measured first: backprop-1t runs the preset's epochs without stopping and
without ``--epochs``, which applies to the runs that stop at the target).
``--model-args`` is passed to every run (any ``stablenets train`` model
flags); ``--args TRAINER=...`` to one trainer's runs (e.g.
``--args "pvd=--pvd-inner-epochs 1"``). ``--dry-run`` prints the commands.
Outputs in ``--out``: ``runs/*.json`` (each run's history), ``summary.json``,
``accuracy_vs_seconds.png``. The folder must be new, empty or one this script
wrote before.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = ".time_to_accuracy"
TRAINERS = ("backprop-1t", "backprop-Nt", "ddp", "sg", "pvd")
DEFAULT_TARGETS = {"digits": 0.97, "swiss": 0.95, "ellipse": 0.95}
MNIST_MARGIN = 0.005
TARGET_RATIOS = {"sg": 0.8, "pvd": 1.5}


def trainer_args(name: str, cores: int) -> tuple[list[str], int]:
    """(command-line flags, threads per process) of one trainer at ``cores`` cores."""
    if name == "backprop-1t":
        return ["--trainer", "backprop", "--threads", "1"], 1
    if name == "backprop-Nt":
        return ["--trainer", "backprop", "--threads", str(cores)], cores
    if name == "ddp":
        return ["--trainer", "backprop", "--backend", "dist", "--workers", str(cores),
                "--threads", "1"], 1
    if name == "sg":
        return ["--trainer", "sg", "--workers", str(cores), "--threads", "1"], 1
    if name == "pvd":
        return ["--trainer", "pvd", "--workers", str(cores), "--threads", "1"], 1
    raise ValueError(f"trainer: expected one of {TRAINERS}, got {name!r}")


def label(name: str, cores: int) -> str:
    return name.replace("Nt", f"{cores}t")


# ------------------------------------------------------------------- running


def command(args, name: str, seed: int, target, history: str, preset_run=False) -> tuple[list, dict]:
    flags, threads = trainer_args(name, args.cores)
    cmd = [sys.executable, "-m", "stablenets_ext", "train", "--dataset", args.dataset,
           "--seed", str(seed), "--device", "cpu", "--json", "--quiet", "--history", history,
           *flags, *shlex.split(args.model_args or "")]
    if args.data_root:
        cmd += ["--data-root", args.data_root, "--no-download"]
    if args.epochs and not preset_run:
        cmd += ["--epochs", str(args.epochs)]
    if target is not None:
        cmd += ["--target-accuracy", target if isinstance(target, str) else repr(target)]
    cmd += shlex.split(args.extra.get(name, ""))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return cmd, env


def run_one(args, name: str, seed: int, target, preset_run=False) -> dict:
    history = os.path.join(args.out, "runs", f"{name}-seed{seed}.json")
    cmd, env = command(args, name, seed, target, history, preset_run)
    if args.dry_run:
        print(" ".join(shlex.quote(c) for c in cmd))
        return {}
    if os.path.exists(history):
        os.remove(history)  # ours (the folder carries the marker)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=args.timeout)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed (exit {proc.returncode}):\n"
                           f"$ {' '.join(shlex.quote(c) for c in cmd)}\n{proc.stderr[-4000:]}")
    with open(history) as f:
        result = json.load(f)
    result["process_wall_seconds"] = wall
    with open(history, "w") as f:
        json.dump(result, f)
    return result


# ----------------------------------------------------------------- analysis


def json_safe(obj) -> str:
    """Strict JSON: non-finite numbers (a target not reached) become null."""
    def walk(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v
    return json.dumps(walk(obj), indent=1, allow_nan=False)


def _sum(values, upto):
    return float(sum(v for v in values[:upto] if v is not None))


def analyse(result: dict, target: float) -> dict:
    """Time to target, start-up and the time split of one run."""
    h = result["history"]
    acc = h["val_accuracy"]
    secs = [s or 0.0 for s in h["seconds"]]
    evals = [s or 0.0 for s in h.get("eval_seconds", [0.0] * len(secs))]
    first = next((i for i, a in enumerate(acc) if a is not None and a >= target), None)
    upto = len(acc) if first is None else first + 1
    train_total, eval_total = sum(secs), sum(evals)
    startup = max(0.0, result["process_wall_seconds"] - train_total - eval_total)
    out = {
        "reached": first is not None,
        "epochs_to_target": None if first is None else first + 1,
        "seconds_to_target": math.inf if first is None else _sum(secs, upto),
        "startup_seconds": startup,
        "eval_seconds": eval_total,
        "train_seconds": train_total,
        "final_accuracy": acc[-1] if acc else math.nan,
        "best_accuracy": max((a for a in acc if a is not None), default=math.nan),
        "curve": [(_sum(secs, i + 1), a) for i, a in enumerate(acc)],
        "accuracy_by_epoch": list(acc),
        "split": split(h, upto),
    }
    if result.get("sg_rel_error") is not None:
        out["sg_rel_error"] = result["sg_rel_error"]
    return out


def split(h: dict, upto: int) -> dict:
    """Where the training time went over the first ``upto`` epochs."""
    wall = _sum(h["seconds"], upto)
    if "busy_seconds" in h:  # SG: per-stage compute inside the pipeline's wall time
        busy = [sum(b[k] for b in h["busy_seconds"][:upto])
                for k in range(len(h["busy_seconds"][0]))] if h["busy_seconds"] else []
        return {"kind": "sg", "wall": wall, "stage_compute": busy,
                "stage_idle": [max(0.0, wall - b) for b in busy],
                "sequential_compute": sum(busy)}
    if "phase_seconds" in h:  # PVD
        workers = h["worker_seconds"][:upto]
        wsum = [sum(w[k] for w in workers) for k in range(len(workers[0]))] if workers else []
        phase = _sum(h["phase_seconds"], upto)
        return {"kind": "pvd", "wall": wall, "direction": _sum(h["direction_seconds"], upto),
                "phase": phase, "worker_compute": wsum,
                "worker_waiting": [max(0.0, phase - w) for w in wsum],
                "sync": _sum(h["sync_seconds"], upto)}
    extra = {k: _sum(v, upto) for k, v in h.items()
             if k.endswith("_seconds") and k not in ("seconds", "eval_seconds") and v
             and all(isinstance(x, (int, float)) or x is None for x in v)}
    return {"kind": "other", "wall": wall, **extra}


def median(values):
    values = [v for v in values if v is not None]
    if not values:
        return math.nan
    return statistics.median(values)


def summarise(per_seed: list[dict]) -> dict:
    keys = ("seconds_to_target", "startup_seconds", "final_accuracy", "best_accuracy")
    out = {k: median([r[k] for r in per_seed]) for k in keys}
    out["with_startup"] = median([r["seconds_to_target"] + r["startup_seconds"] for r in per_seed])
    out["reached"] = sum(r["reached"] for r in per_seed)
    out["seeds"] = len(per_seed)
    out["epochs_to_target"] = median([r["epochs_to_target"] for r in per_seed])
    return out


def fmt(v, unit="", digits=2):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "not reached"
    return f"{v:.{digits}f}{unit}"


def report(args, target, results, cores) -> dict:
    names = [n for n in args.trainers if n in results]
    summ = {n: summarise(results[n]) for n in names}
    backprops = [summ[n]["seconds_to_target"] for n in ("backprop-1t", "backprop-Nt") if n in summ]
    base = min(backprops) if backprops else math.nan
    base_up = min((summ[n]["with_startup"] for n in ("backprop-1t", "backprop-Nt") if n in summ),
                  default=math.nan)
    print(f"\n{args.dataset}: time to {100 * target:.2f}% validation accuracy, {cores} cores, "
          f"medians over seeds {','.join(map(str, args.seeds))}")
    print(f"{'trainer':<13}{'reached':>8}{'epochs':>8}{'train s':>10}{'start-up s':>11}"
          f"{'+start-up':>11}{'x backprop':>11}{'x (+s-u)':>9}{'final %':>9}")
    for n in names:
        s = summ[n]
        ratio = s["seconds_to_target"] / base if base and math.isfinite(base) else math.nan
        ratio_up = s["with_startup"] / base_up if base_up and math.isfinite(base_up) else math.nan
        s["ratio"], s["ratio_with_startup"] = ratio, ratio_up
        print(f"{label(n, cores):<13}{s['reached']:>5}/{s['seeds']:<2}"
              f"{fmt(s['epochs_to_target'], '', 0):>8}{fmt(s['seconds_to_target'], '', 3):>10}"
              f"{fmt(s['startup_seconds'], '', 2):>11}{fmt(s['with_startup'], '', 2):>11}"
              f"{fmt(ratio, 'x'):>11}{fmt(ratio_up, 'x'):>9}"
              f"{fmt(100 * s['final_accuracy'], '', 1):>9}")
    print("\nwhere the training time went (up to the target, or the whole run; medians):")
    for n in names:
        splits = [r["split"] for r in results[n]]
        kind = splits[0]["kind"]
        wall = median([sp["wall"] for sp in splits])
        if kind == "sg":
            comp = [median([sp["stage_compute"][k] for sp in splits])
                    for k in range(len(splits[0]["stage_compute"]))]
            seq = median([sp["sequential_compute"] for sp in splits])
            idle = [max(0.0, wall - c) for c in comp]
            print(f"  {label(n, cores)}: wall {wall:.3f} s; stage compute "
                  f"{', '.join(f'{c:.3f}' for c in comp)} s; stage idle (waiting on a "
                  f"neighbour or the coordinator) {', '.join(f'{i:.3f}' for i in idle)} s; "
                  f"sum of compute {seq:.3f} s = {seq / wall if wall else math.nan:.2f} of "
                  f"{len(comp)} cores busy")
        elif kind == "pvd":
            get = lambda key: median([sp[key] for sp in splits])  # noqa: E731
            wc = [median([sp["worker_compute"][k] for sp in splits])
                  for k in range(len(splits[0]["worker_compute"]))]
            phase = get("phase")
            print(f"  {label(n, cores)}: wall {wall:.3f} s = direction {get('direction'):.3f} "
                  f"(workers, parallel) + parallel phase {phase:.3f} (worker compute "
                  f"{', '.join(f'{w:.3f}' for w in wc)}; waiting "
                  f"{', '.join(f'{max(0.0, phase - w):.3f}' for w in wc)}) + synchronisation "
                  f"{get('sync'):.3f} (coordinator alone, workers idle)")
        else:
            rest = sorted({k for sp in splits for k in sp if k not in ("kind", "wall")})
            parts = "; ".join(f"{k} {median([sp.get(k) for sp in splits]):.3f}" for k in rest)
            print(f"  {label(n, cores)}: wall {wall:.3f} s" + (f"; {parts}" if parts else ""))
    print("\nvalidation accuracy (%) after each epoch (PVD: iteration), median over seeds:")
    for n in names:
        curves = [r["accuracy_by_epoch"] for r in results[n]]
        length = max(len(c) for c in curves)
        row = [median([c[i] for c in curves if i < len(c)]) for i in range(length)]
        print(f"  {label(n, cores):<12} " + " ".join(f"{100 * a:.1f}" for a in row[:40]))
    for n, limit in TARGET_RATIOS.items():
        if n in summ and math.isfinite(base):
            r = summ[n]["ratio"]
            verdict = "met" if r <= limit else "MISSED (see the split above)"
            print(f"target {n}: {fmt(r, 'x')} the faster backprop's time (goal <= {limit}x): "
                  f"{verdict}")
    return summ


def plot(args, target, results, cores, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for n in args.trainers:
        if n not in results:
            continue
        runs = results[n]
        best = sorted(runs, key=lambda r: r["seconds_to_target"])[len(runs) // 2]  # the median run
        xs = [x for x, _ in best["curve"]]
        ys = [100 * (a or 0) for _, a in best["curve"]]
        line, = axes[0].plot(xs, ys, marker=".", label=label(n, cores))
        axes[1].plot([x + best["startup_seconds"] for x in xs], ys, marker=".",
                     color=line.get_color(), label=label(n, cores))
        axes[1].axvline(best["startup_seconds"], color=line.get_color(), lw=0.6, ls=":")
    for ax, title in zip(axes, ("training time (start-up excluded)",
                                "wall time from launch (start-up: dotted lines)")):
        ax.axhline(100 * target, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("seconds")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (%)")
    axes[0].set_ylim(max(0, 100 * target - 30), 100)
    axes[1].legend(loc="lower right")
    fig.suptitle(f"{args.dataset}, {cores} cores: the median-seed run of each trainer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --------------------------------------------------------------------- main


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--dataset", default="digits", choices=("swiss", "ellipse", "digits", "mnist"))
    p.add_argument("--data-root", help="folder of the MNIST files (--dataset mnist)")
    p.add_argument("--target", type=float, help="accuracy to reach (fraction, or percent > 1)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated (default 0,1,2)")
    p.add_argument("--cores", type=int, default=2, help="cores every trainer gets (default 2)")
    p.add_argument("--trainers", default=",".join(TRAINERS),
                   help=f"comma-separated subset of {','.join(TRAINERS)}")
    p.add_argument("--epochs", type=int, help="epoch (PVD: iteration) limit; default the preset's")
    p.add_argument("--model-args", default="", help="model flags passed to every run, e.g. "
                   "\"--arch conv-verlet --layers 8 --width 16\"")
    p.add_argument("--args", action="append", default=[], metavar="TRAINER=FLAGS",
                   help="flags for one trainer's runs, e.g. \"pvd=--pvd-inner-epochs 1\"")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per run (default 3600)")
    p.add_argument("--out", required=True, help="output folder (new, empty, or this script's)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    args.trainers = [t.strip() for t in args.trainers.split(",") if t.strip()]
    bad = [t for t in args.trainers if t not in TRAINERS]
    if bad or not args.trainers:
        p.error(f"--trainers: expected names from {','.join(TRAINERS)}, got {bad or 'none'}")
    if args.cores < 2:
        p.error(f"--cores: the parallel trainers need at least 2, got {args.cores}")
    if args.target is not None:
        if args.target > 1:
            args.target /= 100
        if not 0 < args.target <= 1:
            p.error(f"--target: expected a fraction in (0, 1] or a percentage, got {args.target}")
    elif args.dataset not in DEFAULT_TARGETS and args.dataset != "mnist":
        p.error(f"--target: no default for {args.dataset}")
    extra = {}
    for item in args.args:
        name, sep, flags = item.partition("=")
        if not sep or name not in TRAINERS:
            p.error(f"--args: expected TRAINER=FLAGS with TRAINER in {','.join(TRAINERS)}, "
                    f"got {item!r}")
        extra[name] = (extra.get(name, "") + " " + flags).strip()
    args.extra = extra
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs: expected a positive int, got {args.epochs}")
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        if not os.path.isdir(out):
            p.error(f"--out: {args.out!r} is a file")
        if os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
            p.error(f"--out: {args.out!r} holds files this script did not write; give a new "
                    "or empty folder")
    args.out = out
    return args


def main(argv=None):
    args = parse(argv)
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    open(os.path.join(args.out, MARKER), "w").close()
    cores = args.cores
    results: dict[str, list] = {}
    raw: dict[str, list] = {}
    target = args.target if args.target is not None else DEFAULT_TARGETS.get(args.dataset)
    order = list(args.trainers)
    if target is None:  # mnist: backprop's preset accuracy first, then the target
        finals = []
        for seed in args.seeds:
            r = run_one(args, "backprop-1t", seed, None, preset_run=True)
            if args.dry_run:
                continue
            raw.setdefault("backprop-1t", []).append(r)
            finals.append(r["accuracy"])
            print(f"backprop-1t seed {seed}: final accuracy {100 * r['accuracy']:.2f}% "
                  f"({time.strftime('%H:%M:%S')})", flush=True)
        if args.dry_run:
            target = "TARGET"  # known once the runs above have finished
        else:
            target = statistics.median(finals) - MNIST_MARGIN
            print(f"target: backprop's final accuracy {100 * (target + MNIST_MARGIN):.2f}% "
                  f"less {100 * MNIST_MARGIN:.1f} points = {100 * target:.2f}%", flush=True)
        if "backprop-1t" in order:
            order.remove("backprop-1t")
    for seed in args.seeds:  # seeds outermost: drifts in machine load hit every trainer alike
        for name in order:
            r = run_one(args, name, seed, target)
            if args.dry_run:
                continue
            raw.setdefault(name, []).append(r)
            a = analyse(r, target)
            print(f"{label(name, cores):<12} seed {seed}: "
                  f"{'reached' if a['reached'] else 'did not reach'} {100 * target:.2f}% "
                  f"{'after ' + fmt(a['seconds_to_target'], ' s', 3) if a['reached'] else ''} "
                  f"(start-up {a['startup_seconds']:.2f} s, best {100 * a['best_accuracy']:.2f}%)"
                  f" {time.strftime('%H:%M:%S')}", flush=True)
    if args.dry_run:
        return 0
    for name, runs in raw.items():
        results[name] = [analyse(r, target) for r in runs]
    summ = report(args, target, results, cores)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        f.write(json_safe({"dataset": args.dataset, "target": target, "cores": cores,
                           "seeds": args.seeds, "model_args": args.model_args,
                           "extra_args": args.extra, "summary": summ, "runs": results}))
    png = os.path.join(args.out, "accuracy_vs_seconds.png")
    try:
        plot(args, target, results, cores, png)
        print(f"\nplot: {png}")
    except ImportError:
        print("\nno plot: matplotlib is not installed", file=sys.stderr)
    print(f"summary: {os.path.join(args.out, 'summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
