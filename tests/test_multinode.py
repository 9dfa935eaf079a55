"""Several machines: two "nodes" of one process each on 127.0.0.1 (gloo, torchrun's c10d rendezvous)
train the curve of one process with the same global batch, checkpoint, lose a node, and resume; the
sbatch script `tunedeck slurm` writes; DeepSpeed's hostfile; the errors a user can make."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, run_cli
from test_methods import curve

from engine.train.runs import RunDirectory

COMMON = ["--set", "max_steps=4", "--set", "save_steps=2", "--set", "evaluation_inputs=[]", "--set", "shuffle=false",
          "--set", "accumulative_counts=1"]


def node(workspace: Path, rank: int, port: int, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "train", "demo.yaml", "--work-dir", "nodes",
                             "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                             "--master-port", str(port), "--gpus", "1", "--set", "batch_size=1", *COMMON, *extra],
                            cwd=workspace, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                "TUNEDECK_NODE_EXIT_GRACE_S": "3", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_tree(pid: int) -> None:
    """kill -9 a launcher and every process under it (torchrun starts its ranks in sessions of their own)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def test_two_nodes_train_one_process_curve_lose_a_node_and_resume(workspace):
    port = free_port()
    slow = {"TUNEDECK_FAULT_STEP_DELAY": "0.8"}          # time to lose a node after the first checkpoint
    nodes = [node(workspace, 0, port, env=slow), node(workspace, 1, port, env=slow)]
    run = RunDirectory(workspace / "nodes")
    try:
        deadline = time.time() + 120
        while not any(c.name == "checkpoint-2" for c in run.checkpoints()) and time.time() < deadline:
            assert all(p.poll() is None for p in nodes), [p.communicate()[0][-3000:] for p in nodes]
            time.sleep(0.1)
        assert run.latest_checkpoint().name == "checkpoint-2"
        kill_tree(nodes[1].pid)                           # node 1 is gone: its launcher and its rank
        out0 = nodes[0].communicate(timeout=90)[0]
        assert nodes[0].returncode != 0, out0[-2000:]     # node 0's rank sees its peer vanish and stops
    finally:
        for p in nodes:
            if p.poll() is None:
                kill_tree(p.pid)
    assert run.latest_checkpoint().name == "checkpoint-2" and run.status()["state"] == "failed", run.status()

    port = free_port()                                     # both nodes again, resuming
    nodes = [node(workspace, 0, port, "--resume"), node(workspace, 1, port, "--resume")]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [o[-3000:] for o in outs]
    assert run.status()["state"] == "finished" and run.latest_checkpoint().name == "checkpoint-4"
    assert run.status().get("host") == socket.gethostname()

    assert run_cli("train", "demo.yaml", "--work-dir", "single", "--set", "batch_size=2", *COMMON) == 0
    assert curve(workspace / "nodes") == pytest.approx(curve(workspace / "single"), rel=1e-4)


def test_the_sbatch_script_is_the_recorded_one(tmp_path, monkeypatch):
    from engine.train.multinode import sbatch_script

    expected = (Path(__file__).parent / "data" / "expected_two_nodes.sbatch").read_text()
    got = sbatch_script("configs/mine.yaml", "/shared/work_dirs/mine", nodes=2, gpus_per_node=8, job_name="mine",
                        partition="gpu", time_limit="12:00:00", cpus_per_task=32,
                        overrides=["lr=1e-4", "data.data_path=/shared/data/my data.json"], deepspeed="zero2")
    assert got == expected
    assert subprocess.run(["bash", "-n"], input=got, text=True).returncode == 0
    monkeypatch.chdir(tmp_path)
    assert run_cli("slurm", "demo_tiny_qlora_self", "--nodes", "2", "--gpus-per-node", "4") == 0
    text = (tmp_path / "demo_tiny_qlora_self.sbatch").read_text()
    assert "#SBATCH --nodes=2" in text and "--gpus 4" in text and (tmp_path / "work_dirs").is_dir()
    assert run_cli("slurm", "demo_tiny_qlora_self", "--nodes", "2", "--gpus-per-node", "4") == 2   # kept


def test_deepspeed_runs_its_own_launcher_over_the_hostfile(tmp_path):
    from engine.core.errors import UserError
    from engine.train.multinode import deepspeed_command, read_hostfile, torchrun_command

    hosts = tmp_path / "hostfile"
    hosts.write_text("# two machines\nnode-a slots=8\nnode-b slots=8\n")
    assert read_hostfile(hosts) == [("node-a", 8), ("node-b", 8)]
    worker = [sys.executable, "-m", "engine.cli", "_worker", "/shared/run"]
    cmd = deepspeed_command(worker, hosts, "node-a", 29500)
    assert cmd[1:] == ["-m", "deepspeed.launcher.runner", f"--hostfile={hosts}", "--master_addr=node-a",
                       "--master_port=29500", "--module", "engine.cli", "_worker", "/shared/run"]
    hosts.write_text("node-a slots=8\nnode-b 8\n")
    with pytest.raises(UserError, match=r"hostfile:2: 'node-b 8' is not a hostfile line"):
        read_hostfile(hosts)
    from engine.train.multinode import nodes_from

    n = nodes_from(2, 1, "10.0.0.1", None, None, None, None, work_dir="/shared/run", env={})
    cmd = torchrun_command(worker, 8, n)
    assert "--rdzv-backend=c10d" in cmd and "--rdzv-endpoint=10.0.0.1:29500" in cmd and "--nnodes=2" in cmd
    assert n.rdzv_id == nodes_from(2, 0, "10.0.0.1", None, None, None, None, work_dir="/shared/run", env={}).rdzv_id
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    assert nodes_from(work_dir="/shared/run", env=env).endpoint == "h0:1234"


@pytest.mark.parametrize("args, expect", [
    (["--nnodes", "2", "--node-rank", "0", "--master-addr", "h"], "--nnodes 2: give --work-dir"),
    (["--nnodes", "2", "--work-dir", "w", "--master-addr", "h"], "--nnodes 2: give --node-rank"),
    (["--nnodes", "2", "--node-rank", "2", "--work-dir", "w", "--master-addr", "h"], "--node-rank: 2 is not allowed"),
    (["--nnodes", "2", "--node-rank", "1", "--work-dir", "w"], "--nnodes 2: give --master-addr"),
    (["--hostfile", "hosts"], "--hostfile: needs --deepspeed"),
])
def test_multinode_mistakes_are_one_line(workspace, capsys, args, expect):
    assert run_cli("train", "demo.yaml", *args) == 2
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_node_that_cannot_see_the_run_directory_says_so(workspace, capsys, monkeypatch):
    monkeypatch.setenv("TUNEDECK_SHARED_WAIT_S", "1")
    assert run_cli("train", "demo.yaml", "--nnodes", "2", "--node-rank", "1", "--master-addr", "127.0.0.1",
                   "--work-dir", "not_shared") == 2
    err = capsys.readouterr().err
    assert "not visible from this node after 1 s" in err and "shared" in err
