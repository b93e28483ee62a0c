"""The end of ``stablenets train``: history, plots, the summary line (valid
JSON even when the run diverged)."""

from __future__ import annotations

import math
import os
import sys

from ..training.outputs import dumps, json_safe, write_json

LINE_KEYS = ("accuracy", "loss", "seconds", "epochs")


def _jsonable(value) -> bool:
    import json

    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def diverged(result: dict) -> bool:
    values = [result.get("loss"), result.get("val_loss")]
    values += list((result.get("history") or {}).get("loss", []))
    return any(isinstance(v, float) and not math.isfinite(v) for v in values)


def kernel_used(arch, impl, device, *, activation="tanh", batch_norm=False) -> str:
    from .. import conv, ops
    from ..models import is_conv

    if is_conv(arch):
        return conv.kernel_used(impl, device, activation=activation, batch_norm=batch_norm)
    return "fused" if impl != "reference" and ops.has_kernel(device) else "reference"


def _model_config(model) -> dict:
    config = getattr(model, "config", None)
    return config() if callable(config) else {}


def plot_paths(folder, dataset, arch) -> dict:
    """The files ``--plot folder`` may write: {"curves": path, "trajectories": path}."""
    return {kind: os.path.join(folder, f"{dataset}-{arch}-{kind}.png")
            for kind in ("curves", "trajectories")}


def check_plots(folder, dataset, arch) -> None:
    """Before training: refuse a run whose plots would overwrite files in ``folder``
    that this package did not write."""
    from ..training import plots
    from ..training.outputs import check_ours

    for path in plot_paths(folder, dataset, arch).values():
        check_ours(path, "--plot", plots.is_plot, "a plot written by stablenets")


def write_plots(folder, result, model, data, cfg):
    from ..training import plots
    from ..training.outputs import OutputPathError

    paths = plot_paths(folder, data.name, cfg["arch"])
    try:
        os.makedirs(folder, exist_ok=True)
        if "history" in result and result["history"].get("loss"):
            test = result.get("test_accuracy")
            plots.plot_history(result, paths["curves"],
                               title=f"{cfg['arch']} on {data.name}",
                               test_accuracy=test if isinstance(test, float) else None)
        if data.features == 2 and hasattr(model, "trajectory"):
            plots.plot_trajectories(model, data.val_x, data.val_y, paths["trajectories"])
    except OSError as exc:
        raise OutputPathError(f"--plot: cannot write plots to {folder!r}: "
                              f"{exc.strerror or exc}") from None


def finish(args, cfg, result, model, data, device) -> int:
    bad = diverged(result)
    if args.history:
        extra = {}
        if getattr(model, "multistage", False) and not bad:  # growth through each stage
            from ..stability import stage_report

            device_of = next(model.parameters()).device
            extra["stages"] = stage_report(model, data.val_x[:256].to(device_of),
                                           data.val_y[:256].to(device_of))
        write_json(args.history, {**result, "diverged": bad, **extra})
    if args.plot:
        write_plots(args.plot, result, model, data, cfg)
    line = {
        # "accuracy" is the validation accuracy (kept under that name for compatibility);
        # "val_accuracy" says so, "test_accuracy" (when the dataset has a test set) follows
        "accuracy": result.get("accuracy"), "val_accuracy": result.get("accuracy"),
        "loss": result.get("loss"),
        "seconds": result.get("seconds"), "epochs": result.get("epochs"),
        "arch": cfg["arch"], "dataset": args.dataset, "impl": args.impl,
        "kernel": kernel_used(cfg["arch"], args.impl, device,
                              activation=cfg.get("activation") or "tanh",
                              batch_norm=bool(_model_config(model).get("batch_norm"))),
        "device": str(device),
        "trainer": args.trainer, "layers": getattr(model, "layers", cfg["layers"]),
        "width": cfg["width"], "levels": getattr(args, "levels", 1),
    }
    for key, value in result.items():
        if key not in line and key not in ("history", "levels") and _jsonable(value):
            line[key] = value
    line, nonfinite = json_safe(line)
    line["diverged"] = bad or nonfinite
    if line["diverged"]:
        print(f"stablenets train: warning: the run diverged (non-finite loss); non-finite "
              f"numbers are reported as null. Lower --lr or --step.", file=sys.stderr)
    if args.json:
        print(dumps(line), flush=True)
    else:
        acc = line["accuracy"]
        acc_text = "n/a" if acc is None else f"{100 * acc:.2f}%"
        per_epoch = result.get("seconds_per_epoch")
        test = line.get("test_accuracy")
        print(
            f"{args.dataset} / {cfg['arch']} ({line['layers']} layers, width {cfg['width']}, "
            f"{line['kernel']} on {device}): validation accuracy {acc_text} after "
            f"{line['epochs']} epochs, {line['seconds'] or 0:.1f} s training"
            + (f" ({per_epoch:.3f} s/epoch)" if isinstance(per_epoch, float)
               and math.isfinite(per_epoch) else "")
            + (f"; test accuracy {100 * test:.2f}%" if isinstance(test, float) else ""),
            flush=True,
        )
    return 0
