"""The defects of issue 13, each tried as a hostile user would: every case now
either works or is refused with one clear line naming the option or file,
before any training."""

import json
import os
import stat
import time

import pytest
import torch

from stablenets_ext import cli, stability
from stablenets_ext.training import checkpoint, sg

TINY = ["--dataset", "swiss", "--layers", "4", "--quiet", "--threads", "1"]


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def json_line(out):
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0])


# 1 ------------------------------------------------------------------ resume


@pytest.fixture
def saved(tmp_path, capsys):
    ck = tmp_path / "ck.pt"
    assert run(["train", *TINY, "--arch", "verlet", "--epochs", "3", "--save", str(ck)],
               capsys)[0] == 0
    return ck


@pytest.mark.parametrize("flags,named", [
    (["--arch", "resnet"], "--arch resnet (checkpoint: verlet)"),
    (["--dataset", "ellipse"], "--dataset ellipse (checkpoint: swiss)"),
    (["--width", "8"], "--width 8 (checkpoint: 4)"),
    (["--arch", "resnet", "--seed", "4"], "--seed 4 (checkpoint: 0)"),
])
def test_resume_refuses_other_settings_naming_them(saved, flags, named, capsys):
    before = saved.read_bytes()
    code, _, err = run(["train", "--resume", str(saved), "--epochs", "5", *flags], capsys)
    assert code == 2 and named in err and err.count("\n") == 1
    assert saved.read_bytes() == before


def test_resume_refuses_fewer_epochs_and_never_writes_without_save(saved, tmp_path, capsys):
    code, _, err = run(["train", "--resume", str(saved), "--epochs", "2", "--quiet"], capsys)
    assert code == 2 and "--epochs 2" in err and "3 epochs" in err
    before = saved.read_bytes()
    code, out, _ = run(["train", "--resume", str(saved), "--epochs", "4", "--json", "--quiet"],
                       capsys)
    line = json_line(out)
    assert code == 0 and line["epochs"] == 4 and line["arch"] == "verlet"
    assert saved.read_bytes() == before
    # with --save it continues into the new file
    new = tmp_path / "more.pt"
    assert run(["train", "--resume", str(saved), "--epochs", "4", "--save", str(new)],
               capsys)[0] == 0
    assert checkpoint.load(new)["epoch"] == 4


# 4 ------------------------------------------------------------ pvd workers 1


def test_pvd_with_one_worker(capsys):
    code, out, err = run(["train", "--trainer", "pvd", "--workers", "1", "--backend",
                          "sequential", "--dataset", "ellipse", "--epochs", "2", "--json",
                          "--pvd-inner-batches", "3", "--quiet"], capsys)
    assert code == 0, err
    assert json_line(out)["workers"] == 1


# 5 ---------------------------------------------------------- output paths


@pytest.mark.parametrize("flag,kind", [("--history", "dir"), ("--save", "dir"),
                                       ("--plot", "file"), ("--history", "readonly"),
                                       ("--save", "under-a-file")])
def test_output_paths_checked_before_training(tmp_path, flag, kind, capsys):
    target = tmp_path / "out"
    if kind == "dir":
        target.mkdir()
    elif kind == "file":
        target.write_text("x")
    elif kind == "readonly":
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        target = folder / "h.json"
        if os.access(folder, os.W_OK):  # root ignores permissions
            pytest.skip("running as root: permissions are not enforced")
    else:
        (tmp_path / "afile").write_text("x")
        target = tmp_path / "afile" / "ck.pt"
    t0 = time.monotonic()
    code, out, err = run(["train", *TINY, "--epochs", "100000", flag, str(target)], capsys)
    assert code == 2 and flag in err and str(target) in err
    assert time.monotonic() - t0 < 20 and "accuracy" not in out


def test_stability_out_checked_first(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        stability.main(["--out", str(tmp_path), "--depths", "8"])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err


# 7 ----------------------------------------------------------- corrupt files


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", "foreign", "list"])
def test_bad_checkpoints_are_one_line_naming_the_file(tmp_path, content, capsys):
    ck = tmp_path / "bad.pt"
    if content == "foreign":
        torch.save({"weights": torch.zeros(2)}, ck)
    elif content == "list":
        torch.save([1, 2, 3], ck)
    else:
        ck.write_bytes(content)
    code, _, err = run(["train", *TINY, "--epochs", "2", "--resume", str(ck)], capsys)
    assert code == 2 and str(ck) in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_truncated_real_checkpoint(saved, capsys):
    raw = saved.read_bytes()
    saved.write_bytes(raw[: len(raw) // 2])
    code, _, err = run(["train", "--resume", str(saved), "--epochs", "5"], capsys)
    assert code == 2 and str(saved) in err and "Traceback" not in err


# 8, 10 ----------------------------------------------------- option values


@pytest.mark.parametrize("argv,flag", [
    (["--trainer", "sg", "--sg-threads", "0"], "--sg-threads"),
    (["--trainer", "sg", "--sg-timeout", "nan"], "--sg-timeout"),
    (["--trainer", "sg", "--sg-baseline-epochs", "-1"], "--sg-baseline-epochs"),
    (["--trainer", "sg", "--heartbeat-timeout", "inf"], "--heartbeat-timeout"),
    (["--trainer", "pvd", "--start-timeout", "0"], "--start-timeout"),
    (["--seed", "-5"], "--seed"),
    (["--seed", str(2**40)], "--seed"),
    (["--threads", "0"], "--threads"),
    (["--compare", "magic"], "--compare"),
])
def test_bad_values_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", *argv])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


@pytest.mark.parametrize("argv,named", [
    (["--trainer", "pvd", "--sg-threads", "1"], "--sg-threads: only applies to --trainer sg"),
    (["--trainer", "pvd", "--stages", "2"], "--stages: only applies to --trainer sg"),
    (["--trainer", "sg", "--pvd-sync", "best"], "--pvd-sync: only applies to --trainer pvd"),
    (["--trainer", "pvd", "--alpha", "0.1"], "--alpha"),
    (["--trainer", "pvd", "--weight-decay", "0.1"], "--weight-decay"),
    (["--trainer", "pvd", "--lr-step", "3"], "--lr-step"),
    (["--trainer", "backprop", "--heartbeat-timeout", "5"], "--heartbeat-timeout"),
    (["--trainer", "backprop", "--start-timeout", "5"], "--start-timeout"),
    (["--trainer", "backprop", "--compare", "backprop"], "--compare"),
    (["--trainer", "sg", "--compare", "sequential"], "--compare"),
    (["--trainer", "sg", "--levels", "2"], "--levels"),
    (["--reversible", "--arch", "resnet"], "--reversible"),
    (["--kernel-size", "3", "--arch", "verlet"], "--kernel-size"),
    (["--batch-norm", "--arch", "verlet"], "--batch-norm"),
])
def test_options_that_do_not_apply_are_refused(argv, named, capsys):
    code, out, err = run(["train", *argv, "--epochs", "1"], capsys)
    assert code == 2 and named in err and "accuracy" not in out


# 9 --------------------------------------------------------------- diverged


def test_diverged_run_gives_valid_json_with_null(tmp_path, capsys):
    hist = tmp_path / "h.json"
    code, out, err = run(["train", *TINY, "--epochs", "2", "--step", "1e308", "--json",
                          "--history", str(hist)], capsys)
    assert code == 0
    line = json.loads(out.strip().splitlines()[-1], parse_constant=pytest.fail)
    assert line["diverged"] is True and line["loss"] is None
    assert "diverged" in err
    history = json.loads(hist.read_text(), parse_constant=pytest.fail)
    assert history["diverged"] is True


def test_stability_json_is_strict(capsys, monkeypatch):
    real = stability.stability_report

    def overflowing(*a, **kw):
        report = real(*a, **kw)
        report["rows"] = report.get("rows", {})
        report["overflow"] = float("inf")
        return report

    monkeypatch.setattr(stability, "stability_report", overflowing)
    assert stability.main(["--depths", "8", "--json", "--no-plot"]) == 0
    out = capsys.readouterr()
    line = json.loads(out.out.strip().splitlines()[-1], parse_constant=pytest.fail)
    assert line["overflow"] is None and line["diverged"] is True and "warning" in out.err


# 11 ------------------------------------------------------- SG speed-up


def test_sg_baseline_is_timed_over_several_epochs():
    from stablenets_ext.data import load_dataset
    from stablenets_ext.models import StableNet
    from stablenets_ext.training import TrainConfig

    data = load_dataset("swiss")
    model = StableNet("verlet", 2, 2, 4, width=4)
    options = sg.Options()
    assert options.sg_baseline_epochs >= 3
    res = sg.compare(model, data, TrainConfig(batch_size=64, lr=0.01), options,
                     {"seconds_per_epoch": 0.01, "cores": 1}, ("backprop",))
    assert res["backprop_epochs"] == options.sg_baseline_epochs
    assert res["speedup_vs_backprop"] > 0


# 12 --------------------------------------------------------------- lock


def test_second_run_on_the_same_checkpoint_is_refused(tmp_path, capsys):
    ck = tmp_path / "ck.pt"
    with checkpoint.CheckpointLock(ck):
        code, out, err = run(["train", *TINY, "--epochs", "2", "--save", str(ck)], capsys)
        assert code == 2 and "another run" in err and str(os.getpid()) in err
        assert not ck.exists()
    assert run(["train", *TINY, "--epochs", "1", "--save", str(ck)], capsys)[0] == 0
    assert ck.exists() and not os.path.exists(str(ck) + ".lock")


def test_sg_library_checks_threads_and_timeout():
    from stablenets_ext.data import load_dataset
    from stablenets_ext.models import StableNet

    data = load_dataset("swiss")
    for kw, name in (({"threads": 0}, "threads"), ({"timeout": float("nan")}, "timeout")):
        with pytest.raises(ValueError, match=name):
            sg.train_sg(StableNet("verlet", 2, 2, 4, width=4), data, epochs=1, batch_size=32,
                        lr=0.01, workers=2, **kw)
