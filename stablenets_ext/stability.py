"""Stability report: how gradients and states grow through deep stacks.

``stablenets stability`` (or ``python -m stablenets_ext stability``) checks the
central claim of Haber & Ruthotto (2017), *Stable architectures for deep neural
networks*: a forward-Euler ResNet whose layer Jacobians have eigenvalues with
positive real part blows up with depth (negative real part: vanishes), while
the antisymmetric, leapfrog (second-order) and Verlet (Hamiltonian) stacks keep
gradients and states of the same size at any depth.

For each architecture and depth N it reports, from one forward and backward in
float64 through :mod:`stablenets_ext.functional` (``impl="auto"``: fused
kernels where built, else the reference):

* ``grad_ratio = ||dL/dY_0|| / ||dL/dY_N||`` for ``L = sum(W * Y_N)`` with a
  random ``W`` (so ``dL/dY_N = W``); ``Y_0`` is the stack input, which for
  leapfrog also feeds ``Y_{-1} = Y_0`` (as in ``LeapfrogStack``), and verlet
  starts at ``Z_{-1/2} = 0``;
* ``growth = ||Y_N|| / ||Y_0||`` (Frobenius norms over the batch).

Setup (the defaults; every number is an option of :func:`stability_report`):

* ``features`` d = 8, ``batch`` = 16, tanh, bias 0, ``step`` h = 0.05,
  antisymmetric ``gamma`` = 0.01; inputs ``Y_0 ~ N(0, 0.1^2)`` (``input_scale``):
  the regime the paper's eigenvalue analysis (a linearisation) is about.
* One set of random weights shared by every architecture:
  ``K_j = K(t_j)``, ``t_j = j h``, with
  ``K(t) = s I + sigma/sqrt(d) (G1 cos(nu t) + G2 sin(nu t))``, ``G1, G2`` with
  i.i.d. N(0, 1) entries, ``sigma`` = 0.5, ``nu`` = 0.05: every ``K_j`` is a
  random Gaussian matrix, and K varies smoothly with depth, as in the ODE view
  ``dY/dt = act(K(t) Y + b(t))`` the paper's analysis assumes. The shift ``s`` is
  chosen so that ``min_j Re(eig(K_j)) = margin`` = 0.1 (over one period of K(t)):
  a random K shifted so every eigenvalue has positive real part.
  ``resnet`` uses ``K_j``; ``resnet(-K)`` uses ``-K_j`` (every real part <= -0.1);
  ``antisymmetric`` uses ``(K_j - K_j^T - gamma I) / 2`` (imaginary eigenvalues,
  slightly damped); ``leapfrog`` and ``verlet`` use ``K_j`` as is: their
  dynamics are stable for any K.
* ``weights="iid"`` draws every layer independently instead
  (``K_j = s I + sigma/sqrt(d) G_j``).

What the default run shows (seed 0; the fused kernels and the reference agree
to rounding)::

    gradient ratio    N=8     N=32    N=128   N=512   N=1024
    resnet            1.31    3.61    43.8    91      150
    resnet(-K)        0.793   0.506   0.234   0.0078  7.8e-08
    antisymmetric     0.999   0.996   0.985   0.952   0.909
    leapfrog          0.938   0.672   0.646   0.65    0.699
    verlet            0.945   0.684   0.636   0.661   0.751

Over seeds 0-199 at these depths: resnet >= 19.6 from N=128 on (up to 8e4),
resnet(-K) <= 0.056 from N=512 on, and the three stable stacks stay within
[0.40, 1.5]. Leapfrog and verlet do not sit at 1: their gradient oscillates like
``|cos(omega t)|`` (an undamped oscillator started at rest), with the deepest
dip near N = 32 (t = 1.6); it neither grows nor decays with depth.

Caveats, which ``--input-scale`` and ``--weights`` let you see (20 seeds each):
with inputs of order 1 (``--input-scale 1``) tanh is no longer near-linear and
the stable stacks drift upwards with depth: at N = 1024 leapfrog 1.4-6, verlet
2.5-12, antisymmetric 1.0-1.9, against resnet 6-800 (which saturates there);
the paper's linearised analysis no longer promises a ratio near 1. With
independent layers (``--weights iid``) the stable stacks stay <= 1.4 but
leapfrog and verlet dip to 0.1-0.4 at N = 32. Resnet's growth (and resnet(-K)'s
decay) holds in every case.

The report also draws the paper's Example 1: a 2-D forward-Euler ResNet (N = 10,
h = 0.1, tanh, b = 0) with a constant K from points on the unit circle, for
``K+ = [[2, -2], [0, 2]]`` (eigenvalues 2, 2: trajectories move out),
``K- = [[-2, 0], [2, -2]]`` (-2, -2: they contract) and
``K0 = [[0, -1], [1, 0]]`` (+-i: they rotate, radius kept).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from . import functional as SF
from .training.options import positive_float as _positive_float
from .training.options import positive_int as _positive_int
from .training.options import seed as _seed
from . import reference

DEFAULT_DEPTHS = (8, 32, 128, 512, 1024)
# (label, functional name, sign of K)
ROWS = (
    ("resnet", "resnet", 1.0),
    ("resnet(-K)", "resnet", -1.0),
    ("antisymmetric", "antisymmetric", 1.0),
    ("leapfrog", "leapfrog", 1.0),
    ("verlet", "verlet", 1.0),
)
STABLE_ARCHS = ("antisymmetric", "leapfrog", "verlet")
WEIGHTS = ("smooth", "iid")

EXAMPLE1 = {
    "K+": [[2.0, -2.0], [0.0, 2.0]],
    "K-": [[-2.0, 0.0], [2.0, -2.0]],
    "K0": [[0.0, -1.0], [1.0, 0.0]],
}


# ------------------------------------------------------------------ weights


def make_weights(layers, features, *, step=0.05, seed=0, sigma=0.5, margin=0.1, nu=0.05,
                 weights="smooth", dtype=torch.float64):
    """Random layer weights ``(layers, d, d)`` whose eigenvalues all have real part
    >= ``margin`` (see the module docstring). Returns ``(K, shift, min_real_eig)``."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights: expected one of {WEIGHTS}, got {weights!r}")
    d = features
    gen = torch.Generator().manual_seed(seed)
    scale = sigma / math.sqrt(d)
    if weights == "smooth":
        g1 = torch.randn(d, d, dtype=dtype, generator=gen)
        g2 = torch.randn(d, d, dtype=dtype, generator=gen)

        def noise_at(t):
            return scale * (torch.cos(nu * t)[:, None, None] * g1
                            + torch.sin(nu * t)[:, None, None] * g2)

        noise = noise_at(torch.arange(layers, dtype=dtype) * step)
        # K(t) has period 2 pi / nu: take the shift over a whole period (sampled at
        # the layer times, at most 4096 of them), so the weights do not depend on
        # how deep the deepest stack is.
        if nu > 0:
            samples = min(math.ceil(2 * math.pi / (nu * step)), 4096)
            period = noise_at(torch.arange(samples, dtype=dtype) * (2 * math.pi / nu / samples))
        else:
            period = noise
    else:
        noise = period = scale * torch.randn(layers, d, d, dtype=dtype, generator=gen)
    # Before any eigen solver: LAPACK given inf/NaN prints its own errors on stdout.
    if not (torch.isfinite(noise).all() and torch.isfinite(period).all()):
        raise ValueError(f"step: h={step!r} is too large: the layer times j*h overflow and the "
                         f"weights K(t) are not finite; use a smaller --step")
    shift = margin - torch.linalg.eigvals(period).real.min().item()
    K = noise + shift * torch.eye(d, dtype=dtype)
    min_re = torch.linalg.eigvals(K).real.min().item()
    return K.contiguous(), shift, min_re


# ------------------------------------------------------------------ report


def _measure(arch, y0, W, K, bias, step, activation, gamma, impl):
    y = y0.clone().requires_grad_(True)
    kwargs = {"gamma": gamma} if arch == "antisymmetric" else {}
    with torch.enable_grad():
        yN = SF.FUNCTIONS[arch](y, K, bias, step, activation, impl=impl, **kwargs)
        (grad,) = torch.autograd.grad((yN * W).sum(), y)
    return (grad.norm() / W.norm()).item(), (yN.detach().norm() / y0.norm()).item()


def stability_report(depths=DEFAULT_DEPTHS, features=8, batch=16, seed=0, *, step=0.05,
                     gamma=0.01, sigma=0.5, margin=0.1, nu=0.05, input_scale=0.1,
                     weights="smooth", activation="tanh", impl="auto"):
    """Gradient ratio and forward growth for every row of :data:`ROWS` and depth.

    Returns a dict: ``config`` (every setting, the shift s and the smallest real
    part of an eigenvalue of the K_j used), ``rows`` (one dict per architecture
    and depth: ``label``, ``arch``, ``weights_sign``, ``depth``, ``grad_ratio``,
    ``growth``) and ``seconds``."""
    depths = sorted({int(n) for n in depths})
    if not depths or depths[0] < 1:
        raise ValueError(f"depths: expected positive layer counts, got {depths}")
    for name, value in (("features", features), ("batch", batch)):
        if int(value) < 1:
            raise ValueError(f"{name}: expected a positive int, got {value}")
    dtype = torch.float64
    t0 = time.perf_counter()
    nmax = depths[-1]
    K, shift, min_re = make_weights(nmax, features, step=step, seed=seed, sigma=sigma,
                                    margin=margin, nu=nu, weights=weights, dtype=dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    y0 = input_scale * torch.randn(batch, features, dtype=dtype, generator=gen)
    W = torch.randn(batch, features, dtype=dtype, generator=gen)
    bias = torch.zeros(nmax, features, dtype=dtype)
    rows = []
    for label, arch, sign in ROWS:
        Ks = K if sign > 0 else -K
        for n in depths:
            ratio, growth = _measure(arch, y0, W, Ks[:n], bias[:n], step, activation, gamma, impl)
            rows.append({"label": label, "arch": arch, "weights_sign": "+K" if sign > 0 else "-K",
                         "depth": n, "grad_ratio": ratio, "growth": growth})
    config = {
        "depths": depths, "features": features, "batch": batch, "seed": seed, "step": step,
        "gamma": gamma, "sigma": sigma, "margin": margin, "nu": nu, "input_scale": input_scale,
        "weights": weights, "activation": activation, "dtype": "float64", "bias": 0.0,
        "shift": shift, "min_real_eig": min_re, "impl": impl, "kernels": _kernels(impl),
    }
    return {"config": config, "rows": rows, "seconds": time.perf_counter() - t0}


def _kernels(impl):
    from . import ops

    if impl == "reference":
        return "reference"
    return "fused" if ops.has_kernel("cpu") else "reference"


def ratios(report, label):
    """``{depth: grad_ratio}`` of one row label."""
    return {r["depth"]: r["grad_ratio"] for r in report["rows"] if r["label"] == label}


def growths(report, label):
    """``{depth: growth}`` of one row label."""
    return {r["depth"]: r["growth"] for r in report["rows"] if r["label"] == label}


# ---------------------------------------------------------------- example 1


def example1(points=12, layers=10, step=0.1, activation="tanh", impl="auto"):
    """The paper's Example 1: trajectories of a 2-D forward-Euler ResNet with a
    constant K from ``points`` starts on the unit circle, bias 0.

    Returns ``{name: {"K", "eigenvalues", "trajectory" (points, layers+1, 2),
    "radius_start", "radius_end"}}`` (radii: mean distance from the origin)."""
    dtype = torch.float64
    angle = torch.arange(points, dtype=dtype) * (2 * math.pi / points)
    start = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    bias = torch.zeros(1, 2, dtype=dtype)
    out = {}
    for name, k in EXAMPLE1.items():
        K = torch.tensor(k, dtype=dtype)
        path = [start]
        y = start
        with torch.no_grad():
            for _ in range(layers):
                y = SF.resnet(y, K[None], bias, step, activation, impl=impl)
                path.append(y)
        traj = torch.stack(path, 1)
        eig = torch.linalg.eigvals(K)
        out[name] = {
            "K": k,
            "eigenvalues": [[e.real.item(), e.imag.item()] for e in eig],
            "trajectory": traj,
            "radius_start": traj[:, 0].norm(dim=1).mean().item(),
            "radius_end": traj[:, -1].norm(dim=1).mean().item(),
        }
    return out


# ------------------------------------------------------------------ output


def _fmt(x):
    return f"{x:.3g}" if x == 0 or 1e-2 <= abs(x) < 1e3 else f"{x:.2g}"


def format_table(report, example=None):
    c = report["config"]
    depths = c["depths"]
    lines = [
        "Stability report (Haber & Ruthotto 2017): float64, "
        f"{c['kernels']} kernels, {c['activation']}, bias 0",
        f"  d={c['features']}  batch={c['batch']}  seed={c['seed']}  step h={c['step']}  "
        f"gamma={c['gamma']} (antisymmetric)  inputs Y_0 ~ N(0, {c['input_scale']}^2)",
        f"  weights ({c['weights']}): K_j = s I + {c['sigma']}/sqrt(d) * Gaussian"
        + (f", varying smoothly with depth (nu={c['nu']})" if c["weights"] == "smooth" else
           ", independent per layer")
        + f"; s={c['shift']:.3f} so min Re eig(K_j) = {c['min_real_eig']:.3f}",
        "  resnet: K_j (Re eig > 0); resnet(-K): -K_j (Re eig < 0); "
        "antisymmetric: (K_j - K_j^T - gamma I)/2; leapfrog, verlet: K_j",
        "",
    ]
    width = max(len(label) for label, _, _ in ROWS) + 2
    head = "".join(f"{'N=' + str(n):>10}" for n in depths)
    for title, key in (("gradient ratio ||dL/dY_0|| / ||dL/dY_N||", "grad_ratio"),
                       ("forward growth ||Y_N|| / ||Y_0||", "growth")):
        lines.append(title)
        lines.append(f"  {'arch':<{width}}{head}")
        for label, _, _ in ROWS:
            vals = {r["depth"]: r[key] for r in report["rows"] if r["label"] == label}
            lines.append(f"  {label:<{width}}" + "".join(f"{_fmt(vals[n]):>10}" for n in depths))
        lines.append("")
    deepest = depths[-1]
    lines.append(f"at N={deepest}: " + ", ".join(
        f"{label} {_fmt(ratios(report, label)[deepest])}" for label, _, _ in ROWS))
    stable = [ratios(report, a)[n] for a in STABLE_ARCHS for n in depths]
    lines.append(f"antisymmetric, leapfrog, verlet over all depths: gradient ratio in "
                 f"[{_fmt(min(stable))}, {_fmt(max(stable))}]")
    if example is not None:
        lines.append("")
        lines.append("Example 1 (2-D ResNet, N=10, h=0.1, tanh, b=0, 12 starts on the unit circle): "
                     "mean radius after 10 layers")
        for name, ex in example.items():
            eig = ", ".join(f"{re:+g}{im:+g}i" for re, im in ex["eigenvalues"])
            lines.append(f"  {name:<3} eig {eig:<22} radius {ex['radius_start']:.3f} -> "
                         f"{ex['radius_end']:.3f}")
    return "\n".join(lines)


def plot(report, example, path):
    """Gradient ratio and growth against depth, the K_j spectra, and Example 1."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    c = report["config"]
    depths = c["depths"]
    styles = {"resnet": ("tab:red", "o"), "resnet(-K)": ("tab:orange", "v"),
              "antisymmetric": ("tab:blue", "s"), "leapfrog": ("tab:green", "^"),
              "verlet": ("tab:purple", "D")}
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for ax, key, title in ((axes[0, 0], "grad_ratio", r"$\|\partial L/\partial Y_0\| \,/\, "
                                                       r"\|\partial L/\partial Y_N\|$"),
                           (axes[0, 1], "growth", r"$\|Y_N\| \,/\, \|Y_0\|$")):
        for label, _, _ in ROWS:
            vals = {r["depth"]: r[key] for r in report["rows"] if r["label"] == label}
            color, marker = styles[label]
            ax.loglog(depths, [max(vals[n], 1e-300) for n in depths], marker=marker, color=color,
                      label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhspan(0.5, 2.0, color="grey", alpha=0.15, lw=0)
        ax.set_xlabel("depth N (layers)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    # Spectra of the weights the stacks used.
    ax = axes[0, 2]
    K, _, _ = make_weights(depths[-1], c["features"], step=c["step"], seed=c["seed"],
                           sigma=c["sigma"], margin=c["margin"], nu=c["nu"], weights=c["weights"])
    eye = torch.eye(K.shape[-1], dtype=K.dtype)
    A = 0.5 * (K - K.transpose(1, 2) - c["gamma"] * eye)
    for mats, label, color in ((K, "K_j (resnet, leapfrog, verlet)", "tab:red"),
                               (-K, "-K_j (resnet(-K))", "tab:orange"),
                               (A, "(K_j - K_j^T - gamma I)/2 (antisymmetric)", "tab:blue")):
        ev = torch.linalg.eigvals(mats[:: max(1, mats.shape[0] // 256)]).flatten()
        ax.scatter(ev.real, ev.imag, s=4, alpha=0.4, color=color, label=label)
    ax.axvline(0.0, color="k", lw=0.8)
    ax.set_xlabel("Re")
    ax.set_ylabel("Im")
    ax.set_title("eigenvalues of the layer weights")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    # Example 1.
    circle = torch.linspace(0, 2 * math.pi, 200)
    for ax, (name, ex) in zip(axes[1], example.items()):
        traj = ex["trajectory"]
        ax.plot(torch.cos(circle), torch.sin(circle), "k--", lw=0.8)
        for p in traj:
            ax.plot(p[:, 0], p[:, 1], "-", color="tab:blue", lw=1)
            ax.plot(p[-1, 0], p[-1, 1], "o", color="tab:red", ms=3)
        ax.plot(traj[:, 0, 0], traj[:, 0, 1], "o", color="k", ms=3)
        eig = ", ".join(f"{re:g}{im:+g}i" for re, im in ex["eigenvalues"])
        ax.set_title(f"Example 1, {name} = {ex['K']}\neig: {eig}; radius "
                     f"{ex['radius_start']:.2f} -> {ex['radius_end']:.2f}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-2.2, 2.2)
        ax.set_ylim(-2.2, 2.2)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Stability with depth: d={c['features']}, batch={c['batch']}, h={c['step']}, "
        f"gamma={c['gamma']}, {c['activation']}, Y_0 ~ N(0, {c['input_scale']}^2), "
        f"{c['weights']} random K_j with min Re eig = {c['min_real_eig']:.2f}; seed {c['seed']}",
        fontsize=10)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------- CLI


def _plot_path(out, parser):
    """The file the plot will really be: matplotlib adds ``.png`` to a name
    without an extension, and refuses one it has no writer for (say so now,
    not after the computation)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    if os.path.isdir(out) or os.fspath(out).endswith(os.sep):
        return out  # a folder: check_file says so
    ext = os.path.splitext(os.fspath(out))[1].lower().lstrip(".")
    if not ext:
        return os.fspath(out) + ".png"
    formats = Figure().canvas.get_supported_filetypes()
    if ext not in formats:
        parser.error(f"--out {out}: matplotlib cannot write .{ext} files; use one of "
                     f"{', '.join('.' + f for f in sorted(formats))}")
    return out


def _depths(text):
    try:
        values = [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layer counts like 8,32,128, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive layer counts, got {text!r}")
    return values


def build_parser():
    p = argparse.ArgumentParser(
        prog="stablenets stability",
        description="Gradient ratio ||dL/dY_0||/||dL/dY_N|| and forward growth ||Y_N||/||Y_0|| "
                    "of resnet, antisymmetric, leapfrog and verlet stacks against depth, with "
                    "random weights whose eigenvalues have positive real part (Haber & Ruthotto "
                    "2017), printed as a table and drawn with the paper's Example 1.",
    )
    p.add_argument("--depths", type=_depths, action="extend", default=None, metavar="N[,N...]",
                   help=f"layer counts (default {','.join(map(str, DEFAULT_DEPTHS))})")
    p.add_argument("--features", type=_positive_int, default=8, help="width d (default 8)")
    p.add_argument("--batch", type=_positive_int, default=16, help="rows of Y_0 (default 16)")
    p.add_argument("--seed", type=_seed, default=0, help="weights, inputs and W (default 0)")
    p.add_argument("--out", default="stability.png",
                   help="plot file, any format matplotlib writes (default stability.png)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON line with the numbers instead of the table")
    p.add_argument("--step", type=_positive_float, default=0.05, help="step h (default 0.05)")
    p.add_argument("--gamma", type=float, default=0.01,
                   help="antisymmetric damping gamma (default 0.01)")
    p.add_argument("--input-scale", type=_positive_float, default=0.1,
                   help="standard deviation of Y_0 (default 0.1)")
    p.add_argument("--weights", choices=WEIGHTS, default="smooth",
                   help="K_j varying smoothly with depth (default) or independent per layer")
    p.add_argument("--activation", choices=sorted(reference.ACTIVATIONS), default="tanh",
                   help="activation (default tanh)")
    p.add_argument("--impl", choices=SF.IMPLS, default="auto",
                   help="fused kernels, the plain-PyTorch reference, or auto (default)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    return p


def main(argv=None):
    """``stablenets stability [options]``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if not args.no_plot:  # before the computation, not after it
        from .training.outputs import OutputPathError, check_file

        args.out = _plot_path(args.out, parser)
        try:
            check_file(args.out, "--out")
        except OutputPathError as exc:
            parser.error(str(exc))
    try:
        report = stability_report(
            args.depths or DEFAULT_DEPTHS, args.features, args.batch, args.seed,
            step=args.step, gamma=args.gamma, input_scale=args.input_scale,
            weights=args.weights, activation=args.activation, impl=args.impl,
        )
        example = example1(impl=args.impl)
    except (ValueError, RuntimeError) as exc:
        parser.error(str(exc))
    path = None if args.no_plot else plot(report, example, args.out)
    if args.json:
        line = dict(report)
        line["example1"] = {name: {k: v for k, v in ex.items() if k != "trajectory"}
                            for name, ex in example.items()}
        line["plot"] = path
        from .training.outputs import dumps, json_safe

        _, nonfinite = json_safe(line)
        line["diverged"] = nonfinite
        if nonfinite:
            print("stablenets stability: warning: some numbers are not finite (the states or "
                  "gradients overflowed); they are reported as null", file=sys.stderr)
        print(dumps(line), flush=True)
    else:
        print(format_table(report, example))
        if path:
            print(f"\nplot: {path}")
        print(f"({report['seconds']:.1f} s)", flush=True)
    return 0



def stage_report(model, x, y) -> list[dict]:
    """Per stage of a (trained) :class:`~stablenets_ext.models.StableNet`: how the
    state and the loss gradient grow through that stage's stack on the batch
    ``(x, y)``, the quantities of this module's report measured on a real model.

    Returns one dict per stage: ``stage``, ``layers``, ``width``, ``step``, ``shape``
    (of the state), ``forward_growth`` ``= ||Y_N|| / ||Y_0||`` and
    ``backward_growth`` ``= ||dL/dY_0|| / ||dL/dY_N||`` (Frobenius norms over the
    batch; ``Y_0`` is the stage's input after its transition, ``L`` the mean
    cross-entropy). A single-stack model gives one entry."""
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            h = model.lift_input(x)
            ins, outs = [], []
            for k, stack in enumerate(model.stage_stacks):
                h = model.transition(k, h)
                if k == 0:  # a leaf; later stage inputs are in its graph
                    h = h.detach().requires_grad_()
                ins.append(h)
                h = stack(h)
                outs.append(h)
            loss = F.cross_entropy(model.head(h), y)
            grads = torch.autograd.grad(loss, ins + outs, allow_unused=True)
    finally:
        model.train(was_training)
    n = len(ins)
    out = []
    for k, stack in enumerate(model.stage_stacks):
        g_in, g_out = grads[k], grads[n + k]
        g_in = torch.zeros(()) if g_in is None else g_in
        g_out = torch.zeros(()) if g_out is None else g_out
        out.append({
            "stage": k, "layers": stack.layers, "width": stack.features, "step": stack.step,
            "shape": list(ins[k].shape[1:]),
            "forward_growth": (outs[k].norm() / ins[k].norm().clamp_min(1e-30)).item(),
            "backward_growth": (g_in.norm() / g_out.norm().clamp_min(1e-30)).item(),
        })
    return out


if __name__ == "__main__":
    sys.exit(main())
