"""The synthetic-gradient epoch loop, shared by every engine (in-process,
process pipeline, torch.distributed rank 0): resume, progress, evaluation,
history, checkpoints, early stop."""

from __future__ import annotations

import time

from .. import checkpoint as ckpt
from .. import loop
from .stages import combine_epoch, evaluate_stages

EXTRA_HISTORY_KEYS = ("phase", "sg_loss", "sg_rel_error", "busy_seconds", "theoretical_seconds")


def new_history(history):
    history = loop.new_history() if history is None else history
    for k in EXTRA_HISTORY_KEYS:
        history.setdefault(k, [])
    return history


def median(values):
    values = sorted(values)
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def finish_summary(history: dict, stopped: bool, phase: str, extra: dict) -> dict:
    """:func:`~.backprop.summary` over ``phase``'s epochs plus the SG figures."""
    idx = [i for i, p in enumerate(history["phase"]) if p == phase]
    result = loop.summary(history, stopped)
    seconds = [history["seconds"][i] for i in idx]
    theory = [history["theoretical_seconds"][i] for i in idx]
    result.update(
        trainer="sg",
        stages=len(history["busy_seconds"][idx[-1]]) if idx else None,
        seconds=float(sum(history["seconds"])),
        seconds_per_epoch=median(seconds),
        theoretical_seconds_per_epoch=median(theory),
        sequential_seconds_per_epoch=median([sum(history["busy_seconds"][i]) for i in idx]),
        theoretical_speedup=median([sum(history["busy_seconds"][i])
                                     / history["theoretical_seconds"][i]
                                     for i in idx if history["theoretical_seconds"][i] > 0]),
        sg_loss=history["sg_loss"][idx[-1]] if idx else [],
        sg_rel_error=history["sg_rel_error"][idx[-1]] if idx else [],
        **extra,
    )
    return result


def epoch_loop(engine, phase, data, device, epochs, history, *, checkpoint, resume_state, bounds,
                model, target_accuracy, quiet, eval_batch_size, on_epoch, extra,
                checkpoint_extra=None):
    start = 0
    stopped = False
    try:
        if resume_state is not None and resume_state.get("phase") == phase:
            if resume_state["bounds"] != list(bounds):
                raise ValueError(f"resume: the checkpoint cuts the network at "
                                 f"{resume_state['bounds']}, this run at {list(bounds)}")
            load_runner_states(engine, resume_state["runners"])
            ckpt.set_rng_state(resume_state["rng"])
            start = resume_state["epoch"]
            history.clear()
            history.update(resume_state["history"])
            if resume_state.get("stopped_early"):
                return finish_summary(history, True, phase, dict(extra, bounds=list(bounds)))
        engine.start()
        bar = None
        if loop.progress_enabled(quiet) and start < epochs:
            from tqdm import tqdm

            bar = tqdm(total=epochs, initial=start, unit="ep", dynamic_ncols=True, leave=True,
                       desc=f"sg {phase} M={len(engine.nets)} L={model.layers}")
        for epoch in range(start, epochs):
            seconds, stats = engine.run_epoch(epoch)
            t1 = time.perf_counter()
            val_loss, val_acc = evaluate_stages(engine.nets, data.val_x, data.val_y,
                                                eval_batch_size,
                                                getattr(engine, "eval_device", device))
            record = {
                "epoch": len(history["epoch"]) + 1, "seconds": seconds,
                "val_loss": val_loss, "val_accuracy": val_acc,
                "eval_seconds": time.perf_counter() - t1,
                "layers": model.layers, "phase": phase, **combine_epoch(stats),
            }
            for k, v in record.items():
                history.setdefault(k, []).append(v)
            stopped = target_accuracy is not None and val_acc >= target_accuracy
            if checkpoint is not None:
                ckpt.save(checkpoint, {
                    "trainer": "sg", "phase": phase, "bounds": list(bounds),
                    "model_config": model.config(), "runners": engine.state_dicts(),
                    "rng": ckpt.rng_state(), "epoch": epoch + 1, "history": history,
                    "stopped_early": stopped, **(checkpoint_extra or {}),
                })
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", val=f"{100 * val_acc:.2f}%")
            if on_epoch is not None:
                on_epoch(record)
            if stopped:
                break
        if bar is not None:
            bar.close()
        engine.finish()
    finally:
        engine.close()
    return finish_summary(history, stopped, phase, dict(extra, bounds=list(bounds)))


def load_runner_states(engine, states):
    loader = getattr(engine, "load_states", None)
    if loader is not None:
        loader(states)
        return
    for r, s in zip(engine.runners, states):
        r.load_state_dict(s)
