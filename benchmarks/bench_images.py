"""Stable networks against plain baselines on real digits: test accuracy against
training time, all models trained in the same run, on the same data and threads.

Models (``--models``, comma-separated, default all but ``stable-long``):

- ``stable``: the ``mnist`` preset exactly as ``stablenets train --dataset mnist``
  builds and trains it (:func:`stablenets_ext.training.presets.preset`);
- ``stable-long``: the preset's longer setting
  (:data:`stablenets_ext.training.presets.MNIST_LONG`), the one meant to beat LeNet;
- ``lenet``: a LeNet-style CNN (conv 5x5 6 - pool - conv 5x5 16 - pool - 120 -
  84 - 10, ReLU), Adam 1e-3, batch 64, 20 epochs;
- ``mlp``: 784-256-10 (ReLU), Adam 1e-3, batch 64, 20 epochs.

Every model is trained by the same loop (the package's Adam + StepLR and
shuffled batches, :func:`stablenets_ext.training.backprop.engine.make_optimizer`,
:class:`stablenets_ext.data.TensorLoader`) on ``data.train_x`` (the training
files less the fixed validation split the CLI holds out), and evaluated on the
test files after every epoch. Only the training steps are timed (the
evaluation is not); the clock is cumulative over epochs, so each model gives
a curve of test accuracy against training seconds.

Prints a table (per model: epochs, training seconds, final and best test
accuracy, median over ``--seeds``) and writes ``--out``/bench_images.json and
``--out``/bench_images.png (accuracy against seconds, log time axis).

    python benchmarks/bench_images.py --data-root /work/data/mnist --threads 1 \\
        --seeds 0,1,2 --out bench-images
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from stablenets_ext.data import TensorLoader, load_dataset  # noqa: E402
from stablenets_ext.models import StableNet  # noqa: E402
from stablenets_ext.training.backprop.engine import evaluate, make_optimizer  # noqa: E402
from stablenets_ext.training.outputs import check_folder  # noqa: E402
from stablenets_ext.training import presets  # noqa: E402

MODELS = ("stable", "stable-long", "lenet", "mlp")
DEFAULT_MODELS = ("stable", "lenet", "mlp")
BASELINE = {"epochs": 20, "batch_size": 64, "lr": 1e-3, "lr_step": None, "lr_gamma": 1.0,
            "weight_decay": 0.0}


class LeNet(nn.Module):
    """2 convolutions + 3 linear layers (LeCun et al. 1998, ReLU and max pooling)."""

    def __init__(self, channels=1, size=28, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        side = ((size // 2) - 4) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * side * side, 120), nn.ReLU(), nn.Linear(120, 84),
            nn.ReLU(), nn.Linear(84, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class MLP(nn.Module):
    def __init__(self, inputs=784, hidden=256, classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)


def stable_model(data, settings):
    kw = {k: settings[k] for k in presets.MODEL_KEYS if k in settings}
    return StableNet(settings["arch"], data.features, data.classes, settings["layers"],
                     width=settings["width"], step=settings["step"],
                     activation=settings["activation"], **kw)


def build(name, data, epochs=None):
    """(model, training settings) for ``name``."""
    if name == "stable":
        s = presets.preset("mnist")
    elif name == "stable-long":
        s = presets.preset("mnist")
        s.update(presets.MNIST_LONG)
    elif name == "lenet":
        c, h, _ = data.features
        return LeNet(c, h, data.classes), dict(BASELINE, epochs=epochs or BASELINE["epochs"])
    elif name == "mlp":
        c, h, w = data.features
        return MLP(c * h * w, 256, data.classes), dict(BASELINE, epochs=epochs or BASELINE["epochs"])
    else:
        raise ValueError(f"--models: expected some of {list(MODELS)}, got {name!r}")
    if epochs:
        s["epochs"] = epochs
    return stable_model(data, s), s


def run(name, data, seed, epochs, budget):
    """Train one model; returns its curve (cumulative seconds, test accuracy per epoch)."""
    torch.manual_seed(seed)
    model, s = build(name, data, epochs)
    opt, sched = make_optimizer(model, s["lr"], s.get("weight_decay", 0.0), s.get("lr_step"),
                                s.get("lr_gamma", 0.5), s["epochs"])
    loader = TensorLoader(data.train_x, data.train_y, s["batch_size"], shuffle=True, seed=seed)
    seconds, curve = 0.0, []
    for epoch in range(s["epochs"]):
        model.train()
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
        sched.step()
        seconds += time.perf_counter() - t0
        _, acc = evaluate(model, data.test_x, data.test_y)
        curve.append({"epoch": epoch + 1, "seconds": seconds, "test_accuracy": acc,
                      "loss": loss.item()})
        if budget is not None and seconds >= budget:
            break
    params = sum(p.numel() for p in model.parameters())
    return {"model": name, "seed": seed, "params": params, "curve": curve,
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()}}


def _ints(text):
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        out = []
    if not out:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}")
    return out


def _models(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in MODELS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(MODELS)}, got {text!r}")
    return names


def table(results) -> str:
    rows = ["| model | params | epochs | train s | final test acc | best test acc | seeds |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["model"] for r in results):
        rs = [r for r in results if r["model"] == name]
        med = statistics.median
        rows.append(
            f"| {name} | {rs[0]['params']} | {med(len(r['curve']) for r in rs):g} | "
            f"{med(r['curve'][-1]['seconds'] for r in rs):.2f} | "
            f"{med(r['curve'][-1]['test_accuracy'] for r in rs):.4f} | "
            f"{med(max(c['test_accuracy'] for c in r['curve']) for r in rs):.4f} | {len(rs)} |")
    return "\n".join(rows)


def plot(results, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = {}
    for r in results:
        colour = colours.setdefault(r["model"], f"C{len(colours)}")
        xs = [c["seconds"] for c in r["curve"]]
        ys = [c["test_accuracy"] for c in r["curve"]]
        first = sum(1 for q in results if q["model"] == r["model"] and q is not r
                    and results.index(q) < results.index(r)) == 0
        ax.plot(xs, ys, "o-", ms=3, color=colour, alpha=0.8, label=r["model"] if first else None)
    ax.set_xscale("log")
    ax.set_xlabel("training seconds (cumulative, evaluation not timed)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder holding MNIST (torchvision layout)")
    p.add_argument("--dataset", default="mnist", choices=("mnist",), help="default mnist")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--models", type=_models, default=list(DEFAULT_MODELS),
                   help=f"comma-separated, of {', '.join(MODELS)} (default "
                        f"{','.join(DEFAULT_MODELS)})")
    p.add_argument("--epochs", type=int, help="epochs for every model (default: each model's own)")
    p.add_argument("--time-budget", type=float, metavar="S",
                   help="stop a model after the epoch in which its training time passes S")
    p.add_argument("--seeds", type=_ints, default=[0], help="comma-separated (default 0)")
    p.add_argument("--out", help="folder for bench_images.json and bench_images.png")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads: expected a positive int, got {args.threads}")
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs: expected a positive int, got {args.epochs}")
    if args.time_budget is not None and not args.time_budget > 0:
        p.error(f"--time-budget: expected a positive number of seconds, got {args.time_budget}")
    if args.out is not None:
        check_folder(args.out, "--out")
        for f in ("bench_images.json", "bench_images.png"):
            path = os.path.join(args.out, f)
            if os.path.exists(path) and not _ours(path):
                p.error(f"--out: {path!r} exists and was not written by this benchmark; "
                        "choose another folder")
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, root=args.data_root, download=False)
    if data.test_x is None:
        p.error(f"--dataset {args.dataset}: no test files under {args.data_root!r}")
    print(f"# {args.dataset}: {data.train_x.shape[0]} training images (validation split of "
          f"{data.val_x.shape[0]} left out), {data.test_x.shape[0]} test images; "
          f"{args.threads} thread(s); torch {torch.__version__}", flush=True)
    results = []
    for seed in args.seeds:
        for name in args.models:
            r = run(name, data, seed, args.epochs, args.time_budget)
            last = r["curve"][-1]
            print(f"  {name:12s} seed {seed}: {last['epoch']:3d} epochs, {last['seconds']:7.2f} s, "
                  f"test accuracy {last['test_accuracy']:.4f}", flush=True)
            results.append(r)
    print()
    print(table(results))
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        meta = {"written_by": "benchmarks/bench_images.py", "dataset": args.dataset,
                "train": int(data.train_x.shape[0]), "test": int(data.test_x.shape[0]),
                "threads": args.threads, "seeds": args.seeds, "torch": torch.__version__}
        with open(os.path.join(args.out, "bench_images.json"), "w") as f:
            json.dump({**meta, "results": results}, f, indent=1)
        plot(results, os.path.join(args.out, "bench_images.png"),
             f"{args.dataset}: {meta['train']} train / {meta['test']} test images, "
             f"{args.threads} thread(s), seeds {args.seeds}")
        print(f"\nwrote {os.path.join(args.out, 'bench_images.json')} and bench_images.png")
    return 0


def _ours(path) -> bool:
    if path.endswith(".png"):
        return os.path.exists(path[:-4] + ".json") and _ours(path[:-4] + ".json")
    try:
        with open(path) as f:
            return json.load(f).get("written_by") == "benchmarks/bench_images.py"
    except (OSError, ValueError, AttributeError):
        return False


if __name__ == "__main__":
    sys.exit(main())
