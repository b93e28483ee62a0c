"""PVD synchronisation: from the P workers' points to the next point.

``best``: the candidate with the lowest loss on this iteration's validation
batch. ``hull``: the best point of the affine hull of ``x`` and the P
candidates ``z^l``, i.e. ``x + sum_l lam_l (z^l - x)`` over ``lam`` in R^P,
found by a few L-BFGS steps on the same batch starting from the best
candidate (``lam = e_best``). Block ``m`` of that point is

    x_m + lam_m (y_m - x_m) + (sum_{l != m} lam_l mu_{l,m}) d_m

so the P-dimensional problem never materialises the P candidates. The hull
point replaces the best candidate only when its loss is strictly lower, so
the hull step never does worse than best-of on the batch it is judged on.
"""

from __future__ import annotations

import math
import time

import torch

from .solver import Net, PVDConfig, SharedState, candidate, sync_indices


def _finite(v: float) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def synchronise(net: Net, shared: SharedState, sync_losses: list[float], cfg: PVDConfig,
                iteration: int, val) -> tuple[torch.Tensor, dict]:
    """Returns the new point (a fresh flat tensor) and a report for the history."""
    t0 = time.perf_counter()
    part = net.partition
    P = part.blocks
    scores = [v if _finite(v) else math.inf for v in sync_losses]
    best = min(range(P), key=lambda l: scores[l])
    if not math.isfinite(scores[best]):
        # The run diverged: like backprop, carry on with the (non-finite) point;
        # the summary's loss is then non-finite and the caller reports the
        # divergence (the CLI: strict JSON with "diverged": true).
        with torch.no_grad():
            point = candidate(part, shared.x, shared.d, shared.proposal, shared.mu[best], best)
        return point, {"best_worker": best, "candidate_losses": list(sync_losses),
                       "best_loss": math.nan, "choice": "diverged", "sync_loss": math.nan,
                       "sync_seconds": time.perf_counter() - t0}
    val_x, val_y = val
    vi = sync_indices(cfg, val_x.shape[0], iteration, val_x.device)
    vx, vy = (val_x, val_y) if vi is None else (val_x[vi], val_y[vi])

    with torch.no_grad():
        point = candidate(part, shared.x, shared.d, shared.proposal, shared.mu[best], best)
        best_loss = net.loss(point, vx, vy).item()
    info = {"best_worker": best, "candidate_losses": list(sync_losses), "best_loss": best_loss,
            "choice": "best", "sync_loss": best_loss}

    if cfg.sync == "hull" and cfg.hull_steps > 0 and P > 0:
        lam, hull_loss = _hull(net, shared, best, vx, vy, cfg.hull_steps)
        info["lambda"] = [float(v) for v in lam]
        info["hull_loss"] = hull_loss
        if _finite(hull_loss) and hull_loss < best_loss:
            with torch.no_grad():
                point = _hull_point(part, shared, lam)
            info["choice"] = "hull"
            info["sync_loss"] = hull_loss
    info["sync_seconds"] = time.perf_counter() - t0
    return point, info


def _hull_point(part, shared: SharedState, lam: torch.Tensor) -> torch.Tensor:
    coef = lam @ shared.mu  # c_m = sum_l lam_l mu_{l,m}  (mu_{m,m} = 0)
    parts = []
    for m in range(part.blocks):
        x = part.block(shared.x, m)
        parts.append(x + lam[m] * (part.block(shared.proposal, m) - x) + coef[m] * part.block(shared.d, m))
    return torch.cat(parts)


def _hull(net: Net, shared: SharedState, best: int, vx, vy, steps: int):
    part = net.partition
    lam = torch.zeros(part.blocks, dtype=shared.x.dtype, device=shared.x.device)
    lam[best] = 1.0
    lam.requires_grad_(True)
    opt = torch.optim.LBFGS([lam], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = net.loss(_hull_point(part, shared, lam), vx, vy)
        loss.backward()
        return loss

    try:
        opt.step(closure)
    except RuntimeError:  # a line search that met NaNs: keep the best candidate
        return lam.detach(), math.nan
    lam = lam.detach()
    if not torch.isfinite(lam).all():
        return lam, math.nan
    with torch.no_grad():
        loss = net.loss(_hull_point(part, shared, lam), vx, vy).item()
    return lam, loss
