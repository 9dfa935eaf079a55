"""Training over several machines, with the conventions users know from torchrun, DeepSpeed and
Slurm: `tunedeck train CFG --nnodes N --node-rank R --master-addr HOST --master-port P` on every node
(or NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT / NPROC_PER_NODE), torchrun's c10d rendezvous;
`--deepspeed … --hostfile FILE` through DeepSpeed's own launcher; `tunedeck slurm` writes an sbatch
script. The run directory lives on a filesystem every node shares; node 0 prepares it, the others
wait until they can see it. NCCL's settings (NCCL_SOCKET_IFNAME, NCCL_TIMEOUT, …) reach the ranks
through the environment as they are."""

from __future__ import annotations

import hashlib
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.core.errors import UserError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Nodes:
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int = DEFAULT_PORT
    rdzv_id: str = ""
    rdzv_endpoint: str = ""
    max_restarts: int = 0

    @property
    def endpoint(self) -> str:
        return self.rdzv_endpoint or f"{self.master_addr}:{self.master_port}"


def positive_int(name: str, value: str | int | None, low: int) -> int | None:
    if value is None or value == "":
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = low - 1
    if n < low:
        raise UserError(f"{name}: {value!r} is not allowed: must be a whole number >= {low}")
    return n


def nodes_from(nnodes=None, node_rank=None, master_addr=None, master_port=None, rdzv_id=None, rdzv_endpoint=None,
               max_restarts=None, work_dir: str | None = None, env=os.environ) -> Nodes | None:
    """The command line's settings, else the environment's; None for one machine."""
    n = positive_int("--nnodes", nnodes if nnodes is not None else env.get("NNODES"), 1)
    if n is None or n == 1:
        return None
    rank = positive_int("--node-rank", node_rank if node_rank is not None else env.get("NODE_RANK"), 0)
    if rank is None:
        raise UserError(f"--nnodes {n}: give --node-rank (0 on the first node, 1 … {n - 1} on the others)")
    if rank >= n:
        raise UserError(f"--node-rank: {rank} is not allowed with --nnodes {n}: must be 0 … {n - 1}")
    addr = master_addr or env.get("MASTER_ADDR")
    if not addr and not rdzv_endpoint:
        raise UserError(f"--nnodes {n}: give --master-addr (the first node's address every node can reach)")
    port = positive_int("--master-port", master_port if master_port is not None else env.get("MASTER_PORT"), 1) \
        or DEFAULT_PORT
    if port > 65535:
        raise UserError(f"--master-port: {port} is not allowed: must be 1 … 65535")
    if not work_dir:
        raise UserError(f"--nnodes {n}: give --work-dir, the same run directory on a filesystem every node shares")
    restarts = positive_int("--max-restarts", max_restarts, 0) or 0
    # the same on every node without being told: from what every node is given alike
    rid = rdzv_id or hashlib.sha1(f"{Path(work_dir).resolve()}|{addr}|{port}|{n}".encode()).hexdigest()[:12]
    return Nodes(n, rank, addr or "", port, rid, rdzv_endpoint or "", restarts)


def torchrun_command(worker: list[str], gpus: int, nodes: Nodes | None) -> list[str]:
    """``python -m torch.distributed.run`` for one machine (standalone) or one node of several (c10d)."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if nodes is None:
        cmd += ["--standalone", f"--nproc-per-node={gpus}"]
    else:
        cmd += [f"--nnodes={nodes.nnodes}", f"--node-rank={nodes.node_rank}", f"--nproc-per-node={gpus}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={nodes.endpoint}", f"--rdzv-id={nodes.rdzv_id}",
                f"--max-restarts={nodes.max_restarts}"]
    return cmd + worker


def wait_for_shared_run(run_dir: Path, timeout_s: float | None = None) -> None:
    """A node other than the first waits for node 0's run directory to appear on the shared filesystem."""
    timeout_s = float(os.environ.get("TUNEDECK_SHARED_WAIT_S", "120")) if timeout_s is None else timeout_s
    deadline = time.time() + timeout_s
    while not (run_dir / "config.yaml").is_file():
        if time.time() > deadline:
            raise UserError(f"{run_dir}: node 0's run directory is not visible from this node after {timeout_s:.0f} s; "
                            "multi-node training needs --work-dir on a filesystem every node shares (NFS, Lustre, "
                            "…), and node 0 started")
        time.sleep(0.5)


def read_hostfile(path: str | Path) -> list[tuple[str, int]]:
    """DeepSpeed's hostfile: ``host slots=N`` a line, # comments."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise UserError(f"--hostfile: {p}: {e.strerror or e}") from None
    hosts: list[tuple[str, int]] = []
    for i, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = parts[1] if len(parts) == 2 and parts[1].startswith("slots=") else None
        if slots is None or not slots[6:].isdigit() or int(slots[6:]) < 1:
            raise UserError(f"{p}:{i}: {raw.strip()!r} is not a hostfile line; write 'HOST slots=GPUS'")
        hosts.append((parts[0], int(slots[6:])))
    if not hosts:
        raise UserError(f"--hostfile: {p}: no hosts in it")
    return hosts


def deepspeed_command(worker: list[str], hostfile: str | Path, master_addr: str | None,
                      master_port: int | None) -> list[str]:
    """DeepSpeed's launcher (ssh / pdsh to every host of the hostfile) running the training worker."""
    read_hostfile(hostfile)
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}"]
    if master_addr:
        cmd.append(f"--master_addr={master_addr}")
    if master_port:
        cmd.append(f"--master_port={master_port}")
    # the worker is a module (`-m engine.cli _worker RUN`): DeepSpeed's --module form
    python, flag, module, *args = worker
    assert flag == "-m", worker
    return cmd + ["--module", module, *args]


def sbatch_script(config: str, work_dir: str, *, nodes: int, gpus_per_node: int, job_name: str,
                  partition: str | None = None, time_limit: str | None = None, cpus_per_task: int | None = None,
                  port: int = DEFAULT_PORT, overrides: list[str] | None = None, deepspeed: str | None = None,
                  tunedeck: str = "tunedeck") -> str:
    """An sbatch script: one task a node, the head node from scontrol, srun starting `tunedeck train` on
    every node, which runs torchrun's c10d rendezvous there."""
    q = shlex.quote
    lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}", f"#SBATCH --nodes={nodes}",
             "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={gpus_per_node}"]
    if cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={cpus_per_task}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    if time_limit:
        lines.append(f"#SBATCH --time={time_limit}")
    # beside the run directory, not in it (Slurm opens it before the job starts; the folder must exist)
    out = Path(work_dir)
    lines += [f"#SBATCH --output={out.parent / out.name}-slurm-%j.out", "",
              "# written by `tunedeck slurm`; submit with: sbatch THIS_FILE",
              "set -euo pipefail",
              'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
              "export MASTER_ADDR=$head_node",
              f"export MASTER_PORT=${{MASTER_PORT:-{port}}}",
              ""]
    args = [tunedeck, "train", q(config), "--work-dir", q(work_dir), "--nnodes", '"$SLURM_NNODES"',
            "--node-rank", '"$SLURM_NODEID"', "--master-addr", '"$MASTER_ADDR"', "--master-port", '"$MASTER_PORT"',
            "--gpus", str(gpus_per_node), "--rdzv-id", '"$SLURM_JOB_ID"']
    if deepspeed:
        args += ["--deepspeed", q(deepspeed)]
    for kv in overrides or []:
        args += ["--set", q(kv)]
    lines.append("srun --kill-on-bad-exit=1 " + " ".join(args))
    return "\n".join(lines) + "\n"
