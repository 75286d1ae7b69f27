"""A small pool of judge worker processes with a hard per-sample deadline.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one hung task, and
math-verify's own timeout uses ``SIGALRM``, which only works in a main thread. Here each
worker is a ``multiprocessing`` process (``spawn`` by default: a fresh interpreter that
inherits no CUDA context, no torch.distributed state and no locks from a trainer) joined
to the parent by its own duplex pipe, and it judges ONE sample at a time. The parent

- hands a sample to a worker only once that worker reported "ready" (imports done), so
  start-up time never eats into a sample's budget;
- gives each sample a wall-clock deadline of ``timeout_s`` from the moment it is sent;
- on a passed deadline SIGKILLs that worker, records a ``timeout`` outcome and starts a
  replacement, while the other workers keep going;
- records an ``error`` outcome (and replaces the worker) if a worker dies mid-sample.

A worker exits by itself when the pipe closes or its parent process disappears, so a
crashed trainer leaves no verifier processes behind. Workers ignore SIGINT (Ctrl-C is
the trainer's business; ``close()`` ends them).
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait
from typing import Self

from lens_megatron.preemption import signals_blocked_for_children
from lens_megatron.rewards.judge import (
    DEFAULT_JUDGE,
    AnswerParseError,
    JudgeSpec,
    resolve_judge,
    silence_math_verify_timeout_warnings,
)

OK, PARSE_FAILURE, ERROR, TIMEOUT = "ok", "parse_failure", "error", "timeout"


@dataclasses.dataclass(frozen=True)
class JudgeOutcome:
    """Result of judging one sample: ``status`` is ok | parse_failure | error | timeout."""

    status: str
    correct: bool = False
    detail: str | None = None


def judge_one(judge, predicted_answer: str, gold_answer: str) -> JudgeOutcome:
    """Run ``judge`` on one sample, mapping exceptions to outcome statuses."""
    try:
        return JudgeOutcome(OK, bool(judge(predicted_answer, gold_answer)))
    except AnswerParseError as exc:
        return JudgeOutcome(PARSE_FAILURE, False, str(exc)[:500])
    except Exception as exc:  # noqa: BLE001 - a verifier bug must cost one sample, not the step
        return JudgeOutcome(ERROR, False, f"{type(exc).__name__}: {exc}"[:500])


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _worker_main(connection: Connection, judge_spec: JudgeSpec, parent_pid: int) -> None:
    """Worker process: resolve the judge, report ready, then judge samples until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), daemon=True).start()
    try:
        judge = resolve_judge(judge_spec)
        silence_math_verify_timeout_warnings()
        import math_verify  # noqa: F401 - pay the sympy import before reporting ready
    except BaseException:  # noqa: BLE001 - report any start-up failure to the parent
        connection.send(("startup_error", traceback.format_exc()))
        return
    connection.send(("ready", None))
    while True:
        try:
            message = connection.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        task_index, predicted_answer, gold_answer = message
        connection.send(("result", (task_index, judge_one(judge, predicted_answer, gold_answer))))


@dataclasses.dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    connection: Connection
    started_at: float
    ready: bool = False
    task_index: int | None = None
    deadline: float | None = None


def _stop_workers(workers: list[_Worker], grace_s: float = 1.0) -> None:
    """Ask every ready worker to exit, then kill whichever is still alive after ``grace_s``
    (a worker still starting up is killed at once: it is not reading its pipe yet)."""
    for worker in workers:
        try:
            worker.connection.send(None)
        except (OSError, ValueError):
            pass
        if not worker.ready:
            worker.process.kill()
    give_up_at = time.monotonic() + grace_s
    for worker in workers:
        worker.process.join(max(0.0, give_up_at - time.monotonic()))
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.connection.close()
    workers.clear()


class VerifierPool:
    """``num_workers`` judge processes; ``judge_many`` scores a batch with per-sample deadlines.

    Create once per trainer process and reuse across steps; call :meth:`close` (or use it
    as a context manager) at the end. ``judge_many`` is serialised by a lock.
    """

    def __init__(
        self,
        judge: JudgeSpec = DEFAULT_JUDGE,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.judge = judge
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self.workers_replaced = 0
        self._context = multiprocessing.get_context(start_method)
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _stop_workers, self._workers)
        self._workers.extend(self._start_worker() for _ in range(num_workers))

    def _start_worker(self) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main,
            args=(child_end, self.judge, os.getpid()),
            name="lens-verifier",
            daemon=True,
        )
        # SLURM relays a preemption signal to every process of the step; a worker must not die
        # of it mid-sample (an ERROR verdict) or at start-up. It still ends by message, orphan
        # check or kill().
        with signals_blocked_for_children():
            process.start()
        child_end.close()
        return _Worker(process, parent_end, started_at=time.monotonic())

    def _replace(self, worker: _Worker) -> None:
        """Kill ``worker`` (if still alive) and put a fresh one in its slot."""
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join()
        worker.connection.close()
        self._workers[self._workers.index(worker)] = self._start_worker()
        self.workers_replaced += 1

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def judge_many(self, samples: Sequence[tuple[str, str]]) -> list[JudgeOutcome]:
        """Judge ``(predicted_answer, gold_answer)`` pairs; outcomes come back in order."""
        if self.closed:
            raise RuntimeError("VerifierPool is closed")
        if os.getpid() != self._owner_pid:
            raise RuntimeError("VerifierPool cannot be used from a forked child process")
        with self._lock:
            return self._run(list(samples))

    def _run(self, samples: list[tuple[str, str]]) -> list[JudgeOutcome]:
        for worker in list(self._workers):
            if worker.task_index is not None:  # left busy by an interrupted earlier call
                self._replace(worker)
        pending = collections.deque(range(len(samples)))
        outcomes: list[JudgeOutcome | None] = [None] * len(samples)
        unfinished = len(samples)
        while unfinished:
            self._dispatch(pending, samples)
            self._wait_for_activity()
            for worker in list(self._workers):
                unfinished -= self._collect(worker, outcomes)
            unfinished -= self._enforce_deadlines(outcomes)
        return outcomes  # type: ignore[return-value]

    def _dispatch(self, pending: collections.deque, samples: list[tuple[str, str]]) -> None:
        for worker in self._workers:
            if not pending:
                return
            if worker.ready and worker.task_index is None:
                task_index = pending.popleft()
                try:
                    worker.connection.send((task_index, *samples[task_index]))
                except (OSError, ValueError):
                    pending.appendleft(task_index)  # dead worker: _collect replaces it
                    continue
                worker.task_index = task_index
                worker.deadline = time.monotonic() + self.timeout_s

    def _wait_for_activity(self) -> None:
        """Block until a worker speaks or dies, or until the nearest deadline passes."""
        now = time.monotonic()
        deadlines = [
            w.deadline if w.ready else w.started_at + self.startup_timeout_s
            for w in self._workers
            if w.deadline is not None or not w.ready
        ]
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        handles = [w.connection for w in self._workers] + [
            w.process.sentinel for w in self._workers
        ]
        wait(handles, timeout)

    def _collect(self, worker: _Worker, outcomes: list) -> int:
        """Read everything ``worker`` sent; handle its death. Returns samples finished."""
        finished = self._drain(worker, outcomes)
        if worker.process.is_alive():
            return finished
        finished += self._drain(worker, outcomes)  # whatever it sent just before exiting
        return finished + self._handle_dead_worker(worker, outcomes)

    def _drain(self, worker: _Worker, outcomes: list) -> int:
        """Process the messages waiting on ``worker``'s pipe. Returns samples finished."""
        finished = 0
        try:
            while worker.connection.poll():
                kind, payload = worker.connection.recv()
                if kind == "ready":
                    worker.ready = True
                elif kind == "startup_error":
                    self.close()
                    raise RuntimeError(f"verifier worker failed to start:\n{payload}")
                else:
                    task_index, outcome = payload
                    assert task_index == worker.task_index, (task_index, worker.task_index)
                    outcomes[task_index] = outcome
                    worker.task_index = worker.deadline = None
                    finished += 1
        except (EOFError, OSError):
            pass  # the pipe closed: the process is dead or dying; _collect handles it
        return finished

    def _handle_dead_worker(self, worker: _Worker, outcomes: list) -> int:
        worker.process.join()
        exit_code = worker.process.exitcode
        if not worker.ready:
            self.close()
            raise RuntimeError(f"verifier worker died during start-up (exit code {exit_code})")
        finished = 0
        if worker.task_index is not None:
            detail = f"verifier worker died mid-sample (exit code {exit_code})"
            outcomes[worker.task_index] = JudgeOutcome(ERROR, False, detail)
            finished = 1
        self._replace(worker)
        return finished

    def _enforce_deadlines(self, outcomes: list) -> int:
        """Kill and replace workers past their sample deadline. Returns samples finished."""
        now = time.monotonic()
        finished = 0
        for worker in list(self._workers):
            if (
                worker.task_index is not None
                and worker.deadline is not None
                and now >= worker.deadline
            ):
                outcomes[worker.task_index] = JudgeOutcome(
                    TIMEOUT, False, f"no verdict within {self.timeout_s:g}s; worker killed"
                )
                finished += 1
                self._replace(worker)
            elif not worker.ready and now - worker.started_at > self.startup_timeout_s:
                self.close()
                raise RuntimeError(
                    f"verifier worker not ready after {self.startup_timeout_s:g}s of start-up"
                )
        return finished
