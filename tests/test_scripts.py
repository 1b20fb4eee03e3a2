"""The shipped job scripts: lint-clean (shellcheck, hadolint) and really runnable. Each runs
one small command through its script with the tiny model on CPU: logs land in per-node
files, exit codes pass through, PAI-DLC's variables start the ranks, and the conversion
wrappers round-trip HF -> MCore (TP=2) -> HF bit-exactly."""
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from hf_reference import assert_same_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["launch/common.sh", "launch/torchrun.sh", "launch/dlc.sh", "launch/slurm.sbatch",
           "convert/hf_to_mcore.sh", "convert/mcore_to_hf.sh", "bench/gpu_smoke.sh", "bench/gpu_check.sh"]


def _tool(name):
    path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.fail(f"{name} is not installed (it comes with the [test] extra)")
    return path


@pytest.mark.timeout(60)
def test_scripts_are_shellcheck_clean():
    out = subprocess.run([_tool("shellcheck"), "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.timeout(60)
def test_dockerfile_is_hadolint_clean():
    out = subprocess.run([_tool("hadolint"), "docker/Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _env(tmp_path, **kw):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "NCCL_")) and k not in
           ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(MEGAEMB=f"{sys.executable} -m megaemb.cli", LOG_DIR=str(tmp_path / "logs"),
               NPROC_PER_NODE="1", PYTHONPATH=ROOT)
    env.update(kw)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("", 0))
        return str(s.getsockname()[1])


@pytest.mark.timeout(240)
def test_dlc_variables_start_the_ranks_and_logs_are_per_node(tiny_models, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("one text\nanother text\na third\n")
    env = _env(tmp_path, WORLD_SIZE="1", RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=_free_port(), NPROC_PER_NODE="2", JOB_NAME="dlcjob")
    out = subprocess.run(["bash", "launch/dlc.sh", "embed", "--model", tiny_models["dense"],
                          "--input", str(texts), "--output", str(tmp_path / "e.npy")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert np.load(tmp_path / "e.npy").shape == (3, 64)
    log = (tmp_path / "logs" / "dlcjob-node0.log").read_text()
    assert "3 texts ->" in log and "ranks per node: 2" in out.stderr
    # a user error passes its exit code and one line through the script
    bad = subprocess.run(["bash", "launch/torchrun.sh", "embed", "--model", str(tmp_path / "nope"),
                          "--input", str(texts), "--output", str(tmp_path / "x.npy")],
                         cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "megaemb embed: error:" in bad.stdout, (bad.stdout, bad.stderr)


@pytest.mark.timeout(120)
def test_dlc_script_without_master_addr_stops_with_one_line(tiny_models, tmp_path):
    """The issue's hang: ``WORLD_SIZE=2 RANK=0 bash launch/dlc.sh ...`` without MASTER_ADDR (a
    valid command: before, it waited for a second rank, silent, and RDZV_TIMEOUT did not help)."""
    texts = tmp_path / "t.txt"
    texts.write_text("a\n")
    out = subprocess.run(["bash", "launch/dlc.sh", "embed", "--model", tiny_models["dense"], "--input",
                          str(texts), "--output", str(tmp_path / "e.npy")],
                         cwd=ROOT, env=_env(tmp_path, WORLD_SIZE="2", RANK="0", RDZV_TIMEOUT="5"),
                         capture_output=True, text=True, timeout=100)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout.strip() == ("megaemb embed: error: WORLD_SIZE=2 needs MASTER_ADDR (the address of node "
                                  "rank 0); WORLD_SIZE and RANK count nodes here (PAI-DLC): unset them "
                                  "for one node")


@pytest.mark.timeout(300)
def test_conversion_wrappers_round_trip(tiny_models, tmp_path):
    mcore, hf = tmp_path / "mcore", tmp_path / "hf"
    to_mcore = subprocess.run(
        ["bash", "convert/hf_to_mcore.sh", tiny_models["dense"], str(mcore),
         "--tensor_model_parallel_size", "2"],
        cwd=ROOT, env=_env(tmp_path, NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=240)
    assert to_mcore.returncode == 0, to_mcore.stderr[-3000:]
    # as a PAI-DLC start command on 2 nodes: node 0 exports as one plain process, node 1 exits
    dlc = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
    idle = subprocess.run(["bash", "convert/mcore_to_hf.sh", str(mcore), str(hf)], cwd=ROOT,
                          env=_env(tmp_path, RANK="1", **dlc), capture_output=True, text=True, timeout=60)
    assert idle.returncode == 0 and "nothing to do" in idle.stderr and not hf.exists(), idle.stderr
    to_hf = subprocess.run(["bash", "convert/mcore_to_hf.sh", str(mcore), str(hf)], cwd=ROOT,
                           env=_env(tmp_path, RANK="0", **dlc), capture_output=True, text=True, timeout=240)
    assert to_hf.returncode == 0, to_hf.stderr[-3000:]
    assert_same_weights(tiny_models["dense"], str(hf))
    usage = subprocess.run(["bash", "convert/mcore_to_hf.sh"], cwd=ROOT, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr


@pytest.mark.timeout(180)
def test_sigterm_to_the_script_stops_the_job(tiny_models, tmp_path):
    """A scheduler or container stopping the script (not megaemb) stops every rank."""
    import signal
    import time

    import psutil

    data = os.path.join(ROOT, "demo", "data", "train.jsonl")
    proc = subprocess.Popen(
        ["bash", "launch/torchrun.sh", "sft", "--model", tiny_models["dense"], "--dataset", f"{data}#64",
         "--max_length", "32", "--micro_batch_size", "2", "--global_batch_size", "4",
         "--train_iters", "150", "--log_interval", "1", "--save", str(tmp_path / "run")],
        cwd=ROOT, env=_env(tmp_path, NPROC_PER_NODE="2", JOB_NAME="term"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "logs" / "term-node0.log"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (log.exists() and "step 2:" in log.read_text()):
            time.sleep(0.2)
        job = psutil.Process(proc.pid).children(recursive=True)
        assert job, "megaemb did not start"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
        _, alive = psutil.wait_procs(job, timeout=30)
        assert not alive, alive
        assert "stopped by SIGTERM" in log.read_text()
    finally:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            p.kill()
