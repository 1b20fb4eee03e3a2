"""Process groups: the one place that initialises torch.distributed and megatron's parallel state.

Order matters: ``platform.setup()`` (CPU compatibility) before any megatron import that reads
CUDA; the default process group before ``initialize_model_parallel``; the model-parallel RNG
seed after the groups exist (it needs the TP/EP ranks).
"""
from __future__ import annotations

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

from megaemb import launcher, platform
from megaemb.config import ParallelConfig


def init_parallel(parallel: ParallelConfig, seed: int = 1234, timeout_s: int = 600) -> None:
    """Join the job (torchrun env vars, or a single process) and build TP/PP/EP/CP/DP groups.
    A collective that waits longer than ``timeout_s`` fails (and so ends the job)."""
    platform.setup()
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        launcher.check_rank_env()  # several ranks: their rendezvous is named, not made up here
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        if platform.has_cuda():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        _join(timeout_s)
    if dist.get_rank() == 0:
        platform.report_versions()
    parallel.check_world_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        distributed_timeout_minutes=max(1, -(-timeout_s // 60)),  # its groups time out alike
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def _join(timeout_s: int) -> None:
    """The default process group from torchrun's variables: the peers must join within
    ``RDZV_TIMEOUT`` seconds (said first, ``launcher.join_note``), else ``TimeoutError`` in one
    line; its collectives then time out after ``timeout_s``. What ``init_process_group`` does
    with ``env://``, with the two timeouts apart."""
    env = os.environ
    if int(env["WORLD_SIZE"]) == 1:
        store, rank, world = _local_store(timeout_s), 0, 1
    else:
        store, rank, world = _rendezvous()
    store.set_timeout(datetime.timedelta(seconds=timeout_s))
    dist.init_process_group(backend=platform.backend(), store=dist.PrefixStore("default_pg", store),
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def _local_store(timeout_s: int):
    """A world of one has no peer that reads ``MASTER_ADDR``/``MASTER_PORT``: its store
    listens on 127.0.0.1 on a port the kernel picks (port 0: no race with another job). One
    left in the environment (an unreachable or unresolvable host, a busy port) would make
    torch's store wait forever or fail; the variables are set to the store's, for any child."""
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=timeout_s))
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(store.port)
    return store


def _rendezvous():
    """Several ranks: ``(store, rank, world)`` by torch's ``env://`` rendezvous, within
    ``RDZV_TIMEOUT`` (said first); a busy port, a timeout or a port that is not a rendezvous
    store raise one line (``ValueError`` / ``TimeoutError``)."""
    note = launcher.join_note()
    if note:
        print(note, file=sys.stderr, flush=True)
    env, wait = os.environ, launcher.rdzv_timeout()
    where = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']} (MASTER_ADDR, MASTER_PORT)"
    deadline = time.monotonic() + wait
    try:
        if int(env["RANK"]) != 0:  # rank 0's store first: torch's client logs a C++ trace per try
            launcher.wait_for_port(env["MASTER_ADDR"], int(env["MASTER_PORT"]), wait)
        left = datetime.timedelta(seconds=max(1.0, deadline - time.monotonic()))
        return next(dist.rendezvous("env://", timeout=left))
    except (RuntimeError, TimeoutError) as e:
        text = str(e)
        if "EADDRINUSE" in text:
            raise ValueError(f"MASTER_PORT={env['MASTER_PORT']} is already in use on this node, where "
                             f"rank 0 of {env['WORLD_SIZE']} hosts the rendezvous: set MASTER_PORT (on "
                             "every rank) to a free port") from None
        if "Ping failed" in text or "invalid value returned from server" in text:
            raise ValueError(f"rank {env['RANK']}: {where} answered, but not as a megaemb rendezvous "
                             "(another service on that port?): MASTER_ADDR and MASTER_PORT must reach "
                             "rank 0's megaemb on node 0") from None
        if not launcher.is_timeout(e):
            raise
        raise TimeoutError(f"rank {env['RANK']} of {env['WORLD_SIZE']} (RANK, WORLD_SIZE): not all "
                           f"ranks joined {env['MASTER_ADDR']}:{env['MASTER_PORT']} (MASTER_ADDR, "
                           f"MASTER_PORT) within {wait} s (RDZV_TIMEOUT); start every rank, or unset "
                           "WORLD_SIZE and RANK to run alone") from None


def rng_states() -> dict:
    """A copy of every generator a forward pass draws from: torch's (CPU), the accelerator's
    default (hidden dropout on GPU) and megatron's tracker streams (attention dropout under
    TP, expert-parallel streams). The tracker returns references, hence the copies."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return {"torch": torch.get_rng_state(), "accelerator": platform.accelerator_rng_state(),
            "tracker": {k: copy_rng_state(v) for k, v in tracker.items()}}


def set_rng_states(states: dict) -> None:
    """Inverse of :func:`rng_states` (the states are copied in, so they can be set again).
    Each tracker state is given the kind the live tracker keeps (see :func:`rng_state_like`),
    so states saved by one kind of tracker (a checkpoint) restore into the other."""
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    live = tracker.get_states()
    torch.set_rng_state(states["torch"])
    platform.set_accelerator_rng_state(states["accelerator"])
    tracker.set_states({k: rng_state_like(v, live.get(k)) for k, v in states["tracker"].items()})


def copy_rng_state(state):
    """A copy of one tracker state. megatron's tracker keeps state tensors, or, with
    ``use_cudagraphable_rng`` (CUDA graphs) and Transformer Engine's tracker where graph-safe
    RNG is available, ``torch.Generator``s, which draws advance in place and which have no
    ``.clone()`` (megatron-core 0.16.1 ``tensor_parallel/random.py`` 228-231, 250-277)."""
    return state.clone_state() if isinstance(state, torch.Generator) else state.clone()


def rng_state_tensor(state) -> torch.Tensor:
    """One tracker state as a state tensor (what a checkpoint keeps: portable between
    trackers and picklable)."""
    return state.get_state() if isinstance(state, torch.Generator) else state.clone()


def rng_state_like(state, live):
    """A copy of ``state`` (tensor or Generator) of the kind of ``live``, the tracker's
    current state of the same name: a Generator for a Generator tracker, else a tensor."""
    if not isinstance(live, torch.Generator):
        return rng_state_tensor(state)
    if isinstance(state, torch.Generator):
        return state.clone_state()
    generator = live.clone_state()
    generator.set_state(state)
    return generator


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()

