"""Parallel Variable Distribution trainer (stablenets_ext.training.pvd*).

In-process tests first (block split, all four architectures, the hull step),
then the ones that start worker processes: reaching the target on ellipse and
swiss with P=2, identical parameters on every worker after every
synchronisation, a killed / failing / interrupted worker, and the
torch.distributed backend with 2 local ranks. Training tests fix their seed:
they check convergence of one known run, not of every initialisation.
"""

import json
import os
import signal
import time

import pytest
import torch

from stablenets_ext.data import load_dataset
from stablenets_ext.models import StableNet
from stablenets_ext.training import pvd
from stablenets_ext.training.presets import preset
from stablenets_ext.training.pvd.blocks import BlockPartition, digest, split_layers
from stablenets_ext.training.pvd.solver import Net, PVDConfig, SharedState
from stablenets_ext.training.pvd.sync import synchronise

from conftest import needs_cuda

ARCHS = ["resnet", "antisymmetric", "leapfrog", "verlet"]
# The CLI test starts its workers the default way (spawn); the others use the
# forkserver, which imports torch once for all of them (seconds per start saved
# on the 2-core machine).
FAST_START = {"start_method": "forkserver"}


@pytest.fixture(scope="module")
def ellipse():
    return load_dataset("ellipse")


@pytest.fixture(scope="module")
def swiss():
    return load_dataset("swiss")


def preset_model(data, seed=0, **over):
    p = preset(data.name)
    p.update(over)
    torch.manual_seed(seed)
    return StableNet(p["arch"], data.features, data.classes, p["layers"], width=p["width"],
                     step=p["step"]), p


def flat_of(model, workers):
    part = BlockPartition(model, workers)
    return part.flatten(dict(model.named_parameters()))


def shm_entries():
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def assert_reaped(pids):
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def assert_identical_after_every_sync(result, model, workers):
    h = result["history"]
    assert len(h["worker_digests"]) == result["iterations"] > 0
    for own, theirs in zip(h["digest"], h["worker_digests"]):
        assert len(theirs) == workers and set(theirs) == {own}
    assert result["digests_identical"]
    assert digest(flat_of(model, workers)) == h["digest"][-1]


# ------------------------------------------------------------- in process


def test_split_layers():
    assert split_layers(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_layers(2, 2) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="at least one layer"):
        split_layers(2, 3)


@pytest.mark.parametrize("arch", ARCHS)
def test_partition_covers_every_parameter_once(arch):
    # width < features: a learned linear lift, which must go to the first block.
    model = StableNet(arch, 6, 3, 7, width=4)
    part = BlockPartition(model, 3)
    assert part.layer_ranges == [(0, 3), (3, 5), (5, 7)]
    assert part.numel == sum(p.numel() for p in model.parameters())
    owners = {s.name: set() for s in part.segments}
    for s in part.segments:
        owners[s.name].add(s.block)
    assert owners["lift.weight"] == {0} and owners["lift.bias"] == {0}
    assert owners["classifier.weight"] == {2} and owners["classifier.bias"] == {2}
    assert owners["stack.weight"] == owners["stack.bias"] == {0, 1, 2}
    flat = part.flatten(dict(model.named_parameters()))
    back = part.unflatten(flat)
    for name, p in model.named_parameters():
        torch.testing.assert_close(back[name], p, rtol=0, atol=0)
    # Block 1 is exactly layers 3..4 of the stack tensors.
    blk = part.block(flat, 1)
    w = model.stack.weight[3:5].reshape(-1)
    b = model.stack.bias[3:5].reshape(-1)
    torch.testing.assert_close(blk, torch.cat([w, b]).detach(), rtol=0, atol=0)


def test_partition_rejects_other_models():
    with pytest.raises(TypeError, match="StableNet-like"):
        BlockPartition(torch.nn.Linear(3, 3), 2)


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_trains_sequential(arch, impl, ellipse):
    """One PVD iteration per architecture, fused (auto) and reference: finite
    losses, the model changes, weights and biases of every block included."""
    torch.manual_seed(0)
    model = StableNet(arch, 2, 2, 4, width=4, impl=impl)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    res = pvd.train_pvd(model, ellipse, workers=2, backend="sequential", iterations=1,
                        inner_batches=4, direction_batches=2, batch_size=32, lr=0.02, threads=1)
    h = res["history"]
    assert res["iterations"] == 1 and torch.isfinite(torch.tensor(h["best_loss"]))
    assert h["sync_loss"][0] <= h["best_loss"][0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"stack.weight", "stack.bias", "classifier.weight", "classifier.bias"} <= changed
    assert h["worker_digests"][0] == [h["digest"][0]] * 2


def test_fused_and_reference_iterates_agree(ellipse):
    """Slices of the (N, d, d) stack tensors reach the fused op whole; the
    result matches the reference implementation's."""
    out = []
    for impl in ("auto", "reference"):
        torch.manual_seed(0)
        model = StableNet("verlet", 2, 2, 6, width=4, impl=impl)
        pvd.train_pvd(model, ellipse, workers=3, backend="sequential", iterations=2,
                      inner_batches=3, batch_size=32, lr=0.02, threads=1, sync="best")
        out.append(flat_of(model, 3))
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-5)


def test_hull_never_worse_than_best(ellipse):
    """Directly: random candidate points, the hull point's loss <= the best one's."""
    torch.manual_seed(0)
    model = StableNet("resnet", 2, 2, 6, width=4)
    part = BlockPartition(model, 3)
    shared = SharedState.allocate(part.numel, 3, torch.float32, "cpu", share=False)
    part.flatten(dict(model.named_parameters()), out=shared.x)
    for trial in range(3):
        shared.d.normal_()
        shared.proposal.copy_(shared.x + 0.3 * torch.randn_like(shared.x))
        shared.mu.normal_(0, 0.1).fill_diagonal_(0)
        net = Net(model, {}, part)
        losses = []
        for l in range(3):
            from stablenets_ext.training.pvd.solver import candidate

            point = candidate(part, shared.x, shared.d, shared.proposal, shared.mu[l], l)
            losses.append(net.loss(point, ellipse.val_x, ellipse.val_y).item())
        for mode in ("best", "hull"):
            cfg = PVDConfig(workers=3, sync=mode, sync_batch=10_000, hull_steps=8)
            point, info = synchronise(net, shared, losses, cfg, trial, (ellipse.val_x, ellipse.val_y))
            got = net.loss(point, ellipse.val_x, ellipse.val_y).item()
            assert info["best_worker"] == min(range(3), key=losses.__getitem__)
            if mode == "best":
                best = got
                assert got == pytest.approx(min(losses), rel=1e-5)
            else:
                assert got <= best + 1e-7
                assert info["sync_loss"] <= info["best_loss"]


def test_bad_arguments(ellipse):
    model = StableNet("resnet", 2, 2, 4, width=4)
    with pytest.raises(ValueError, match="sync"):
        pvd.train_pvd(model, ellipse, sync="average", backend="sequential")
    with pytest.raises(ValueError, match="backend"):
        pvd.train_pvd(model, ellipse, backend="threads")
    with pytest.raises(ValueError, match="at least one layer"):
        pvd.train_pvd(model, ellipse, workers=5, backend="sequential")


# ----------------------------------------------------- worker processes


def test_cli_ellipse_reaches_target_identical_workers(ellipse, tmp_path, capsys):
    """`stablenets train --trainer pvd --workers 2` on the ellipse: 95% validation
    accuracy, the same parameters in every worker after every synchronisation,
    the same iterates as the sequential run, and the comparisons in --json."""
    from stablenets_ext import cli

    hist = tmp_path / "history.json"
    rc = cli.main(["train", "--dataset", "ellipse", "--trainer", "pvd", "--workers", "2",
                   "--target-accuracy", "95", "--epochs", "10", "--pvd-threads", "1",
                   "--compare", "sequential,backprop", "--json", "--quiet", "--history", str(hist)])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["trainer"] == "pvd" and line["accuracy"] >= 0.95 and line["reached_target"]
    assert line["digests_identical"] and line["workers"] == 2
    seq = line["comparison"]["sequential"]
    assert seq["same_iterates"] and seq["phase_speedup"] > 0 and line["phase_speedup"] > 0
    assert line["comparison"]["backprop"]["accuracy"] > 0
    assert "time_to_target_vs_backprop" in line
    h = json.loads(hist.read_text())["history"]
    assert len(h["phase_seconds"]) == line["iterations"]
    for own, theirs in zip(h["digest"], h["worker_digests"]):
        assert theirs == [own, own]


def test_swiss_reaches_target(swiss):
    model, p = preset_model(swiss)
    start_bias = model.stack.bias.detach().clone()
    res = pvd.train_pvd(model, swiss, workers=2, iterations=40, target_accuracy=0.95,
                        lr=p["lr"], batch_size=p["batch_size"], threads=1, sync="best",
                        **FAST_START)
    assert res["reached_target"] and res["accuracy"] >= 0.95, res["history"]["val_accuracy"]
    assert_identical_after_every_sync(res, model, 2)
    assert not torch.equal(model.stack.bias, start_bias)  # biases trained and broadcast too
    assert all(t > 0 for t in res["history"]["phase_seconds"])


def test_killed_worker_is_reported_and_reaped(ellipse):
    model, p = preset_model(ellipse)
    shm = shm_entries()
    seen = {}

    def kill_worker_1(info):
        if info["iteration"] == 1:
            seen["pids"] = info["pids"]
            seen["t"] = time.monotonic()
            os.kill(info["pids"][1], signal.SIGKILL)

    # Even where the caller chose torch's file_system strategy (named files in
    # /dev/shm that a kill -9 can strand), PVD shares through descriptors.
    strategy = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        with pytest.raises(pvd.WorkerError, match=r"worker 1 .*died.*SIGKILL") as err:
            pvd.train_pvd(model, ellipse, workers=2, iterations=5, inner_batches=5, threads=1,
                          callback=kill_worker_1, **FAST_START)
    finally:
        torch.multiprocessing.set_sharing_strategy(strategy)
    assert time.monotonic() - seen["t"] < 10
    assert err.value.worker == 1
    assert_reaped(seen["pids"])
    assert shm_entries() <= shm


def test_failing_worker_is_reported_and_reaped(ellipse):
    model, _ = preset_model(ellipse)
    shm = shm_entries()
    seen = {}

    def remember(info):
        seen["pids"] = info["pids"]

    t0 = time.monotonic()
    with pytest.raises(pvd.WorkerError, match=r"(?s)worker 0 .*failed.*injected fault"):
        pvd.train_pvd(model, ellipse, workers=2, iterations=5, inner_batches=5, threads=1,
                      callback=remember, fault=("raise", 0, 1), **FAST_START)
    assert time.monotonic() - t0 < 120
    assert_reaped(seen["pids"])
    assert shm_entries() <= shm


def test_ctrl_c_stops_cleanly(ellipse, sigint_default):
    """Ctrl-C reaches the whole process group: the workers ignore it and the
    coordinator raises KeyboardInterrupt after reaping them."""
    model, _ = preset_model(ellipse)
    seen = {}

    def ctrl_c(info):
        seen["pids"] = info["pids"]
        for pid in info["pids"]:
            os.kill(pid, signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)  # the KeyboardInterrupt arrives here

    with pytest.raises(KeyboardInterrupt):
        pvd.train_pvd(model, ellipse, workers=2, iterations=5, inner_batches=5, threads=1,
                      callback=ctrl_c, **FAST_START)
    assert_reaped(seen["pids"])


def test_dist_backend_two_ranks(ellipse):
    model, p = preset_model(ellipse)
    res = pvd.train_pvd(model, ellipse, workers=2, backend="dist", iterations=10,
                        target_accuracy=0.95, lr=p["lr"], batch_size=p["batch_size"], threads=1,
                        **FAST_START)
    assert res["backend"] == "dist" and res["dist_backend"] == "gloo"
    assert res["reached_target"] and res["accuracy"] >= 0.95
    assert_identical_after_every_sync(res, model, 2)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["sequential", "process", "dist"])
def test_cuda_backends(backend, ellipse):
    """Shared CUDA tensors between processes (IPC), and dist ranks sharing one
    GPU (gloo over CPU copies, since NCCL needs a GPU per rank)."""
    torch.manual_seed(0)
    model = StableNet("verlet", 2, 2, 8, width=4).cuda()
    start = flat_of(model, 2).clone()
    res = pvd.train_pvd(model, ellipse, workers=2, backend=backend, iterations=3, inner_batches=20,
                        batch_size=32, lr=0.05, threads=1, device="cuda", **FAST_START)
    assert res["iterations"] == 3 and model.stack.weight.is_cuda
    assert_identical_after_every_sync(res, model, 2)
    assert not torch.equal(flat_of(model, 2), start)
    assert res["history"]["val_loss"][-1] < res["initial_val_loss"]
