"""Synthetic-gradient (DNI) trainer against backprop: accuracy and epoch wall time.

    python benchmarks/bench_synthetic.py                 # both parts
    python benchmarks/bench_synthetic.py --part speed    # or: accuracy
    python benchmarks/bench_synthetic.py --quick         # fewer seeds/epochs (a smoke run)

Accuracy (target: SG within 1 percentage point of backprop): each dataset's
preset (stablenets_ext.training.presets), the same initial weights and batches
for every trainer, final validation accuracy averaged over --seeds seeds, for
backprop, in-process SG with M=2 and M=3, and the M=2 process pipeline.

Speed (target: M=2 pipeline >= 1.5x faster per epoch than single-process
backprop on the same cores): configurations where each stage has enough work
(default: digits, verlet, 64 layers of width 64, batches of 32 and of 128),
backprop with torch.set_num_threads(cores) against the pipeline with M
worker processes of cores/M threads each. Narrow stacks (width 16) do not
qualify: the fixed per-batch cost of a DNI stage (its own optimiser step,
the SG module's prediction and training, the hand-over) then outweighs the
half network it saves. Times are medians over the epochs after
the first (warm-up); all measured in this one run. The theoretical parallel
time (the busiest stage's compute time, the original research's figure) is
printed alongside.

On a shared machine the timings move with the load: the load average is
printed with the results; rerun when the machine is quiet.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch

from stablenets_ext import models
from stablenets_ext.data import load_dataset
from stablenets_ext.training import backprop
from stablenets_ext.training.presets import preset
from stablenets_ext.training.outputs import write_json
from stablenets_ext.training.sg import train_sg

warnings.filterwarnings("ignore", message="stablenets_ext: no compiled kernel")


def build(data, cfg, seed):
    torch.manual_seed(seed)
    return models.StableNet(cfg["arch"], data.features, data.classes, cfg["layers"],
                            width=cfg["width"], step=cfg["step"], activation=cfg["activation"],
                            impl=cfg.get("impl", "auto"))


def load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# ---------------------------------------------------------------- accuracy


def accuracy_part(datasets, seeds, quick, sg_kwargs):
    print("\n== accuracy (final validation accuracy, mean over seeds; presets) ==")
    rows = []
    for name in datasets:
        data = load_dataset(name)
        cfg = preset(name)
        epochs = max(2, cfg["epochs"] // 4) if quick else cfg["epochs"]
        train = dict(epochs=epochs, batch_size=cfg["batch_size"], lr=cfg["lr"],
                     lr_step=cfg["lr_step"], lr_gamma=cfg["lr_gamma"])
        runs = {
            "backprop": lambda m, s: backprop.train(m, data, seed=s, quiet=True, **train),
            "sg M=2": lambda m, s: train_sg(m, data, stages=2, seed=s, quiet=True, **train,
                                            **sg_kwargs),
            "sg M=3": lambda m, s: train_sg(m, data, stages=3, seed=s, quiet=True, **train,
                                            **sg_kwargs),
            "sg M=2 pipeline": lambda m, s: train_sg(m, data, workers=2, threads=1, seed=s,
                                                     quiet=True, **train, **sg_kwargs),
        }
        accs = {}
        for label, fn in runs.items():
            vals = []
            t0 = time.perf_counter()
            for seed in seeds:
                vals.append(fn(build(data, cfg, seed), seed)["accuracy"])
            accs[label] = vals
            print(f"  {name:7s} {label:16s} {100 * statistics.mean(vals):6.2f}%  "
                  f"({', '.join(f'{100 * v:.1f}' for v in vals)})  {time.perf_counter() - t0:6.1f} s",
                  flush=True)
        ref = statistics.mean(accs["backprop"])
        for label, vals in accs.items():
            if label == "backprop":
                continue
            gap = 100 * (statistics.mean(vals) - ref)
            rows.append({"dataset": name, "trainer": label, "accuracy": statistics.mean(vals),
                         "backprop": ref, "gap_points": gap, "target_met": gap >= -1.0})
    print("\n  dataset  trainer           gap to backprop  target (>= -1 point)")
    for r in rows:
        print(f"  {r['dataset']:7s}  {r['trainer']:16s}  {r['gap_points']:+6.2f} points   "
              f"{'met' if r['target_met'] else 'NOT met'}")
    return rows


# ------------------------------------------------------------------- speed


def speed_part(args):
    """One row per ``--configs`` entry (LAYERSxWIDTHxBATCH)."""
    out = []
    for text in args.configs.split(","):
        layers, width, batch = (int(v) for v in text.lower().split("x"))
        out.append(speed_config(args, layers, width, batch))
    if len(out) > 1:
        print("\n  layers x width x batch   backprop s/ep   pipeline s/ep   speed-up   theoretical")
        for r in out:
            print(f"  {r['config']:>22s}   {r['backprop']:13.3f}   {r['pipeline']:13.3f}   "
                  f"{r['speedup']:7.2f}x   {r['backprop'] / r['theoretical']:10.2f}x")
    return out


def speed_config(args, layers, width, batch):
    data = load_dataset(args.dataset)
    cfg = dict(preset(args.dataset), arch=args.arch, layers=layers, width=width,
               step=args.step, impl=args.impl)
    args.batch_size = batch
    cores = args.cores
    epochs = args.epochs
    common = dict(epochs=epochs, batch_size=args.batch_size, lr=cfg["lr"])
    print(f"\n== speed: {args.dataset}, {cfg['arch']}, {cfg['layers']} layers of width "
          f"{cfg['width']}, batch {args.batch_size}, impl {args.impl}, {epochs} epochs, "
          f"{cores} cores ==")
    print(f"  load average before: {load():.2f}", flush=True)
    old = torch.get_num_threads()
    results = {}
    rounds = []
    for rnd in range(args.rounds):
        torch.set_num_threads(cores)
        bp = backprop.train(build(data, cfg, 0), data, quiet=True, **common)
        torch.set_num_threads(old)
        pipe = train_sg(build(data, cfg, 0), data, workers=args.stages, threads=cores // args.stages,
                        quiet=True, **common)
        torch.set_num_threads(cores)
        inproc = train_sg(build(data, cfg, 0), data, stages=args.stages, quiet=True, **common)
        torch.set_num_threads(old)
        r = {
            "backprop": statistics.median(bp["history"]["seconds"][1:] or bp["history"]["seconds"]),
            "pipeline": statistics.median(pipe["history"]["seconds"][1:] or pipe["history"]["seconds"]),
            "inprocess": statistics.median(inproc["history"]["seconds"][1:]
                                           or inproc["history"]["seconds"]),
            "theoretical": statistics.median(pipe["history"]["theoretical_seconds"][1:]
                                             or pipe["history"]["theoretical_seconds"]),
            "acc_backprop": bp["accuracy"], "acc_pipeline": pipe["accuracy"],
        }
        rounds.append(r)
        print(f"  round {rnd + 1}: backprop {r['backprop']:.3f} s/epoch ({cores} threads), "
              f"pipeline M={args.stages} {r['pipeline']:.3f} s/epoch "
              f"({cores // args.stages} thread(s) each) -> {r['backprop'] / r['pipeline']:.2f}x; "
              f"in-process SG {r['inprocess']:.3f}; theoretical {r['theoretical']:.3f}; "
              f"load {load():.2f}", flush=True)
    for key in rounds[0]:
        results[key] = statistics.median(r[key] for r in rounds)
    speedup = results["backprop"] / results["pipeline"]
    print(f"\n  median of {len(rounds)} round(s): backprop {results['backprop']:.3f} s/epoch, "
          f"pipeline {results['pipeline']:.3f} s/epoch: speed-up {speedup:.2f}x "
          f"(target >= 1.5x: {'met' if speedup >= 1.5 else 'NOT met'}); "
          f"theoretical parallel time {results['theoretical']:.3f} s/epoch "
          f"({results['backprop'] / results['theoretical']:.2f}x); "
          f"accuracy backprop {100 * results['acc_backprop']:.1f}%, "
          f"pipeline {100 * results['acc_pipeline']:.1f}%")
    results["speedup"] = speedup
    results["config"] = f"{layers}x{width}x{batch}"
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("all", "accuracy", "speed"), default="all")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--datasets", default="swiss,digits")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--coarse-epochs", type=int, default=0, help="multilevel SG in the accuracy part")
    p.add_argument("--dataset", default="digits", help="speed part")
    p.add_argument("--arch", default="verlet")
    p.add_argument("--configs", default="64x64x32,64x64x128",
                   help="speed part: comma-separated LAYERSxWIDTHxBATCH (default 64x64x32,64x64x128)")
    p.add_argument("--impl", default="auto", help="speed part: auto, fused or reference")
    p.add_argument("--step", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.rounds = 1, 3, 1
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load average {load():.2f}")
    out = {}
    if args.part in ("all", "accuracy"):
        out["accuracy"] = accuracy_part(args.datasets.split(","), list(range(args.seeds)),
                                        args.quick, {"coarse_epochs": args.coarse_epochs})
    if args.part in ("all", "speed"):
        out["speed"] = speed_part(args)
    if args.json:
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
