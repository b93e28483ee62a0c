"""What a module call costs around its kernels: module against raw ops, an empty op and eager.

    python benchmarks/overhead.py [--shapes 1024x4x64] [--archs ...] [--reps 51] [--rounds 5]
                                  [--threads T] [--no-eager]

For every shape (B x d x N), architecture and mode (stored; reversible for leapfrog and
Verlet), float32, tanh, step 0.1, on the CPU:
  module fwd    the nn.Module under torch.no_grad()
  raw fwd       torch.ops.stablenets.<arch>_forward (store=False), no autograd
  module f+b    module(y).sum().backward() (parameter gradients reset to None first)
  raw f+b       the forward op keeping what the backward reads (states, or the final pair
                in reversible mode), then the backward op on a gradient of ones: the kernels
                alone, as an autograd formula would call them
  empty f+b     the same autograd steps around no work: a one-element parameter through one
                ATen op, .sum().backward(); the floor any autograd call pays
  eager         stablenets_ext.reference (a per-layer PyTorch loop), fwd and f+b
and the ratios module / raw (issue 22 asks for f+b <= 1.5x), the overhead module - raw in
microseconds, and eager / module (issue 22 asks for >= 30x, fwd and f+b).

Each time is compare.round_medians': the median over --rounds rounds of the per-round median
of --reps back-to-back calls, the rounds visiting the cases in turn.
"""

from __future__ import annotations

import argparse
import platform

import torch
from compare import round_medians  # benchmarks/ is on sys.path when run as a script

import stablenets_ext as sn
from stablenets_ext import ops, reference

ARCHS = ["resnet", "antisymmetric", "leapfrog", "verlet"]
STEP, GAMMA = 0.1, 0.01
CPU = torch.device("cpu")


def modes(archs):
    for arch in archs:
        yield arch, False
        if arch in ("leapfrog", "verlet"):
            yield arch, True


def raw_cases(arch, reversible, y, w, b):
    """The kernels alone: forward without states; forward keeping what the backward reads,
    then the backward op."""
    R = torch.ops.stablenets
    g = torch.ones_like(y)
    if arch in ("resnet", "antisymmetric"):
        extra = (GAMMA,) if arch == "antisymmetric" else ()
        fop, bop = getattr(R, arch + "_forward").default, getattr(R, arch + "_backward").default

        def fb():
            out, states = fop(y, w, b, STEP, *extra, "tanh", True)
            return bop(g, states, w, b, STEP, *extra, "tanh")

        return (lambda: fop(y, w, b, STEP, *extra, "tanh", False)), fb
    second = y if arch == "leapfrog" else torch.zeros_like(y)
    fop = getattr(R, arch + "_forward").default
    bop = getattr(R, arch + ("_backward_reversible" if reversible else "_backward")).default

    def fb():
        ya, yb, states = fop(y, second, w, b, STEP, "tanh", not reversible)
        if reversible:
            return bop(g, torch.zeros_like(y), ya, yb, w, b, STEP, "tanh")
        return bop(g, torch.zeros_like(y), states, w, b, STEP, "tanh")

    return (lambda: fop(y, second, w, b, STEP, "tanh", False)), fb


def cases(arch, reversible, B, d, N, eager):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(B, d, generator=g)
    kw = {"reversible": True} if reversible else {}
    if arch == "antisymmetric":
        kw["gamma"] = GAMMA
    m = sn.layers.STACKS[arch](d, N, step=STEP, activation="tanh", impl="fused", **kw)
    with torch.no_grad():
        m.weight.copy_(torch.randn(N, d, d, generator=g) / d**0.5)
        m.bias.copy_(0.1 * torch.randn(N, d, generator=g))
    w, b = m.weight.detach(), m.bias.detach()
    raw_fwd, raw_fb = raw_cases(arch, reversible, y, w, b)
    p = torch.zeros(1, requires_grad=True)

    def module_fwd():
        with torch.no_grad():
            m(y)

    def module_fb():
        m.weight.grad = m.bias.grad = None
        m(y).sum().backward()

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def empty_fb():
        p.grad = None
        torch.mul(p, 1.0).sum().backward()

    out = {"module_fwd": module_fwd, "raw_fwd": no_grad(raw_fwd), "module_fb": module_fb,
           "raw_fb": no_grad(raw_fb), "empty_fb": empty_fb}
    if eager:
        ref = reference.FUNCTIONS[arch]
        rkw = {"gamma": GAMMA} if arch == "antisymmetric" else {}
        wl, bl = m.weight, m.bias

        def eager_fwd():
            with torch.no_grad():
                ref(y, wl, bl, STEP, "tanh", **rkw)

        def eager_fb():
            wl.grad = bl.grad = None
            ref(y, wl, bl, STEP, "tanh", **rkw).sum().backward()

        out.update(eager_fwd=eager_fwd, eager_fb=eager_fb)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1024x4x64")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--reps", type=int, default=51)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: leave)")
    p.add_argument("--no-eager", action="store_true", help="skip the per-layer PyTorch loop")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# stablenets-ext {sn.__version__}, torch {torch.__version__}, {platform.machine()}, cpu kernels "
          f"{ops.CPU_ISA}, {torch.get_num_threads()} threads, float32, tanh, step {STEP}, "
          f"{args.rounds} rounds x {args.reps} reps, ms (overhead in us)")
    head = (f"{'arch':14s} {'mode':10s} {'B x d x N':>11s} | {'mod fwd':>7s} {'raw fwd':>7s} {'ratio':>6s} | "
            f"{'mod f+b':>7s} {'raw f+b':>7s} {'ratio':>6s} {'over us':>7s} {'empty':>7s} | "
            f"{'eager fwd':>9s} {'x':>6s} {'eager f+b':>9s} {'x':>6s}")
    print(head)
    print("-" * len(head))
    for shape in args.shapes.split(","):
        B, d, N = (int(v) for v in shape.split("x"))
        for arch, reversible in modes(args.archs.split(",")):
            r = round_medians(cases(arch, reversible, B, d, N, not args.no_eager), CPU, args.reps,
                              args.rounds)
            eager = "-" * 9 + " " + "-" * 6 + " " + "-" * 9 + " " + "-" * 6
            if "eager_fwd" in r:
                eager = (f"{r['eager_fwd']:9.3f} {r['eager_fwd'] / r['module_fwd']:5.1f}x "
                         f"{r['eager_fb']:9.3f} {r['eager_fb'] / r['module_fb']:5.1f}x")
            mode = "reversible" if reversible else "stored"
            print(f"{arch:14s} {mode:10s} {shape:>11s} | {r['module_fwd']:7.3f} {r['raw_fwd']:7.3f} "
                  f"{r['module_fwd'] / r['raw_fwd']:5.2f}x | {r['module_fb']:7.3f} {r['raw_fb']:7.3f} "
                  f"{r['module_fb'] / r['raw_fb']:5.2f}x {1e3 * (r['module_fb'] - r['raw_fb']):7.1f} "
                  f"{r['empty_fb']:7.3f} | {eager}", flush=True)
    print("ratio = module / raw ops; over us = module f+b - raw f+b; x = eager / module")


if __name__ == "__main__":
    main()
