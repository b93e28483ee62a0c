"""Multi-stage StableNets (stages of fused stacks joined by transitions): shapes,
fused ops per stage, reversible and batch-norm stages, layer doubling per stage,
save/resume, the SG, PVD and DDP trainers over stages, and the CLI's checks.
Tiny sizes and generated (or bundled) data only."""

import json
import os
import subprocess
import sys

import pytest
import torch

from stablenets_ext import cli, conv_ops
from stablenets_ext.data import Dataset
from stablenets_ext.models import StableNet, Transition, double_layers, halve_layers
from stablenets_ext.training import TrainConfig, load_trainer
from stablenets_ext.training.pvd.blocks import BlockPartition
from stablenets_ext.training.sg.stages import chain_forward, merge_stages, split_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ["resnet", "antisymmetric", "leapfrog", "verlet"]
IMG = (1, 8, 8)


def conv_net(arch="verlet", **kw):
    kw = {"layers": (2, 3, 2), "width": (4, 6, 8), **kw}
    return StableNet(f"conv-{arch}", IMG, 3, kw.pop("layers"), kw.pop("width"), step=0.2, **kw)


def images(n=24, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *IMG, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def image_data(n=96):
    x, y = images(n)
    vx, vy = images(32, seed=1)
    # an easy, learnable signal: the label brightens one quadrant
    for k in range(3):
        x[y == k, :, (k % 2) * 4:(k % 2) * 4 + 4, (k // 2) * 4:(k // 2) * 4 + 4] += 2.0
        vx[vy == k, :, (k % 2) * 4:(k % 2) * 4 + 4, (k // 2) * 4:(k // 2) * 4 + 4] += 2.0
    return Dataset("gen", x, y, vx, vy, IMG, 3)


# ------------------------------------------------------------------ model


@pytest.mark.parametrize("arch", ARCHS)
def test_conv_stage_shapes_and_transitions(arch):
    model = conv_net(arch)
    x, _ = images(5)
    assert model(x).shape == (5, 3)
    assert model.stage_layers == (2, 3, 2) and model.layers == 7 and model.width == (4, 6, 8)
    assert model.stage_bounds() == [0, 2, 5, 7]
    states = model.trajectory(x)
    assert [tuple(s.shape) for s in states] == [(3, 5, 4, 8, 8), (4, 5, 6, 4, 4), (3, 5, 8, 2, 2)]
    # the forward is the stages' stacks joined by the transitions
    with torch.no_grad():
        y = model.lift_input(x)
        for k, stack in enumerate(model.stacks):
            y = stack(model.transition(k, y))
        torch.testing.assert_close(model.head(y), model(x))
        torch.testing.assert_close(states[-1][-1], y)


def test_transition_kinds_and_errors():
    y = torch.randn(2, 4, 7, 7)
    assert Transition(4, 8, conv=True, downsample="pool", widen="conv")(y).shape == (2, 8, 4, 4)
    padded = Transition(4, 8, conv=True, downsample="pool", widen="pad")(y)
    assert padded.shape == (2, 8, 4, 4) and padded[:, 4:].abs().max() == 0
    assert Transition(4, 8, conv=True, downsample="stride", widen="conv")(y).shape == (2, 8, 4, 4)
    assert Transition(4, 4, conv=True, downsample="none", widen="conv")(y).shape == (2, 4, 7, 7)
    with pytest.raises(ValueError, match="widen: 'pad' can only grow"):
        Transition(8, 4, conv=True, downsample="pool", widen="pad")
    with pytest.raises(ValueError, match="widen: 'pad' needs downsample"):
        Transition(4, 8, conv=True, downsample="stride", widen="pad")
    dense = StableNet("verlet", 10, 3, (2, 2), (16, 8))
    assert dense(torch.randn(4, 10)).shape == (4, 3)
    assert isinstance(dense.transitions[0].change, torch.nn.Linear)


@pytest.mark.parametrize("kw, match", [
    (dict(layers=(2, 2, 2), width=(4, 8)), "width: expected one width per stage"),
    (dict(layers=(2, 0), width=4), "layers: expected positive ints"),
    (dict(layers=(), width=4), "layers: expected a positive int or a non-empty sequence"),
    (dict(layers=(2, 2), width=(4, 8), downsample="max"), "downsample: expected one of"),
    (dict(layers=(2, 2), width=(4, 8), widen="zeros"), "widen: expected one of"),
    (dict(layers=2, width=4, downsample="pool"), "downsample: only applies between stages"),
    (dict(layers=(2, 2), width=(8, 4), widen="pad"), "widen: 'pad' can only grow"),
])
def test_bad_stage_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        StableNet("conv-verlet", IMG, 3, **kw)
    with pytest.raises(ValueError, match="downsample: dense archs"):
        StableNet("verlet", 10, 3, (2, 2), (8, 8), downsample="pool")


def test_one_value_keeps_the_single_stack():
    model = StableNet("conv-verlet", IMG, 3, 4, 6)
    assert not model.multistage and list(model.state_dict())[:2] == ["stack.weight", "stack.bias"]
    assert model.stage_stacks == [model.stack] and model.config()["layers"] == 4
    # one value is repeated over the stages the other names
    assert StableNet("conv-verlet", IMG, 3, 2, (4, 8)).stage_layers == (2, 2)
    assert StableNet("conv-verlet", IMG, 3, (1, 2), 4).width == (4, 4)


@pytest.mark.skipif(not conv_ops.has_kernel("cpu"), reason="no compiled CPU conv kernel")
@pytest.mark.parametrize("arch", ARCHS)
def test_every_stage_runs_one_fused_op(arch, monkeypatch):
    calls = []
    name = f"conv_{arch}_forward"
    real = getattr(conv_ops.ops, name)

    def counting(y, *args):
        calls.append(tuple(y.shape))
        return real(y, *args)

    monkeypatch.setattr(conv_ops.ops, name, counting)
    model = conv_net(arch)
    x, _ = images(5)
    model(x).sum().backward()
    assert calls == [(5, 4, 8, 8), (5, 6, 4, 4), (5, 8, 2, 2)]


@pytest.mark.skipif(not conv_ops.has_kernel("cpu"), reason="no compiled CPU conv kernel")
@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_reversible_in_every_stage_gives_the_same_gradients(arch):
    torch.manual_seed(0)
    plain = conv_net(arch).double()
    rev = conv_net(arch, reversible=True).double()
    rev.load_state_dict(plain.state_dict())
    assert all(s.reversible for s in rev.stacks)
    x, y = images(6)
    for m in (plain, rev):
        torch.nn.functional.cross_entropy(m(x.double()), y).backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), rev.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10, msg=n)


def test_batch_norm_per_stage():
    model = conv_net("resnet", batch_norm=True)
    assert all(s.batch_norm for s in model.stacks)
    x, _ = images(6)
    model(x).sum().backward()
    assert model.stacks[2].norm_weight.grad is not None


def test_doubling_and_halving_act_inside_each_stage():
    torch.manual_seed(0)
    model = conv_net("verlet", layers=(2, 4, 2)).double()
    fine = double_layers(model)
    assert fine.stage_layers == (4, 8, 4) and fine.step == model.step / 2
    for a, b in zip(model.transitions.state_dict().values(), fine.transitions.state_dict().values()):
        assert torch.equal(a, b)
    x, _ = images(4)
    # the same time N h: a close function (exact for layer-constant weights)
    assert (fine(x.double()) - model(x.double())).abs().max() < 0.05
    coarse = halve_layers(fine)
    assert coarse.stage_layers == (2, 4, 2)
    assert torch.equal(coarse.stacks[1].weight, fine.stacks[1].weight[0::2])
    with pytest.raises(ValueError, match="even number of layers in every stage"):
        halve_layers(conv_net("verlet", layers=(2, 3, 2)))


def test_config_round_trip_and_json():
    model = conv_net("leapfrog", downsample="stride", widen="conv", pool=1)
    cfg = json.loads(json.dumps(model.config()))  # lists after JSON
    again = StableNet.from_config(cfg)
    again.load_state_dict(model.state_dict())
    x, _ = images(3)
    torch.testing.assert_close(again(x), model(x))
    assert again.downsample == "stride" and again.stage_layers == (2, 3, 2)


# ------------------------------------------------------------------ trainers


@pytest.mark.parametrize("arch", ["resnet", "verlet"])
@pytest.mark.parametrize("bounds", [[0, 2, 5, 7], [0, 5, 7], [0, 1, 3, 7], [0, 3, 6, 7]])
def test_sg_cuts_anywhere_chain_to_the_model(arch, bounds):
    model = conv_net(arch)
    nets = split_model(model, bounds=bounds)
    x, _ = images(4)
    with torch.no_grad():
        torch.testing.assert_close(chain_forward(nets, (x)), model(x))
    # a cut on a stage boundary carries Y alone; inside a stage the whole state
    parts = 2 if arch == "verlet" else 1
    for net in nets[:-1]:
        assert net.out_parts == (1 if net.hi in model.stage_bounds() else parts)
    # merging back is exact
    other = conv_net(arch)
    merge_stages(nets, other)
    for (n, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), n


def test_sg_default_cuts_are_the_stages():
    model = conv_net("verlet")
    assert [n.lo for n in split_model(model, stages=3)] == [0, 2, 5]
    assert len(split_model(model, stages=2)) == 2


def _fit(trainer, model, data, epochs=2, **options):
    t = load_trainer(trainer)
    config = TrainConfig(epochs=epochs, batch_size=16, lr=0.01, quiet=True, threads=1)
    return t.fit(model, data, config, t.Options(**options))


@pytest.mark.parametrize("stages", [3, 2])
def test_sg_inprocess_trains_a_multistage_model(stages):
    torch.manual_seed(0)
    data = image_data()
    model = conv_net("verlet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _fit("sg", model, data, epochs=2, stages=stages)
    assert result["epochs"] == 2 and result["accuracy"] > 0.5
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "transitions.1.change.weight" in changed and "stacks.2.weight" in changed


def test_sg_coarse_epochs_halve_every_stage():
    torch.manual_seed(0)
    model = conv_net("verlet", layers=(2, 2, 2))
    result = _fit("sg", model, image_data(), epochs=1, stages=3, coarse_epochs=1)
    assert result["epochs"] == 2 and model.stage_layers == (2, 2, 2)


def test_sg_pipeline_processes_on_a_multistage_model():
    torch.manual_seed(0)
    model = conv_net("verlet")
    result = _fit("sg", model, image_data(), epochs=1, stages=3, workers=3)
    assert result["epochs"] == 1 and 0 <= result["accuracy"] <= 1


def test_pvd_partition_over_stages():
    model = conv_net("verlet")
    params = dict(model.named_parameters())
    for blocks in (1, 2, 3, 4):
        part = BlockPartition(model, blocks)
        flat = part.flatten(params)
        back = part.unflatten(flat)
        for k, v in params.items():
            assert torch.equal(back[k], v), (blocks, k)
    part = BlockPartition(model, 3)  # natural: one block per stage
    assert part.layer_ranges == [(0, 2), (2, 5), (5, 7)]
    owners = {s.name: s.block for s in part.segments if s.rows is None}
    assert owners["transitions.0.change.weight"] == 1 and owners["transitions.1.change.weight"] == 2
    assert owners["classifier.weight"] == 2
    split = BlockPartition(model, 2)  # a block across a stage boundary
    rows = [(s.block, s.rows) for s in split.segments if s.name == "stacks.1.weight"]
    assert rows == [(0, (0, 2)), (1, (2, 3))]


def test_pvd_sequential_trains_a_multistage_model():
    torch.manual_seed(0)
    model = conv_net("resnet")
    result = _fit("pvd", model, image_data(), epochs=2, workers=3, backend="sequential")
    assert result["epochs"] == 2 and 0 <= result["accuracy"] <= 1


# ------------------------------------------------------------------ CLI


def _train(args, capsys):
    code = cli.main(["train", "--dataset", "digits", "--arch", "conv-verlet", "--quiet",
                     "--json", *args])
    out = capsys.readouterr()
    return code, out


@pytest.mark.parametrize("args, match", [
    (["--layers", "2,2", "--width", "4,8,16"], "one value per stage in both"),
    (["--layers", "1,1", "--width", "8,4", "--widen", "pad"], "widen: 'pad' can only grow"),
    (["--layers", "2", "--width", "8", "--downsample", "pool"], "--downsample: only applies between"),
    (["--arch", "verlet", "--layers", "2,2", "--downsample", "pool"], "only convolutional"),
])
def test_cli_refuses_bad_stage_flags(args, match, capsys):
    code, out = _train(args, capsys)
    assert code == 2 and match in out.err, out.err


def test_cli_refuses_bad_stage_ints(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--layers", "2,x"])
    assert "comma-separated positive ints" in capsys.readouterr().err


def test_cli_trains_saves_and_resumes_a_multistage_model(tmp_path, capsys):
    ck = tmp_path / "ck.pt"
    shape = ["--layers", "1,1", "--widths", "4,8", "--downsample", "stride", "--epochs", "1",
             "--batch-size", "128"]
    hist = tmp_path / "h.json"
    code, out = _train([*shape, "--save", str(ck), "--history", str(hist)], capsys)
    assert code == 0, out.err
    line = json.loads(out.out.strip().splitlines()[-1])
    assert line["layers"] == 2 and line["width"] == [4, 8]
    stages = json.loads(hist.read_text())["stages"]
    assert [s["width"] for s in stages] == [4, 8] and stages[1]["shape"] == [8, 4, 4]
    code, out = _train(["--resume", str(ck), "--epochs", "2"], capsys)
    assert code == 0, out.err
    assert json.loads(out.out.strip().splitlines()[-1])["epochs"] == 2
    code, out = _train(["--resume", str(ck), "--epochs", "2", "--widths", "4,16"], capsys)
    assert code == 2 and "other settings" in out.err


def test_cli_ddp_two_ranks_on_a_multistage_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(
        [sys.executable, "-m", "stablenets_ext", "train", "--backend", "dist", "--workers", "2",
         "--threads", "1", "--dataset", "digits", "--arch", "conv-resnet", "--layers", "1,1",
         "--width", "4,8", "--epochs", "1", "--json", "--quiet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    line = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
    assert line["workers"] == 2 and line["layers"] == 2


def test_mnist_preset_builds_stages_from_the_cli(tmp_path, capsys):
    from test_data import write_mnist

    write_mnist(tmp_path, n_train=24, n_test=8, side=6)
    ck = tmp_path / "ck.pt"
    argv = ["train", "--dataset", "mnist", "--data-root", str(tmp_path), "--no-download",
            "--epochs", "1", "--json", "--quiet", "--save", str(ck)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    line = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert line["width"] == [8, 16, 32] and line["layers"] == 3
    config = torch.load(ck, weights_only=False)["model_config"]
    assert config["downsample"] == "stride" and config["lift"] is True and config["pool"] == 4
    # a single value on the command line keeps the single stack (no preset transitions)
    argv = ["train", "--dataset", "mnist", "--data-root", str(tmp_path), "--no-download",
            "--epochs", "1", "--json", "--quiet", "--layers", "2", "--width", "4"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    line = json.loads([ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")][-1])
    assert line["width"] == 4 and line["layers"] == 2


def test_stage_stability_report():
    from stablenets_ext.stability import stage_report

    model = conv_net("verlet")
    x, y = images(8)
    report = stage_report(model, x, y)
    assert [r["layers"] for r in report] == [2, 3, 2]
    assert [r["shape"] for r in report] == [[4, 8, 8], [6, 4, 4], [8, 2, 2]]
    for r in report:
        assert 0 < r["forward_growth"] < 10 and 0 < r["backward_growth"] < 10
    single = stage_report(StableNet("verlet", 10, 3, 4), torch.randn(5, 10), torch.tensor([0, 1, 2, 0, 1]))
    assert len(single) == 1 and single[0]["width"] == 10


def test_trajectory_plot_runs_through_every_stage(tmp_path):
    from stablenets_ext.training import plots

    model = StableNet("verlet", 2, 2, (2, 2), (4, 6))
    x = torch.randn(40, 2)
    y = (x[:, 0] > 0).long()
    path = plots.plot_trajectories(model, x, y, tmp_path / "t.png")
    assert os.path.getsize(path) > 0
    states = model.trajectory(x)
    assert [tuple(s.shape) for s in states] == [(3, 40, 4), (3, 40, 6)]


def test_bench_images_runs_and_refuses_foreign_outputs(tmp_path, capsys):
    from test_data import write_mnist

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import bench_images
    finally:
        sys.path.pop(0)
    write_mnist(tmp_path, n_train=24, n_test=8, side=28)
    out = tmp_path / "out"
    argv = ["--data-root", str(tmp_path), "--epochs", "1", "--models", "stable,lenet,mlp",
            "--out", str(out)]
    assert bench_images.main(argv) == 0
    report = json.loads((out / "bench_images.json").read_text())
    assert [r["model"] for r in report["results"]] == ["stable", "lenet", "mlp"]
    assert (out / "bench_images.png").stat().st_size > 0
    assert "| stable |" in capsys.readouterr().out
    assert bench_images.main(argv) == 0  # its own files may be rewritten
    (out / "bench_images.json").write_text("{}")  # a file it did not write is not
    with pytest.raises(SystemExit):
        bench_images.main(argv)
    assert "not written by this benchmark" in capsys.readouterr().err
