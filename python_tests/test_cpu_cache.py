"""The CPU block cache (csrc/cpu/block_cache.h): large op buffers reused, never stale, capped."""

import os
import subprocess
import sys

import pytest
import torch

from stablenets_ext import functional as SF
from stablenets_ext import ops, reference

pytestmark = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="extension not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _big(arch, seed):
    """Inputs whose states (and, for d=160, weight gradient) are over the cache's 1 MiB floor."""
    g = torch.Generator().manual_seed(seed)
    B, d, N = 200, 160, 6
    y = torch.randn(B, d, generator=g, dtype=torch.float64)
    w = (torch.randn(N, d, d, generator=g, dtype=torch.float64) / d**0.5).requires_grad_()
    b = (0.1 * torch.randn(N, d, generator=g, dtype=torch.float64)).requires_grad_()
    return y, w, b


@pytest.mark.parametrize("arch", ["resnet", "antisymmetric", "leapfrog", "verlet"])
def test_reused_blocks_give_fresh_results(arch):
    """Steps that reuse cached states and weight gradients compute exactly what fresh memory does,
    and match the reference; the cache serves them (hits grow)."""
    before = ops.cpu_cache_stats()
    results = []
    for seed in (0, 1, 0):  # the third call reuses blocks last written by a different input
        y, w, b = _big(arch, seed)
        out = SF.FUNCTIONS[arch](y, w, b, 0.1, "tanh", impl="fused")
        out.sum().backward()
        results.append((out.detach(), w.grad, b.grad))
        if seed == 1:
            ref_w = w.detach().clone().requires_grad_()
            ref = reference.FUNCTIONS[arch](y, ref_w, b.detach(), 0.1, "tanh")
            ref.sum().backward()
            torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-9, atol=1e-10)
        del out, w, b
    for first, again in zip(results[0], results[2]):
        assert torch.equal(first, again)
    after = ops.cpu_cache_stats()
    assert after["hits"] > before["hits"]
    assert after["held"] <= after["cap"]


def test_cached_tensors_behave_like_any_other():
    y, w, b = _big("resnet", 3)
    _, states = torch.ops.stablenets.resnet_forward(y, w.detach(), b.detach(), 0.1, "tanh", True)
    assert states.nbytes >= 1 << 20
    states.resize_(states.numel() + 10)  # a resizable storage, like at::empty's
    shared = states.clone().share_memory_()
    assert shared.is_shared()
    del states, shared


def test_empty_releases_everything():
    y, w, b = _big("verlet", 4)
    SF.verlet(y, w, b, 0.1, "tanh", impl="fused").sum().backward()
    del w, b
    assert ops.cpu_cache_stats()["blocks"] > 0
    ops.cpu_cache_empty()
    stats = ops.cpu_cache_stats()
    assert stats["held"] == 0 and stats["blocks"] == 0


def _run(env_value, code):
    env = dict(os.environ, STABLENETS_CPU_CACHE_MB=env_value, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


STEP = """
import torch
from stablenets_ext import functional as SF, ops
y = torch.randn(200, 160, dtype=torch.float64)
for _ in range(3):
    w = (torch.randn(6, 160, 160, dtype=torch.float64) / 13).requires_grad_()
    b = torch.zeros(6, 160, dtype=torch.float64, requires_grad=True)
    SF.leapfrog(y, w, b, 0.1, "tanh", impl="fused").sum().backward()
print(ops.cpu_cache_stats())
"""


def test_cap_zero_turns_the_cache_off():
    r = _run("0", STEP)
    assert r.returncode == 0, r.stderr
    stats = eval(r.stdout.strip().splitlines()[-1])
    assert stats["cap"] == 0 and stats["held"] == 0 and stats["hits"] == 0


def test_small_cap_is_respected():
    r = _run("1", STEP)  # 1 MiB: the 3 MiB states and 1.2 MiB weight gradients do not fit
    assert r.returncode == 0, r.stderr
    stats = eval(r.stdout.strip().splitlines()[-1])
    assert stats["cap"] == 1 << 20 and stats["held"] <= stats["cap"] and stats["hits"] == 0


@pytest.mark.parametrize("bad", ["lots", "-5", "1.5"])
def test_bad_cap_is_refused_by_name(bad):
    r = _run(bad, STEP)
    assert r.returncode != 0
    assert "STABLENETS_CPU_CACHE_MB" in r.stderr and "whole number of megabytes" in r.stderr


def test_info_reports_a_bad_cap_instead_of_crashing():
    r = _run("lots", "import stablenets_ext as sn; print(sn.info()['cpu_cache'])")
    assert r.returncode == 0, r.stderr
    assert "STABLENETS_CPU_CACHE_MB" in r.stdout and "error" in r.stdout
