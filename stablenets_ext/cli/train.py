"""``stablenets train``: flags -> TrainConfig + the trainer's Options -> fit.

Every check that can fail is made before the first epoch: flags that do not
apply to the chosen trainer or architecture, a resume whose checkpoint was
made with other settings, output paths that cannot be written, a checkpoint
another run is writing."""

from __future__ import annotations

import argparse
import os
import random
import sys

from ..training import TRAINERS, load_trainer
from ..training import options as T
from ..training.options import cli_fields
from .errors import CliError

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
                                                "pvd; default 30)"),
}
# TrainConfig fields set from flags of the same name.
CONFIG_FLAGS = ("epochs", "batch_size", "lr", "weight_decay", "lr_step", "lr_gamma", "alpha",
                "alpha_c", "target_accuracy")
MODEL_FLAGS = ("layers", "width", "step", "activation")
# Settings that identify a run: a resume must match them (the others may change).
NOT_IDENTITY = {"epochs", "target_accuracy", "threads", "device", "quiet", "json", "save",
                "resume", "plot", "history", "compare", "cache", "data_root", "no_download",
                "heartbeat_timeout", "sg_timeout", "sg_baseline_epochs", "sg_threads",
                "pvd_threads", "pvd_start_method", "impl", "command"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


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
    m.add_argument("--layers", type=T.positive_int, help="layers N of the stack")
    m.add_argument("--width", type=T.positive_int, help="stack width (channels for conv archs)")
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
    r.add_argument("--json", action="store_true", help="print one JSON line with the result")
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


def _compare_list(text):
    runs = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    bad = [r for r in runs if r not in ("sequential", "backprop")]
    if not runs or bad:
        raise argparse.ArgumentTypeError(f"expected sequential and/or backprop, comma-separated, "
                                         f"got {text!r}")
    return runs


def given_options(argv) -> set:
    """The dests set explicitly on the command line (not by a default)."""
    from . import build_parser

    ns = build_parser(suppress_defaults=True).parse_args(["train", *argv])
    return set(vars(ns)) - {"command"}


# ------------------------------------------------------------------ checks


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


def check_applicable(args, given: set, trainer) -> None:
    """Refuse every given flag the chosen trainer would ignore."""
    name = args.trainer
    fields = {f.name for f in __import__("dataclasses").fields(trainer.Options)}
    for dest in sorted(given):
        owners = args.option_owners.get(dest)
        if owners is not None and dest not in fields:
            raise CliError(f"{_flag(dest)}: only applies to --trainer {' or '.join(owners)}, "
                           f"not {name}")
        if dest in SHARED and dest not in fields:
            raise CliError(f"{SHARED[dest]['flags'][0]}: does not apply to --trainer {name}")
        if dest in trainer.UNSUPPORTED:
            raise CliError(f"{_flag(dest)}: --trainer {name} cannot honour it (no schedule or "
                           f"regulariser there); leave it out")
    if "compare" in given:
        bad = [c for c in args.compare if c not in trainer.COMPARISONS]
        if bad:
            runs = ", ".join(trainer.COMPARISONS) or "none"
            raise CliError(f"--compare {','.join(bad)}: --trainer {name} offers: {runs}")
    if name == "backprop" and "backend" in given and args.backend != "dist":
        raise CliError(f"--backend {args.backend}: backprop runs in one process or with "
                       f"--backend dist (DistributedDataParallel)")
    if name == "backprop" and "workers" in given and args.backend != "dist":
        raise CliError("--workers: backprop takes it with --backend dist (one rank per worker)")


def check_model_flags(args, given: set, arch: str) -> None:
    from ..models import is_conv

    if "gamma" in given and not arch.endswith("antisymmetric"):
        raise CliError(f"--gamma: only applies to antisymmetric architectures, not {arch}")
    if args.reversible and not arch.endswith(("leapfrog", "verlet")):
        raise CliError(f"--reversible: only leapfrog and verlet stacks run backwards, not {arch}")
    for flag, dest in (("--kernel-size", "kernel_size"), ("--pool", "pool"),
                       ("--batch-norm", "batch_norm")):
        if dest in given and not is_conv(arch):
            raise CliError(f"{flag}: only applies to convolutional architectures, not {arch}")


def check_outputs(args) -> None:
    from ..training.outputs import check_file, check_folder

    if args.save is not None:
        check_file(args.save, "--save")
    if args.history is not None:
        check_file(args.history, "--history")
    if args.plot is not None:
        check_folder(args.plot, "--plot")
    if args.resume is not None and not os.path.exists(args.resume):
        raise CliError(f"--resume: checkpoint {args.resume!r} does not exist")


# ------------------------------------------------------------------- train


def settings(args, adopted: dict) -> dict:
    """The preset for the dataset/arch, under the checkpoint's settings, under
    the command line's."""
    from ..training.presets import preset

    arch = args.arch or adopted.get("arch")
    out = preset(args.dataset, arch)
    for key in MODEL_FLAGS + CONFIG_FLAGS:
        if key in adopted:
            out[key] = adopted[key]
        value = getattr(args, key, None)
        if value is not None:
            out[key] = value
    return out


def model_kwargs(args) -> dict:
    kw = {}
    if args.gamma is not None:
        kw["gamma"] = args.gamma
    if args.reversible:
        kw["reversible"] = True
    if args.kernel_size is not None:
        kw["kernel_size"] = args.kernel_size
    if args.lift is not None:
        kw["lift"] = {"auto": None, "learn": True, "pad": False}[args.lift]
    if args.pool is not None:
        kw["pool"] = args.pool
    if args.batch_norm:
        kw["batch_norm"] = True
    return kw


def build_model(cfg, data, impl, kwargs):
    from ..models import StableNet

    try:
        return StableNet(cfg["arch"], data.features, data.classes, cfg["layers"],
                         width=cfg["width"], step=cfg["step"], activation=cfg["activation"],
                         impl=impl, **kwargs)
    except TypeError as exc:  # a keyword this build's model or stack does not take yet
        for key in kwargs:
            if f"'{key}'" in str(exc):
                raise CliError(f"{_flag(key)}: the {cfg['arch']} model of this build does not "
                               f"accept {key} yet") from None
        raise


def kernel_used(arch, impl, device) -> str:
    from .. import ops
    from ..models import is_conv

    if is_conv(arch):
        return "aten"
    return "fused" if impl != "reference" and ops.has_kernel(device) else "reference"


def cmd_train(args, argv, parser) -> int:
    import numpy as np
    import torch

    from ..data import load_dataset
    from ..models import is_conv
    from ..training import TrainConfig, checkpoint as ckpt
    from ..training.runtime import torchrun
    from . import report, resume

    given = given_options(argv)
    ranked = torchrun.under_torchrun()
    if ranked and "backend" not in given:
        args.backend = "dist"  # under torchrun: one rank of a distributed run
        given = given | {"backend"}
    check_outputs(args)
    state, adopted = None, {}
    if args.resume is not None:
        state = ckpt.load(args.resume)
        adopted = resume.reconcile(args, given, state)
    name = args.trainer
    if name in args.missing_trainers:
        raise CliError(f"--trainer {name}: the module {TRAINERS[name]} is not available "
                       f"({args.missing_trainers[name]})")
    trainer = load_trainer(name)
    check_applicable(args, given, trainer)
    cfg = settings(args, adopted)
    check_model_flags(args, given, cfg["arch"])
    device = resolve_device(args.device)

    if name == "backprop" and args.backend == "dist" and not ranked:
        return report.launch_ddp(args, argv, cfg, device)

    rank = int(os.environ.get("RANK", 0)) if ranked else 0
    run_dir = torchrun.run_dir() if ranked else None
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    lock = None
    if args.save is not None and rank == 0 and run_dir is None:
        lock = ckpt.CheckpointLock(args.save).acquire()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        download = False if args.no_download else None
        data = load_dataset(args.dataset, root=args.data_root, seed=args.seed,
                            download=download, cache=args.cache)
        if is_conv(cfg["arch"]) and not data.is_image:
            raise CliError(
                f"--arch {cfg['arch']}: a convolutional architecture needs image data (mnist, "
                f"cifar10, cifar100), but --dataset {args.dataset} has {data.features} features")
        if args.impl == "fused" and not is_conv(cfg["arch"]):
            from .. import ops

            if not ops.has_kernel(device):
                raise CliError(
                    f"--impl fused: no compiled kernel for device {device.type!r} (compiled "
                    f"for: {', '.join(ops.compiled_devices()) or 'none'}); use --impl auto or "
                    "reference")

        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        random.seed(args.seed)
        model = build_model(cfg, data, args.impl, model_kwargs(args)).to(device)
        options = resume.make_options(trainer, args, given)
        run = resume.run_settings(args, cfg, options)
        config_kw = {k: cfg[k] for k in CONFIG_FLAGS if k in cfg}
        config_kw["target_accuracy"] = args.target_accuracy
        for k in trainer.UNSUPPORTED:  # preset values the trainer has no use for
            config_kw.pop(k, None)
        config = TrainConfig(**config_kw, seed=args.seed, device=device, threads=args.threads,
                             checkpoint=args.save, resume=args.resume,
                             quiet=args.quiet or args.json, run=run)
        resume.check_progress(args, state, trainer, cfg, options)
        import copy

        start = copy.deepcopy(model) if args.compare else None
        result = trainer.fit(model, data, config, options)
        if "rank" in result and result["rank"] != 0 and name != "backprop":
            return 0
        if args.compare and rank == 0:
            result = trainer.compare(start, data, config, options, result, args.compare)
        model = result.pop("model", model)
        if data.test_x is not None and rank == 0:
            from ..training import evaluate

            result["test_loss"], result["test_accuracy"] = evaluate(model, data.test_x,
                                                                    data.test_y)
        if run_dir is not None:  # launched by `--backend dist`: the launcher reports
            if rank == 0:
                report.save_for_launcher(run_dir, result, model)
            return 0
        if rank != 0:
            return 0
        return report.finish(args, cfg, result, model, data, device)
    finally:
        if lock is not None:
            lock.release()
