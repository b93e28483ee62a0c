"""What a PVD run records: the backprop trainer's history plus PVD's own columns.

``history`` is a dict of per-iteration lists, the layout of
:func:`..loop.new_history` (``epoch`` is the PVD iteration, ``seconds`` its
training time: direction + parallel phase + synchronisation, without the
evaluation and the fingerprint check), with these added:

- ``direction_seconds``, ``phase_seconds``, ``sync_seconds``: wall time of each
  step of the iteration, measured by the coordinator (rank 0 for dist);
- ``worker_seconds``, ``worker_cpu_seconds``: each worker's own wall and CPU
  time for its subproblem; ``worker_steps``: mini-batches per subproblem;
- ``candidate_losses``, ``best_worker``, ``best_loss``, ``hull_loss``,
  ``sync_loss``, ``sync_choice``, ``lambda``, ``mu``: the synchronisation;
- ``digest``, ``worker_digests``: fingerprints of the point the coordinator
  broadcast and of the point each worker holds afterwards.
"""

from __future__ import annotations

import os

from .. import checkpoint as ckpt
from .. import loop

PVD_HISTORY_KEYS = (
    "direction_seconds", "phase_seconds", "sync_seconds", "worker_seconds", "worker_cpu_seconds",
    "worker_steps", "candidate_losses", "best_worker", "best_loss", "hull_loss", "sync_loss",
    "sync_choice", "lambda", "mu", "digest", "worker_digests",
)


def new_history() -> dict:
    h = loop.new_history()
    for k in PVD_HISTORY_KEYS:
        h[k] = []
    return h


def record(history, **values):
    for k, v in values.items():
        history.setdefault(k, []).append(v)


def result_dict(history, stopped, cfg, partition, extra) -> dict:
    """:func:`..loop.summary` plus the PVD figures derived from ``history``."""
    res = loop.summary(history, stopped)
    phases = history["phase_seconds"]
    reached = [i for i, a in enumerate(history["val_accuracy"])
               if cfg.target_accuracy is not None and a >= cfg.target_accuracy]
    first = reached[0] if reached else None
    res.update({
        "trainer": "pvd",
        "workers": cfg.workers,
        "sync": cfg.sync,
        "iterations": len(history["epoch"]),
        "target_accuracy": cfg.target_accuracy,
        "reached_target": first is not None,
        "iterations_to_target": None if first is None else first + 1,
        "seconds_to_target": None if first is None else float(sum(history["seconds"][:first + 1])),
        "phase_seconds": list(phases),
        "phase_seconds_total": float(sum(phases)),
        "phase_seconds_mean": float(sum(phases) / len(phases)) if phases else float("nan"),
        "direction_seconds_total": float(sum(history["direction_seconds"])),
        "sync_seconds_total": float(sum(history["sync_seconds"])),
        "threads_per_worker": cfg.worker_threads(),
        "blocks": partition.describe(),
        "config": {k: v for k, v in vars(cfg).items() if k != "fault"},
        "digests_identical": (None if not any(history["worker_digests"]) else
                              all(len(set(w)) == 1 and w[0] == c
                                  for w, c in zip(history["worker_digests"], history["digest"]))),
    })
    res.update(extra)
    return res


def load_resume(path, cfg, partition, device):
    """A PVD checkpoint that fits this run (``cfg.workers`` blocks of ``partition``)."""
    state = ckpt.load(path, map_location=device,
                      require=("trainer", "x", "solvers", "history", "epoch", "rng"))
    if state["trainer"] != "pvd":
        raise ckpt.CheckpointError(f"resume: {os.fspath(path)!r} was written by the "
                                   f"{state['trainer']} trainer, not pvd")
    if len(state["solvers"]) != cfg.workers or state["x"].numel() != partition.numel:
        raise ckpt.CheckpointError(
            f"resume: {os.fspath(path)!r} holds a PVD run of {len(state['solvers'])} workers "
            f"and {state['x'].numel()} parameters, not {cfg.workers} and {partition.numel}")
    return state
