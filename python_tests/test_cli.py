import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch

from stablenets_ext import cli, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--layers", "4", "--epochs", "2", "--quiet"]


def json_line(out):
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0])


def test_module_entry_point_info_json():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-m", "stablenets_ext", "info", "--json"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["torch"] == torch.__version__ and "compiled_devices" in info


def test_info_human(capsys):
    assert cli.main(["info"]) == 0
    assert "compiled_devices" in capsys.readouterr().out


def test_train_json_line_history_plot_and_resume(tmp_path, capsys):
    hist, ck, plot = tmp_path / "h.json", tmp_path / "ck.pt", tmp_path / "plots"
    args = ["train", "--dataset", "swiss", "--arch", "resnet", "--json", "--seed", "3",
            "--history", str(hist), "--save", str(ck), "--plot", str(plot), *SMALL]
    assert cli.main(args) == 0
    line = json_line(capsys.readouterr().out)
    for key in ("accuracy", "loss", "seconds", "epochs", "arch", "dataset", "impl", "device"):
        assert key in line, key
    assert line["arch"] == "resnet" and line["dataset"] == "swiss" and line["epochs"] == 2
    assert line["impl"] == "auto" and line["device"] == "cpu" and 0 <= line["accuracy"] <= 1
    assert json.loads(hist.read_text())["history"]["val_accuracy"][-1] == line["accuracy"]
    assert sorted(p.name for p in plot.iterdir()) == ["swiss-resnet-curves.png",
                                                      "swiss-resnet-trajectories.png"]
    # resume to 3 epochs continues the saved run (settings left out come from it)
    saved = ck.read_bytes()
    assert cli.main(["train", "--resume", str(ck), "--json", "--epochs", "3", "--quiet"]) == 0
    again = json_line(capsys.readouterr().out)
    assert again["epochs"] == 3 and again["arch"] == "resnet" and again["layers"] == 4
    assert ck.read_bytes() == saved  # without --save the checkpoint is not written


def test_train_human_output_and_levels(capsys):
    assert cli.main(["train", "--dataset", "ellipse", "--levels", "2", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "validation accuracy" in out and "8 layers" in out


@pytest.mark.parametrize("argv,needle", [
    (["train", "--arch", "conv-verlet"], "--arch conv-verlet"),
    (["train", "--workers", "2"], "--workers"),
    (["train", "--backend", "sequential"], "--backend"),
    (["train", "--resume", "/nonexistent/ck.pt"], "--resume"),
    (["train", "--gamma", "0.1", "--arch", "verlet"], "--gamma"),
    (["train", "--device", "tpu"], "--device"),
])
def test_bad_combinations_are_clear_errors(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "error" in err


@pytest.mark.parametrize("argv,needle", [
    (["train", "--arch", "densenet"], "--arch"),
    (["train", "--dataset", "imagenet"], "--dataset"),
    (["train", "--epochs", "0"], "--epochs"),
    (["train", "--lr", "-1"], "--lr"),
    (["train", "--target-accuracy", "150"], "--target-accuracy"),
    (["train", "--trainer", "magic"], "--trainer"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_are_argparse_errors(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda(capsys):
    assert cli.main(["train", "--device", "cuda"]) == 2
    assert "CUDA" in capsys.readouterr().err


@pytest.mark.skipif(ops.has_kernel("cpu"), reason="the fused CPU kernel is built")
def test_fused_without_kernel(capsys):
    assert cli.main(["train", "--impl", "fused", "--device", "cpu"]) == 2
    assert "--impl fused" in capsys.readouterr().err


def test_missing_trainer_module(monkeypatch, capsys):
    from stablenets_ext import training

    monkeypatch.setitem(training.TRAINERS, "sg", "stablenets_ext.training.no_such_module")
    assert cli.main(["train", "--trainer", "sg", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--trainer sg" in err and "no_such_module" in err


def test_registry_trainer_contract(monkeypatch, capsys):
    """A trainer is a module with Options (flags in the field metadata), ENGINES,
    UNSUPPORTED, COMPARISONS and fit(): one registry entry makes it a CLI trainer."""
    import dataclasses

    from stablenets_ext import training
    from stablenets_ext.training.options import option, positive_int

    fake = types.ModuleType("fake_trainer")
    seen = {}

    @dataclasses.dataclass
    class Options:
        fake_knob: int = option("--fake-knob", 1, type=positive_int, help="a knob")
        workers: int = None

    def fit(model, data, config, options=None, callbacks=None):
        seen.update(knob=options.fake_knob, workers=options.workers, arch=model.arch,
                    data=data.name, epochs=config.epochs, alpha=config.alpha)
        return {"accuracy": 0.5, "loss": 0.7, "seconds": 1.0, "epochs": 1, "history": {},
                "extra": "x", "model": model}

    fake.Options, fake.fit, fake.ENGINES = Options, fit, {"inprocess": "here"}
    fake.UNSUPPORTED, fake.COMPARISONS = frozenset({"alpha"}), ()
    monkeypatch.setitem(sys.modules, "fake_trainer", fake)
    monkeypatch.setitem(training.TRAINERS, "fake", "fake_trainer")
    assert cli.main(["train", "--trainer", "fake", "--workers", "3", "--fake-knob", "5",
                     "--json", "--dataset", "ellipse", "--epochs", "4"]) == 0
    line = json_line(capsys.readouterr().out)
    assert seen == {"knob": 5, "workers": 3, "arch": "verlet", "data": "ellipse", "epochs": 4,
                    "alpha": 0.0}
    assert line["accuracy"] == 0.5 and line["trainer"] == "fake" and line["extra"] == "x"
    # flags the trainer does not declare, or settings it cannot honour, are refused
    assert cli.main(["train", "--trainer", "fake", "--levels", "2"]) == 2
    assert "--levels: only applies to --trainer backprop" in capsys.readouterr().err
    assert cli.main(["train", "--trainer", "fake", "--alpha", "0.1"]) == 2
    assert "--alpha" in capsys.readouterr().err
    assert cli.main(["train", "--trainer", "fake", "--compare", "backprop"]) == 2
    assert "--compare" in capsys.readouterr().err


def test_stability_delegates(monkeypatch):
    fake = types.ModuleType("stablenets_ext.stability")
    calls = []
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "stablenets_ext.stability", fake)
    import stablenets_ext

    monkeypatch.setattr(stablenets_ext, "stability", fake, raising=False)
    assert cli.main(["stability", "--arch", "verlet", "--help"]) == 0
    assert calls == [["--arch", "verlet", "--help"]]


def test_train_conv_arch_on_self_written_mnist(tmp_path, capsys):
    from test_data import write_mnist

    write_mnist(tmp_path, n_train=16, n_test=8, side=6)
    argv = ["train", "--dataset", "mnist", "--data-root", str(tmp_path), "--no-download",
            "--arch", "conv-verlet", "--width", "4", "--layers", "2", "--epochs", "1",
            "--batch-size", "8", "--json", "--quiet", "--cache"]
    assert cli.main(argv) == 0
    line = json_line(capsys.readouterr().out)
    assert line["arch"] == "conv-verlet" and line["kernel"] == "fused" and line["epochs"] == 1
    assert (tmp_path / "mnist.h5").exists()
    # without the files (and offline) the error says where they go
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["train", "--dataset", "mnist", "--data-root", str(empty), "--no-download"]) == 2
    assert "MNIST/raw" in capsys.readouterr().err


def test_image_runs_report_the_test_set_once(tmp_path, capsys):
    from test_data import write_mnist

    write_mnist(tmp_path, n_train=24, n_test=8, side=6)
    ck = tmp_path / "ck.pt"
    argv = ["train", "--dataset", "mnist", "--data-root", str(tmp_path), "--no-download",
            "--arch", "conv-verlet", "--width", "4", "--layers", "2", "--epochs", "1",
            "--batch-size", "8", "--json", "--quiet", "--kernel-size", "5", "--pool", "2",
            "--lift", "learn", "--save", str(ck)]
    assert cli.main(argv) == 0
    line = json_line(capsys.readouterr().out)
    assert 0 <= line["test_accuracy"] <= 1 and "test_loss" in line
    config = torch.load(ck, weights_only=False)["model_config"]
    assert config["kernel_size"] == 5 and config["pool"] == 2 and config["lift"] is True


def test_batch_norm_flag_reaches_the_model(tmp_path, capsys):
    from test_data import write_mnist

    write_mnist(tmp_path, n_train=16, n_test=8, side=6)
    ck = tmp_path / "bn.pt"
    argv = ["train", "--dataset", "mnist", "--data-root", str(tmp_path), "--no-download",
            "--arch", "conv-verlet", "--width", "4", "--layers", "2", "--epochs", "1",
            "--batch-size", "8", "--json", "--quiet", "--batch-norm", "--save", str(ck)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    line = json_line(capsys.readouterr().out)
    # batch norm runs on the per-layer reference path, and the report says so
    assert line["kernel"] == "reference"
    state = torch.load(ck, map_location="cpu", weights_only=False)
    assert any("norm" in k for k in state["model"]), sorted(state["model"])[:8]


def test_batch_norm_flag_refused_for_split_trainers(tmp_path, capsys):
    argv = ["train", "--dataset", "digits", "--arch", "conv-verlet", "--layers", "2",
            "--epochs", "1", "--trainer", "sg", "--workers", "2", "--batch-norm", "--quiet"]
    assert cli.main(argv) == 2
    assert "--batch-norm" in capsys.readouterr().err


def test_multilevel_takes_lr_and_step_per_level(tmp_path, capsys):
    hist = tmp_path / "h.json"
    assert cli.main(["train", "--dataset", "ellipse", "--layers", "4", "--epochs", "2",
                     "--levels", "2", "--level-lr", "0.05,0.01", "--level-step", "0.2,0.05",
                     "--json", "--quiet", "--threads", "1", "--history", str(hist)]) == 0
    levels = json.loads(hist.read_text())["levels"]
    assert [lv["lr"] for lv in levels] == [0.05, 0.01]
    assert [lv["step"] for lv in levels] == [0.2, 0.05]
    assert [lv["layers"] for lv in levels] == [4, 8]
    assert cli.main(["train", "--levels", "2", "--level-lr", "0.1,0.2,0.3"]) == 2
    assert "--level-lr: expected one value per level (2), got 3" in capsys.readouterr().err


def test_digits_as_images_for_conv_archs(capsys):
    """The sklearn digits train convolutional stacks as 1x8x8 images (issue 12's offline
    image data); the full preset reaches >= 97% (benchmarks/RESULTS.md)."""
    argv = ["train", "--dataset", "digits", "--arch", "conv-verlet", "--epochs", "2",
            "--layers", "2", "--width", "4", "--json", "--quiet", "--threads", "1"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    line = json_line(capsys.readouterr().out)
    assert line["arch"] == "conv-verlet" and line["kernel"] == "fused"
    assert line["accuracy"] > 0.3  # two tiny epochs: well above chance (0.1)


# ------------------------------------------------------------ outputs a user reads


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_plot_folder_that_cannot_be_created_names_the_flag(capsys):
    assert cli.main(["train", "--plot", "/proc/stablenets-no/x", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and "/proc/stablenets-no/x" in err


def test_plot_over_a_file_the_package_did_not_write_is_refused_before_training(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from stablenets_ext.training import plots

    folder = tmp_path / "plots"
    folder.mkdir()
    theirs = folder / "swiss-resnet-curves.png"
    fig = plt.figure()
    fig.savefig(theirs)  # a real PNG, but matplotlib's own, not one of ours
    plt.close(fig)
    before = theirs.read_bytes()
    args = ["train", "--dataset", "swiss", "--arch", "resnet", "--plot", str(folder), *SMALL]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and str(theirs) in err and "overwritten" in err
    assert theirs.read_bytes() == before
    # the plots a run wrote are its own: a second run replaces them
    theirs.unlink()
    assert cli.main(args) == 0
    ours = sorted(folder.iterdir())
    assert [p.name for p in ours] == ["swiss-resnet-curves.png", "swiss-resnet-trajectories.png"]
    assert all(plots.is_plot(p) for p in ours)
    assert cli.main(args) == 0
    (tmp_path / "text.png").write_text("Software stablenets-ext")
    assert not plots.is_plot(tmp_path / "text.png")


def test_plot_probe_leaves_nothing_behind(tmp_path):
    from stablenets_ext.training.outputs import check_folder

    check_folder(tmp_path / "a" / "b", "--plot")
    assert list(tmp_path.iterdir()) == []


def test_history_figure_title_integer_epochs_plain_log_labels_and_test_accuracy():
    from stablenets_ext.training import plots

    h = {"loss": [2.3, 1.1, 0.6], "val_loss": [2.2, 1.2, 0.7], "train_accuracy": [0.2, 0.6, 0.8],
         "val_accuracy": [0.2, 0.5, 0.7]}
    fig = plots.history_figure(h, title="conv-verlet on mnist", test_accuracy=0.68)
    try:
        fig.canvas.draw()
        loss_ax, acc_ax = fig.axes
        assert fig._suptitle.get_text() == "conv-verlet on mnist"
        for ax in (loss_ax, acc_ax):
            ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
            assert ticks and all(float(t).is_integer() for t in ticks)
        labels = [t.get_text() for t in loss_ax.get_yticklabels() if t.get_text()]
        assert labels and all(re.fullmatch(r"[0-9.]+", s) for s in labels), labels
        legend = [t.get_text() for t in acc_ax.get_legend().get_texts()]
        assert any(s.startswith("test") and "68.0%" in s for s in legend), legend
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_image_run_json_and_plot_say_which_accuracy_is_which(tmp_path, capsys, monkeypatch):
    from stablenets_ext.training import plots
    from test_data import write_mnist

    seen = {}
    real = plots.plot_history

    def spy(result, path, **kw):
        seen.update(kw)
        return real(result, path, **kw)

    monkeypatch.setattr(plots, "plot_history", spy)
    write_mnist(tmp_path, n_train=24, n_test=8, side=6)
    argv = ["train", "--dataset", "mnist", "--data-root", str(tmp_path), "--no-download",
            "--arch", "conv-verlet", "--width", "4", "--layers", "2", "--epochs", "2",
            "--batch-size", "8", "--json", "--quiet", "--plot", str(tmp_path / "plots")]
    assert cli.main(argv) == 0
    line = json_line(capsys.readouterr().out)
    assert line["val_accuracy"] == line["accuracy"] and 0 <= line["test_accuracy"] <= 1
    assert seen["title"] == "conv-verlet on mnist"
    assert seen["test_accuracy"] == line["test_accuracy"]
    assert (tmp_path / "plots" / "mnist-conv-verlet-curves.png").stat().st_size > 0


def test_json_help_says_which_accuracy_is_which(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "val_accuracy" in text and "test_accuracy" in text and "validation" in text
