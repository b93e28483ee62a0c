import json

import pytest
import torch

from stablenets_ext import data as D, models as M, ops
from stablenets_ext.training import backprop, checkpoint, plots, regularizers
from stablenets_ext.training.backprop import multilevel
from stablenets_ext.training.presets import ARCH_PRESETS, PRESETS, preset

needs_cpu_kernel = pytest.mark.skipif(not ops.has_kernel("cpu"), reason="no fused CPU kernel built")


@pytest.fixture(scope="module")
def swiss():
    return D.load_dataset("swiss")


def tiny(data, n=40):
    """A few points of ``data`` for fast mechanics tests."""
    return D.Dataset(data.name, data.train_x[::data.train_x.shape[0] // n],
                     data.train_y[::data.train_x.shape[0] // n], data.val_x[:n], data.val_y[:n],
                     data.features, data.classes)


def fit(name, arch=None, seed=0, **over):
    cfg = preset(name, arch)
    cfg.update(over)
    data = D.load_dataset(name, seed=seed)
    torch.manual_seed(seed)
    m = M.StableNet(cfg["arch"], data.features, data.classes, cfg["layers"], width=cfg["width"],
                    step=cfg["step"], activation=cfg["activation"])
    return backprop.train(m, data, epochs=cfg["epochs"], batch_size=cfg["batch_size"], lr=cfg["lr"],
                          weight_decay=cfg["weight_decay"], lr_step=cfg["lr_step"],
                          lr_gamma=cfg["lr_gamma"], alpha=cfg["alpha"], alpha_c=cfg["alpha_c"],
                          target_accuracy=over.get("target_accuracy"), quiet=True)


# ------------------------------------------------------------ accuracy targets


@pytest.mark.parametrize("arch", [
    "verlet",
    # the other presets take 2-3x longer; on the reference fallback that is too slow for CI
    *[pytest.param(a, marks=needs_cpu_kernel) for a in ("resnet", "antisymmetric", "leapfrog")],
])
def test_swiss_reaches_99_percent(arch):
    r = fit("swiss", arch, target_accuracy=0.99)
    assert r["accuracy"] >= 0.99, r["history"]["val_accuracy"]


def test_ellipse_reaches_99_percent():
    r = fit("ellipse", target_accuracy=0.99)
    assert r["accuracy"] >= 0.99, r["history"]["val_accuracy"]


def test_digits_above_90_percent():
    r = fit("digits", target_accuracy=0.9)
    assert r["accuracy"] >= 0.90, r["history"]["val_accuracy"]


# ------------------------------------------------------------------ mechanics


@needs_cpu_kernel
@pytest.mark.parametrize("arch", M.DENSE_ARCHS)
def test_fused_and_reference_give_the_same_first_epoch_loss(swiss, arch):
    losses = []
    for impl in ("fused", "reference"):
        torch.manual_seed(0)
        m = M.StableNet(arch, 2, 2, 16, width=4, step=0.1, impl=impl)
        r = backprop.train(m, tiny(swiss, 128), epochs=1, batch_size=32, lr=0.01, quiet=True)
        losses.append(r["history"]["loss"][0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


def run(data, epochs, tmp_path=None, resume=None, seed=0, init_seed=0, **kw):
    torch.manual_seed(init_seed)
    m = M.StableNet("verlet", 2, 2, 6, width=4, step=0.1, impl="reference")
    ck = None if tmp_path is None else str(tmp_path / "ck.pt")
    r = backprop.train(m, data, epochs=epochs, batch_size=8, lr=0.02, lr_step=1, lr_gamma=0.7,
                       alpha=0.01, alpha_c=0.001, weight_decay=1e-4, seed=seed, quiet=True,
                       checkpoint=ck, resume=resume, **kw)
    return m, r


def test_resume_equals_uninterrupted_run(swiss, tmp_path):
    data = tiny(swiss)
    full, rf = run(data, 4)
    run(data, 2, tmp_path)
    resumed, rr = run(data, 4, tmp_path, resume=str(tmp_path / "ck.pt"), init_seed=123)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert rr["history"]["loss"] == rf["history"]["loss"]
    assert rr["history"]["lr"] == rf["history"]["lr"] and rr["epochs"] == 4
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp files left


def test_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"a": torch.ones(2)})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        checkpoint.save(path, {"a": Boom()})
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    with pytest.raises(FileNotFoundError, match="resume"):
        checkpoint.load(tmp_path / "missing.pt")


def test_step_lr_is_stepped_and_history_written(swiss, tmp_path):
    _, r = run(tiny(swiss), 3, history_path=str(tmp_path / "h.json"))
    assert r["history"]["lr"] == pytest.approx([0.02, 0.014, 0.0098])
    saved = json.loads((tmp_path / "h.json").read_text())
    assert saved["history"]["val_accuracy"] == r["history"]["val_accuracy"]
    for key in ("loss", "train_accuracy", "val_loss", "val_accuracy", "seconds"):
        assert len(r["history"][key]) == 3
    assert r["seconds"] == pytest.approx(sum(r["history"]["seconds"]))


def test_target_accuracy_stops_early(swiss):
    _, r = run(tiny(swiss), 5, target_accuracy=0.01)
    assert r["epochs"] == 1 and r["stopped_early"]


def test_bad_training_arguments(swiss):
    m = M.StableNet("resnet", 2, 2, 2, width=4)
    for kw, name in (({"epochs": 0}, "epochs"), ({"batch_size": 0}, "batch_size"),
                     ({"lr": -1.0}, "lr"), ({"target_accuracy": 2.0}, "target_accuracy")):
        args = {"epochs": 1, "batch_size": 4, "lr": 0.1, **kw}
        with pytest.raises(ValueError, match=name):
            backprop.train(m, tiny(swiss), quiet=True, **args)


@torch.no_grad()
def test_regularizers():
    torch.manual_seed(0)
    m = M.StableNet("resnet", 2, 3, 4, width=4, step=0.5)
    w, b = m.stack.weight, m.stack.bias
    want = 0.3 / (2 * 0.5) * (sum(((w[j + 1] - w[j]) ** 2).sum() for j in range(3))
                              + sum(((b[j + 1] - b[j]) ** 2).sum() for j in range(3)))
    assert float(regularizers.smoothness(m.stack, 0.3)) == pytest.approx(float(want), rel=1e-5)
    assert float(regularizers.classifier(m, 0.2)) == pytest.approx(
        float(0.1 * (m.classifier.weight ** 2).sum()), rel=1e-5)
    assert regularizers.penalty(m) == 0.0


def test_multilevel_doubles_and_resumes(swiss, tmp_path):
    data = tiny(swiss)

    def ml(levels, resume=None, ck=None, init_seed=0):
        torch.manual_seed(init_seed)
        m = M.StableNet("resnet", 2, 2, 3, width=4, step=0.2, impl="reference")
        return multilevel.train_multilevel(m, data, levels=levels, epochs=2, batch_size=8,
                                           lr=0.02, quiet=True, resume=resume, checkpoint=ck)

    model, r = ml(3)
    assert model.layers == 12 and model.step == pytest.approx(0.05)
    assert r["history"]["layers"] == [3, 3, 6, 6, 12, 12] and r["epochs"] == 6
    assert [lv["layers"] for lv in r["levels"]] == [3, 6, 12]
    ck = str(tmp_path / "ml.pt")
    ml(2, ck=ck)  # stops after level 2 of 3
    resumed, r2 = ml(3, resume=ck, ck=ck, init_seed=7)
    assert r2["history"]["loss"] == r["history"]["loss"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_plots_written(swiss, tmp_path):
    m, r = run(tiny(swiss), 2)
    a = plots.plot_history(r, tmp_path / "curves.png")
    b = plots.plot_trajectories(m, swiss.val_x[:50], swiss.val_y[:50], tmp_path / "traj.png")
    for p in (a, b):
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_presets_are_complete():
    keys = set(PRESETS["swiss"])
    for name, cfg in PRESETS.items():
        assert set(cfg) == keys, name
        assert M.StableNet(cfg["arch"], (1, 8, 8) if M.is_conv(cfg["arch"]) else 2, 2, 1)
    for (name, arch), cfg in ARCH_PRESETS.items():
        assert name in PRESETS and arch in M.ARCHS and set(cfg) <= keys


# ------------------------------------------- the Python trainers' outputs and arguments


def _foreign(path, text="a user's notes\n"):
    path.write_text(text)
    return path.read_bytes()


@pytest.mark.parametrize("trainer", ["train", "train_multilevel", "train_sg", "train_pvd"])
def test_python_trainers_refuse_to_overwrite_a_file_they_did_not_write(trainer, swiss, tmp_path):
    from stablenets_ext.training.pvd import train_pvd
    from stablenets_ext.training.sg import train_sg

    data = tiny(swiss)
    net = M.StableNet("verlet", 2, classes=2, layers=4, width=4)
    run = {
        "train": lambda **kw: backprop.train(net, data, epochs=1, batch_size=16, lr=0.05, **kw),
        "train_multilevel": lambda **kw: multilevel.train_multilevel(
            net, data, levels=1, epochs=1, lr=0.05, batch_size=16, **kw),
        "train_sg": lambda **kw: train_sg(net, data, epochs=1, batch_size=16, lr=0.05, stages=2,
                                          **kw),
        "train_pvd": lambda **kw: train_pvd(net, data, workers=2, backend="sequential",
                                            iterations=1, inner_batches=1, direction_batches=1,
                                            batch_size=16, sync_batch=16, **kw),
    }[trainer]
    theirs = tmp_path / "results.pt"
    before = _foreign(theirs)
    with pytest.raises(ValueError, match=r"checkpoint: .*results\.pt.* is not a stablenets checkpoint"):
        run(checkpoint=str(theirs))
    assert theirs.read_bytes() == before
    if trainer != "train_pvd":  # PVD writes no history file of its own
        notes = tmp_path / "notes.json"
        before = _foreign(notes, '{"mine": 1}')
        with pytest.raises(ValueError, match=r"history_path: .*notes\.json.* is not a stablenets history"):
            run(history_path=str(notes))
        assert notes.read_bytes() == before
    # what the trainer wrote itself, it may write again
    ours = tmp_path / "ours.pt"
    run(checkpoint=str(ours))
    assert checkpoint.is_checkpoint(ours)
    run(checkpoint=str(ours))


@pytest.mark.parametrize("name,value", [("eval_batch_size", 0), ("lr_gamma", 0.0), ("alpha", -1.0),
                                        ("alpha_c", float("nan")), ("weight_decay", -0.1)])
def test_train_names_the_bad_argument(name, value, swiss):
    net = M.StableNet("verlet", 2, classes=2, layers=2, width=4)
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        backprop.train(net, tiny(swiss), epochs=1, batch_size=16, lr=0.05, **{name: value})


def test_preset_refuses_an_unknown_arch():
    with pytest.raises(ValueError, match="arch: expected one of"):
        preset("mnist", "conv-nope")
    assert preset("mnist", "verlet")["arch"] == "verlet"
