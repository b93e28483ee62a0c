"""Synthetic-gradient (DNI) trainer: stages, SG modules, the in-process
reference, the process pipeline, the torch.distributed backend, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from torch import nn

from stablenets_ext import models
from stablenets_ext.data import Dataset, load_dataset
from stablenets_ext.training import backprop
from stablenets_ext.training.sg.trainer import InProcessEngine, StageError, make_runners, train_sg
from stablenets_ext.training.sg.stages import (
    SyntheticGradient,
    chain_forward,
    make_sg_modules,
    split_bounds,
    split_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The swiss-roll preset (verlet, 64 layers of width 4): SG with M=2 and M=3
# reaches it well within the preset's 60 epochs.
SWISS = dict(arch="verlet", layers=64, width=4, step=0.1)
SWISS_TRAIN = dict(batch_size=32, lr=0.05)
SWISS_TARGET = 0.95

warnings.filterwarnings("ignore", message="stablenets_ext: no compiled kernel")


@pytest.fixture(scope="module")
def swiss():
    return load_dataset("swiss")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def make(data, arch="verlet", layers=8, width=None, step=0.1, seed=0, **kw):
    torch.manual_seed(seed)
    return models.StableNet(arch, data.features, data.classes, layers, width=width, step=step, **kw)


def params(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


# ------------------------------------------------------------------ stages


@pytest.mark.parametrize("arch", ["resnet", "antisymmetric", "leapfrog", "verlet", "conv-verlet"])
def test_stages_compose_to_the_model(arch):
    torch.manual_seed(0)
    if arch.startswith("conv"):
        features, x = (1, 6, 6), torch.randn(5, 1, 6, 6)
        model = models.StableNet(arch, features, 3, 6, width=4, pool=2)
    else:
        features, x = 5, torch.randn(5, 5)
        model = models.StableNet(arch, features, 3, 7, width=6, step=0.2)
    nets = split_model(model, stages=3)
    assert [n.hi - n.lo for n in nets] == [2, 3, 2] or arch.startswith("conv")
    torch.testing.assert_close(chain_forward(nets, x), model(x), rtol=1e-5, atol=1e-6)


def test_split_bounds_checks():
    assert split_bounds(8, 2) == [0, 4, 8]
    assert split_bounds(7, 3) == [0, 2, 5, 7]
    with pytest.raises(ValueError, match="stages"):
        split_bounds(2, 3)
    model = models.StableNet("resnet", 4, 2, 4)
    with pytest.raises(ValueError, match="bounds"):
        split_model(model, bounds=[0, 3, 2, 4])


@pytest.mark.parametrize("arch", ["resnet", "leapfrog", "verlet"])
def test_true_gradients_through_the_cuts_are_backprop(arch, swiss, one_thread):
    """With the true gradient handed across every cut (the coarse phase of
    multilevel SG), per-stage Adam is exactly backprop's Adam."""
    ref = make(swiss, arch, layers=6, width=4)
    cut = make(swiss, arch, layers=6, width=4)
    backprop.train(ref, swiss, epochs=1, batch_size=64, lr=0.01, quiet=True)
    nets = split_model(cut, stages=3)
    sgs = make_sg_modules(nets, swiss.train_x[:1], swiss.classes)
    runners = make_runners(nets, sgs, 1, dict(lr=0.01), torch.device("cpu"))
    engine = InProcessEngine(runners, swiss, torch.device("cpu"), batch_size=64, seed=0,
                             synthetic=False)
    engine.run_epoch(0)
    from stablenets_ext.training.sg.stages import merge_stages

    merge_stages(nets, cut)
    torch.testing.assert_close(params(cut), params(ref), rtol=1e-4, atol=1e-5)
    # ...and the SG modules learnt from it.
    assert any(p.abs().sum() > 0 for sg in sgs for p in sg.parameters())


@pytest.mark.parametrize("hidden", [0, 16])
@pytest.mark.parametrize("classes", [2, 7])
def test_sg_module(hidden, classes, one_thread):
    torch.manual_seed(0)
    sg = SyntheticGradient((3,), parts=2, classes=classes, hidden=hidden)
    state = (torch.randn(10, 3), torch.randn(10, 3))
    labels = torch.randint(0, classes, (10,))
    out = sg(state, labels)
    assert len(out) == 2 and all(o.shape == (10, 3) for o in out)
    assert all(o.abs().max() == 0 for o in out)  # zero-initialised: predicts no gradient
    # it can learn a label-dependent linear target
    w = torch.randn(6, 6)
    opt = torch.optim.Adam(sg.parameters(), lr=0.05)
    losses = []
    for _ in range(150):
        s = (torch.randn(64, 3), torch.randn(64, 3))
        y = torch.randint(0, classes, (64,))
        target = torch.cat(s, 1) @ w + y[:, None].float()
        pred = torch.cat(sg(s, y), 1)
        loss = (pred - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


# ------------------------------------------------------------ in-process


@pytest.mark.parametrize("stages", [2, 3])
def test_inprocess_reaches_target_on_swiss(stages, swiss, one_thread):
    model = make(swiss, **SWISS)
    result = train_sg(model, swiss, epochs=60, stages=stages, target_accuracy=SWISS_TARGET,
                      quiet=True, **SWISS_TRAIN)
    assert result["accuracy"] >= SWISS_TARGET, result["history"]["val_accuracy"]
    assert result["stages"] == stages and len(result["sg_loss"]) == stages - 1
    h = result["history"]
    assert all(len(b) == stages for b in h["busy_seconds"])
    assert all(t <= s + 1e-9 for t, s in zip(h["theoretical_seconds"], map(sum, h["busy_seconds"])))
    # the trained stages were written back into the model
    _, acc = backprop.evaluate(model, swiss.val_x, swiss.val_y)
    assert acc == pytest.approx(result["accuracy"])


def test_inprocess_is_deterministic_and_resumes(swiss, one_thread, tmp_path):
    kw = dict(epochs=3, batch_size=64, lr=0.02, stages=2, quiet=True)
    a, b = make(swiss, layers=6, width=4), make(swiss, layers=6, width=4)
    ra = train_sg(a, swiss, **kw)
    ck = tmp_path / "sg.pt"
    train_sg(b, swiss, **dict(kw, epochs=2), checkpoint=ck)
    c = make(swiss, layers=6, width=4, seed=5)
    rc = train_sg(c, swiss, **kw, resume=ck)
    assert torch.equal(params(a), params(c))
    assert ra["history"]["loss"] == rc["history"]["loss"]


def test_multilevel(swiss, one_thread):
    model = make(swiss, layers=8, width=4)
    result = train_sg(model, swiss, epochs=2, coarse_epochs=2, batch_size=64, lr=0.02, stages=2,
                      quiet=True)
    h = result["history"]
    assert h["phase"] == ["coarse", "coarse", "fine", "fine"]
    assert h["layers"] == [4, 4, 8, 8]
    assert result["bounds"] == [0, 4, 8]
    # the SG modules learnt during the coarse phase: the fine phase starts with a prediction
    assert h["sg_rel_error"][0][0] == h["sg_rel_error"][0][0]  # not NaN


def test_conv_arch_gets_a_convolutional_sg(digits, one_thread):

    images = Dataset("digits-images", digits.train_x.view(-1, 1, 8, 8), digits.train_y,
                     digits.val_x.view(-1, 1, 8, 8), digits.val_y, (1, 8, 8), 10)
    torch.manual_seed(0)
    model = models.StableNet("conv-verlet", (1, 8, 8), 10, 4, width=4, pool=2)
    result = train_sg(model, images, epochs=2, batch_size=64, lr=0.01, stages=2, quiet=True)
    (sg,) = result["sg_modules"]
    assert sg.spatial and sum(p.numel() for p in sg.parameters() if p.requires_grad) < 2000
    assert result["accuracy"] > 0.3
    # the per-class gradient maps make it predict (1.0 = no better than zero;
    # a 3x3 convolution alone, trained by Adam, stayed at 0.99-1.0)
    assert result["history"]["sg_rel_error"][0][0] < 0.7, result["history"]["sg_rel_error"]


def test_sg_modules_learn_the_gradient(digits, one_thread):
    """The SG module predicts the true gradient at the cut: relative error
    well below 1 (predicting zero gives 1). Adam at 3e-4 on the raw targets,
    the old default, stayed at 0.99-1.0 on this run."""
    model = make(digits, layers=8, width=64)
    result = train_sg(model, digits, epochs=1, batch_size=64, lr=0.01, stages=2, quiet=True)
    (err,) = result["sg_rel_error"]
    assert err < 0.6, err


def test_ridge_fit_recovers_a_linear_gradient(one_thread):
    from stablenets_ext.training.sg.stages import RidgeFit

    torch.manual_seed(0)
    sg = SyntheticGradient((3,), parts=2, classes=4)
    fit = RidgeFit(sg)
    w, b = torch.randn(10, 6), torch.randn(6)
    for _ in range(5):
        s = (torch.randn(32, 3), torch.randn(32, 3))
        y = torch.randint(0, 4, (32,))
        target = torch.cat([*s, nn.functional.one_hot(y, 4).float()], 1) @ w + b
        fit.step(s, y, (target[:, :3], target[:, 3:]), target.pow(2).mean().sqrt())
    s = (torch.randn(16, 3), torch.randn(16, 3))
    y = torch.randint(0, 4, (16,))
    target = torch.cat([*s, nn.functional.one_hot(y, 4).float()], 1) @ w + b
    pred = torch.cat(sg(s, y), 1)
    assert (pred - target).norm() < 0.01 * target.norm()
    with pytest.raises(ValueError, match="sg_fit"):
        RidgeFit(SyntheticGradient((3,), parts=1, classes=2, hidden=4))
    with pytest.raises(ValueError, match="sg_fit"):
        RidgeFit(SyntheticGradient((2, 3, 3), parts=1, classes=2))


def test_cut_points(swiss, one_thread):
    from stablenets_ext.training import TrainConfig, load_trainer
    from stablenets_ext.training.options import OptionError

    sg = load_trainer("sg")
    model = make(swiss, layers=6, width=4)
    config = TrainConfig(epochs=1, batch_size=64, lr=0.02, quiet=True)
    result = sg.fit(model, swiss, config, sg.Options(sg_cuts=2))
    assert result["bounds"] == [0, 2, 6]
    with pytest.raises(OptionError, match="sg_cuts"):
        sg.fit(make(swiss, layers=6, width=4), swiss, config, sg.Options(sg_cuts=(4, 2)))
    with pytest.raises(ValueError, match="bounds.*workers is 2"):
        train_sg(make(swiss, layers=6, width=4), swiss, epochs=1, batch_size=64, lr=0.02,
                 bounds=[0, 2, 4, 6], workers=2, quiet=True)


def test_sg_fit_checks(swiss, one_thread, tmp_path):
    kw = dict(epochs=1, batch_size=64, lr=0.02, stages=2, quiet=True)
    with pytest.raises(ValueError, match="sg_fit"):
        train_sg(make(swiss, layers=4, width=4), swiss, sg_fit="sgd", **kw)
    with pytest.raises(ValueError, match="sg_fit"):
        train_sg(make(swiss, layers=4, width=4), swiss, sg_fit="solve", sg_hidden=8, **kw)
    ck = tmp_path / "sg.pt"
    train_sg(make(swiss, layers=4, width=4), swiss, checkpoint=ck, **kw)
    with pytest.raises(ValueError, match="sg-fit"):
        train_sg(make(swiss, layers=4, width=4), swiss, sg_fit="adam", resume=ck,
                 **dict(kw, epochs=2))


def test_cli_json_line(capsys):
    from stablenets_ext import cli

    rc = cli.main(["train", "--trainer", "sg", "--dataset", "swiss", "--layers", "4",
                   "--epochs", "2", "--stages", "2", "--compare", "backprop", "--sg-baseline-epochs", "1", "--json"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("accuracy", "seconds_per_epoch", "theoretical_seconds_per_epoch", "sg_loss",
                "backprop_seconds_per_epoch", "speedup_vs_backprop", "stages", "cores"):
        assert key in line, key
    assert line["trainer"] == "sg" and len(line["sg_loss"]) == 1


# --------------------------------------------------------------- pipeline


def _children(pid):
    """(pid, state, cmdline) of the live children of ``pid``, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append((int(entry), fields[0], cmd))
    return out


def _stage_children(pid):
    # multiprocessing's resource tracker and forkserver (started by other tests in
    # this session, e.g. PVD's) live as long as their parent: not ours to end.
    return [c for c in _children(pid)
            if "resource_tracker" not in c[2] and "multiprocessing.forkserver" not in c[2]]


def _shm_entries():
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def test_pipeline_matches_inprocess(digits, one_thread, tmp_path):
    """The pipeline's schedule is fixed by ``inflight``, not by timing: it equals
    the in-process run with the same ``inflight`` (here across a checkpoint and
    a resume), and lands within 2 points of the textbook (``inflight=1``) run."""
    kw = dict(batch_size=64, lr=0.01, stages=2, quiet=True)
    ref = make(digits, layers=8, width=64)
    same = make(digits, layers=8, width=64)
    r_ref = train_sg(ref, digits, epochs=4, **kw)
    r_same = train_sg(same, digits, epochs=4, inflight=3, **kw)
    ck = tmp_path / "pipe.pt"
    train_sg(make(digits, layers=8, width=64), digits, epochs=2, workers=2, threads=1,
             checkpoint=ck, **kw)
    piped = make(digits, layers=8, width=64, seed=7)
    r_pipe = train_sg(piped, digits, epochs=4, workers=2, threads=1, resume=ck, **kw)
    assert r_pipe["mode"] == "process" and r_pipe["inflight"] == 3
    torch.testing.assert_close(params(piped), params(same), rtol=1e-5, atol=1e-6)
    assert r_pipe["history"]["loss"] == pytest.approx(r_same["history"]["loss"], rel=1e-5)
    # (best, not final: with SG modules that learn, a 4-epoch digits run wobbles
    # by a few points from epoch to epoch)
    assert abs(r_pipe["best_accuracy"] - r_ref["best_accuracy"]) <= 0.02
    assert r_ref["accuracy"] > 0.9
    assert _stage_children(os.getpid()) == []


def test_killed_stage_is_reported_and_cleaned_up(swiss):
    before = _shm_entries()
    pids = []
    t_kill = []

    def kill_stage_1(started):
        pids.extend(started)

        def later():
            time.sleep(1.0)
            t_kill.append(time.monotonic())
            os.kill(started[1], signal.SIGKILL)

        threading.Thread(target=later, daemon=True).start()

    model = make(swiss, **SWISS)
    with pytest.raises(StageError, match=r"stage 1 .*SIGKILL") as info:
        train_sg(model, swiss, epochs=200, workers=2, threads=1, quiet=True,
                 on_workers_started=kill_stage_1, **SWISS_TRAIN)
    assert time.monotonic() - t_kill[0] < 10
    assert info.value.stage == 1
    assert _stage_children(os.getpid()) == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z"
    leaked = [e for e in _shm_entries() - before
              if any(str(p) in e for p in pids + [os.getpid()])]
    assert leaked == []


def _state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


class ExplodingLift(nn.Module):
    """A lift that raises on its 5th training call (pickled into stage 0)."""

    def __init__(self, lift):
        super().__init__()
        self.lift, self.calls = lift, 0

    def forward(self, x):
        self.calls += 1
        if self.training and self.calls == 5:
            raise FloatingPointError("boom in the lift")
        return self.lift(x)


def test_stage_exception_is_reported(swiss):
    model = make(swiss, layers=4, width=4)
    model.lift = ExplodingLift(model.lift)
    with pytest.raises(StageError, match=r"stage 0 .*FloatingPointError: boom in the lift"):
        train_sg(model, swiss, epochs=5, workers=2, threads=1, quiet=True, batch_size=64, lr=0.01)
    assert _stage_children(os.getpid()) == []


def test_dist_stage_exception_is_reported_as_its_one_line(swiss):
    # labels out of range: a rank fails inside its training loop
    bad = Dataset(swiss.name, swiss.train_x, swiss.train_y * 7, swiss.val_x, swiss.val_y,
                  swiss.features, swiss.classes)
    model = make(swiss, layers=4, width=4)
    with pytest.raises(StageError) as info:
        train_sg(model, bad, epochs=2, workers=2, threads=1, quiet=True, batch_size=64, lr=0.01,
                 backend="dist")
    # the failing rank's own line, not a summary of torchrun's log. Both ranks fail on the
    # first batch (stage 0's label-conditioned synthetic gradient, stage 1's loss), so either
    # may be the first reported: a race, whichever it is.
    message = str(info.value)
    own_lines = {0: "synthetic-gradient stage 0: Class values must be smaller than num_classes.",
                 1: "synthetic-gradient stage 1: IndexError: Target 7 is out of bounds."}
    assert info.value.worker in own_lines, info.value.worker
    assert message == own_lines[info.value.worker], message


def test_ctrl_c_stops_the_pipeline(tmp_path, sigint_default):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stablenets_ext", "train", "--trainer", "sg", "--workers", "2",
         "--dataset", "swiss", "--epochs", "1000", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        stages = []
        while time.monotonic() < deadline and len(stages) < 2:
            stages = [c for c in _stage_children(proc.pid) if "multiprocessing" in c[2]]
            time.sleep(0.5)
        assert len(stages) == 2, "the stage processes never started"
        time.sleep(2.0)  # let them train
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)  # a loaded CI machine shuts down slowly
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert b"KeyboardInterrupt" in err
    time.sleep(0.5)
    assert all(_state(pid) in (None, "Z") for pid, _, _ in stages)


# ------------------------------------------------------------ distributed


def test_torchrun_two_ranks(tmp_path):
    from stablenets_ext.training.runtime import free_port

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}",
           "-m", "stablenets_ext.cli.sg_dist", "--dataset", "digits", "--layers", "8",
           "--width", "64", "--epochs", "6", "--batch-size", "64", "--lr", "0.01",
           "--target-accuracy", "0.9", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=150)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # rank 0 alone reports
    line = json.loads(lines[0])
    assert line["mode"] == "dist" and line["workers"] == 2 and line["dist_backend"] == "gloo"
    assert line["accuracy"] >= 0.9
