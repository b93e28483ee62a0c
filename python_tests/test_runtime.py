"""Shared process plumbing (stablenets_ext.training.runtime): hung workers are
named within the heartbeat limit, launched torchrun ranks die with their
launcher and leave nothing in /tmp, start-up failures reap the pool."""

import contextlib
import glob
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from stablenets_ext.data import load_dataset
from stablenets_ext.models import StableNet
from stablenets_ext.training import pvd, runtime
from stablenets_ext.training.sg import train_sg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ellipse():
    return load_dataset("ellipse")


def gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_error_family():
    assert issubclass(runtime.StageError, runtime.WorkerError)
    assert issubclass(runtime.HungWorkerError, runtime.WorkerError)
    assert pvd.WorkerError is runtime.WorkerError
    for bad in (0, -1, float("nan"), float("inf"), "3"):
        with pytest.raises(ValueError, match="heartbeat_timeout"):
            runtime.check_timeout(bad)


def test_heartbeats_report_the_silent_worker():
    hb = runtime.Heartbeats(3)
    hb.beat(0)
    hb.beat(2)
    hb.times[2] -= 10  # worker 2 last beat 10 s ago; worker 1 never beat
    assert hb.overdue(range(3), 5.0)[0] == 2
    with pytest.raises(runtime.HungWorkerError, match="worker #2 stopped responding") as err:
        hb.check(range(3), 5.0, lambda i: f"worker #{i}")
    assert err.value.worker == 2
    hb.check(range(3), None, str)  # None: never


def test_stopped_pvd_worker_is_named_within_the_limit(ellipse):
    torch.manual_seed(0)
    model = StableNet("verlet", 2, 2, 8, width=4)
    seen = {}

    def stop_worker_1(info):
        if info["iteration"] == 1:
            seen["pids"] = info["pids"]
            seen["t"] = time.monotonic()
            os.kill(info["pids"][1], signal.SIGSTOP)

    with pytest.raises(runtime.HungWorkerError, match=r"PVD worker 1 .*no heartbeat.*stopped"):
        pvd.train_pvd(model, ellipse, workers=2, iterations=5, inner_batches=5, threads=1,
                      callback=stop_worker_1, heartbeat_timeout=2.0, start_method="forkserver")
    assert time.monotonic() - seen["t"] < 12
    time.sleep(0.5)
    assert all(gone(p) for p in seen["pids"])


def test_stopped_sg_stage_is_named_within_the_limit(ellipse):
    torch.manual_seed(0)
    model = StableNet("verlet", 2, 2, 8, width=4)
    seen = {}

    def stop_stage_0(pids):
        seen["pids"] = pids

        def later():
            time.sleep(1.0)
            seen["t"] = time.monotonic()
            os.kill(pids[0], signal.SIGSTOP)

        threading.Thread(target=later, daemon=True).start()

    with pytest.raises(runtime.HungWorkerError, match=r"stage 0 .*no heartbeat.*stopped") as err:
        train_sg(model, ellipse, epochs=500, batch_size=32, lr=0.01, workers=2, threads=1,
                 quiet=True, on_workers_started=stop_stage_0, heartbeat_timeout=2.0)
    assert isinstance(err.value, runtime.StageError) or err.value.worker == 0
    assert time.monotonic() - seen["t"] < 12
    time.sleep(0.5)
    assert all(gone(p) for p in seen["pids"])


def test_pool_is_reaped_when_start_up_fails(ellipse, monkeypatch):
    """A worker that never answers at start-up is reported after start_timeout,
    and the pool is closed (the parent used to hang for ever after that)."""
    from stablenets_ext.training.pvd import process as pvd_process

    monkeypatch.setattr(pvd_process, "_worker_main", _never_ready)
    t0 = time.monotonic()
    with pytest.raises(runtime.WorkerError, match="did not answer while starting"):
        pvd.train_pvd(StableNet("verlet", 2, 2, 4, width=4), ellipse, workers=2, iterations=1,
                      inner_batches=2, threads=1, start_timeout=3.0, start_method="forkserver")
    assert time.monotonic() - t0 < 30
    assert [c for c in __import__("multiprocessing").active_children()
            if c.name.startswith("pvd-worker")] == []


def _never_ready(index, conn, payload):
    time.sleep(60)


def _children(pid):
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    rows = [ln.split(None, 2) for ln in out.splitlines() if ln.strip()]
    kids, todo = [], [str(pid)]
    while todo:
        p = todo.pop()
        for r in rows:
            if len(r) == 3 and r[1] == p:
                kids.append(int(r[0]))
                todo.append(r[0])
    return kids


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_dist_ranks_die_with_the_cli(sig, tmp_path):
    tmp = tmp_path / "tmp"  # the launcher's run folders go here (TMPDIR), nobody else's
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp),
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stablenets_ext", "train", "--trainer", "sg", "--backend", "dist",
         "--workers", "2", "--dataset", "swiss", "--layers", "8", "--epochs", "100000", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        kids = []
        while time.monotonic() < deadline:
            kids = _children(proc.pid)
            if len(kids) >= 3 and glob.glob(os.path.join(tmp, "stablenets-sg-*", "heartbeat-1")):
                break
            time.sleep(0.5)
        assert len(kids) >= 3, "torchrun and its ranks never started"
        proc.send_signal(sig)
        proc.wait(30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(gone(k) for k in kids):
            time.sleep(0.5)
        assert all(gone(k) for k in kids), "ranks outlived the CLI"
        # the run folder goes with the last of them (CI, loaded, once took over 0.5 s)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and glob.glob(os.path.join(tmp, "stablenets-*")):
            time.sleep(0.2)
        assert glob.glob(os.path.join(tmp, "stablenets-*")) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def _rank_of(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        return int(env[b"RANK"]) if b"RANK" in env else None
    except (OSError, ValueError):
        return None


def test_stopped_dist_rank_is_named_not_the_healthy_one(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp),
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stablenets_ext", "train", "--trainer", "sg", "--backend", "dist",
         "--workers", "2", "--dataset", "swiss", "--layers", "8", "--epochs", "100000",
         "--quiet", "--heartbeat-timeout", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 90
        ranks = {}
        while time.monotonic() < deadline and len(ranks) < 2:
            ranks = {_rank_of(k): k for k in _children(proc.pid) if _rank_of(k) is not None}
            time.sleep(0.5)
        assert len(ranks) == 2, "the ranks never started"
        while time.monotonic() < deadline and len(glob.glob(os.path.join(
                tmp, "stablenets-sg-*", "heartbeat-*"))) < 2:
            time.sleep(0.5)
        time.sleep(1.0)
        os.kill(ranks[1], signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.terminate()  # an orderly stop: the CLI stops torchrun's session
            proc.wait(30)
        leftover = [p for p in ranks.values() if not gone(p)]
        time.sleep(1.0)
        for pid in leftover:  # never leave a stopped rank behind, even when the test fails
            if not gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert not leftover
    assert proc.returncode == 1
    assert b"stage 1 (torchrun rank 1) stopped responding" in err, err
    assert glob.glob(os.path.join(tmp, "stablenets-*")) == []
