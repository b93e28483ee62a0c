"""What a run is made of, recorded in its checkpoints, and the checks that
make ``--resume`` continue *that* run: a flag that contradicts the checkpoint
is refused (naming every difference), a flag left out takes the checkpoint's
value, and fewer epochs than the checkpoint has done is refused."""

from __future__ import annotations

import dataclasses

from .errors import CliError

# Settings that identify a run: a resume must match them (the others may change).
NOT_IDENTITY = {"epochs", "target_accuracy", "threads", "device", "quiet", "json", "save",
                "resume", "plot", "history", "compare", "cache", "data_root", "no_download",
                "heartbeat_timeout", "start_timeout", "sg_timeout", "sg_baseline_epochs", "sg_threads",
                "pvd_threads", "pvd_start_method", "impl", "command"}

MODEL_KWARGS = ("gamma", "reversible", "kernel_size", "lift", "pool", "batch_norm", "downsample",
                "widen")
CONFIG_IDENTITY = ("batch_size", "lr", "weight_decay", "lr_step", "lr_gamma", "alpha", "alpha_c")
MODEL_IDENTITY = ("arch", "layers", "width", "step", "activation")


def _flag(dest):
    return "--" + dest.replace("_", "-")


def make_options(trainer, args, given):
    """The trainer's Options from the flags (shared flags left unset keep the
    trainer's own defaults)."""
    kw = {}
    for f in dataclasses.fields(trainer.Options):
        if hasattr(args, f.name) and (f.name in given or getattr(args, f.name) is not None):
            value = getattr(args, f.name)
            if value is not None or f.name in given:
                kw[f.name] = value
    options = trainer.Options(**kw)
    if not hasattr(options, "check"):
        return options
    try:
        return options.check()
    except ValueError as exc:  # name the flag, not the field
        name, _, rest = str(exc).partition(":")
        if name in kw:
            raise CliError(f"{_flag(name)}:{rest}") from None
        raise


def run_settings(args, cfg, options) -> dict:
    """The settings that identify this run (written into every checkpoint)."""
    run = {"trainer": args.trainer, "dataset": args.dataset, "seed": args.seed}
    for key in MODEL_IDENTITY + CONFIG_IDENTITY:
        if key in cfg:
            run[key] = cfg[key]
    for key in MODEL_KWARGS:
        run[key] = getattr(args, key, None)
    for f in dataclasses.fields(options):
        if f.name not in NOT_IDENTITY:
            run[f.name] = getattr(options, f.name)
    return run


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def reconcile(args, given: set, state: dict) -> dict:
    """Check the command line against the checkpoint's run settings; returns the
    settings adopted from the checkpoint (the flags left out). Options that
    live on ``args`` are set there too."""
    saved = state.get("run")
    if not isinstance(saved, dict):
        return {}  # written before runs were recorded: the model itself is still checked
    differ, adopted = [], {}
    for key, value in saved.items():
        if key in NOT_IDENTITY:
            continue
        if key in given:
            current = getattr(args, key, None)
            if key in MODEL_IDENTITY + CONFIG_IDENTITY or key in MODEL_KWARGS or \
                    hasattr(args, key):
                if not _same(current, value):
                    differ.append(f"{_flag(key)} {current} (checkpoint: {value})")
            continue
        adopted[key] = value
        if key not in MODEL_IDENTITY + CONFIG_IDENTITY and hasattr(args, key):
            setattr(args, key, value)
    if differ:
        raise CliError(
            f"--resume: {args.resume!r} was made with other settings: {'; '.join(differ)}. "
            "Leave those flags out to continue it as it was, or start a new run without --resume")
    return adopted


def total_epochs(trainer_name, cfg, options) -> int:
    epochs = cfg["epochs"]
    if trainer_name == "backprop":
        return epochs * getattr(options, "levels", 1)
    if trainer_name == "sg":
        return epochs + getattr(options, "coarse_epochs", 0)
    if trainer_name == "pvd":
        return getattr(options, "pvd_iterations", None) or epochs
    return epochs


def check_progress(args, state, trainer, cfg, options) -> None:
    if state is None:
        return
    history = state.get("history") or {}
    done = len(history.get("epoch", []))
    want = total_epochs(args.trainer, cfg, options)
    if want < done:
        what = "iterations" if args.trainer == "pvd" else "epochs"
        raise CliError(f"--epochs {cfg['epochs']}: the checkpoint {args.resume!r} has already "
                       f"trained {done} {what}, more than the {want} asked for; ask for at "
                       f"least {done}")
