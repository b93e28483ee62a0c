"""``stablenets train``: flags -> TrainConfig + the trainer's Options -> fit.

Every check that can fail is made before the first epoch: flags that do not
apply to the chosen trainer or architecture, a resume whose checkpoint was
made with other settings, output paths that cannot be written, a checkpoint
another run is writing."""

from __future__ import annotations

import dataclasses
import os
import random
import sys

from ..training import TRAINERS, load_trainer
from .errors import CliError
from .parser import CONFIG_FLAGS, MODEL_FLAGS, SHARED, given_options


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


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
    fields = {f.name for f in dataclasses.fields(trainer.Options)}
    for dest in sorted(given):
        owners = args.option_owners.get(dest)
        if owners is not None and dest not in fields:
            raise CliError(f"{_flag(dest)}: only applies to --trainer {' or '.join(owners)}, "
                           f"not {name}")
        if dest in SHARED and dest not in fields:
            raise CliError(f"{SHARED[dest]['flags'][0]}: does not apply to --trainer {name}")
        if dest == "amp" and dest in trainer.UNSUPPORTED:
            raise CliError(f"--amp: --trainer {name} does not run mixed precision (backprop "
                           f"does); leave it out")
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


def check_model_flags(args, given: set, arch: str, cfg=None) -> None:
    from ..models import is_conv

    if "gamma" in given and not arch.endswith("antisymmetric"):
        raise CliError(f"--gamma: only applies to antisymmetric architectures, not {arch}")
    if args.reversible and not arch.endswith(("leapfrog", "verlet")):
        raise CliError(f"--reversible: only leapfrog and verlet stacks run backwards, not {arch}")
    for flag, dest in (("--kernel-size", "kernel_size"), ("--pool", "pool"),
                       ("--batch-norm", "batch_norm")):
        if dest in given and not is_conv(arch):
            raise CliError(f"{flag}: only applies to convolutional architectures, not {arch}")
    if args.batch_norm and args.impl == "fused" and is_conv(arch):
        raise CliError("--batch-norm with --impl fused: batch normalisation has no fused kernel "
                       "(it runs on the per-layer reference path); use --impl auto or reference")
    layers, width = cfg_shape = (cfg["layers"], cfg["width"]) if cfg is not None else (None, None)
    if isinstance(layers, (list, tuple)) and isinstance(width, (list, tuple)) \
            and len(layers) != len(width):
        src = lambda d: "" if d in given else " (from the preset or checkpoint)"  # noqa: E731
        raise CliError(f"--layers {','.join(map(str, layers))}{src('layers')} and --width "
                       f"{','.join(map(str, width))}{src('width')}: expected one value per stage "
                       f"in both (or a single value in one), got {len(layers)} and {len(width)}")
    stages = max(len(v) if isinstance(v, (list, tuple)) else 1 for v in cfg_shape)
    for dest in ("downsample", "widen"):
        if dest in given and stages == 1:
            raise CliError(f"{_flag(dest)}: only applies between stages; give --layers or "
                           f"--width one value per stage (e.g. --layers 2,2,2)")
    if "downsample" in given and args.downsample != "none" and not is_conv(arch):
        raise CliError(f"--downsample {args.downsample}: only convolutional architectures have a "
                       f"resolution to reduce, not {arch}; use --downsample none or leave it out")
    if args.batch_norm and getattr(args, "trainer", "backprop") != "backprop":
        raise CliError(f"--batch-norm: only with --trainer backprop; the {args.trainer} trainer "
                       "splits a stack's weights and biases across workers, not its per-layer "
                       "batch-norm parameters and running statistics")


def check_outputs(args) -> None:
    """Every output writable (a real file is made and removed), no two on one
    path (``--save`` may continue ``--resume``'s file), none over a file this
    package did not write, and what killed runs left there cleared."""
    from ..training import checkpoint as ckpt
    from ..training.outputs import (check_distinct, check_file, check_folder, check_ours,
                                    clean_stale, is_history)

    cache = args.cache if isinstance(args.cache, str) else None
    check_distinct({"--resume": args.resume, "--save": args.save, "--history": args.history,
                    "--cache": cache, "--plot": args.plot}, allowed={("--resume", "--save")})
    for path in (args.save, args.history, args.resume, cache):
        if path is not None:
            clean_stale(path)
    if args.save is not None:
        check_file(args.save, "--save")
        check_ours(args.save, "--save", ckpt.is_checkpoint, "a stablenets checkpoint")
    if args.history is not None:
        check_file(args.history, "--history")
        check_ours(args.history, "--history", is_history, "a stablenets history (JSON)")
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


def model_kwargs(args, cfg=None) -> dict:
    """Model keyword arguments: the flags given, else the preset's (``cfg``)."""
    from ..training.presets import MODEL_KEYS

    from ..models import is_conv

    kw = {k: cfg[k] for k in MODEL_KEYS if cfg is not None and cfg.get(k) is not None}
    if kw:  # preset values only where they apply to the shape and arch being built
        shape = (cfg.get("layers"), cfg.get("width"))
        if max(len(v) if isinstance(v, (list, tuple)) else 1 for v in shape) == 1:
            kw.pop("downsample", None)
            kw.pop("widen", None)
        if not is_conv(cfg["arch"]):
            for k in ("pool", "kernel_size"):
                kw.pop(k, None)
            if kw.get("downsample") not in (None, "none"):
                kw.pop("downsample")
        if not cfg["arch"].endswith("antisymmetric"):
            kw.pop("gamma", None)
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
    for key in ("downsample", "widen"):
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
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
    check_model_flags(args, given, cfg["arch"], cfg)
    if args.plot is not None:
        report.check_plots(args.plot, args.dataset, cfg["arch"])
    device = resolve_device(args.device)

    rank = int(os.environ.get("RANK", 0)) if ranked else 0
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    lock = None
    if args.save is not None and rank == 0:
        lock = ckpt.CheckpointLock(args.save).acquire()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        download = False if args.no_download else None
        data = load_dataset(args.dataset, root=args.data_root, seed=args.seed,
                            download=download, cache=args.cache)
        if is_conv(cfg["arch"]) and not data.is_image and data.meta.get("image_shape"):
            data = data.as_images()  # digits: its 64 features are 8x8 pictures
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
        model = build_model(cfg, data, args.impl, model_kwargs(args, cfg)).to(device)
        options = resume.make_options(trainer, args, given)
        run = resume.run_settings(args, cfg, options)
        config_kw = {k: cfg[k] for k in CONFIG_FLAGS if k in cfg}
        config_kw["target_accuracy"] = args.target_accuracy
        for k in trainer.UNSUPPORTED:  # preset values the trainer has no use for
            config_kw.pop(k, None)
        config = TrainConfig(**config_kw, seed=args.seed, device=device, threads=args.threads,
                             amp=args.amp,
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
        if rank != 0:
            return 0
        return report.finish(args, cfg, result, model, data, device)
    finally:
        if lock is not None:
            lock.release()
