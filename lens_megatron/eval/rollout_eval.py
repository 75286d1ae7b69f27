"""pass@k of a policy on a problem set: generate n samples per problem with the rollout
engine, judge them with the verifier, summarise with the unbiased estimator.

Data-parallel ranks split the problems; every rank returns the same summary.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..rollout.base import SamplingConfig
from .pass_at_k import DEFAULT_KS, summarize_pass_at_k


@dataclass
class EvalResult:
    summary: dict  # subset name -> SubsetMetrics
    num_correct: list[int]  # per problem
    levels: list[Optional[int]]
    samples_per_problem: int
    seconds: float

    def flat(self, prefix: str = "eval") -> dict[str, float]:
        out: dict[str, float] = {}
        for subset, metrics in self.summary.items():
            out.update(metrics.as_flat_dict(f"{prefix}/{subset}"))
        return out


def _dp_info() -> tuple[int, int, object]:
    if not dist.is_initialized():
        return 0, 1, None
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, None
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_group()


def evaluate_pass_at_k(engine, scorer_or_none, tokenize, records: Sequence, samples: int,
                       rollout, seed: int = 0, batch_problems: int = 64,
                       ks: Sequence[int] = DEFAULT_KS) -> EvalResult:
    """``tokenize(record) -> token ids``; ``rollout``: the config's rollout section
    (temperature, top_p, max_new_tokens). ``scorer_or_none`` scores on model-parallel
    leaders, whose results are shared within their model-parallel group."""
    from ..parallel.collectives import share_from_model_parallel_leader

    start = time.perf_counter()
    dp_rank, dp_size, dp_group = _dp_info()
    grouped = dp_group is not None  # megatron's groups exist: share the leaders' scores
    per_rank = -(-len(records) // dp_size)
    mine = list(records)[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    correct: list[int] = []
    for offset in range(0, len(mine), batch_problems):
        chunk = mine[offset:offset + batch_problems]
        sampling = SamplingConfig(group_size=samples, temperature=rollout.temperature,
                                  top_p=rollout.top_p, max_new_tokens=rollout.max_new_tokens,
                                  seed=seed,
                                  row_offset=(dp_rank * per_rank + offset) * samples)
        batch = engine.generate([tokenize(r) for r in chunk], sampling)
        golds = [r.answer for r in chunk for _ in range(samples)]
        scored = scorer_or_none.score(batch, golds) if scorer_or_none is not None else None
        rewards, _ = share_from_model_parallel_leader(scored) if grouped else scored
        correct.extend((rewards.view(-1, samples) >= 1.0).sum(1).tolist())
    if dp_size > 1:
        gathered = [None] * dp_size
        dist.all_gather_object(gathered, correct, group=dp_group)
        correct = [c for part in gathered for c in part]
    levels = [getattr(r, "level", None) for r in records]
    summary = summarize_pass_at_k(torch.tensor(correct).numpy(), samples, levels,
                                  ks=[k for k in ks if k <= samples])
    return EvalResult(summary, correct, levels, samples, time.perf_counter() - start)
