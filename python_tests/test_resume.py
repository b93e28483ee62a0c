"""Checkpoint and resume for every trainer: a run stopped and resumed gives the
same numbers as the uninterrupted run (CPU). Backprop (plain, multilevel) and
SG (in-process, pipeline) are covered in test_training / test_synthetic, DDP in
test_ddp; here PVD on every backend, and the CLI round trip for
each trainer."""

import json

import pytest
import torch

from stablenets_ext import cli
from stablenets_ext.data import load_dataset
from stablenets_ext.models import StableNet
from stablenets_ext.training import checkpoint, pvd
from stablenets_ext.training.pvd.blocks import BlockPartition


@pytest.fixture(scope="module")
def ellipse():
    return load_dataset("ellipse")


def from_state(state):
    """A fresh model holding ``state`` (the same start for every run)."""
    m = StableNet("verlet", 2, 2, 8, width=4)
    m.load_state_dict(state)
    return m


def flat(model):
    return BlockPartition(model, 2).flatten(dict(model.named_parameters()))


@pytest.mark.parametrize("backend", ["sequential", "process", "dist"])
def test_pvd_resume_continues_exactly(ellipse, backend, tmp_path):
    kw = dict(workers=2, backend=backend, inner_batches=6, batch_size=32, lr=0.05, threads=1,
              start_method="forkserver", sync="hull")
    torch.manual_seed(1)
    start = StableNet("verlet", 2, 2, 8, width=4).state_dict()

    def model():
        return from_state(start)

    whole = model()
    ref = pvd.train_pvd(whole, ellipse, iterations=4, **kw)
    ck = tmp_path / "pvd.pt"
    pvd.train_pvd(model(), ellipse, iterations=2, checkpoint=ck, **kw)
    state = checkpoint.load(ck)
    assert state["trainer"] == "pvd" and state["epoch"] == 2 and len(state["solvers"]) == 2
    resumed = model()  # its own parameters are replaced by the checkpoint's
    res = pvd.train_pvd(resumed, ellipse, iterations=4, resume=ck, **kw)
    assert torch.equal(flat(resumed), flat(whole))
    assert res["history"]["digest"] == ref["history"]["digest"]
    assert res["history"]["val_loss"] == ref["history"]["val_loss"]
    if backend == "sequential":
        with pytest.raises(ValueError, match="2 workers.*not 4"):
            pvd.train_pvd(model(), ellipse, iterations=4, resume=ck, **dict(kw, workers=4))


@pytest.mark.parametrize("trainer,extra", [
    ("backprop", []),
    ("sg", ["--stages", "2"]),
    ("pvd", ["--backend", "sequential", "--pvd-inner-batches", "4"]),
])
def test_cli_save_then_resume_equals_one_run(trainer, extra, tmp_path, capsys):
    base = ["train", "--trainer", trainer, "--dataset", "ellipse", "--layers", "4",
            "--threads", "1", "--json", "--quiet", *extra]

    def line():
        out = capsys.readouterr().out
        return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])

    assert cli.main([*base, "--epochs", "4"]) == 0
    whole = line()
    ck = tmp_path / "ck.pt"
    assert cli.main([*base, "--epochs", "2", "--save", str(ck)]) == 0
    capsys.readouterr()
    assert checkpoint.load(ck)["run"]["trainer"] == trainer
    assert cli.main(["train", "--resume", str(ck), "--epochs", "4", "--json", "--quiet",
                     "--threads", "1"]) == 0
    again = line()
    assert again["trainer"] == trainer and again["epochs"] == 4
    assert again["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert again["accuracy"] == whole["accuracy"]


def test_sg_dist_resume_equals_the_inprocess_run(tmp_path):
    """The dist backend's schedule is the in-process one with the same inflight:
    a dist run stopped after 2 epochs and resumed to 4 lands on the parameters
    of 4 uninterrupted in-process epochs."""
    from stablenets_ext.training.sg import train_sg

    data = load_dataset("swiss")
    torch.manual_seed(3)
    start = StableNet("verlet", 2, 2, 8, width=4).state_dict()

    def model():
        return from_state(start)

    kw = dict(batch_size=64, lr=0.01, stages=2, quiet=True, inflight=3)
    whole = model()
    ref = train_sg(whole, data, epochs=4, **kw)
    ck = tmp_path / "sg.pt"
    train_sg(model(), data, epochs=2, workers=2, backend="dist", threads=1, checkpoint=ck, **kw)
    resumed = model()
    res = train_sg(resumed, data, epochs=4, workers=2, backend="dist", threads=1, resume=ck, **kw)
    assert res["mode"] == "dist" and res["epochs"] == 4
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert res["history"]["loss"] == pytest.approx(ref["history"]["loss"], rel=1e-5)
