"""Run a function in N local processes joined by a gloo process group.

Used by the tests (every distributed path is compared against one process) and by the
CPU demo. Each rank runs ``fn(*args)`` after ``torch.distributed`` is initialised with
the gloo backend on a free localhost port; the per-rank return values come back in rank
order. If any rank raises, the others are terminated and a ``SpawnedRankError`` carrying
that rank's traceback is raised in the caller. A rank that does not finish within
``timeout`` seconds makes the whole run fail with ``TimeoutError`` (no hung CI jobs).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence


class SpawnedRankError(RuntimeError):
    """A spawned rank raised; the message holds its rank and full traceback."""


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(fn, args, rank, world_size, port, env, result_queue):
    os.environ.update(env)
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
        }
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(max(1, int(env.get("LENS_THREADS_PER_RANK", "1"))))
        if env.get("LENS_SPAWN_INIT_GROUP", "1") == "1":
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            out = fn(*args)
        finally:
            try:
                from lens_megatron.parallel.initialize import destroy_parallel

                destroy_parallel()
            except Exception:  # noqa: BLE001 - teardown must not mask the real result
                pass
        # Plain pickle copies tensor storage; torch's queue reducers would share it through
        # file descriptors that vanish when this process exits.
        result_queue.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - forward everything, including SystemExit
        result_queue.put((rank, "error", traceback.format_exc()))


def run_in_processes(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` gloo ranks; return the results in rank order.

    ``fn`` must be picklable (defined at module top level). ``env`` is added to each
    rank's environment before torch is imported. ``env={"LENS_SPAWN_INIT_GROUP": "0"}`` leaves
    the process group to ``fn`` (the rendezvous variables are set, as a launcher would).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    result_queue = ctx.Queue()
    port = find_free_port()
    env = dict(env or {})
    procs = [
        ctx.Process(
            target=_rank_entry,
            args=(fn, tuple(args), rank, world_size, port, env, result_queue),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise TimeoutError(
                    f"ranks {missing} of {world_size} did not finish within {timeout:.0f}s"
                )
            try:
                rank, status, payload = result_queue.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [
                    r for r, p in enumerate(procs)
                    if r not in results and not p.is_alive() and p.exitcode not in (0, None)
                ]
                if dead:
                    # Give the queue a moment: a rank may have reported and then exited.
                    try:
                        rank, status, payload = result_queue.get(timeout=2.0)
                    except queue.Empty:
                        raise SpawnedRankError(
                            f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                            "without reporting (killed, out of memory, or a crash in C code)"
                        ) from None
                else:
                    continue
            if status == "error":
                raise SpawnedRankError(f"rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        result_queue.close()
    return [results[r] for r in range(world_size)]
