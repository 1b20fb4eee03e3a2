"""The launcher: environment -> ranks, one error line per job, no orphans (real processes)."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from megaemb import launcher

ROOT = os.path.join(os.path.dirname(__file__), "..")
DATA = os.path.join(ROOT, "demo", "data", "train.jsonl")
LAUNCH_ENV = ("NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK",
              "RANK", "WORLD_SIZE", "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST",
              "RDZV_TIMEOUT", launcher.PARENT_PID_ENV, launcher.ERROR_DIR_ENV)


def clean_env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(PYTHONWARNINGS="ignore", **kw)
    return env


def megaemb(*args, timeout=120, **env):
    return subprocess.run([sys.executable, "-m", "megaemb.cli", *args], capture_output=True,
                          text=True, env=clean_env(**env), timeout=timeout, cwd=ROOT)


def error_lines(stderr: str) -> list[str]:
    """Lines with ``error:``, from ``megaemb`` on (rank 0's tqdm bar ends without a newline)."""
    return [line[line.find("megaemb "):] for line in stderr.splitlines() if "error:" in line]


@pytest.fixture
def listening_port():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        yield s.getsockname()[1]


# ------------------------------------------------------------------ environment -> plan (unit)

@pytest.mark.timeout(10)
def test_one_rank_or_already_a_rank_runs_here():
    assert launcher.launch_plan({}) is None
    assert launcher.launch_plan({"NPROC_PER_NODE": "1"}) is None
    assert launcher.launch_plan({"NPROC_PER_NODE": "two", "LOCAL_RANK": "0"}) is None  # a rank


@pytest.mark.timeout(10)
def test_single_node_picks_a_free_port():
    plan = launcher.launch_plan({"NPROC_PER_NODE": "2"})
    assert (plan.nproc_per_node, plan.nnodes, plan.node_rank, plan.master_addr) == (2, 1, 0, "127.0.0.1")
    assert 0 < plan.master_port < 65536 and launcher.port_is_free(plan.master_port)
    assert launcher.launch_plan({"NPROC_PER_NODE": "2", "MASTER_PORT": ""}).master_port > 0
    ports = {launcher.launch_plan({"NPROC_PER_NODE": "2"}).master_port for _ in range(5)}
    assert len(ports) > 1  # not a fixed default: two jobs on one machine do not collide


@pytest.mark.timeout(10)
def test_multi_node_values_and_default_port():
    env = {"NPROC_PER_NODE": "8", "NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "10.0.0.1"}
    assert launcher.launch_plan(env) == launcher.Plan(8, 4, 3, "10.0.0.1", 29500)
    slurm = {"NPROC_PER_NODE": "8", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "MASTER_ADDR": "h0",
             "MASTER_PORT": "12345"}
    assert launcher.launch_plan(slurm) == launcher.Plan(8, 2, 1, "h0", 12345)


DLC = {"MASTER_ADDR": "dlc1-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1",
       "NPROC_PER_NODE": "8"}  # PAI-DLC's injected variables on worker-0 of a 2-node job
SLURM = {"NPROC_PER_NODE": "8", "SLURM_NNODES": "3", "SLURM_NODEID": "2",
         "SLURM_JOB_NODELIST": "gpu[07-08,12]", "MASTER_PORT": "29511"}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("env, plan", [
    (DLC, launcher.Plan(8, 2, 1, "dlc1-master-0", 23456)),
    (SLURM, launcher.Plan(8, 3, 2, "gpu07", 29511)),
    (dict(SLURM, MASTER_ADDR="10.1.1.1"), launcher.Plan(8, 3, 2, "10.1.1.1", 29511)),
    # explicit variables win over DLC's and Slurm's; DLC's over Slurm's
    (dict(DLC, **SLURM, NNODES="4", NODE_RANK="3"), launcher.Plan(8, 4, 3, "dlc1-master-0", 29511)),
    (dict(SLURM, **DLC), launcher.Plan(8, 2, 1, "dlc1-master-0", 23456)),
    # a single DLC node: its own port is kept
    (dict(DLC, WORLD_SIZE="1", RANK="0"), launcher.Plan(8, 1, 0, "dlc1-master-0", 23456)),
])
def test_scheduler_environments(env, plan):
    got = launcher.launch_plan(env)
    assert got == plan
    assert got.torchrun_argv() == [
        "torchrun", f"--nnodes={plan.nnodes}", f"--node_rank={plan.node_rank}",
        f"--nproc_per_node={plan.nproc_per_node}", f"--master_addr={plan.master_addr}",
        f"--master_port={plan.master_port}", "--rdzv_backend=static", "--rdzv_conf=timeout=600",
        "--max_restarts=0"]


@pytest.mark.timeout(10)
def test_exact_torchrun_argv_for_dlc_worker():
    env = dict(DLC, RDZV_TIMEOUT="90")
    assert launcher.launch_plan(env).torchrun_argv() == [
        "torchrun", "--nnodes=2", "--node_rank=1", "--nproc_per_node=8",
        "--master_addr=dlc1-master-0", "--master_port=23456", "--rdzv_backend=static",
        "--rdzv_conf=timeout=90", "--max_restarts=0"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("nodelist, first", [
    ("gpu[07-09,12],cpu1", "gpu07"), ("node1", "node1"), ("h0,h1", "h0"),
    ("rack1-n[001-004]", "rack1-n001"), ("a[1-2]-ib[3-4]", "a1-ib3"), ("n[5,1-3]", "n5")])
def test_slurm_first_host(nodelist, first):
    assert launcher.first_host(nodelist) == first


@pytest.mark.timeout(10)
@pytest.mark.parametrize("nodelist", ["node[", "   ", "node1 node2", ""])
def test_bad_slurm_nodelist_names_the_variable(nodelist):
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST="):
        launcher.first_host(nodelist)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("env, message", [
    ({"NPROC_PER_NODE": "2", "WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "m"},
     "RANK='2': expected an integer from 0 to 1"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE='two': expected a positive integer"),
    ({"NPROC_PER_NODE": "0"}, "NPROC_PER_NODE='0': expected a positive integer"),
    ({"NPROC_PER_NODE": "-2"}, "NPROC_PER_NODE='-2': expected a positive integer"),
    ({"NPROC_PER_NODE": "2", "NNODES": "1.5"}, "NNODES='1.5': expected a positive integer"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"},
     "NODE_RANK='2': expected an integer from 0 to 1"),
    ({"NPROC_PER_NODE": "2", "NODE_RANK": "x"}, "NODE_RANK='x': expected an integer from 0 to 0"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "1"}, "NNODES=2 needs MASTER_ADDR"),
    ({"NPROC_PER_NODE": "2", "MASTER_PORT": "70000"}, "MASTER_PORT='70000': expected an integer from 1"),
    ({"NPROC_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_NODEID": "n1", "MASTER_ADDR": "h"},
     "SLURM_NODEID='n1': expected an integer from 0 to 1"),
])
def test_bad_values_are_rejected(env, message):
    with pytest.raises(ValueError) as e:
        launcher.launch_plan(env)
    assert str(e.value).startswith(message)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("env, message", [
    # the hang: a stray WORLD_SIZE (torch then waits for a second rank forever)
    ({"WORLD_SIZE": "2", "NPROC_PER_NODE": "1"}, "WORLD_SIZE=2 needs MASTER_ADDR"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 needs MASTER_ADDR"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "h0"}, "WORLD_SIZE=2 needs RANK (this node's rank, 0 to 1)"),
    ({"RANK": "1"}, "RANK='1': expected an integer from 0 to 0"),
    ({"NNODES": "1", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 but this is the job's only process"),
    ({"NNODES": "1", "RANK": "1"}, "RANK=1 but this is the job's only process"),
    ({"SLURM_NNODES": "1", "SLURM_NODEID": "0", "WORLD_SIZE": "4"}, "WORLD_SIZE=4 needs MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "h0", "NPROC_PER_NODE": "2"}, "NNODES=2 needs NODE_RANK"),
])
def test_environment_that_cannot_describe_the_job_is_rejected(env, message):
    with pytest.raises(ValueError) as e:
        launcher.launch_plan(env)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.timeout(10)
def test_a_world_of_one_may_say_so():
    assert launcher.launch_plan({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert launcher.launch_plan({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "h0"}) is None
    assert launcher.launch_plan({"NNODES": "1", "NODE_RANK": "0", "WORLD_SIZE": "1"}) is None


@pytest.mark.timeout(10)
def test_rank_environment_must_name_its_rendezvous():
    """A rank (LOCAL_RANK set by hand or a launcher) of several: no made-up port to wait on."""
    with pytest.raises(ValueError, match=r"^WORLD_SIZE=2 \(a rank of 2\) needs RANK, MASTER_ADDR, MASTER_PORT;"):
        launcher.check_rank_env({"LOCAL_RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"^WORLD_SIZE=2 \(a rank of 2\) needs MASTER_PORT;"):
        launcher.check_rank_env({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h0"})
    full = {"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29500"}
    with pytest.raises(ValueError, match="RANK='2': expected an integer from 0 to 1"):
        launcher.check_rank_env(dict(full, RANK="2"))
    launcher.check_rank_env(full)
    launcher.check_rank_env({"LOCAL_RANK": "0"})


@pytest.mark.timeout(60)
def test_cli_stray_world_size_is_one_line_not_a_hang(tiny_models, tmp_path):
    """A valid command (before: it waited, silent, for a second rank that never came)."""
    texts = tmp_path / "t.txt"
    texts.write_text("a\n")
    t0 = time.time()
    r = megaemb("embed", "--model", tiny_models["dense"], "--input", str(texts), "--output",
                str(tmp_path / "e.npy"), WORLD_SIZE="2", NPROC_PER_NODE="1", timeout=50)
    assert r.returncode == 2 and time.time() - t0 < 30, r.stderr[-2000:]
    assert r.stderr.strip() == ("megaemb embed: error: WORLD_SIZE=2 needs MASTER_ADDR (the address of node "
                                  "rank 0); WORLD_SIZE and RANK count nodes here (PAI-DLC): unset them "
                                  "for one node")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("rank", ["0", "1"])
def test_rank_whose_peers_never_come_says_so_and_stops(tiny_models, tmp_path, rank):
    """A rank as an external launcher (or a hand-set environment) starts it, its peer missing:
    it says where and for whom it waits, then stops after RDZV_TIMEOUT with one line."""
    texts = tmp_path / "t.txt"
    texts.write_text("a\n")
    port = _free_port()
    t0 = time.time()
    r = megaemb("embed", "--model", tiny_models["dense"], "--input", str(texts), "--output",
                str(tmp_path / "e.npy"), LOCAL_RANK="0", RANK=rank, WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RDZV_TIMEOUT="3")
    assert r.returncode == 2 and time.time() - t0 < 60, r.stderr[-2000:]
    assert r.stderr.startswith(f"megaemb: rank {rank} of 2 (RANK, WORLD_SIZE): waiting up to 3 s "
                               f"(RDZV_TIMEOUT) for all 2 ranks to join 127.0.0.1:{port}"), r.stderr[-2000:]
    assert error_lines(r.stderr) == [
        f"megaemb embed: error: rank {rank} of 2 (RANK, WORLD_SIZE): not all ranks joined "
        f"127.0.0.1:{port} (MASTER_ADDR, MASTER_PORT) within 3 s (RDZV_TIMEOUT); start every "
        "rank, or unset WORLD_SIZE and RANK to run alone"], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "frame #" not in r.stderr, r.stderr[-2000:]
    assert len(r.stderr.splitlines()) == 2, r.stderr[-2000:]


@pytest.mark.timeout(180)
def test_external_torchrun_ranks_join_and_say_it_once(tiny_models, tmp_path):
    """Ranks of a plain ``torchrun`` (its agent store, not megaemb's launcher): they join, local
    rank 0 alone says what it waits for, and the job's result is right."""
    texts = tmp_path / "t.txt"
    texts.write_text("one text\nanother text\n")
    out = tmp_path / "e.npy"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={_free_port()}", "-m", "megaemb.cli", "embed", "--model",
                        tiny_models["dense"], "--input", str(texts), "--output", str(out),
                        "--tensor_model_parallel_size", "2"], capture_output=True, text=True,
                       env=clean_env(RDZV_TIMEOUT="60"), timeout=150, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [line for line in r.stderr.splitlines() if "(RDZV_TIMEOUT) for all 2 ranks to join" in line]
    assert len(notes) == 1 and notes[0].startswith("megaemb: rank 0 of 2"), r.stderr[-3000:]
    import numpy as np

    assert np.load(out).shape == (2, 64)


@pytest.mark.timeout(10)
def test_busy_port_is_rejected_on_node_zero_only(listening_port):
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(listening_port)}
    with pytest.raises(ValueError, match=f"MASTER_PORT={listening_port} is already in use"):
        launcher.launch_plan(env)
    other_node = dict(env, NNODES="2", NODE_RANK="1", MASTER_ADDR="h0")
    assert launcher.launch_plan(other_node).master_port == listening_port


# ------------------------------------------------------------------ CLI: one line, before ranks

@pytest.mark.timeout(60)
def test_cli_bad_nproc_is_one_line():
    r = megaemb("sft", "--model", "m", "--dataset", "d.jsonl", NPROC_PER_NODE="two")
    assert r.returncode == 2
    assert r.stderr.strip() == "megaemb sft: error: NPROC_PER_NODE='two': expected a positive integer"


@pytest.mark.timeout(60)
def test_cli_busy_master_port_is_one_line(listening_port):
    r = megaemb("sft", "--model", "m", "--dataset", "d.jsonl", NPROC_PER_NODE="2",
                MASTER_PORT=str(listening_port))
    assert r.returncode == 2
    assert r.stderr.strip() == (f"megaemb sft: error: MASTER_PORT={listening_port} is already in use; "
                                "set MASTER_PORT to a free port, or unset it on a single node to pick one")


@pytest.mark.timeout(120)
def test_user_error_on_every_rank_is_printed_once(tiny_models, tmp_path):
    """A bad data row: found by every rank (rows are read on the ranks), reported once."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "response": ""}\n')
    r = megaemb("sft", "--model", tiny_models["dense"], "--dataset", str(bad), "--train_iters", "2",
                "--max_length", "32", "--micro_batch_size", "2", "--global_batch_size", "4",
                NPROC_PER_NODE="2")
    assert r.returncode == 2, r.stderr[-3000:]
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"megaemb sft: error: {bad}:1"), r.stderr[-3000:]
    for noise in ("Traceback", "ChildFailedError", "torch.distributed"):
        assert noise not in r.stderr, r.stderr[-3000:]


# ------------------------------------------------------------------ two nodes on one machine

def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("", 0))
        return str(s.getsockname()[1])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("node_rank", ["0", "1"])
def test_missing_node_times_out_with_a_message(tiny_models, tmp_path, node_rank):
    texts = tmp_path / "t.txt"
    texts.write_text("a\n")
    t0 = time.time()
    r = megaemb("embed", "--model", tiny_models["dense"], "--input", str(texts), "--output",
                str(tmp_path / "e.npy"), NPROC_PER_NODE="1", NNODES="2", NODE_RANK=node_rank,
                MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port(), RDZV_TIMEOUT="4")
    assert r.returncode == 1 and time.time() - t0 < 40, r.stderr[-2000:]
    assert f"node {node_rank} of 2: waiting up to 4 s (RDZV_TIMEOUT) for all 2 nodes" in r.stderr
    assert error_lines(r.stderr) == [error_lines(r.stderr)[0]] and \
        "rendezvous: not all 2 nodes joined 127.0.0.1:" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "frame #" not in r.stderr, r.stderr[-2000:]


def _sft_args(model, save):
    return ["sft", "--model", model, "--dataset", f"{DATA}#32", "--max_length", "24",
            "--micro_batch_size", "1", "--global_batch_size", "4", "--train_iters", "3",
            "--tensor_model_parallel_size", "2", "--log_interval", "1", "--lr", "1e-4",
            "--save", save]


def _losses(stdout: str) -> list[str]:
    return [line.split(" lr ")[0] for line in stdout.splitlines() if line.startswith("step ")]


@pytest.mark.timeout(420)
def test_two_nodes_on_one_machine_equal_one_node(tiny_models, tmp_path):
    """NNODES=2 x 2 ranks (TP=2 x DP=2) through two launchers on localhost: the same losses
    and the same final weights as one node of 4 ranks."""
    from hf_reference import assert_same_weights

    model = tiny_models["dense"]
    one = megaemb(*_sft_args(model, str(tmp_path / "one")), NPROC_PER_NODE="4", timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    env = dict(NPROC_PER_NODE="2", NNODES="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=_free_port())
    nodes = [subprocess.Popen([sys.executable, "-m", "megaemb.cli", *_sft_args(model, str(tmp_path / "two"))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=clean_env(NODE_RANK=str(rank), **env)) for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            p.kill()
    assert [p.returncode for p in nodes] == [0, 0], [err[-3000:] for _, err in outs]
    assert len(_losses(one.stdout)) == 3 and _losses(outs[0][0]) == _losses(one.stdout), \
        (_losses(outs[0][0]), _losses(one.stdout))
    assert_same_weights(os.path.join(tmp_path, "one", "hf_model"), os.path.join(tmp_path, "two", "hf_model"))


# ------------------------------------------------------------------ parent death (helpers)

SLEEPER = ("import os, sys, time; from megaemb import launcher; launcher.die_with_parent(); "
           "print(os.getpid(), flush=True); time.sleep(120)")


def _alive(procs) -> list:
    """The processes still running (zombies count as gone; a reused pid is not ours)."""
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _gone(procs, timeout: float) -> bool:
    """Whether every process is gone within ``timeout`` seconds."""
    deadline = time.time() + timeout
    while _alive(procs) and time.time() < deadline:
        time.sleep(0.2)
    return not _alive(procs)


def _kill(procs) -> None:
    for p in _alive(procs):
        p.kill()


@pytest.mark.timeout(60)
def test_child_env_child_dies_with_its_parent():
    """As rank 0's HF-export subprocess: its parent is SIGKILLed, the child follows."""
    parent_code = ("import subprocess, sys, time; from megaemb import launcher; "
                   f"subprocess.Popen([sys.executable, '-c', {SLEEPER!r}], env=launcher.child_env()); "
                   "time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], env=clean_env(),
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        child = int(parent.stdout.readline())
        assert psutil.Process(child).ppid() == parent.pid
        parent.kill()
        assert _gone([psutil.Process(child)], 10)
    finally:
        parent.kill()
        parent.wait()


@pytest.mark.timeout(60)
def test_parent_gone_before_prctl_kills_the_child():
    """The race: the announced parent is not (or no longer) this process's parent."""
    env = clean_env(**{launcher.PARENT_PID_ENV: "1" if os.getpid() != 1 else "2"})
    r = subprocess.run([sys.executable, "-c", SLEEPER], env=env, cwd=ROOT, timeout=30,
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL and r.stdout == ""


@pytest.mark.timeout(60)
def test_rank_death_takes_its_process_group():
    """A rank (new session, as torchelastic starts it) SIGKILLed: what it started dies too."""
    code = ("import os, subprocess, time; from megaemb import launcher; launcher.die_with_parent(); "
            "p = subprocess.Popen(['sleep', '120']); print(p.pid, flush=True); time.sleep(120)")
    env = clean_env(**{launcher.PARENT_PID_ENV: str(os.getpid())})
    rank = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, start_new_session=True)
    try:
        grandchild = psutil.Process(int(rank.stdout.readline()))
        rank.kill()
        assert _gone([grandchild], 10)
    finally:
        rank.kill()
        rank.wait()


# ------------------------------------------------------------------ killing a real training job

def _start_training(model, save, tmp_path):
    """A 2-rank run that saves every 2 steps, returned once its first save is complete. Bounded
    (60 steps) so a test that fails before killing it cannot fill the disk; killed here on
    any failure."""
    args = ["sft", "--model", model, "--dataset", f"{DATA}#64", "--train_iters", "60",
            "--max_length", "32", "--micro_batch_size", "2", "--global_batch_size", "4",
            "--log_interval", "1", "--save", str(save), "--save_interval", "2"]
    out, err = open(tmp_path / "out.txt", "w"), open(tmp_path / "err.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "megaemb.cli", *args], stdout=out, stderr=err,
                            env=clean_env(NPROC_PER_NODE="2"), cwd=ROOT)
    try:
        tracker = save / "latest_checkpointed_iteration.txt"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not tracker.is_file():
            time.sleep(0.1)
        assert proc.poll() is None, (tmp_path / "err.txt").read_text()[-3000:]
        assert tracker.is_file(), "no checkpoint within 120 s"
        job = psutil.Process(proc.pid).children(recursive=True)
        ranks = [p for p in job if p.ppid() == proc.pid and "megaemb.cli" in " ".join(p.cmdline())]
        assert len(ranks) == 2, [p.cmdline() for p in job]  # the two ranks
        return proc, job
    except BaseException:
        _kill(psutil.Process(proc.pid).children(recursive=True))
        proc.kill()
        raise


def _snapshot(save):
    return sorted(os.listdir(save)), (save / "latest_checkpointed_iteration.txt").read_text()


@pytest.mark.timeout(180)
def test_sigkill_to_launcher_leaves_no_rank(tiny_models, tmp_path):
    save = tmp_path / "run"
    proc, job = _start_training(tiny_models["dense"], save, tmp_path)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _gone(job, 30), [p.cmdline() for p in _alive(job)]
        before = _snapshot(save)
        time.sleep(3)
        assert _snapshot(save) == before  # no rank goes on saving
    finally:
        _kill(job)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_launcher_stops_the_job(tiny_models, tmp_path, sig):
    """SIGTERM (exit 143) or SIGINT (Ctrl-C, 130): ranks stopped, one line, no traceback."""
    save = tmp_path / "run"
    proc, job = _start_training(tiny_models["dense"], save, tmp_path)
    try:
        proc.send_signal(sig)
        assert proc.wait(60) == 128 + sig
        assert _gone(job, 30)
        err = (tmp_path / "err.txt").read_text()
        assert err.count("stopped by") == 1 and f"megaemb sft: stopped by {sig.name}\n" in err, err[-3000:]
        for noise in ("Traceback", "KeyboardInterrupt", "torch.distributed"):
            assert noise not in err, err[-3000:]
    finally:
        _kill(job)


@pytest.mark.timeout(180)
def test_crashed_rank_is_named_once(tiny_models, tmp_path):
    """One rank SIGKILLed (as by the OOM killer): the launcher names it in one line, exit 1."""
    proc, job = _start_training(tiny_models["dense"], tmp_path / "run", tmp_path)
    try:
        rank1 = next(p for p in job if p.ppid() == proc.pid and p.environ().get("RANK") == "1")
        rank1.kill()
        assert proc.wait(60) == 1
        assert _gone(job, 30)
        err = (tmp_path / "err.txt").read_text()
        assert error_lines(err) == ["megaemb sft: error: rank 1 killed by SIGKILL"], err[-3000:]
        assert "ChildFailedError" not in err and "torch.distributed.elastic" not in err, err[-3000:]
    finally:
        _kill(job)


@pytest.mark.timeout(180)
def test_sigkill_of_single_process_run_leaves_nothing(tiny_models, tmp_path):
    """One process, no launcher: megatron's checkpoint-writer processes and the HF export child
    die with it (they are watched by pid: the process group is the caller's)."""
    save = tmp_path / "run"
    args = ["sft", "--model", tiny_models["dense"], "--dataset", f"{DATA}#64", "--train_iters", "1",
            "--max_length", "32", "--micro_batch_size", "2", "--global_batch_size", "4", "--save", str(save)]
    out = open(tmp_path / "out.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "megaemb.cli", *args], stdout=out,
                            stderr=subprocess.STDOUT, env=clean_env(), cwd=ROOT)
    def descendants():
        try:
            return psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def exporting(p):
        with contextlib.suppress(psutil.Error):
            return "export" in p.cmdline()
        return False

    deadline, job = time.time() + 120, []
    try:
        while time.time() < deadline and proc.poll() is None:  # kill during the HF export
            if any(exporting(p) for p in descendants()):
                break
            time.sleep(0.05)
        time.sleep(0.6)  # the watcher polls every 0.5 s
        job = descendants()
        assert any(exporting(p) for p in job), (tmp_path / "out.txt").read_text()[-3000:]
        proc.kill()
        proc.wait(10)
        assert _gone(job, 20), [p.cmdline() for p in _alive(job)]
    finally:
        _kill(job)
        if proc.poll() is None:
            proc.kill()


# ------------------------------------------------------------------ joining: bounded, one line

_JOIN = ("import sys, torch.distributed as dist\n"
         "from megaemb import parallel\n"
         "try:\n"
         "    parallel._join(30)\n"
         "except (ValueError, TimeoutError) as e:\n"
         "    print(f'{type(e).__name__}: {e}'); sys.exit(2)\n"
         "print('world', dist.get_world_size())\n")


def _join_alone(**env) -> subprocess.CompletedProcess:
    """``parallel._join`` in a fresh process with ``env`` (what ``init_parallel`` leaves)."""
    full = clean_env(PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])), **env)
    return subprocess.run([sys.executable, "-c", _JOIN], env=full, capture_output=True, text=True,
                          timeout=90, cwd=ROOT)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("addr", ["nosuchhost.invalid", "10.255.255.1", "127.0.0.1"])
def test_a_world_of_one_joins_locally(addr):
    """A single process ignores a MASTER_ADDR / MASTER_PORT left in its environment (no peer
    reads them): an unresolvable or unreachable host, or a busy port, waited forever or failed
    with a traceback; it now joins a store of its own on 127.0.0.1."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = _join_alone(WORLD_SIZE="1", RANK="0", MASTER_ADDR=addr, MASTER_PORT=str(busy.getsockname()[1]))
    assert r.returncode == 0 and "world 1" in r.stdout, (r.stdout, r.stderr[-2000:])


@pytest.mark.timeout(120)
def test_rank_0_on_a_busy_master_port_is_one_line():
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        r = _join_alone(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                        RDZV_TIMEOUT="20")
    assert r.returncode == 2 and r.stdout.startswith(f"ValueError: MASTER_PORT={port} is already in use"), \
        (r.stdout, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.timeout(120)
def test_a_master_port_that_is_not_a_rendezvous_says_what_to_check():
    """Rank 1 pointed at a port where another service answers: one line naming MASTER_ADDR and
    MASTER_PORT (was torch's "Ping failed, invalid value returned from server")."""
    import threading

    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()

        def answer_garbage():
            while True:
                try:
                    conn, _ = other.accept()
                except OSError:
                    return
                with conn:
                    try:
                        conn.recv(64)
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
                    except OSError:
                        pass

        threading.Thread(target=answer_garbage, daemon=True).start()
        r = _join_alone(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(other.getsockname()[1]), RDZV_TIMEOUT="20")
    assert r.returncode == 2 and "not as a megaemb rendezvous" in r.stdout and \
        "MASTER_ADDR and MASTER_PORT" in r.stdout, (r.stdout, r.stderr[-2000:])
