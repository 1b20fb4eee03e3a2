"""Run a function in N real processes joined by a gloo group; never hang.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, each calling
``fn(rank, world_size, *args)`` with ``MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK`` set.
``fn`` must be a module-level function (spawn pickles it by reference). Returns the list of
per-rank return values; raises ``AssertionError`` naming every rank that failed (with its
traceback) or did not finish within ``timeout`` seconds (those processes are killed).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, results, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    try:
        import torch

        torch.set_num_threads(1)
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def run_distributed(fn, world_size: int, *args, timeout: float = 240):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, results, args))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, object]] = {}
    deadline = time.time() + timeout
    while len(outcome) < world_size and time.time() < deadline:
        try:
            rank, status, value = results.get(timeout=0.5)
            outcome[rank] = (status, value)
            if status == "error":  # the others would wait on a collective forever
                deadline = min(deadline, time.time() + 10)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    failures = []
    for r in range(world_size):
        status, value = outcome.get(r, ("timeout", f"no result within {timeout:.0f}s"))
        if status != "ok":
            failures.append(f"--- rank {r} {status} ---\n{value}")
    if failures:
        raise AssertionError(f"{len(failures)}/{world_size} ranks failed:\n" + "\n".join(failures))
    return [outcome[r][1] for r in range(world_size)]
