"""Wide stacks against their floor: the matrix products they must do plus their fresh outputs.

    python benchmarks/wide_floor.py [--shape 256x784x16] [--archs ...] [--reps 7] [--no-compile]

For each architecture (float32, tanh, step 0.1, stored states, the CPU by default), in one run:
  fused fwd      the raw forward op, keeping the states its backward needs (what autograd runs)
  fused bwd      the raw backward op on those states
  gemm fwd/bwd   the same matrix products the op does, with the same shapes and transposes,
                 into warm preallocated buffers (forward: N or 2N products of (B,d)x(d,d);
                 backward: as many again for the input gradient and as many (d,B)x(B,d) for the
                 weight gradient)
  alloc fwd/bwd  allocating the op's outputs (outputs and states; input, weight and bias
                 gradients) and writing them once: the page faults of fresh memory that any
                 implementation pays, torch.compile included
  floor          gemm + alloc; fused/floor is what the op spends above it (activations, the
                 elementwise updates, the antisymmetric weight transform, bias sums)
  f+b            forward+backward through autograd: fused, and torch.compile of the plain loop
Every case is timed once per round, rounds interleaved, so a slow spell of the machine hits all
of them alike; each figure is the median over the rounds (milliseconds).
"""

from __future__ import annotations

import argparse
import platform

import torch
from compare import round_medians  # benchmarks/ is on sys.path when run as a script

import stablenets_ext as sn
from stablenets_ext import functional as SF
from stablenets_ext import reference

ARCHS = ["resnet", "antisymmetric", "leapfrog", "verlet"]
# (B,d)x(d,d) products per layer in the forward; the backward does as many again for the input
# gradient and as many (d,B)x(B,d) for the weight gradient.
GEMMS = {"resnet": 1, "antisymmetric": 1, "leapfrog": 2, "verlet": 2}
STATE_SLOTS = {"resnet": 2, "antisymmetric": 2, "leapfrog": 2, "verlet": 4}
STEP, GAMMA = 0.1, 0.01


def raw_ops(arch, y, w, b):
    """(forward() -> outputs, backward(outputs) -> grads) of the raw ops, stored states."""
    R = torch.ops.stablenets
    if arch == "resnet":
        return (lambda: R.resnet_forward(y, w, b, STEP, "tanh", True),
                lambda o: R.resnet_backward(o[0], o[1], w, b, STEP, "tanh"))
    if arch == "antisymmetric":
        return (lambda: R.antisymmetric_forward(y, w, b, STEP, GAMMA, "tanh", True),
                lambda o: R.antisymmetric_backward(o[0], o[1], w, b, STEP, GAMMA, "tanh"))
    if arch == "leapfrog":
        return (lambda: R.leapfrog_forward(y, y, w, b, STEP, "tanh", True),
                lambda o: R.leapfrog_backward(o[0], o[1], o[2], w, b, STEP, "tanh"))
    z = torch.zeros_like(y)
    return (lambda: R.verlet_forward(y, z, w, b, STEP, "tanh", True),
            lambda o: R.verlet_backward(o[0], o[1], o[2], w, b, STEP, "tanh"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="256x784x16")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args(argv)
    B, d, N = (int(v) for v in args.shape.split("x"))
    print(f"# stablenets-ext {sn.__version__}, torch {torch.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} threads, cpu, float32, tanh, B x d x N = {B}x{d}x{N}, "
          f"median of {args.reps} interleaved rounds, ms")
    head = (f"{'arch':14s} | {'fwd':>7s} {'gemm':>7s} {'alloc':>6s} {'/floor':>6s} | {'bwd':>7s} {'gemm':>7s} "
            f"{'alloc':>6s} {'/floor':>6s} | {'f+b':>7s} {'floor':>7s} {'/floor':>6s} {'compile':>8s} {'x':>5s}")
    print(head)
    print("-" * len(head))
    g = torch.Generator().manual_seed(0)
    for arch in args.archs.split(","):
        y = torch.randn(B, d, generator=g)
        w = (torch.randn(N, d, d, generator=g) / d**0.5).requires_grad_()
        b = (0.1 * torch.randn(N, d, generator=g)).requires_grad_()
        wd, bd = w.detach(), b.detach()
        fwd, bwd = raw_ops(arch, y, wd, bd)
        outs = fwd()
        k, S = GEMMS[arch], STATE_SLOTS[arch]
        n_out = 2 if arch in ("leapfrog", "verlet") else 1
        buf_row, buf_w = torch.empty(B, d), torch.empty(d, d)

        def gemm_fwd():
            for j in range(N):
                for i in range(k):
                    torch.mm(y, wd[j].t() if i == 0 else wd[j], out=buf_row)

        def gemm_bwd():
            for j in range(N):
                for i in range(k):
                    torch.mm(y, wd[j] if i == 0 else wd[j].t(), out=buf_row)
                    torch.mm(y.t(), y, out=buf_w)

        def alloc_fwd():
            torch.empty(n_out * B * d + N * S * B * d).fill_(1.0)

        def alloc_bwd():
            torch.empty(n_out * B * d + N * d * d + N * d).fill_(1.0)

        eager = lambda *a: reference.FUNCTIONS[arch](*a, STEP, "tanh")  # noqa: E731
        fused = lambda *a: SF.FUNCTIONS[arch](*a, STEP, "tanh", impl="fused")  # noqa: E731

        def fb(fn):
            def run():
                w.grad = b.grad = None
                fn(y, w, b).sum().backward()
            return run

        cases = {"fwd": fwd, "bwd": lambda: bwd(outs), "gemm_fwd": gemm_fwd, "gemm_bwd": gemm_bwd,
                 "alloc_fwd": alloc_fwd, "alloc_bwd": alloc_bwd, "fb": fb(fused)}
        if not args.no_compile:
            torch._dynamo.reset()
            cases["compiled"] = fb(torch.compile(eager))
        # one call per case and round (reps=1): these calls take tens of ms
        m = round_medians(cases, torch.device("cpu"), 1, args.reps)
        floor_f = m["gemm_fwd"] + m["alloc_fwd"]
        floor_b = m["gemm_bwd"] + m["alloc_bwd"]
        comp = m.get("compiled")
        comp_s = f"{comp:8.2f} {comp / m['fb']:4.2f}x" if comp else f"{'-':>8s} {'-':>5s}"
        print(f"{arch:14s} | {m['fwd']:7.2f} {m['gemm_fwd']:7.2f} {m['alloc_fwd']:6.2f} {m['fwd'] / floor_f:5.2f}x | "
              f"{m['bwd']:7.2f} {m['gemm_bwd']:7.2f} {m['alloc_bwd']:6.2f} {m['bwd'] / floor_b:5.2f}x | "
              f"{m['fb']:7.2f} {floor_f + floor_b:7.2f} {m['fb'] / (floor_f + floor_b):5.2f}x {comp_s}",
              flush=True)
    print("/floor = fused / (gemm + alloc); x = compiled / fused (above 1: the fused op is faster)")


if __name__ == "__main__":
    main()
