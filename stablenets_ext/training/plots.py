"""Matplotlib figures (Agg backend, files only): training curves and, for 2-D
data, the features' trajectories through the layers."""

from __future__ import annotations

import os
import struct

import torch

# The PNG "Software" text of every plot this package writes: how a later run knows a
# file in its --plot folder is one of ours (and may be replaced) and not the user's.
SIGNATURE = "stablenets-ext"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def history_figure(result_or_history: dict, *, title=None, test_accuracy=None):
    """The loss/accuracy figure (matplotlib ``Figure``, not saved): integer epoch
    ticks, plain numbers on the log loss axis, level changes (multilevel) as dotted
    lines, and the test accuracy (known only at the end) as a marker at the last
    epoch."""
    plt = _pyplot()
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, StrMethodFormatter

    h = result_or_history.get("history", result_or_history)
    x = list(range(1, len(h["loss"]) + 1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.plot(x, h["loss"], label="train")
    ax1.plot(x, h["val_loss"], label="validation")
    ax1.set_yscale("log")
    # plain numbers ("0.5", "2"), not "5x10^-1"; minor ticks labelled only when the
    # axis spans less than a decade (else there would be no label at all)
    ax1.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax1.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax1.yaxis.set_minor_formatter(NullFormatter())
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("cross-entropy (log scale)")
    ax2.plot(x, [100 * a for a in h["train_accuracy"]], label="train")
    ax2.plot(x, [100 * a for a in h["val_accuracy"]], label="validation")
    if test_accuracy is not None:
        ax2.plot([x[-1]], [100 * test_accuracy], marker="*", ms=12, ls="none", color="C3",
                 label=f"test ({100 * test_accuracy:.1f}%)")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    layers = h.get("layers") or []
    for i in range(1, len(layers)):
        if layers[i] != layers[i - 1]:
            for ax in (ax1, ax2):
                ax.axvline(i + 0.5, color="grey", ls=":", lw=1)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_history(result_or_history: dict, path, *, title=None, test_accuracy=None) -> str:
    """Loss and accuracy per epoch (:func:`history_figure`), saved to ``path``."""
    plt = _pyplot()
    fig = history_figure(result_or_history, title=title, test_accuracy=test_accuracy)
    return _save(fig, plt, path)


def _project(states):
    """Project ``(S, B, d)`` states to 2-D per snapshot (principal directions)."""
    out = []
    for s in states:
        if s.shape[1] <= 2:
            out.append(s if s.shape[1] == 2 else torch.cat([s, torch.zeros_like(s)], 1))
            continue
        c = s - s.mean(0)
        _, _, v = torch.linalg.svd(c, full_matrices=False)
        out.append(c @ v[:2].T)
    return out


@torch.no_grad()
def plot_trajectories(model, x, y, path, snapshots=5) -> str:
    """Points ``x`` (2-D inputs) at ``snapshots`` layers of the stack, projected
    onto their two principal directions, and the decision regions in input space."""
    plt = _pyplot()
    model = model.eval()
    device = next(model.parameters()).device
    x = x.to(device)
    traj = model.trajectory(x)  # (N+1, B, width); a list of them for several stages
    if isinstance(traj, (list, tuple)):  # every stage's states, in order (widths may differ)
        traj = [s for t in traj for s in t.float().cpu()]
    else:
        traj = list(traj.float().cpu())
    n = len(traj) - 1
    picks = sorted({round(i * n / (snapshots - 1)) for i in range(snapshots)})
    proj = _project([traj[i] for i in picks])
    y = y.cpu()
    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(3.2 * (len(picks) + 1), 3.4))
    for ax, j, p in zip(axes, picks, proj):
        ax.scatter(p[:, 0], p[:, 1], c=y, s=4, cmap="coolwarm")
        ax.set_title(f"layer {j}/{n}")
        ax.set_xticks([])
        ax.set_yticks([])
    ax = axes[-1]
    xc = x.cpu()
    lo, hi = xc.min(0).values - 0.2, xc.max(0).values + 0.2
    g0, g1 = torch.meshgrid(torch.linspace(lo[0], hi[0], 200), torch.linspace(lo[1], hi[1], 200),
                            indexing="xy")
    grid = torch.stack([g0.flatten(), g1.flatten()], 1).to(device)
    pred = model(grid).argmax(1).cpu().reshape(g0.shape)
    ax.contourf(g0, g1, pred, alpha=0.3, cmap="coolwarm")
    ax.scatter(xc[:, 0], xc[:, 1], c=y, s=4, cmap="coolwarm")
    ax.set_title("decision regions")
    fig.suptitle(f"{model.arch}: features through {n} layers (step {model.step:g})")
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": f"{SIGNATURE} (matplotlib)"})
    plt.close(fig)
    return os.fspath(path)


def is_plot(path) -> bool:
    """Whether ``path`` is a PNG this package wrote: a ``Software`` text chunk (before
    the image data) that names :data:`SIGNATURE`."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return False
        while True:
            head = f.read(8)
            if len(head) < 8:
                return False
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND") or length > 1 << 20:
                return False
            data = f.read(length)
            f.seek(4, os.SEEK_CUR)  # the chunk's CRC
            if kind == b"tEXt":
                key, _, text = data.partition(b"\0")
                if key == b"Software":
                    return text.startswith(SIGNATURE.encode())
