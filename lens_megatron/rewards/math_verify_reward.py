"""The rule-based math reward: 1 if the last boxed answer verifies against the gold, else 0.

``MathVerifyReward`` scores a whole rollout batch per call. Per sample:
1. extract the last ``\\boxed{}`` in the parent (cheap); none → reward 0, ``parse_failures``;
2. judge it (math-verify by default) with a hard deadline of ``timeout_s``:
   - ``num_workers >= 1``: in a :class:`VerifierPool` of spawned processes; a sample past
     its deadline has its worker killed and replaced → reward 0, ``timeouts``;
   - ``num_workers == 0``: in this process, bounded by a ``SIGALRM`` interval timer when
     called from the main thread (signals only work there); from any other thread it
     runs without a time bound.
   A prediction math-verify cannot parse → ``parse_failures``; any verifier exception
   (or a worker crash) → ``errors``. All give reward 0; a training step never fails or
   hangs because of one sample.
Counters are returned per call and accumulated on the object (``totals``).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Sequence
from typing import Self

from lens_megatron.rewards.boxed import extract_last_boxed
from lens_megatron.rewards.judge import (
    DEFAULT_JUDGE,
    JudgeSpec,
    resolve_judge,
    silence_math_verify_timeout_warnings,
)
from lens_megatron.rewards.verifier_pool import (
    ERROR,
    OK,
    PARSE_FAILURE,
    TIMEOUT,
    JudgeOutcome,
    VerifierPool,
    judge_one,
)

logger = logging.getLogger(__name__)

NO_BOXED_ANSWER = "no_boxed_answer"


@dataclasses.dataclass
class RewardCounters:
    """How many samples were scored and why the failed ones scored 0."""

    samples: int = 0
    correct: int = 0
    timeouts: int = 0
    parse_failures: int = 0
    errors: int = 0

    def add(self, other: RewardCounters) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RewardResult:
    """Rewards of one batch (in input order), per-sample outcomes and the batch's counters.

    ``statuses[i]`` is ok | parse_failure | error | timeout; ``details[i]`` says why a
    non-ok sample failed (``no_boxed_answer`` for a missing box).
    """

    rewards: list[float]
    statuses: list[str]
    details: list[str | None]
    counters: RewardCounters

    def as_tensor(self, dtype=None):
        """Rewards as a 1-D float tensor (float32 unless ``dtype`` is given)."""
        import torch

        return torch.tensor(self.rewards, dtype=dtype or torch.float32)


class _AlarmTimeout(BaseException):
    """Raised by the in-process SIGALRM handler; a BaseException so that verifier code's
    ``except Exception`` cannot swallow it."""


def _judge_with_alarm(
    judge, predicted_answer: str, gold_answer: str, timeout_s: float
) -> JudgeOutcome:
    """In-process judging bounded by an interval timer (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return judge_one(judge, predicted_answer, gold_answer)

    def on_alarm(signum, frame):
        raise _AlarmTimeout()

    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    started = time.monotonic()
    outcome = None
    try:
        try:
            outcome = judge_one(judge, predicted_answer, gold_answer)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _AlarmTimeout:  # also covers an alarm landing between the verdict and disarming
        outcome = outcome or JudgeOutcome(TIMEOUT, False, f"no verdict within {timeout_s:g}s")
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:  # re-arm a timer someone else had set, minus the time spent
            remaining = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, previous_interval)
    return outcome


class MathVerifyReward:
    """Binary correctness reward for math responses (see the module docstring).

    Args:
        timeout_s: hard wall-clock budget for judging one sample.
        num_workers: verifier processes; 0 judges in this process (alarm-bounded).
        judge: callable or dotted path ``"module:function"`` with signature
            ``(predicted_answer, gold_answer) -> bool``; default math-verify.
        start_method: multiprocessing start method of the workers (``spawn`` or
            ``forkserver``; never ``fork`` in a trainer that holds CUDA/NCCL state).
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        judge: JudgeSpec = DEFAULT_JUDGE,
        start_method: str = "spawn",
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers
        self.totals = RewardCounters()
        self._pool: VerifierPool | None = None
        self._in_process_judge = None
        if num_workers == 0:
            self._in_process_judge = resolve_judge(judge)
            silence_math_verify_timeout_warnings()
        else:
            self._pool = VerifierPool(judge, num_workers, timeout_s, start_method)

    def __call__(self, responses: Sequence[str], gold_answers: Sequence[str]) -> RewardResult:
        """Score ``responses[i]`` against ``gold_answers[i]`` for the whole batch."""
        if len(responses) != len(gold_answers):
            raise ValueError(f"{len(responses)} responses but {len(gold_answers)} gold answers")
        predicted = [extract_last_boxed(response) for response in responses]
        to_judge = [i for i, answer in enumerate(predicted) if answer is not None]
        judged = self._judge([(predicted[i], str(gold_answers[i])) for i in to_judge])
        outcomes = [JudgeOutcome(PARSE_FAILURE, False, NO_BOXED_ANSWER)] * len(responses)
        for index, outcome in zip(to_judge, judged):
            outcomes[index] = outcome
        result = self._summarise(outcomes)
        self.totals.add(result.counters)
        if result.counters.timeouts or result.counters.errors:
            logger.warning("reward batch of %d: %s", len(responses), result.counters.as_dict())
        return result

    def _judge(self, samples: list[tuple[str, str]]) -> list[JudgeOutcome]:
        if self._pool is not None:
            return self._pool.judge_many(samples)
        return [_judge_with_alarm(self._in_process_judge, p, g, self.timeout_s) for p, g in samples]

    @staticmethod
    def _summarise(outcomes: list[JudgeOutcome]) -> RewardResult:
        counters = RewardCounters(samples=len(outcomes))
        for outcome in outcomes:
            counters.correct += outcome.status == OK and outcome.correct
            counters.timeouts += outcome.status == TIMEOUT
            counters.parse_failures += outcome.status == PARSE_FAILURE
            counters.errors += outcome.status == ERROR
        rewards = [1.0 if o.status == OK and o.correct else 0.0 for o in outcomes]
        return RewardResult(
            rewards=rewards,
            statuses=[o.status for o in outcomes],
            details=[o.detail for o in outcomes],
            counters=counters,
        )

    @property
    def workers_replaced(self) -> int:
        """How many hung or crashed verifier workers were killed and replaced so far."""
        return self._pool.workers_replaced if self._pool is not None else 0

    def close(self) -> None:
        """Stop the verifier processes (idempotent). The object is unusable afterwards."""
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
