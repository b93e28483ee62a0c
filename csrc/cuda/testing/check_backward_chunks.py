"""The narrow CUDA backward's grid and layer chunks, checked on the CPU emulator.

The backward runs on up to 4 blocks per SM and walks the layers in chunks so
that the per-block partial weight gradients stay within a memory budget
(narrow_host.h, backward_plan). This forces small budgets and few or many
blocks on the emulated device and checks, for every architecture and both
backward modes:
  - gradients equal the one-chunk run and the float64 reference (rounding only);
  - the same configuration twice gives bitwise equal results (float32 too);
  - the expected number of launches ran (one kernel per chunk).

    python csrc/cuda/testing/check_backward_chunks.py      # builds the emulator (~1 min)
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", "..", ".."))
sys.path.insert(0, HERE)

ARCHS = ("resnet", "antisymmetric", "leapfrog", "verlet")
PAIR = ("leapfrog", "verlet")


def load_emulator():
    from run_emulated import build

    work = tempfile.mkdtemp(prefix="sn_chunks_")
    build_dir = os.environ.get("SN_EMULATOR_BUILD") or os.path.join(work, "build")
    os.makedirs(build_dir, exist_ok=True)
    os.environ["STABLENETS_CPU_ISA"] = "none"  # the emulator is the CPU backend here
    lib = build(build_dir)
    torch.ops.load_library(lib)
    # The emulator library is also the stablenets_ext._C module (as in run_emulated.py).
    loader = importlib.machinery.ExtensionFileLoader("stablenets_ext._C", lib)
    spec = importlib.util.spec_from_loader("stablenets_ext._C", loader)
    sys.modules["stablenets_ext._C"] = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    from stablenets_ext import ops

    assert ops.has_kernel("cpu"), "emulator did not register"


def grads(arch, B, d, N, dtype, rev, seed, impl="fused"):
    from stablenets_ext import functional as F

    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, d, generator=g, dtype=torch.float64)
    o = torch.randn(B, d, generator=g, dtype=torch.float64) * 0.5
    W = torch.randn(N, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(N, d, generator=g, dtype=torch.float64) * 0.3
    cot = [torch.randn(B, d, generator=g, dtype=torch.float64) for _ in range(2)]
    xs = [t.to(dtype).requires_grad_(True) for t in (y, o, W, b)]
    y, o, W, b = xs
    rev = rev and impl == "fused"  # the reference stores every state: it refuses reversible
    if arch == "resnet":
        outs = (F.resnet(y, W, b, 0.2, "tanh", impl=impl),)
    elif arch == "antisymmetric":
        outs = (F.antisymmetric(y, W, b, 0.2, "tanh", gamma=0.05, impl=impl),)
    elif arch == "leapfrog":
        outs = tuple(F.leapfrog(y, W, b, 0.2, "tanh", y_prev=o, return_state=True,
                                reversible=rev, impl=impl))
    else:
        outs = tuple(F.verlet(y, W, b, 0.2, "tanh", z=o, return_state=True, reversible=rev,
                              impl=impl))
    loss = sum((t * c.to(dtype)).sum() for t, c in zip(outs, cot))
    leaves = [y, W, b] + ([o] if arch in PAIR else [])
    return [t.detach() for t in torch.autograd.grad(loss, leaves)]


def plan(ntiles, layer_bytes, N, sms, budget):
    """narrow_host.h's backward_plan: (blocks, chunk)."""
    budget = min(budget, max(16 << 20, layer_bytes * N))
    blocks = min(ntiles, sms * 4)
    fit = budget // (min(N, 8) * layer_bytes)
    if blocks > fit:
        blocks = max(fit, min(blocks, sms * 2))
    blocks = max(1, blocks)
    chunk = min(max(budget // (blocks * layer_bytes), 1), N)
    nchunks = -(-N // chunk)
    return blocks, -(-N // nchunks)


def rows_per_tile(d):
    """narrow_kernels.cuh's Cfg<D>::R for the padded width of d."""
    D = next(w for w in (4, 8, 16, 32, 64) if d <= w)
    nt = 256 if D >= 64 else 128
    rpt = 1 if (D <= 8 or D >= 64) else 2
    return nt // (D // 4) * rpt


def narrow_launches(fn):
    before = torch.ops.sn_emu.counters()[1]
    out = fn()
    return out, torch.ops.sn_emu.counters()[1] - before


def main():
    load_emulator()
    emu = torch.ops.sn_emu
    failures = 0
    # (B, d, N): several row tiles, padded widths.
    cases = [(150, 5, 7), (150, 16, 6), (40, 64, 5)]
    for B, d, N in cases:
        ntiles = -(-B // rows_per_tile(d))
        for arch in ARCHS:
            for rev in ((False, True) if arch in PAIR else (False,)):
                seed = 1000 * B + d
                tag = f"{arch} B={B} d={d} N={N} {'reversible' if rev else 'stored'}"
                emu.set_limits(227 * 1024, 132)
                emu.set_partial_budget(64 << 20)
                base = grads(arch, B, d, N, torch.float64, rev, seed)
                ref = grads(arch, B, d, N, torch.float64, rev, seed, impl="reference")
                for sms, chunk in ((1, 1), (1, 2), (2, 3), (1, N)):
                    blocks = min(ntiles, 4 * sms)
                    layer = d * (d + 1) * 8
                    emu.set_limits(227 * 1024, sms)
                    emu.set_partial_budget(blocks * layer * chunk)
                    got, launches = narrow_launches(
                        lambda: grads(arch, B, d, N, torch.float64, rev, seed))
                    _, even = plan(ntiles, layer, N, sms, blocks * layer * chunk)
                    want_launches = -(-N // even) + 1  # backward chunks + the forward
                    again = grads(arch, B, d, N, torch.float64, rev, seed)
                    emu.set_partial_budget(blocks * d * (d + 1) * 4 * chunk)
                    f32a = grads(arch, B, d, N, torch.float32, rev, seed)
                    f32b = grads(arch, B, d, N, torch.float32, rev, seed)
                    errs = []
                    for a, c, r in zip(got, base, ref):
                        scale = 1.0 + r.abs().max().item()
                        errs.append(max((a - c).abs().max().item(), (a - r).abs().max().item())
                                    / scale)
                    ok = (max(errs) < 1e-10 and launches == want_launches
                          and all(torch.equal(a, c) for a, c in zip(got, again))
                          and all(torch.equal(a, c) for a, c in zip(f32a, f32b)))
                    failures += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {tag} sms={sms} chunk={chunk}: "
                          f"max rel err {max(errs):.1e}, narrow launches {launches} "
                          f"(expected {want_launches}, chunk {even})", flush=True)
    emu.set_limits(227 * 1024, 132)
    emu.set_partial_budget(64 << 20)
    print("check_backward_chunks:", "all ok" if not failures else f"{failures} FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
