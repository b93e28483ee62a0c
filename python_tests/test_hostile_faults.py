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
        if b"RANK" in env and b"LOCAL_RANK" in env and b"torch.distributed.run" not in \
                open(f"/proc/{p}/cmdline", "rb").read():
            out[int(env[b"RANK"])] = p
    return out


def _gone(pids, limit=15.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        alive = [p for p in pids if os.path.exists(f"/proc/{p}")
                 and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
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
