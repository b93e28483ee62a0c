"""Command line: ``stablenets train | info | stability`` (also ``python -m stablenets_ext``).

``stablenets train`` with no arguments trains a 64-layer Verlet network of
width 4 on the swiss roll with the fused kernels (where compiled) and prints
the validation accuracy. Settings not given on the command line come from
:data:`stablenets_ext.training.presets.PRESETS` for the dataset and arch.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import sys

EXTERNAL_TRAINERS = {"sg": "stablenets_ext.training.synthetic", "pvd": "stablenets_ext.training.pvd"}
TRAINERS = ("backprop",) + tuple(EXTERNAL_TRAINERS)


class CliError(ValueError):
    """A usage error found after parsing (reported like an argparse error)."""


# ------------------------------------------------------------------ parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _accuracy(text):
    """A fraction in (0, 1] or a percentage in (1, 100]."""
    value = _positive_float(text)
    if value > 1:
        value /= 100.0
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a fraction <= 1 or a percentage <= 100, got {text!r}")
    return value


def _load_external(trainer):
    """Import an external trainer module; returns (module, None) or (None, why)."""
    try:
        return importlib.import_module(EXTERNAL_TRAINERS[trainer]), None
    except Exception as exc:  # a missing module or a broken one: report when requested
        return None, f"{type(exc).__name__}: {exc}"


def build_parser():
    from .data import DATASETS
    from .functional import IMPLS
    from .models import ARCHS
    from .reference import ACTIVATIONS

    parser = argparse.ArgumentParser(
        prog="stablenets",
        description="Stable deep networks (Haber & Ruthotto 2017) with fused kernels.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,info,stability}")
    sub.required = True

    t = sub.add_parser(
        "train", help="train a network (default: Verlet on the swiss roll)",
        description="Train a stable network. Unset options take the dataset's preset "
                    "(stablenets_ext.training.presets).",
    )
    m = t.add_argument_group("model")
    m.add_argument("--arch", choices=ARCHS, help="architecture (default: the dataset preset's)")
    m.add_argument("--dataset", choices=DATASETS, default="swiss", help="default: swiss")
    m.add_argument("--layers", type=_positive_int, help="layers N of the stack")
    m.add_argument("--width", type=_positive_int, help="stack width (channels for conv archs)")
    m.add_argument("--step", type=_positive_float, help="step h")
    m.add_argument("--activation", choices=sorted(ACTIVATIONS))
    m.add_argument("--gamma", type=_nonneg_float, help="antisymmetric damping (default 0.01)")
    m.add_argument("--impl", choices=IMPLS, default="auto",
                   help="auto: fused kernels where compiled, else the reference (default)")
    o = t.add_argument_group("optimisation")
    o.add_argument("--trainer", choices=TRAINERS, default="backprop")
    o.add_argument("--epochs", type=_positive_int, help="epochs (per level with --levels)")
    o.add_argument("--batch-size", type=_positive_int)
    o.add_argument("--lr", type=_positive_float, help="Adam learning rate")
    o.add_argument("--weight-decay", type=_nonneg_float)
    o.add_argument("--lr-step", type=_positive_int, help="StepLR: epochs between decays")
    o.add_argument("--lr-gamma", type=_positive_float, help="StepLR: decay factor")
    o.add_argument("--alpha", type=_nonneg_float, help="smoothness-in-time regulariser weight")
    o.add_argument("--alpha-c", type=_nonneg_float, help="classifier regulariser weight")
    o.add_argument("--levels", type=_positive_int, default=1,
                   help="multilevel: train, double the layers, halve the step, repeat")
    o.add_argument("--target-accuracy", type=_accuracy,
                   help="stop once validation accuracy reaches this (0.99 or 99)")
    o.add_argument("--workers", type=_positive_int, help="parallel workers (sg, pvd)")
    o.add_argument("--backend", choices=("process", "dist"), help="parallel backend (sg, pvd)")
    r = t.add_argument_group("run")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--data-root", help="folder of the mnist/cifar files ($STABLENETS_DATA)")
    r.add_argument("--cache", nargs="?", const=True, default=None, metavar="PATH",
                   help="cache the dataset as HDF5 (at PATH, or in the data root)")
    r.add_argument("--no-download", action="store_true", help="never download datasets")
    r.add_argument("--save", metavar="PATH", help="checkpoint written (atomically) every epoch")
    r.add_argument("--resume", metavar="PATH", help="continue from a checkpoint")
    r.add_argument("--plot", metavar="DIR", help="write loss/accuracy (and 2-D trajectory) plots")
    r.add_argument("--history", metavar="PATH", help="write the history as JSON")
    r.add_argument("--json", action="store_true", help="print one JSON line with the result")
    r.add_argument("--quiet", action="store_true", help="no progress bar")

    # External trainers add their own options; a missing module is reported if requested.
    missing = {}
    for name in EXTERNAL_TRAINERS:
        module, why = _load_external(name)
        if module is None or not hasattr(module, "add_cli_arguments"):
            missing[name] = why or f"{EXTERNAL_TRAINERS[name]} has no add_cli_arguments"
            continue
        group = t.add_argument_group(f"--trainer {name}")
        try:
            module.add_cli_arguments(group)
        except Exception as exc:
            missing[name] = f"add_cli_arguments failed: {type(exc).__name__}: {exc}"
    t.set_defaults(missing_trainers=missing)

    i = sub.add_parser("info", help="version, torch, and which devices have fused kernels")
    i.add_argument("--json", action="store_true")
    sub.add_parser("stability", help="stability analysis (see `stablenets stability --help`)",
                   add_help=False)
    return parser


# -------------------------------------------------------------------- info


def cmd_info(args) -> int:
    from . import info

    data = info()
    if args.json:
        print(json.dumps(data))
        return 0
    width = max(len(k) for k in data)
    for key, value in data.items():
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value)) or "none"
        print(f"{key:<{width}}  {value}")
    return 0


# ------------------------------------------------------------------- train


def resolve_device(text):
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CliError(f"--device: expected cpu, cuda, cuda:N or auto, got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CliError("--device: CUDA was requested but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise CliError(f"--device: expected cpu, cuda, cuda:N or auto, got {text!r}")
    return device


def settings(args) -> dict:
    """The preset for the dataset/arch with command-line values on top."""
    from .training.presets import preset

    out = preset(args.dataset, args.arch)
    for key in ("layers", "width", "step", "activation", "epochs", "batch_size", "lr",
                "weight_decay", "lr_step", "lr_gamma", "alpha", "alpha_c"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    return out


def check_combinations(args, cfg, data, device):
    from . import ops
    from .models import is_conv

    if args.trainer == "backprop":
        for flag, value in (("--workers", args.workers), ("--backend", args.backend)):
            if value is not None:
                raise CliError(f"{flag}: only applies to --trainer sg or pvd, not backprop")
    elif args.trainer in args.missing_trainers:
        raise CliError(
            f"--trainer {args.trainer}: the module {EXTERNAL_TRAINERS[args.trainer]} is not "
            f"available ({args.missing_trainers[args.trainer]})"
        )
    if is_conv(cfg["arch"]) and not data.is_image:
        raise CliError(
            f"--arch {cfg['arch']}: a convolutional architecture needs image data "
            f"(mnist, cifar10, cifar100), but --dataset {args.dataset} has {data.features} features"
        )
    if args.gamma is not None and not cfg["arch"].endswith("antisymmetric"):
        raise CliError(f"--gamma: only applies to antisymmetric architectures, not {cfg['arch']}")
    if args.impl == "fused" and not is_conv(cfg["arch"]) and not ops.has_kernel(device):
        raise CliError(
            f"--impl fused: no compiled kernel for device {device.type!r} (compiled for: "
            f"{', '.join(ops.compiled_devices()) or 'none'}); use --impl auto or reference"
        )
    if args.resume is not None and not os.path.exists(args.resume):
        raise CliError(f"--resume: checkpoint {args.resume!r} does not exist")
    if args.levels > 1 and args.trainer != "backprop":
        raise CliError(f"--levels: multilevel training runs with --trainer backprop, not {args.trainer}")


def kernel_used(arch, impl, device) -> str:
    from . import ops
    from .models import is_conv

    if is_conv(arch):
        return "aten"
    return "fused" if impl != "reference" and ops.has_kernel(device) else "reference"


def cmd_train(args) -> int:
    import numpy as np
    import torch

    from .data import load_dataset
    from .models import StableNet

    cfg = settings(args)
    for key, value in cfg.items():  # external trainers read the resolved values from args
        setattr(args, key, value)
    device = resolve_device(args.device)
    download = False if args.no_download else None
    data = load_dataset(args.dataset, root=args.data_root, seed=args.seed, download=download,
                        cache=args.cache)
    check_combinations(args, cfg, data, device)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    common = {
        "epochs": cfg["epochs"], "batch_size": cfg["batch_size"], "lr": cfg["lr"],
        "weight_decay": cfg["weight_decay"], "lr_step": cfg["lr_step"], "lr_gamma": cfg["lr_gamma"],
        "alpha": cfg["alpha"], "alpha_c": cfg["alpha_c"], "target_accuracy": args.target_accuracy,
        "device": device, "seed": args.seed, "quiet": args.quiet or args.json,
    }
    checkpoint = args.save or args.resume
    stack_kwargs = {"gamma": args.gamma} if args.gamma is not None else {}
    model = StableNet(cfg["arch"], data.features, data.classes, cfg["layers"], width=cfg["width"],
                      step=cfg["step"], activation=cfg["activation"], impl=args.impl,
                      **stack_kwargs).to(device)

    if args.trainer == "backprop":
        if args.levels > 1 or args.resume is not None:
            from .training.multilevel import train_multilevel

            model, result = train_multilevel(model, data, levels=args.levels, resume=args.resume,
                                             checkpoint=checkpoint, **common)
        else:
            from .training.backprop import train

            result = train(model, data, checkpoint=checkpoint, **common)
    else:
        module, _ = _load_external(args.trainer)
        args.model = model  # built from the resolved settings; a trainer may build its own
        result = module.run_cli(args, data, device)
        model = result.get("model", model) if isinstance(result, dict) else model

    result = {k: v for k, v in result.items() if k != "model"}
    if args.history:
        from .training.backprop import write_json

        write_json(args.history, result)
    if args.plot:
        write_plots(args.plot, result, model, data, cfg)

    line = {
        "accuracy": result.get("accuracy"), "loss": result.get("loss"),
        "seconds": result.get("seconds"), "epochs": result.get("epochs"),
        "arch": cfg["arch"], "dataset": args.dataset, "impl": args.impl,
        "kernel": kernel_used(cfg["arch"], args.impl, device), "device": str(device),
        "trainer": args.trainer, "layers": getattr(model, "layers", cfg["layers"]),
        "width": cfg["width"], "levels": args.levels,
    }
    for key, value in result.items():
        if key not in line and key not in ("history", "levels") and _jsonable(value):
            line[key] = value
    if args.json:
        print(json.dumps(line), flush=True)
    else:
        acc = line["accuracy"]
        acc_text = "n/a" if acc is None else f"{100 * acc:.2f}%"
        per_epoch = result.get("seconds_per_epoch")
        print(
            f"{args.dataset} / {cfg['arch']} ({line['layers']} layers, width {cfg['width']}, "
            f"{line['kernel']} on {device}): validation accuracy {acc_text} after "
            f"{line['epochs']} epochs, {line['seconds'] or 0:.1f} s training"
            + (f" ({per_epoch:.3f} s/epoch)" if isinstance(per_epoch, float) else ""),
            flush=True,
        )
    return 0


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def write_plots(folder, result, model, data, cfg):
    from .training import plots

    os.makedirs(folder, exist_ok=True)
    stem = f"{data.name}-{cfg['arch']}"
    if "history" in result and result["history"].get("loss"):
        plots.plot_history(result, os.path.join(folder, f"{stem}-curves.png"))
    if data.features == 2 and hasattr(model, "trajectory"):
        plots.plot_trajectories(model, data.val_x, data.val_y,
                                os.path.join(folder, f"{stem}-trajectories.png"))


# -------------------------------------------------------------------- main


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "stability":
        from . import stability

        return stability.main(argv[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            return cmd_info(args)
        return cmd_train(args)
    except (CliError, ValueError, FileNotFoundError) as exc:
        prog = f"{parser.prog} {args.command}"
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted (KeyboardInterrupt)", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        # A parallel trainer's dead worker or stage (PVD WorkerError, SG StageError):
        # the message names it; the traceback adds nothing for a user.
        if type(exc).__name__ not in ("WorkerError", "StageError"):
            raise
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
