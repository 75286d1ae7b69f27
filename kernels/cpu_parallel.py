"""Run independent row chunks on a few worker threads, each with single-threaded torch ops.

The chunked CPU path issues many small ops (a few per ~1 MiB chunk). Letting each op fork
and join torch's OpenMP team costs one barrier per op, and on a shared, oversubscribed
machine every barrier waits for both cores to be scheduled: measured on the 2-core sandbox
at load average ~8, the same forward took 1.1-18 s with per-op OpenMP and 0.11-0.3 s with
two worker threads whose ops run single-threaded (each thread's OpenMP team size is a
per-thread setting, so the caller's ``torch.get_num_threads()`` is unchanged). Torch ops
release the GIL, so the workers run in parallel. Each chunk touches disjoint rows.

Tasks are handed out dynamically (each worker takes the next chunk when it finishes one), so
a worker that the shared machine deschedules for a while delays the call by at most its
current chunk instead of its whole static share.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] | None = None     # (pid, workers): a forked child makes a new pool


def _single_threaded_worker() -> None:
    torch.set_num_threads(1)   # this thread's OpenMP team only (a per-thread setting)


def _get_pool(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    key = (os.getpid(), workers)
    with _lock:
        if _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=True)
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="lens_kernels",
                                       initializer=_single_threaded_worker)
            _pool_key = key
    return _pool


def _without_grad(work, tasks) -> None:
    with torch.no_grad():
        work(tasks)


def num_workers(device: torch.device) -> int:
    """Worker threads for CPU tensors; 1 (inline, ops use torch's own threads) elsewhere.

    Default: torch's intra-op thread count. ``LENS_KERNELS_CPU_WORKERS=1`` runs inline on
    the calling thread instead, each op then parallelised by torch's OpenMP team.
    """
    if device.type != "cpu":
        return 1
    override = os.environ.get("LENS_KERNELS_CPU_WORKERS")
    return max(1, int(override) if override else torch.get_num_threads())


class _SharedTasks:
    """An iterator over ``tasks`` that several worker threads draw from (next free task)."""

    def __init__(self, tasks: Sequence):
        self._it = iter(tasks)
        self._lock = threading.Lock()

    def __iter__(self):
        return self

    def __next__(self):
        with self._lock:
            return next(self._it)


def run_chunks(tasks: Sequence, work: Callable[[Iterable], None], device: torch.device) -> None:
    """Call ``work(tasks_iterable)`` once per worker thread, all drawing from ``tasks``.

    ``work`` iterates its argument (each task is given to exactly one worker) and must only
    write rows its tasks own. With one worker (or non-CPU tensors) it runs inline on the
    calling thread. Autograd never records it (grad mode is thread-local, so it is switched
    off in the workers too).
    """
    pool_size = num_workers(device)
    workers = min(pool_size, len(tasks))
    if workers <= 1:
        if tasks:
            _without_grad(work, tasks)
        return
    pool = _get_pool(pool_size)
    shared = _SharedTasks(tasks)
    futures = [pool.submit(_without_grad, work, shared) for _ in range(workers)]
    for fut in futures:
        fut.result()
