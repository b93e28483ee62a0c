"""Seconds per training epoch with the fused kernels against the reference.

The swiss-roll configuration of the issue (64 layers, width 4, the preset's
batch size and learning rate): each impl trains the same model from the same
seed for a few epochs; the median seconds per epoch (training only, and
training + evaluation) are compared. Target: reference / fused >= 3.

    python benchmarks/bench_training.py [--arch verlet|all] [--epochs 8] [--threads N] [--json]

``--ddp W``: instead, data-parallel backprop (DDP, gloo, ``W`` ranks of one
thread, ``stablenets train --backend dist``) against one process with ``W``
threads on the same dataset preset (default digits): seconds per epoch (the
median) and accuracy, through the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from stablenets_ext import data as D, models as M, ops  # noqa: E402
from stablenets_ext.training import backprop  # noqa: E402
from stablenets_ext.training.presets import preset  # noqa: E402


def epoch_seconds(arch, impl, cfg, data, epochs, device):
    torch.manual_seed(0)
    model = M.StableNet(arch, data.features, data.classes, cfg["layers"], width=cfg["width"],
                        step=cfg["step"], activation=cfg["activation"], impl=impl).to(device)
    r = backprop.train(model, data, epochs=epochs + 1, batch_size=cfg["batch_size"], lr=cfg["lr"],
                       lr_step=cfg["lr_step"], lr_gamma=cfg["lr_gamma"], alpha=cfg["alpha"],
                       device=device, quiet=True)
    h = r["history"]
    train = h["seconds"][1:]  # the first epoch warms up allocators and caches
    total = [a + b for a, b in zip(h["seconds"][1:], h["eval_seconds"][1:])]
    return statistics.median(train), statistics.median(total), h["loss"][0]


def _cli(extra, threads):
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-m", "stablenets_ext", "train", "--json", "--quiet",
                          "--threads", str(threads), *extra], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ddp_part(dataset, world, history_dir=None):
    """One process with ``world`` threads against ``world`` DDP ranks of one thread."""
    rows = []
    for label, extra, threads in (
            ("1 process, 1 thread", [], 1),
            (f"1 process, {world} threads", [], world),
            (f"DDP {world} ranks x 1 thread", ["--backend", "dist", "--workers", str(world)], 1)):
        line = _cli(["--dataset", dataset, *extra], threads)
        rows.append({"run": label, "seconds_per_epoch": line["seconds_per_epoch"],
                     "accuracy": line["accuracy"], "test_accuracy": line.get("test_accuracy"),
                     "epochs": line["epochs"]})
        print(f"{label:<28} {line['seconds_per_epoch']:.4f} s/epoch  accuracy "
              f"{100 * line['accuracy']:.2f}% after {line['epochs']} epochs", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="swiss")
    p.add_argument("--arch", default="verlet", help="a dense arch, or 'all'")
    p.add_argument("--epochs", type=int, default=8, help="timed epochs (plus one warm-up)")
    p.add_argument("--layers", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true", help="one JSON line per arch")
    p.add_argument("--ddp", type=int, metavar="W",
                   help="compare DDP with W ranks against one process (default dataset digits)")
    args = p.parse_args(argv)
    if args.ddp:
        rows = ddp_part("digits" if args.dataset == "swiss" else args.dataset, args.ddp)
        if args.json:
            print(json.dumps(rows))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if not ops.has_kernel(device):
        print(f"no fused kernel for {device.type} (compiled for: "
              f"{ops.compiled_devices() or 'none'}); build the extension first", file=sys.stderr)
        return 1
    data = D.load_dataset(args.dataset)
    archs = M.DENSE_ARCHS if args.arch == "all" else (args.arch,)
    if not args.json:
        print(f"{args.dataset}, {torch.get_num_threads()} threads, {device}, median of {args.epochs} epochs")
        print(f"{'arch':<14}{'layers':>7}{'width':>6}{'batch':>6}  {'fused s/ep':>11}"
              f"{'ref s/ep':>10}{'ratio':>7}  {'ratio (+eval)':>13}")
    worst = None
    for arch in archs:
        cfg = preset(args.dataset, arch)
        for key in ("layers", "width", "batch_size"):
            if getattr(args, key) is not None:
                cfg[key] = getattr(args, key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f_train, f_total, f_loss = epoch_seconds(arch, "fused", cfg, data, args.epochs, device)
            r_train, r_total, r_loss = epoch_seconds(arch, "reference", cfg, data, args.epochs, device)
        ratio, ratio_total = r_train / f_train, r_total / f_total
        worst = ratio if worst is None else min(worst, ratio)
        if args.json:
            print(json.dumps({"arch": arch, "dataset": args.dataset, "layers": cfg["layers"],
                              "width": cfg["width"], "batch_size": cfg["batch_size"],
                              "threads": torch.get_num_threads(), "device": str(device),
                              "fused_s_per_epoch": f_train, "reference_s_per_epoch": r_train,
                              "ratio": ratio, "ratio_with_eval": ratio_total,
                              "first_epoch_loss": [f_loss, r_loss]}))
        else:
            print(f"{arch:<14}{cfg['layers']:>7}{cfg['width']:>6}{cfg['batch_size']:>6}  "
                  f"{f_train:>11.4f}{r_train:>10.4f}{ratio:>6.1f}x  {ratio_total:>12.1f}x")
    if not args.json:
        print(f"training speed-up, reference / fused: {worst:.2f}x (target >= 3x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
