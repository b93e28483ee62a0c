"""Data-parallel backprop (DistributedDataParallel over gloo, 2 ranks): the
same parameters as one process on the same global batch, across a checkpoint
and resume too; and the `--backend dist` launcher of the CLI."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from stablenets_ext.data import load_dataset
from stablenets_ext.models import StableNet
from stablenets_ext.training import backprop
from stablenets_ext.training.backprop import ddp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 33 does not divide the 514 training points: the short last batch is split unevenly too.
KW = dict(batch_size=33, lr=0.05, lr_step=1, lr_gamma=0.5, alpha=1e-3, seed=0)


def _rank(rank, world, folder, state, out):
    torch.set_num_threads(1)
    data = load_dataset("swiss")
    model = StableNet("verlet", 2, 2, 8, width=4)
    model.load_state_dict(state)
    ck = os.path.join(folder, "ck.pt")
    ddp.train_ddp(model, data, init_method=f"file://{folder}/rdv1", rank=rank, world=world,
                  epochs=1, checkpoint=ck, quiet=True, **KW)
    other = StableNet("verlet", 2, 2, 8, width=4)  # resume rebuilds everything from ck
    res = ddp.train_ddp(other, data, init_method=f"file://{folder}/rdv2", rank=rank,
                        world=world, epochs=2, resume=ck, quiet=True, **KW)
    torch.save({"state": other.state_dict(), "loss": res["history"]["loss"],
                "workers": res["workers"]}, os.path.join(out, f"rank{rank}.pt"))


def test_two_gloo_ranks_equal_one_process_across_a_resume(tmp_path):
    torch.manual_seed(0)
    data = load_dataset("swiss")
    model = StableNet("verlet", 2, 2, 8, width=4)
    start = copy.deepcopy(model.state_dict())
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = backprop.train(model, data, epochs=2, quiet=True, **KW)
    finally:
        torch.set_num_threads(old)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, 2, str(tmp_path), start, str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0]
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["workers"] == 2
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got["state"][k], v, rtol=0, atol=1e-5)
        assert got["loss"] == pytest.approx(ref["history"]["loss"], rel=1e-5)


def test_shard_covers_each_batch_once():
    for n in (1, 2, 5, 33, 64):
        parts = [ddp.Shard(None, r, 3, "cpu").slice(torch.arange(n), torch.arange(n))
                 for r in range(3)]
        covered = torch.cat([x for x, _, s in parts if s])
        assert covered.tolist() == list(range(n))
        assert sum(x.shape[0] * s for x, _, s in parts) == pytest.approx(3.0)


def test_cli_backend_dist_launches_two_ranks(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    hist = tmp_path / "h.json"
    out = subprocess.run(
        [sys.executable, "-m", "stablenets_ext", "train", "--backend", "dist", "--workers", "2",
         "--dataset", "ellipse", "--epochs", "3", "--threads", "1", "--json", "--quiet",
         "--history", str(hist), "--save", str(tmp_path / "ck.pt")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert out.returncode == 0, out.stderr
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["workers"] == 2 and line["dist_backend"] == "gloo" and line["epochs"] == 3
    assert line["accuracy"] > 0.8
    assert json.loads(hist.read_text())["epochs"] == 3
    assert (tmp_path / "ck.pt").exists() and not (tmp_path / "ck.pt.lock").exists()
