"""Run as one rank, or start the ranks: the environment decides, as in Megatron-SWIFT.

``NPROC_PER_NODE`` is the number of ranks on this node. The nodes of the job and the
rendezvous come from the first of these that is present (``node_topology``):

==============  ==============================  ================  =========================
source          nodes / this node's rank        rendezvous host   port
==============  ==============================  ================  =========================
explicit        ``NNODES`` / ``NODE_RANK``      ``MASTER_ADDR``   ``MASTER_PORT``
PAI-DLC         ``WORLD_SIZE`` / ``RANK``       ``MASTER_ADDR``   ``MASTER_PORT``
Slurm           ``SLURM_NNODES`` /              first host of     ``MASTER_PORT``
                ``SLURM_NODEID``                ``SLURM_JOB_NODELIST``
==============  ==============================  ================  =========================

PAI-DLC injects, per node, ``MASTER_ADDR``/``MASTER_PORT`` (the master node's service), and
``WORLD_SIZE``/``RANK`` counting *nodes*, not processes, plus ``NPROC_PER_NODE`` (GPUs per
node) — Alibaba Cloud, "Platform for AI: Built-in environment variables",
https://www.alibabacloud.com/help/en/pai/general-environment-variables . It is recognised by
``WORLD_SIZE`` or ``RANK`` without ``LOCAL_RANK`` (a rank started by a launcher always has
``LOCAL_RANK``). ``MASTER_PORT`` unset: a free port on one node, else 29500.

An environment that cannot describe a whole job is a one-line error, not a wait for peers
that never come: several nodes without ``MASTER_ADDR`` or without this node's rank, and a
process that runs alone (one node, ``NPROC_PER_NODE=1``) with a ``WORLD_SIZE`` other than 1 or
a ``RANK`` other than 0 (torch would read them). A rank joins its peers within
``RDZV_TIMEOUT`` seconds (``megaemb.parallel``), saying first where and for whom it waits.

If this process is not already a rank (no ``LOCAL_RANK``) and more than one rank is asked
for, this process becomes the torchelastic agent of its node and starts the ranks.

Design:

- **In-process agent.** ``relaunch`` calls torch's own launcher API
  (``elastic_launch(LaunchConfig(...), sys.executable)("-m", "megaemb.cli", *argv)``, what
  ``torchrun`` does after parsing its flags) instead of running ``torchrun`` as a child. The
  ranks are therefore children of the ``megaemb`` process itself, no process sits in between,
  and failures (``ChildFailedError``) and signals (``SignalException``) reach this module as
  exceptions. torchelastic's log lines are silenced unless ``LOGLEVEL`` is set.
- **Ranks die with their launcher.** The launcher exports ``MEGAEMB_PARENT_PID``; every
  ``megaemb`` process calls ``die_with_parent()`` first thing, which sets
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` and then checks ``getppid()`` against that pid (the
  parent may have died before the prctl). Rank 0's HF-export subprocess gets the same through
  ``child_env()``. Each rank also forks a watcher that SIGKILLs the rank's process group when
  the rank dies: what the rank started (megatron's checkpoint writer processes, their
  multiprocessing manager) dies with it. So ``kill -9`` of the launcher leaves no process of
  the job. Linux only; elsewhere it is a no-op.
- **Signals stop the job.** SIGTERM/SIGINT/SIGHUP/SIGQUIT to the launcher: torchelastic sends
  the same signal to the ranks (SIGKILL after 30 s; ranks die of SIGINT quietly, no
  KeyboardInterrupt), then this module prints one line
  ``megaemb <cmd>: stopped by SIGTERM`` and exits ``128 + signum`` (143 for SIGTERM).
- **Errors printed once.** The launcher exports ``MEGAEMB_ERROR_DIR``; a rank failing with a
  user error writes its one line there (``report_error``) and exits 2 silently. When the job
  fails the launcher prints the lowest rank's line and exits 2; if no rank left a line (a
  crash), it prints ``rank N exited with code X`` / ``rank N killed by SIGKILL`` for the first
  rank that failed (its traceback, if any, is already on stderr above) and exits 1. Ranks
  started by an external ``torchrun`` (no error directory) each print their own error: a
  failure seen only on one rank is then not lost.
- **Ports.** On one node with ``MASTER_PORT`` unset a free port is picked (two jobs on one
  machine do not collide; the port is free when checked, a race with another program binding
  it in the next second remains). A ``MASTER_PORT`` in use on node rank 0 (the rendezvous
  host) is reported before any rank starts.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass

from megaemb.outputs import atomic_file

PARENT_PID_ENV = "MEGAEMB_PARENT_PID"
ERROR_DIR_ENV = "MEGAEMB_ERROR_DIR"
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class Plan:
    """Ranks to start on this node and where the job's rendezvous is."""

    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    rdzv_timeout: int = 600  # seconds the nodes wait for each other (RDZV_TIMEOUT)

    def torchrun_argv(self) -> list[str]:
        """The ``torchrun`` command this plan equals (``relaunch`` runs its launcher API)."""
        return ["torchrun", f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}",
                f"--nproc_per_node={self.nproc_per_node}", f"--master_addr={self.master_addr}",
                f"--master_port={self.master_port}", "--rdzv_backend=static",
                f"--rdzv_conf=timeout={self.rdzv_timeout}", "--max_restarts=0"]


def launch_plan(env=os.environ) -> Plan | None:
    """The ranks to start, or None when this process should just run (one rank, or a rank).

    Raises ``ValueError`` (one line) for a malformed variable or a busy ``MASTER_PORT``."""
    if "LOCAL_RANK" in env:
        return None
    nproc = _positive_int(env, "NPROC_PER_NODE", 1)
    nnodes, node_rank, addr = node_topology(env)
    if nproc * nnodes <= 1:
        _check_alone(env)
        return None
    if env.get("MASTER_PORT"):
        port = _int_in(env, "MASTER_PORT", 0, 65536, low=1)
    else:
        port = _free_port() if nnodes == 1 else DEFAULT_PORT
    if node_rank == 0 and not port_is_free(port):
        raise ValueError(f"MASTER_PORT={port} is already in use; set MASTER_PORT to a free port, "
                         "or unset it on a single node to pick one")
    return Plan(nproc, nnodes, node_rank, addr, port, rdzv_timeout(env))


def rdzv_timeout(env=os.environ) -> int:
    """Seconds to wait for the job's other nodes or ranks to join (``RDZV_TIMEOUT``, 600)."""
    return _positive_int(env, "RDZV_TIMEOUT", Plan.rdzv_timeout)


def _check_alone(env) -> None:
    """A process that runs the command by itself is a world of one: a ``WORLD_SIZE`` or
    ``RANK`` left in the environment (torch would read them and wait for peers that never
    come) must say so, else ``ValueError``."""
    for name, alone in (("WORLD_SIZE", 1), ("RANK", 0)):
        text = env.get(name)
        if text and text.strip() != str(alone):
            raise ValueError(f"{name}={text} but this is the job's only process (NPROC_PER_NODE="
                             f"{env.get('NPROC_PER_NODE') or 1}, one node): unset {name}, or describe "
                             "the whole job (NNODES, NODE_RANK, MASTER_ADDR; or PAI-DLC's WORLD_SIZE, "
                             "RANK, MASTER_ADDR)")


def node_topology(env=os.environ) -> tuple[int, int, str]:
    """``(nodes, this node's rank, rendezvous host)`` from the first source present: explicit
    ``NNODES``/``NODE_RANK``, PAI-DLC, Slurm, else one node on 127.0.0.1 (module docstring)."""
    if env.get("NNODES") or env.get("NODE_RANK"):
        nodes_var, rank_var = "NNODES", "NODE_RANK"
    elif env.get("WORLD_SIZE") or env.get("RANK"):
        nodes_var, rank_var = "WORLD_SIZE", "RANK"  # PAI-DLC: both count nodes
    elif env.get("SLURM_NNODES"):
        nodes_var, rank_var = "SLURM_NNODES", "SLURM_NODEID"
    else:
        return 1, 0, env.get("MASTER_ADDR") or "127.0.0.1"
    nnodes = _positive_int(env, nodes_var, 1)
    node_rank = _int_in(env, rank_var, 0, nnodes)
    addr = env.get("MASTER_ADDR")
    if not addr and env.get("SLURM_JOB_NODELIST") and nodes_var == "SLURM_NNODES":
        addr = first_host(env["SLURM_JOB_NODELIST"])
    hint = "; WORLD_SIZE and RANK count nodes here (PAI-DLC): unset them for one node" \
        if nodes_var == "WORLD_SIZE" else ""
    if nnodes > 1 and not addr:
        raise ValueError(f"{nodes_var}={nnodes} needs MASTER_ADDR (the address of node rank 0){hint}")
    if nnodes > 1 and not env.get(rank_var):
        raise ValueError(f"{nodes_var}={nnodes} needs {rank_var} (this node's rank, 0 to {nnodes - 1}){hint}")
    return nnodes, node_rank, addr or "127.0.0.1"


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[07-09,12],cpu1`` -> ``gpu07`` (what
    ``scontrol show hostnames | head -n 1`` prints; zero padding kept)."""
    host, depth = "", 0
    for i, ch in enumerate(nodelist):
        if ch == "," and depth == 0:
            break
        if ch == "[":
            depth += 1
            close = nodelist.find("]", i)
            if close < 0:
                raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: unclosed '['")
            host += nodelist[i + 1:close].split(",")[0].split("-")[0]
        elif ch == "]":
            depth -= 1
        elif depth == 0:
            host += ch
    if not host.strip() or any(c.isspace() for c in host):
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: expected hosts like gpu[01-04],cpu1")
    return host


def _positive_int(env, name: str, default: int) -> int:
    """``env[name]`` as an integer >= 1 (``default`` when unset)."""
    return _int_in(env, name, default, None, low=1, what="a positive integer")


def _int_in(env, name: str, default: int, high: int | None, low: int = 0,
            what: str | None = None) -> int:
    """``env[name]`` as an integer in ``[low, high)``, else ``ValueError`` naming the variable."""
    text = env.get(name)
    if text is None or text == "":
        return default
    what = what or f"an integer from {low} to {high - 1}"
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected {what}") from None
    if value < low or (high is not None and value >= high):
        raise ValueError(f"{name}={text!r}: expected {what}")
    return value


def _free_port() -> int:
    """A TCP port nobody listens on now (the kernel's choice)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether the rendezvous store could listen on ``port`` (same ``SO_REUSEADDR`` as it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


# ---------------------------------------------------------------- the launcher (agent) side
def relaunch(plan: Plan, argv: list[str]) -> int:
    """Run ``megaemb <argv>`` on ``plan.nproc_per_node`` ranks of this node; the exit code.

    Prints at most one line of its own: the first rank's user error, a crashed rank, or the
    signal that stopped the job."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    command = f"megaemb {argv[0] if argv else ''}".strip()
    _quiet_torchelastic()
    if plan.nproc_per_node > 1:
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: ranks share the cores
    error_dir = tempfile.mkdtemp(prefix="megaemb-errors-")  # also holds torchelastic's log dir
    config = LaunchConfig(
        min_nodes=plan.nnodes, max_nodes=plan.nnodes, nproc_per_node=plan.nproc_per_node,
        run_id="megaemb", rdzv_backend="static",
        rdzv_endpoint=f"{plan.master_addr}:{plan.master_port}",
        rdzv_configs={"rank": plan.node_rank, "timeout": plan.rdzv_timeout}, max_restarts=0,
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(error_dir, "torchelastic")))
    saved = {k: os.environ.get(k) for k in (PARENT_PID_ENV, ERROR_DIR_ENV)}
    os.environ.update({PARENT_PID_ENV: str(os.getpid()), ERROR_DIR_ENV: error_dir})
    previous = {s: signal.signal(s, _raise_signal_exception) for s in (signal.SIGTERM, signal.SIGINT)}
    from megaemb import platform

    shm = platform.shm_problem() if platform.has_cuda() and plan.nproc_per_node > 1 else None
    if shm and os.environ.get("NCCL_SHM_DISABLE") != "1":
        print(f"{command}: warning: {shm}", file=sys.stderr, flush=True)
    if plan.nnodes > 1:
        print(f"{command}: node {plan.node_rank} of {plan.nnodes}: waiting up to "
              f"{plan.rdzv_timeout} s (RDZV_TIMEOUT) for all {plan.nnodes} nodes to join "
              f"{plan.master_addr}:{plan.master_port} (as {' '.join(plan.torchrun_argv())})",
              file=sys.stderr, flush=True)
    try:
        if plan.node_rank > 0:
            wait_for_port(plan.master_addr, plan.master_port, plan.rdzv_timeout)
        elastic_launch(config, sys.executable)("-m", "megaemb.cli", *argv)
        return 0
    except SignalException as e:
        print(f"{command}: stopped by {signal.Signals(e.sigval).name}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        line, code = _failure_line(command, e, error_dir)
        print(line, file=sys.stderr, flush=True)
        return code
    except Exception as e:  # rendezvous errors and the like: one line, not torch's traceback
        if plan.nnodes > 1 and is_timeout(e):
            print(f"{command}: error: rendezvous: not all {plan.nnodes} nodes joined "
                  f"{plan.master_addr}:{plan.master_port} within {plan.rdzv_timeout} s (this is "
                  f"node {plan.node_rank}; start every node with the same NNODES, MASTER_ADDR and "
                  "MASTER_PORT, or raise RDZV_TIMEOUT)", file=sys.stderr, flush=True)
        else:
            print(f"{command}: error: launcher: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr, flush=True)
        return 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(error_dir, ignore_errors=True)


def check_rank_env(env=os.environ) -> None:
    """A rank of several (``WORLD_SIZE`` > 1) must be told its rank and the rendezvous:
    ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` (else ``ValueError``; torch would wait, or
    megaemb would invent a port no peer knows)."""
    world = _positive_int(env, "WORLD_SIZE", 1)
    if world == 1:
        return
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} (a rank of {world}) needs {', '.join(missing)}; "
                         "unset WORLD_SIZE to run alone")
    _int_in(env, "RANK", 0, world)


def join_note(env=os.environ) -> str | None:
    """What a rank about to join its peers waits for, and where it read that: said by local
    rank 0 of each node started outside megaemb's own launcher (an external ``torchrun``, or
    variables set by hand); megaemb's launcher has said it already. None for one process."""
    world = int(env.get("WORLD_SIZE") or 1)
    if world <= 1 or ERROR_DIR_ENV in env or int(env.get("LOCAL_RANK") or 0) != 0:
        return None
    return (f"megaemb: rank {env.get('RANK', 0)} of {world} (RANK, WORLD_SIZE): waiting up to "
            f"{rdzv_timeout(env)} s (RDZV_TIMEOUT) for all {world} ranks to join "
            f"{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')} (MASTER_ADDR, MASTER_PORT)")


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Until node 0's rendezvous store listens (``TimeoutError`` after ``timeout_s``). The
    store's own client would wait too, but logs a C++ stack trace per failed try."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port} did not answer") from None
            time.sleep(1)


def is_timeout(error: BaseException) -> bool:
    """Whether the rendezvous store gave up waiting (its errors say "timed out"/"timeout")."""
    while error is not None:
        text = str(error).lower()
        if isinstance(error, TimeoutError) or "timed out" in text or "timeout" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _raise_signal_exception(signum, frame):
    """Until torchelastic installs its own handler: the same exception it raises."""
    from torch.distributed.elastic.multiprocessing import SignalException

    raise SignalException(f"Process {os.getpid()} got signal: {signum}", sigval=signal.Signals(signum))


def _quiet_torchelastic() -> None:
    """torchelastic logs every start, failure and shutdown to stderr; this module reports them
    in one line instead. ``LOGLEVEL=INFO`` (torchelastic's own variable) brings them back."""
    if os.environ.get("LOGLEVEL"):
        return
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        log = logging.getLogger(name)
        log.addHandler(logging.NullHandler())
        log.propagate = False


def _failure_line(command: str, error, error_dir: str) -> tuple[str, int]:
    """The line and exit code for a failed job: the lowest rank's user error as that rank wrote
    it (2), else the rank that crashed first (1). torchelastic lists the ranks it SIGTERMed
    after the first failure as failed too: those come last; in the same second a rank killed
    by a signal comes before one that exited (its peers then fail in their collectives)."""
    ranks = sorted(int(n[len("rank"):-len(".txt")]) for n in os.listdir(error_dir)
                   if n.startswith("rank") and n.endswith(".txt"))
    if ranks:
        with open(os.path.join(error_dir, f"rank{ranks[0]}.txt")) as f:
            return f.read().strip(), 2
    rank, failure = min(error.failures.items(),
                        key=lambda kv: (kv[1].exitcode == -signal.SIGTERM, kv[1].timestamp,
                                        kv[1].exitcode >= 0, kv[0]))
    if failure.exitcode < 0:
        return f"{command}: error: rank {rank} killed by {failure.signal_name()}", 1
    return f"{command}: error: rank {rank} exited with code {failure.exitcode}", 1


# ---------------------------------------------------------------- the rank (child) side
def die_with_parent() -> bool:
    """Make this process die (SIGKILL) when the process that started it dies, and with it
    whatever this process started (see ``_reap_group_on_exit``).

    Acts only when the parent announced itself in ``MEGAEMB_PARENT_PID`` (the launcher, or
    rank 0 for its export); the variable is then removed so this process's own children do
    not inherit it. SIGINT then ends this process quietly, as SIGTERM does: torchelastic
    forwards the launcher's SIGINT to the ranks, and a KeyboardInterrupt traceback per rank is
    noise. Parent death: Linux only (``prctl``)."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent is None:
        return False
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if not sys.platform.startswith("linux"):
        return True
    if not set_parent_death_signal(signal.SIGKILL, int(parent)):
        os.kill(os.getpid(), signal.SIGKILL)  # the parent died before the prctl took effect
    _reap_group_on_exit()
    return True


def set_parent_death_signal(sig: int, parent: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)``; False when ``parent`` is no longer our parent."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return os.getppid() == parent


def _reap_group_on_exit() -> None:
    """If this process leads its process group (torchelastic starts each rank in a new
    session), fork a watcher that SIGKILLs the group when this process dies, however it dies.

    The group holds what the rank started and that a parent-death signal does not reach:
    megatron's checkpoint writers and their multiprocessing manager (which ignores SIGINT, so
    torchelastic's ``killpg(SIGINT)`` leaves it running), the export child. Must run before
    any thread exists (it forks)."""
    leader = os.getpid()
    if os.getpgrp() != leader or os.fork():
        return
    try:  # the watcher: a copy of this small interpreter, waiting for its parent to die
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)  # torchelastic signals the whole group: outlive it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        if set_parent_death_signal(signal.SIGUSR1, leader):
            signal.sigwait({signal.SIGUSR1})
        os.killpg(leader, signal.SIGKILL)
    finally:
        os._exit(0)


def reap_descendants_on_exit(poll_s: float = 0.5) -> None:
    """For a ``megaemb`` that runs its command itself and has no launcher above it (started
    from a shell; not a launcher, whose ranks watch themselves): fork a watcher that
    notes this process's descendants every ``poll_s`` and SIGKILLs them when this process
    dies. Its own process group is the shell's job (it may hold the caller), so unlike
    ``_reap_group_on_exit`` it kills by pid: megatron's checkpoint writer processes would
    otherwise outlive a ``kill -9`` of a single-process run. Must run before any thread.
    Linux only."""
    leader = os.getpid()
    if not sys.platform.startswith("linux") or os.fork():
        return
    try:
        import psutil

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        me, known = os.getpid(), {}
        alive = set_parent_death_signal(signal.SIGUSR1, leader)
        while alive:
            try:
                for child in psutil.Process(leader).children(recursive=True):
                    if child.pid != me:
                        known[child.pid] = child
            except psutil.Error:
                break
            alive = signal.sigtimedwait({signal.SIGUSR1}, poll_s) is None
        for child in known.values():
            with contextlib.suppress(psutil.Error):
                if child.is_running():  # same pid and start time: not a reused pid
                    child.kill()
    finally:
        os._exit(0)


def child_env(env: dict | None = None) -> dict:
    """Environment for a subprocess that must die with this process (it runs ``megaemb``):
    ``env`` (default ``os.environ``) plus this pid, minus the launcher's error directory (the
    child reports its errors on its own stderr)."""
    env = dict(os.environ if env is None else env)
    env.pop(ERROR_DIR_ENV, None)
    env[PARENT_PID_ENV] = str(os.getpid())
    return env


def report_error(line: str) -> None:
    """A rank's one-line user error: to the launcher's error directory when there is one (the
    launcher prints it once for the job), else to stderr."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if error_dir and os.path.isdir(error_dir):
        path = os.path.join(error_dir, f"rank{int(os.environ.get('RANK', 0))}.txt")
        with contextlib.suppress(OSError):
            with atomic_file(path) as f:
                f.write(line + "\n")
            return
    print(line, file=sys.stderr, flush=True)
