"""benchmarks/time_to_accuracy.py: its arguments, its arithmetic on recorded
histories, and one short real run through the command line."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tta():
    path = os.path.join(ROOT, "benchmarks", "time_to_accuracy.py")
    spec = importlib.util.spec_from_file_location("time_to_accuracy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_arguments(tta, tmp_path, capsys):
    args = tta.parse(["--dataset", "digits", "--out", str(tmp_path / "a"), "--target", "95",
                      "--args", "pvd=--pvd-inner-epochs 1", "--args", "pvd=--pvd-hull-steps 3",
                      "--trainers", "sg,pvd"])
    assert args.target == pytest.approx(0.95) and args.trainers == ["sg", "pvd"]
    assert args.extra == {"pvd": "--pvd-inner-epochs 1 --pvd-hull-steps 3"}
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for bad in (["--out", str(foreign)], ["--out", str(tmp_path / "b"), "--trainers", "sgd"],
                ["--out", str(tmp_path / "c"), "--args", "nope"],
                ["--out", str(tmp_path / "d"), "--cores", "1"]):
        with pytest.raises(SystemExit):
            tta.parse(bad)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_time_to_target_and_splits(tta):
    sg = {"process_wall_seconds": 10.0, "history": {
        "val_accuracy": [0.5, 0.8, 0.96, 0.97], "seconds": [1.0, 1.0, 1.0, 1.0],
        "eval_seconds": [0.1] * 4, "busy_seconds": [[0.8, 0.5]] * 4}}
    a = tta.analyse(sg, 0.9)
    assert a["reached"] and a["epochs_to_target"] == 3
    assert a["seconds_to_target"] == pytest.approx(3.0)
    assert a["startup_seconds"] == pytest.approx(10.0 - 4.0 - 0.4)
    assert a["split"]["stage_compute"] == pytest.approx([2.4, 1.5])
    assert a["split"]["stage_idle"] == pytest.approx([0.6, 1.5])
    pvd = {"process_wall_seconds": 5.0, "history": {
        "val_accuracy": [0.5, 0.6], "seconds": [1.0, 1.0], "eval_seconds": [0.0, 0.0],
        "direction_seconds": [0.1, 0.1], "phase_seconds": [0.7, 0.7],
        "sync_seconds": [0.2, 0.2], "worker_seconds": [[0.6, 0.5], [0.6, 0.5]]}}
    b = tta.analyse(pvd, 0.9)
    assert not b["reached"] and math.isinf(b["seconds_to_target"])
    assert b["split"]["worker_waiting"] == pytest.approx([0.2, 0.4])
    assert b["split"]["sync"] == pytest.approx(0.4)
    assert json.loads(tta.json_safe(b))["seconds_to_target"] is None


def test_one_real_run(tta, tmp_path, capsys):
    out = tmp_path / "tta"
    assert tta.main(["--dataset", "swiss", "--trainers", "backprop-1t", "--seeds", "0",
                     "--epochs", "2", "--target", "0.4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "time to 40.00% validation accuracy" in text and "backprop-1t" in text
    summary = json.loads((out / "summary.json").read_text())
    run = summary["runs"]["backprop-1t"][0]
    assert run["reached"] and run["epochs_to_target"] == 1 and run["startup_seconds"] > 0
    assert (out / "accuracy_vs_seconds.png").exists()
    # a second run into the same folder is allowed (the script wrote it)
    assert tta.parse(["--out", str(out)]).out == str(out)
