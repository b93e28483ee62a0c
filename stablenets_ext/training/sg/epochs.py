"""The synthetic-gradient epoch loop, shared by every engine (in-process,
process pipeline, torch.distributed rank 0): resume, progress, evaluation,
history, checkpoints, early stop."""

from __future__ import annotations

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
    """:func:`..loop.summary` over ``phase``'s epochs plus the SG figures."""
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


class _LoopEngine:
    """An SG engine (in-process, pipeline, dist rank 0) seen through the protocol
    of :func:`..loop.run_epochs`."""

    def __init__(self, engine, phase, data, device, history, bounds, model, eval_batch_size):
        self.engine, self.phase, self.data, self.history = engine, phase, data, history
        self.device = getattr(engine, "eval_device", device)
        self.bounds, self.model, self.eval_batch_size = list(bounds), model, eval_batch_size

    def run_epoch(self, epoch):
        seconds, stats = self.engine.run_epoch(epoch)
        return {"epoch": len(self.history["epoch"]) + 1, "seconds": seconds,
                "layers": self.model.layers, "phase": self.phase, **combine_epoch(stats)}

    def evaluate(self):
        val_loss, val_acc = evaluate_stages(self.engine.nets, self.data.val_x, self.data.val_y,
                                            self.eval_batch_size, self.device)
        return {"val_loss": val_loss, "val_accuracy": val_acc}

    def state_dict(self):
        return {"trainer": "sg", "phase": self.phase, "bounds": self.bounds,
                "model_config": self.model.config(), "runners": self.engine.state_dicts()}

    def load_state_dict(self, state):
        if state["bounds"] != self.bounds:
            raise ValueError(f"resume: the checkpoint cuts the network at {state['bounds']}, "
                             f"this run at {self.bounds}")
        load_runner_states(self.engine, state["runners"])


def epoch_loop(engine, phase, data, device, epochs, history, *, checkpoint, resume_state, bounds,
               model, target_accuracy, quiet, eval_batch_size, on_epoch, extra,
               checkpoint_extra=None):
    """Run ``engine`` for ``phase`` through :func:`..loop.run_epochs`."""
    adapter = _LoopEngine(engine, phase, data, device, history, bounds, model, eval_batch_size)
    start, stopped = 0, False
    try:
        if resume_state is not None and resume_state.get("phase") == phase:
            start, stopped = loop.resume(adapter, resume_state, history)
        if not stopped:
            engine.start()
            stopped = loop.run_epochs(
                adapter, epochs=epochs, start=start, history=history,
                target_accuracy=target_accuracy, checkpoint=checkpoint,
                checkpoint_extra=checkpoint_extra, quiet=quiet, on_epoch=on_epoch,
                desc=f"sg {phase} M={len(engine.nets)} L={model.layers}")
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
