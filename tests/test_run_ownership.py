"""Nothing lost, nothing silent, for run directories: one trainer per run directory, resume that works
from anywhere, user files never overwritten, a clean restart for a run without checkpoints, disk-full
reported in one line."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli
from test_train import _wait_for, losses

from engine.train.runlock import RunLock, claim
from engine.train.runs import RunDirectory

QUICK = ["--set", "save_steps=3", "--set", "evaluation_inputs=[]"]


def _cli(workspace: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=workspace, capture_output=True,
                          text=True, timeout=timeout)


def test_a_live_trainer_owns_its_run_directory_and_a_dead_ones_lock_is_taken_over(workspace, capsys):
    out = _cli(workspace, "train", "demo.yaml", "--work-dir", "live", "--detach", "--set", "max_steps=100000",
               "--set", "save_steps=2", "--set", "evaluation_inputs=[]")
    assert out.returncode == 0, out.stderr
    run = RunDirectory(workspace / "live")
    try:
        _wait_for(lambda: run.latest_checkpoint() is not None and run.status().get("state") == "running", 240,
                  "the detached run's first checkpoint")
        pid = run.status()["pid"]
        assert RunLock(run.path).holder() == pid
        for args in (["--resume", "--detach"], ["--resume"], []):          # a second trainer is refused
            again = _cli(workspace, "train", "demo.yaml", "--work-dir", "live", *args, "--set", "max_steps=100000",
                         "--set", "save_steps=2", "--set", "evaluation_inputs=[]")
            assert again.returncode == 2, again.stderr
            assert again.stderr.strip() == (f"error: {run.path}: a trainer (pid {pid}) is running in it; stop it "
                                            f"first (tunedeck stop {run.path}) or choose another --work-dir")
        assert run.status()["pid"] == pid                                   # status still names the live one
        assert run_cli("stop", run.path) == 0
    finally:
        st = run.status()
        if st.get("state") in ("running", "starting") and st.get("pid"):
            os.kill(st["pid"], 9)
    _wait_for(lambda: RunLock(run.path).holder() is None, 30, "the lock to go with the process")
    lock = claim(run.path)                                                 # free again
    try:
        with pytest.raises(Exception, match="a trainer"):
            claim(run.path)                                                # and exclusive
    finally:
        lock.release()


def test_resume_detached_with_relative_paths_continues_the_run(workspace):
    first = _cli(workspace, "train", "demo.yaml", "--work-dir", "rel", "--set", "max_steps=6", *QUICK)
    assert first.returncode == 0, first.stderr
    full = losses(workspace / "rel")
    (workspace / "rel" / "checkpoint-6").rename(workspace / "rel" / "gone-6")   # as if it stopped at step 3
    out = _cli(workspace, "train", "demo.yaml", "--work-dir", "rel", "--resume", "rel/checkpoint-3", "--detach",
               "--set", "max_steps=6", *QUICK)
    assert out.returncode == 0, out.stderr
    run = RunDirectory(workspace / "rel")
    _wait_for(lambda: run.status().get("state") in ("finished", "failed"), 240, "the resumed run")
    assert run.status()["state"] == "finished", run.status()
    resumed = losses(run.path)
    assert sorted(resumed) == list(range(1, 7))
    assert [resumed[s] for s in range(4, 7)] == pytest.approx([full[s] for s in range(4, 7)], rel=1e-5)


def test_a_folder_that_is_not_a_run_is_never_written_into(workspace, capsys):
    mine = workspace / "notes"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own file\n")
    assert run_cli("train", "demo.yaml", "--work-dir", mine, "--set", "max_steps=2") == 2
    assert "exists and is not a run directory" in capsys.readouterr().err
    assert (mine / "config.yaml").read_text() == "my own file\n"
    assert run_cli("train", "demo.yaml", "--work-dir", mine, "--resume") == 2
    assert "exists and is not a run directory" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["config.yaml"]          # nothing added, nothing changed
    afile = workspace / "a-file"
    afile.write_text("x")
    assert run_cli("train", "demo.yaml", "--work-dir", afile) == 2
    assert capsys.readouterr().err.strip() == f"error: --work-dir {afile}: is a file, not a directory"


def test_resume_with_a_changed_recipe_is_refused_unless_forced(workspace, capsys):
    assert run_cli("train", "demo.yaml", "--work-dir", "c", "--set", "max_steps=3", *QUICK) == 0
    own = (workspace / "c" / "config.yaml").read_text()
    capsys.readouterr()
    assert run_cli("train", "demo.yaml", "--work-dir", "c", "--resume", "--set", "max_steps=6", "--set",
                   "lr=1e-3", *QUICK) == 2
    err = capsys.readouterr().err
    assert "train.max_steps: 3 -> 6" in err and "train.lr: 0.002 -> 0.001" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1
    assert (workspace / "c" / "config.yaml").read_text() == own                 # the run keeps its own config
    assert run_cli("train", "demo.yaml", "--work-dir", "c", "--resume", "--force", "--set", "max_steps=6",
                   *QUICK) == 0
    assert (workspace / "c" / "config.before-resume.yaml").read_text() == own
    assert RunDirectory(workspace / "c").status()["step"] == 6


def test_a_run_killed_before_its_first_checkpoint_starts_again_in_place(workspace, capsys):
    run = workspace / "work_dirs" / "demo"
    assert run_cli("train", "demo.yaml", "--set", "max_steps=2", "--set", "save_steps=100") == 0
    for ck in run.glob("checkpoint-*"):                       # as if killed before its first checkpoint
        import shutil

        shutil.rmtree(ck)
    RunDirectory(run).write_status(state="failed", error="killed")
    assert run_cli("train", "demo.yaml", "--resume", "--set", "max_steps=2", "--set", "save_steps=100") == 0
    assert "no complete checkpoint yet; starting it again from step 0" in capsys.readouterr().err
    assert RunDirectory(run).status()["state"] == "finished" and sorted(losses(run)) == [1, 2]
    for ck in run.glob("checkpoint-*"):
        import shutil

        shutil.rmtree(ck)
    assert run_cli("train", "demo.yaml", "--work-dir", run, "--set", "max_steps=2", "--set", "save_steps=100") == 0
    assert sorted(losses(run)) == [1, 2]


def test_resume_picks_the_newest_run_that_has_a_checkpoint(workspace, capsys):
    assert run_cli("train", "demo.yaml", "--set", "max_steps=3", *QUICK) == 0         # work_dirs/demo
    older = workspace / "work_dirs" / "demo"
    failed = workspace / "work_dirs" / "demo_2"
    failed.mkdir()
    RunDirectory(failed).write_status(state="failed", error="crashed at start", step=0)   # newer, no checkpoint
    assert run_cli("train", "demo.yaml", "--resume", "--force", "--set", "max_steps=6", *QUICK) == 0
    assert RunDirectory(older).status()["step"] == 6
    assert RunDirectory(failed).status()["state"] == "failed"


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_partial_files(workspace, monkeypatch, capsys):
    import torch

    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 3:                     # the first checkpoint's three files fit, the second's do not
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    assert run_cli("train", "demo.yaml", "--work-dir", "full", "--set", "max_steps=9", *QUICK) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no space left on device ") and "while writing checkpoint-6 (" in err, err
    assert len(err.splitlines()) == 1
    run = RunDirectory(workspace / "full")
    st = run.status()
    assert st["state"] == "failed" and st["error"].startswith("no space left on device")
    assert [p.name for p in run.checkpoints()] == ["checkpoint-3"]              # the earlier one stays
    assert not list(run.path.glob(".checkpoint-*")) and not list(run.path.glob(".status.json.*"))
    assert "no space left on device" in (run.path / "train.log").read_text()


def test_a_foreground_run_whose_terminal_closes_saves_a_checkpoint_and_stops(workspace):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "train", "demo.yaml", "--work-dir", "hup",
                             "--set", "max_steps=100000", "--set", "save_steps=100000",
                             "--set", "evaluation_inputs=[]"], cwd=workspace, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = RunDirectory(workspace / "hup")
    try:
        _wait_for(lambda: run.status().get("state") == "running" and run.status().get("step", 0) >= 2, 240,
                  "the run to take steps")
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(0.1)
    assert run.status()["state"] == "stopped"
    assert run.latest_checkpoint() is not None and run.latest_checkpoint().name == f"checkpoint-{run.status()['step']}"


def test_status_files_are_readable_by_others_and_stale_temporaries_go(workspace):
    run = workspace / "modes"
    run.mkdir()
    stale = run / ".status.json.abc123.tmp"
    stale.write_text("{")
    one_step = ["--set", "max_steps=1", "--set", "evaluation_inputs=[]"]
    assert run_cli("train", "demo.yaml", "--work-dir", run, *one_step) == 2     # not a run directory: refused
    stale.rename(workspace / "keep.tmp")
    RunDirectory(run).write_status(state="failed", error="killed before its first checkpoint")
    (run / ".status.json.def456.tmp").write_text("{")
    assert run_cli("train", "demo.yaml", "--work-dir", run, *one_step) == 0
    assert not list(run.glob(".status.json.*.tmp"))
    mode = (run / "status.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~_umask(), oct(mode)


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
