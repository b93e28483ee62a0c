"""The ``stablenets`` argument parser. A trainer's own flags come from the
fields of its ``Options`` dataclass (:func:`stablenets_ext.training.options.option`)."""

from __future__ import annotations

import argparse

from ..training import TRAINERS, load_trainer
from ..training import options as T
from ..training.options import cli_fields

# Flags several trainers share; a trainer takes one when its Options has the field.
SHARED = {
    "workers": dict(flags=("--workers",), type=T.positive_int,
                    help="parallel workers: stages (sg), blocks (pvd), ranks (--backend dist)"),
    "backend": dict(flags=("--backend",), choices=("process", "sequential", "dist"),
                    help="process (sg, pvd), sequential (pvd), dist: torch.distributed "
                         "(DDP for backprop, launched with torchrun)"),
    "heartbeat_timeout": dict(flags=("--heartbeat-timeout",), type=T.positive_float,
                              metavar="S", help="seconds a live worker may go without a "
                                                "heartbeat before it is reported hung (sg, "
                                                "pvd, backprop --backend dist; default 30)"),
    "start_timeout": dict(flags=("--start-timeout",), type=T.positive_float, metavar="S",
                          help="seconds the workers may take to start before they are "
                               "reported (sg, pvd: default 120; backprop --backend dist: "
                               "180); no limit once they run"),
}
# TrainConfig fields set from flags of the same name.
CONFIG_FLAGS = ("epochs", "batch_size", "lr", "weight_decay", "lr_step", "lr_gamma", "alpha",
                "alpha_c", "target_accuracy")
MODEL_FLAGS = ("layers", "width", "step", "activation")


def build_parser(suppress_defaults=False):
    """``suppress_defaults``: leave out every flag not given (see :func:`given_options`)."""
    parser = argparse.ArgumentParser(
        prog="stablenets",
        description="Stable deep networks (Haber & Ruthotto 2017) with fused kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,info,stability}")
    sub.required = True
    build_train_parser(sub, suppress_defaults)
    i = sub.add_parser("info", help="version, torch, and which devices have fused kernels")
    i.add_argument("--json", action="store_true")
    sub.add_parser("stability", help="stability analysis (see `stablenets stability --help`)",
                   add_help=False)
    return parser


def _trainer_options():
    """{trainer: Options class}, and why a trainer could not be imported."""
    out, missing = {}, {}
    for name in TRAINERS:
        try:
            out[name] = load_trainer(name).Options
        except Exception as exc:  # a missing module or a broken one: report when requested
            missing[name] = f"{type(exc).__name__}: {exc}"
    return out, missing


def build_train_parser(sub, suppress_defaults=False):
    from ..data import DATASETS
    from ..functional import IMPLS
    from ..models import ARCHS
    from ..reference import ACTIVATIONS

    t = sub.add_parser(
        "train", help="train a network (default: Verlet on the swiss roll)",
        description="Train a stable network. Unset options take the dataset's preset "
                    "(stablenets_ext.training.presets).",
    )
    m = t.add_argument_group("model")
    m.add_argument("--arch", choices=ARCHS, help="architecture (default: the dataset preset's)")
    m.add_argument("--dataset", choices=DATASETS, default="swiss", help="default: swiss")
    m.add_argument("--layers", type=stage_ints, metavar="N[,N...]",
                   help="layers of the stack, or of each stage (comma-separated: 2,2,2)")
    m.add_argument("--width", "--widths", dest="width", type=stage_ints, metavar="W[,W...]",
                   help="stack width (channels for conv archs), or one per stage (16,32,64); "
                        "a single value of --layers or --width applies to every stage")
    m.add_argument("--downsample", choices=("pool", "stride", "none"),
                   help="between stages: 2x2 average pooling (conv default), a stride-2 3x3 "
                        "convolution, or none (dense archs)")
    m.add_argument("--widen", choices=("conv", "pad"),
                   help="between stages: change the width by a learned 1x1 convolution (linear "
                        "map for dense archs; default) or by zero channels")
    m.add_argument("--step", type=T.positive_float, help="step h")
    m.add_argument("--activation", choices=sorted(ACTIVATIONS))
    m.add_argument("--gamma", type=T.nonneg_float, help="antisymmetric damping (default 0.01)")
    m.add_argument("--impl", choices=IMPLS, default="auto",
                   help="auto: fused kernels where compiled, else the reference (default)")
    m.add_argument("--reversible", action="store_true",
                   help="leapfrog/verlet: rebuild the states backwards instead of storing them")
    m.add_argument("--kernel-size", type=T.positive_int, help="conv archs: kernel size (odd)")
    m.add_argument("--lift", choices=("auto", "learn", "pad"),
                   help="input lift: learned, zero-padded, or auto (pad when wide enough)")
    m.add_argument("--pool", type=T.nonneg_int,
                   help="conv archs: pool the feature map to PxP before the classifier")
    m.add_argument("--batch-norm", action="store_true",
                   help="conv archs: BatchNorm2d in every layer (outside the stability theory)")
    o = t.add_argument_group("optimisation")
    o.add_argument("--trainer", choices=tuple(TRAINERS), default="backprop")
    o.add_argument("--epochs", type=T.positive_int, help="epochs (per level with --levels)")
    o.add_argument("--batch-size", type=T.positive_int)
    o.add_argument("--lr", type=T.positive_float, help="Adam learning rate")
    o.add_argument("--weight-decay", type=T.nonneg_float)
    o.add_argument("--lr-step", type=T.positive_int, help="StepLR: epochs between decays")
    o.add_argument("--lr-gamma", type=T.positive_float, help="StepLR: decay factor")
    o.add_argument("--alpha", type=T.nonneg_float, help="smoothness-in-time regulariser weight")
    o.add_argument("--alpha-c", type=T.nonneg_float, help="classifier regulariser weight")
    o.add_argument("--target-accuracy", type=T.accuracy,
                   help="stop once validation accuracy reaches this (0.99 or 99)")
    o.add_argument("--compare", type=_compare_list, metavar="RUN[,RUN...]",
                   help="also run comparisons: sequential (pvd), backprop (sg, pvd)")
    for dest, spec in SHARED.items():
        kw = {k: v for k, v in spec.items() if k != "flags"}
        o.add_argument(*spec["flags"], dest=dest, **kw)
    r = t.add_argument_group("run")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    r.add_argument("--seed", type=T.seed, default=0, help=f"0 to {T.SEED_MAX} (default 0)")
    r.add_argument("--amp", choices=("bf16", "fp16"),
                   help="mixed precision: forward under torch.autocast in bfloat16, or float16 "
                        "with a gradient scaler (every trainer; default: float32)")
    r.add_argument("--threads", type=T.positive_int,
                   help="torch threads (per worker for sg and pvd; default: torch's)")
    r.add_argument("--data-root", help="folder of the mnist/cifar files ($STABLENETS_DATA)")
    r.add_argument("--cache", nargs="?", const=True, default=None, metavar="PATH",
                   help="cache the dataset as HDF5 (at PATH, or in the data root)")
    r.add_argument("--no-download", action="store_true", help="never download datasets")
    r.add_argument("--save", metavar="PATH", help="checkpoint written (atomically) every epoch")
    r.add_argument("--resume", metavar="PATH",
                   help="continue from a checkpoint (written again only with --save)")
    r.add_argument("--plot", metavar="DIR", help="write loss/accuracy (and 2-D trajectory) plots")
    r.add_argument("--history", metavar="PATH", help="write the history as JSON")
    r.add_argument("--json", action="store_true",
                   help="print one JSON line with the result: val_accuracy (also under its old "
                        "name, accuracy) is the accuracy on the validation split, test_accuracy "
                        "the test set's (datasets with one), measured once at the end")
    r.add_argument("--quiet", action="store_true", help="no progress bar")

    # Each trainer's own flags, from its Options dataclass.
    classes, missing = _trainer_options()
    seen = set(SHARED)
    owners = {}
    for name, cls in classes.items():
        group = None
        for f, meta in cli_fields(cls):
            owners.setdefault(f.name, []).append(name)
            if f.name in seen:
                continue
            seen.add(f.name)
            group = group or t.add_argument_group(f"--trainer {name}")
            kw = {"dest": f.name, "help": meta["help"], "default": f.default}
            for key in ("type", "choices", "action", "metavar"):
                if meta[key] is not None:
                    kw[key] = meta[key]
            group.add_argument(meta["flag"], **kw)
    t.set_defaults(missing_trainers=missing, option_owners=owners)
    if suppress_defaults:
        for action in t._actions:
            if action.dest != "help":
                action.default = argparse.SUPPRESS
        t._defaults.clear()
    return t


def stage_ints(text):
    """``"8"`` -> 8; ``"2,2,2"`` -> (2, 2, 2) (one positive int per stage)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected a positive int or comma-separated positive ints (one per stage), "
            f"got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _compare_list(text):
    runs = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [r for r in runs if r not in ("sequential", "backprop")]
    if not runs or bad:
        raise argparse.ArgumentTypeError(f"expected sequential and/or backprop, comma-separated, "
                                         f"got {text!r}")
    return runs


def given_options(argv) -> set:
    """The dests set explicitly on the command line (not by a default)."""
    ns = build_parser(suppress_defaults=True).parse_args(["train", *argv])
    return set(vars(ns)) - {"command"}
