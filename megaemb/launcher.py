"""Run as one rank, or start the ranks: the environment decides, as in Megatron-SWIFT.

``NPROC_PER_NODE`` (ranks on this node), ``NNODES``, ``NODE_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``; under Slurm (``SLURM_NNODES``/``SLURM_NODEID``) the node values come from
Slurm. If this process is not already a rank (no ``LOCAL_RANK``) and more than one rank is
asked for, re-run the same command under ``torch.distributed.run`` (torchrun).
"""
from __future__ import annotations

import os
import subprocess
import sys


def launch_plan(env=os.environ) -> list[str] | None:
    """The torchrun argv to run, or None when this process should just run (one rank, or a rank)."""
    if "LOCAL_RANK" in env:
        return None
    nproc = int(env.get("NPROC_PER_NODE", 1))
    nnodes = int(env.get("NNODES", env.get("SLURM_NNODES", 1)))
    if nproc * nnodes <= 1:
        return None
    node_rank = env.get("NODE_RANK", env.get("SLURM_NODEID", "0"))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--nnodes={nnodes}", f"--node_rank={node_rank}",
           f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}",
           f"--master_port={env.get('MASTER_PORT', '29500')}"]
    return cmd


def relaunch(plan: list[str], argv: list[str]) -> int:
    """Run ``megaemb <argv>`` on every rank of this node; returns the exit code."""
    return subprocess.call(plan + ["-m", "megaemb.cli", *argv])
