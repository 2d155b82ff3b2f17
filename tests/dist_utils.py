"""Run a function on N gloo ranks in fresh processes (torch.multiprocessing, spawn) and collect results.

The function must be a top-level function of an importable module; it receives (rank, world_size, *args)
and returns something picklable. Each rank gets MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK and
OMP_NUM_THREADS=1; process groups are destroyed and the processes joined whatever happens. A rank that exits
without a result, or no result within ``result_timeout`` seconds, raises with the exit code or the time waited.
"""
from __future__ import annotations

import os
import socket
import sys
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if "megatron.core.parallel_state" in sys.modules:  # importing megatron only to clean up costs ~10 s
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 600.0, result_timeout: float | None = None) -> list:
    """Results of ``fn(rank, world, *args)`` ordered by rank; raises with the rank's traceback on failure.
    ``timeout``: how long the processes may take to exit after their results; ``result_timeout``: how long to
    wait for the results (None: as long as they run)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue), daemon=False) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    deadline = None if result_timeout is None else time.monotonic() + result_timeout
    try:
        while len(results) < world and not errors:
            if queue.empty():
                # a rank that died without a result (a crash in native code, a kill) or a hang is an error with
                # its exit code or the time waited, not a wait that only the test runner's timeout ends
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if not p.is_alive() and r not in results]
                if dead and queue.empty():
                    errors.append("; ".join(f"rank {r} exited with code {code} without a result" for r, code in dead))
                elif deadline is not None and time.monotonic() > deadline:
                    errors.append(f"no result from ranks {sorted(set(range(world)) - set(results))} "
                                  f"in {result_timeout:g} s")
                else:
                    time.sleep(0.05)
                continue
            rank, status, payload = queue.get()
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world)]
