"""The defects of issue 21, each tried as a hostile user would (one test per
defect, named for it): DDP runs that outlive the start-up limit, faults in DDP
ranks, outputs that would overwrite each other or a user's file, options that
were accepted and ignored, tracebacks where one line belongs, and the conv
stacks under torch.func and with batch 0."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from stablenets_ext import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "ellipse", "--layers", "4", "--quiet", "--threads", "1"]


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def json_line(out):
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, out
    return json.loads(lines[0], parse_constant=pytest.fail)


def env_for(tmp_path, **extra):
    return dict(os.environ, TMPDIR=str(tmp_path), **extra,
                PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def cli_proc(argv, tmp_path, **env):
    return subprocess.Popen([sys.executable, "-m", "stablenets_ext", "train", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env=env_for(tmp_path, **env))


# 1 ------------------------------------------------------------------ DDP

DDP = ["--backend", "dist", "--workers", "2", "--dataset", "ellipse", "--layers", "4",
       "--threads", "1", "--json", "--quiet"]


def _run_folders(tmp_path):
    return [p for p in tmp_path.iterdir() if p.name.startswith("stablenets-ddp-")]


def _wait_for_beats(proc, tmp_path, world=2, limit=120.0):
    """The run folder once every rank has beaten into it."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for folder in _run_folders(tmp_path):
            if all((folder / f"heartbeat-{r}").exists() for r in range(world)):
                return folder
        time.sleep(0.1)
    raise AssertionError("the DDP ranks never beat")


def _ranks(pid):
    """{torchrun rank: pid} of the processes below ``pid``."""
    from stablenets_ext.training.runtime.processes import descendants

    out = {}
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                agent = b"torch.distributed.run" in f.read()
        except OSError:
            continue
        if b"RANK" in env and b"LOCAL_RANK" in env and not agent:
            out[int(env[b"RANK"])] = p
    return out


def _process_state(pid):
    from stablenets_ext.training.runtime import process_state

    return process_state(pid)


def _gone(pids, limit=15.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        alive = [p for p in pids if _process_state(p) not in ("", "zombie")]
        if not alive:
            return True
        time.sleep(0.2)
    return False


def test_ddp_run_outlives_the_start_timeout(tmp_path):
    start_limit = 20.0  # the ranks start within it even on a loaded machine
    t0 = time.monotonic()
    proc = cli_proc([*DDP, "--epochs", "1000000", "--start-timeout", str(start_limit)], tmp_path)
    try:
        _wait_for_beats(proc, tmp_path)
        while time.monotonic() - t0 < start_limit + 4:
            assert proc.poll() is None, proc.communicate()  # the old launcher ended it here
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "did not start" not in err
    assert not _run_folders(tmp_path)


def test_ddp_kill_9_of_the_cli_leaves_no_ranks_nor_run_folder(tmp_path):
    proc = cli_proc([*DDP, "--epochs", "1000000"], tmp_path)
    try:
        _wait_for_beats(proc, tmp_path)
        ranks = _ranks(proc.pid)
        assert sorted(ranks) == [0, 1]
        from stablenets_ext.training.runtime.processes import descendants

        everyone = descendants(proc.pid)
        proc.kill()
        proc.communicate()
        assert _gone(everyone), [p for p in everyone if os.path.exists(f"/proc/{p}")]
        deadline = time.monotonic() + 10
        while _run_folders(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _run_folders(tmp_path)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_ddp_stopped_rank_is_named_within_the_heartbeat_timeout(tmp_path):
    proc = cli_proc([*DDP, "--epochs", "1000000", "--heartbeat-timeout", "3"], tmp_path)
    stopped = None
    try:
        _wait_for_beats(proc, tmp_path)
        stopped = _ranks(proc.pid)[1]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert "DDP rank 1" in err and "stopped responding" in err and "--heartbeat-timeout" in err
    assert waited < 3 + 10
    assert _gone([stopped]) and not _run_folders(tmp_path)


def test_ddp_heartbeat_timeout_refused_without_backend_dist(capsys):
    code, out, err = run(["train", *TINY, "--epochs", "1", "--heartbeat-timeout", "5"], capsys)
    assert code == 2 and "--heartbeat-timeout" in err and "dist" in err


def test_ddp_batch_smaller_than_the_ranks_is_one_line(tmp_path):
    proc = cli_proc([*DDP, "--epochs", "2", "--batch-size", "1"], tmp_path)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 2, err
    assert err.strip().count("\n") == 0 and "batch_size" in err and "2 ranks" in err
    assert "Traceback" not in err and "torchrun" not in err


def test_ddp_rank_error_reaches_the_user_as_its_one_line(tmp_path, monkeypatch):
    """An error only the ranks can meet (here: a checkpoint that is not there when
    they start) is reported as the line the rank printed, not torchrun's log."""
    from stablenets_ext.data import load_dataset
    from stablenets_ext.models import StableNet
    from stablenets_ext.training.backprop import ddp
    from stablenets_ext.training.runtime import WorkerError

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    missing = tmp_path / "gone.pt"
    with pytest.raises(WorkerError) as exc:
        ddp.launch(StableNet("verlet", 2, 2, 4, width=4), load_dataset("ellipse"), workers=2,
                   threads=1, epochs=1, batch_size=16, lr=0.01, resume=str(missing))
    msg = str(exc.value)
    assert msg.startswith("DDP rank ") and str(missing) in msg and "does not exist" in msg
    assert "\n" not in msg and "torchrun" not in msg and "Traceback" not in msg
    assert not _run_folders(tmp_path)


# 2 -------------------------------------------------------------- outputs


@pytest.mark.parametrize("flags", [
    ["--resume", "{ck}", "--history", "{ck}"],
    ["--save", "{d}/same.out", "--history", "{d}/same.out"],
    ["--resume", "{ck}", "--cache", "{ck}"],
    ["--save", "{d}/x.pt", "--plot", "{d}/x.pt"],
])
def test_two_outputs_on_one_path_are_refused(tmp_path, flags, capsys):
    ck = tmp_path / "col.pt"
    assert run(["train", *TINY, "--epochs", "1", "--save", str(ck)], capsys)[0] == 0
    before = ck.read_bytes()
    argv = [f.format(ck=ck, d=tmp_path) for f in flags]
    code, out, err = run(["train", *TINY, "--epochs", "2", *argv], capsys)
    assert code == 2 and "also the path of" in err and err.count("\n") == 1, err
    assert "accuracy" not in out and ck.read_bytes() == before
    assert not (tmp_path / "same.out").exists()


def test_resume_and_save_may_share_one_checkpoint(tmp_path, capsys):
    ck = tmp_path / "ck.pt"
    assert run(["train", *TINY, "--epochs", "1", "--save", str(ck)], capsys)[0] == 0
    code, _, err = run(["train", *TINY, "--epochs", "2", "--resume", str(ck), "--save", str(ck)],
                       capsys)
    assert code == 0, err
    from stablenets_ext.training import checkpoint

    assert checkpoint.load(ck)["epoch"] == 2


@pytest.mark.parametrize("flag", ["--save", "--history"])
def test_a_users_file_is_never_overwritten_by_save_or_history(tmp_path, flag, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, out, err = run(["train", *TINY, "--epochs", "1", flag, str(notes)], capsys)
    assert code == 2 and flag in err and "notes.txt" in err and "not a stablenets" in err
    assert notes.read_text() == "my notes\n"


def test_our_own_outputs_are_overwritten(tmp_path, capsys):
    ck, hist = tmp_path / "ck.pt", tmp_path / "h.json"
    for epochs in ("1", "2"):
        code, _, err = run(["train", *TINY, "--epochs", epochs, "--save", str(ck), "--history",
                            str(hist)], capsys)
        assert code == 0, err
    assert json.loads(hist.read_text())["epochs"] == 2


def test_cache_never_overwrites_a_users_file(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    code, out, err = run(["train", *TINY, "--epochs", "1", "--cache", str(notes)], capsys)
    assert code == 2 and "cache" in err and "notes.txt" in err and "not an HDF5 cache" in err
    assert notes.read_text() == "my notes\n"


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_and_temporaries_of_dead_runs_are_cleared(tmp_path, capsys):
    ck = tmp_path / "k9.pt"
    assert run(["train", *TINY, "--epochs", "1", "--save", str(ck)], capsys)[0] == 0
    dead = _dead_pid()
    lock = tmp_path / "k9.pt.lock"
    lock.write_text(str(dead))  # what kill -9 during --save leaves
    tmps = [tmp_path / f".k9.pt.tmp{dead}", tmp_path / f"h.json.tmp{dead}"]
    for t in tmps:
        t.write_bytes(b"half")
    code, _, err = run(["train", *TINY, "--epochs", "2", "--resume", str(ck), "--history",
                        str(tmp_path / "h.json")], capsys)
    assert code == 0, err
    assert not lock.exists() and not any(t.exists() for t in tmps)


def test_live_lock_is_kept_and_refuses_a_second_writer(tmp_path, capsys):
    from stablenets_ext.training import checkpoint

    ck = tmp_path / "busy.pt"
    with checkpoint.CheckpointLock(ck):
        code, _, err = run(["train", *TINY, "--epochs", "1", "--save", str(ck)], capsys)
        assert code == 2 and "being written by another run" in err
        assert (tmp_path / "busy.pt.lock").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_output_precheck_writes_a_real_file(capsys):
    # /proc passes os.access as root, yet nothing can be created there
    t0 = time.monotonic()
    code, out, err = run(["train", *TINY, "--epochs", "100000", "--history", "/proc/h.json"],
                         capsys)
    assert code == 2 and "--history" in err and "/proc/h.json" in err
    assert time.monotonic() - t0 < 20 and "accuracy" not in out


# 3 ----------------------------------------------- ignored options, wrong answers


def test_level_lr_with_one_level_is_honoured(capsys):
    def loss(*extra):
        code, out, err = run(["train", *TINY, "--epochs", "2", "--json", *extra], capsys)
        assert code == 0, err
        return json_line(out)["loss"]

    default, given = loss(), loss("--level-lr", "0.3")
    assert given != default
    assert given == loss("--lr", "0.3")


def test_level_lr_refused_with_backend_dist(capsys):
    code, _, err = run(["train", *TINY, "--epochs", "1", "--backend", "dist", "--level-lr",
                        "0.1"], capsys)
    assert code == 2 and "--level-lr" in err


def test_batch_norm_with_impl_fused_is_refused(capsys):
    code, out, err = run(["train", "--dataset", "digits", "--arch", "conv-verlet", "--layers", "2",
                          "--width", "4", "--epochs", "1", "--batch-norm", "--impl", "fused",
                          "--quiet"], capsys)
    assert code == 2 and "--batch-norm" in err and "--impl fused" in err
    from stablenets_ext.conv import ConvVerletStack

    with pytest.raises(ValueError, match="impl='fused': batch normalisation \\(batch_norm=True\\)"):
        ConvVerletStack(4, 2, batch_norm=True, impl="fused")


@pytest.mark.parametrize("n_train,n_test,named", [
    (0, 6, "train-images"), (1, 6, "train-images"), (12, 0, "t10k-images")])
def test_empty_mnist_split_is_an_error_naming_the_file(tmp_path, n_train, n_test, named, capsys):
    sys.path.insert(0, os.path.dirname(__file__))
    try:
        from test_data import write_mnist
    finally:
        sys.path.pop(0)
    write_mnist(tmp_path, n_train=n_train, n_test=n_test)
    code, out, err = run(["train", "--dataset", "mnist", "--data-root", str(tmp_path),
                          "--no-download", "--epochs", "1", "--quiet", "--json"], capsys)
    assert code == 2 and named in err and "Traceback" not in err and "accuracy" not in out


def test_no_training_examples_is_an_error_not_zerodivision():
    from stablenets_ext.data import Dataset
    from stablenets_ext.models import StableNet
    from stablenets_ext.training import backprop

    data = Dataset("empty", torch.zeros(0, 2), torch.zeros(0, dtype=torch.long),
                   torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 2, 2)
    with pytest.raises(ValueError, match="no training examples"):
        backprop.train(StableNet("verlet", 2, 2, 2, width=4), data, epochs=1, batch_size=4,
                       lr=0.01, quiet=True)


def test_stability_out_without_extension_reports_the_file_written(tmp_path, monkeypatch,
                                                                  capsys):
    from stablenets_ext import stability

    monkeypatch.chdir(tmp_path)
    assert stability.main(["--json", "--out", "plotnoext", "--depths", "4"]) == 0
    line = json_line(capsys.readouterr().out)
    assert line["plot"] == "plotnoext.png" and (tmp_path / "plotnoext.png").exists()
    assert not (tmp_path / "plotnoext").exists()


# 4 ---------------------------------------------------------- tracebacks


def test_pvd_diverged_run_gives_strict_json(capsys):
    code, out, err = run(["train", *TINY, "--trainer", "pvd", "--workers", "2", "--backend",
                          "sequential", "--epochs", "2", "--step", "1e308", "--json",
                          "--pvd-inner-batches", "2"], capsys)
    assert code == 0, err
    line = json_line(out)
    assert line["diverged"] is True and "Traceback" not in err


def test_stability_huge_step_checked_before_the_eigen_solver(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "stablenets_ext", "stability", "--step", "1e308",
                           "--json", "--no-plot", "--depths", "4"], capture_output=True,
                          text=True, cwd=tmp_path, env=env_for(tmp_path), timeout=240)
    assert proc.returncode == 2
    assert proc.stdout == "" and "MKL" not in proc.stderr, proc.stdout
    last = proc.stderr.strip().splitlines()[-1]  # argparse's usage, then the one error line
    assert "step" in last and "too large" in last and "Traceback" not in proc.stderr


def test_stability_bad_extension_refused_before_computing(tmp_path, capsys, monkeypatch):
    from stablenets_ext import stability

    def boom(*a, **kw):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(stability, "stability_report", boom)
    with pytest.raises(SystemExit) as exc:
        stability.main(["--out", str(tmp_path / "s.badext"), "--depths", "4"])
    assert exc.value.code == 2 and ".badext" in capsys.readouterr().err


@pytest.mark.parametrize("var,value", [("STABLENETS_CPU_CACHE_MB", "abc"),
                                       ("STABLENETS_CPU_ISA", "bogus")])
@pytest.mark.parametrize("command", [["info"], ["train", "--epochs", "1"],
                                     ["stability", "--no-plot", "--depths", "4"]])
def test_bad_environment_variable_is_one_line_exit_2(var, value, command, monkeypatch, capsys):
    monkeypatch.setenv(var, value)
    code, out, err = run(command, capsys)
    assert code == 2 and var in err and err.count("\n") == 1 and out == "", err


@pytest.mark.parametrize("var,value", [("STABLENETS_CPU_CACHE_MB", "abc"),
                                       ("STABLENETS_CPU_ISA", "bogus")])
def test_bad_environment_variable_is_no_traceback_at_import(tmp_path, var, value):
    proc = subprocess.run([sys.executable, "-m", "stablenets_ext", "train", "--epochs", "1"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env=env_for(tmp_path, **{var: value}), timeout=240)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert var in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_checkpoint_whose_history_is_not_a_dict(tmp_path, capsys):
    from stablenets_ext.training import checkpoint

    ck = tmp_path / "ck.pt"
    assert run(["train", *TINY, "--epochs", "1", "--save", str(ck)], capsys)[0] == 0
    state = checkpoint.load(ck)
    state["history"] = [1, 2, 3]
    torch.save(state, ck)
    code, _, err = run(["train", *TINY, "--epochs", "2", "--resume", str(ck)], capsys)
    assert code == 2 and str(ck) in err and "history" in err and err.count("\n") == 1


# 5 ---------------------------------------------------------- conv stacks


def _conv_kernel():
    from stablenets_ext import conv_ops

    return conv_ops.has_kernel("cpu")


needs_conv_kernel = pytest.mark.skipif(not _conv_kernel(),
                                       reason="needs the compiled CPU conv kernels")


@needs_conv_kernel
@pytest.mark.parametrize("arch", ["resnet", "antisymmetric", "leapfrog", "verlet"])
@pytest.mark.parametrize("transform", ["jacrev", "grad"])
def test_conv_stacks_under_torch_func_route_to_the_reference(arch, transform):
    import warnings

    from stablenets_ext import conv

    fn = getattr(conv, f"conv_{arch}")
    y = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    w = 0.3 * torch.randn(2, 2, 2, 3, 3, dtype=torch.float64)
    b = 0.1 * torch.randn(2, 2, dtype=torch.float64)
    conv._warned.discard("transform")

    def f(w):
        return fn(y, w, b, 0.1).sum() if transform == "grad" else fn(y, w, b, 0.1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = getattr(torch.func, transform)(f)(w)
    ref = getattr(torch.func, transform)(
        lambda w: (lambda o: o.sum() if transform == "grad" else o)(
            fn(y, w, b, 0.1, impl="reference")))(w)
    torch.testing.assert_close(got, ref)
    assert len([c for c in caught if "torch.func" in str(c.message)]) == 1


@needs_conv_kernel
@pytest.mark.parametrize("arch", ["leapfrog", "verlet"])
def test_conv_stored_mode_backward_with_batch_0(arch):
    from stablenets_ext import conv

    fn = getattr(conv, f"conv_{arch}")
    y = torch.zeros(0, 2, 3, 3, requires_grad=True)
    w = torch.randn(2, 2, 2, 3, 3, requires_grad=True)
    b = torch.randn(2, 2, requires_grad=True)
    out = fn(y, w, b, 0.1, impl="fused")
    assert out.shape == (0, 2, 3, 3)
    out.sum().backward()
    assert y.grad.shape == y.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
