"""One step's rollout stage: draw prompts, generate G samples each, score them — the same code on
colocated ranks (``source.LocalRollouts``) and on separate rollout ranks (``worker.py``).

The prompts of a round are shared out over the generating replicas (the native sampler's
data-parallel ranks, or vLLM's replicas) in contiguous shares differing by at most one; each
replica's first rank scores its share; the shares are gathered over the role's default process
group, so every rank of it returns the whole scored batch.

DAPO dynamic sampling (``rollout.dynamic_sampling``): groups whose rewards are all equal (all
right or all wrong) give plain GRPO no gradient; with it on, they are dropped and further prompts
are drawn and generated (``oversample`` × the missing groups per round) until the step has
``rollout.prompts_per_step`` groups with reward variance, for at most ``max_rounds`` rounds. If the
cap is reached first, the batch is topped up with the last dropped groups, so its size never
changes (``dynamic_sampling/topped_up_groups`` counts them and a warning says so). Every drop,
round and generated group is counted in the step's metrics.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable

import torch
import torch.distributed as dist

from .base import SamplingConfig, concat_batches, take_groups
from .exchange import ScoredBatch

logger = logging.getLogger(__name__)

# shard_fn(num_prompts) -> (this rank's slice, shard id, does this rank score its shard)
ShardFn = Callable[[int], tuple[slice, int, bool]]


def step_seed(base: int, step: int) -> int:
    return (int(base) * 1_000_003 + int(step) * 7919) % (2**31 - 1)


def balanced_shard(n: int, index: int, count: int) -> slice:
    """The ``index``-th of ``count`` contiguous shares of ``n`` items (sizes differ by <= 1)."""
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def sampling_config(rollout_cfg, seed: int, row_offset: int) -> SamplingConfig:
    return SamplingConfig(
        group_size=rollout_cfg.group_size, temperature=rollout_cfg.temperature,
        top_p=rollout_cfg.top_p, top_k=rollout_cfg.top_k,
        max_new_tokens=rollout_cfg.max_new_tokens, ignore_eos=rollout_cfg.ignore_eos,
        seed=seed, row_offset=row_offset)


def generate_and_score(cfg, engine, scorer, prompts: list, seed: int, shard_fn: ShardFn,
                       timings: dict[str, float]):
    """(batch, rewards [N], counters) of ``prompts`` — every rank of the group gets all."""
    shard, shard_id, leader = shard_fn(len(prompts))
    mine = prompts[shard]
    sampling = sampling_config(cfg.rollout, seed, shard.start * cfg.rollout.group_size)
    t0 = time.perf_counter()
    engine.wake()
    local = engine.generate([p.token_ids for p in mine], sampling)
    engine.sleep()
    timings["time/rollout_s"] = timings.get("time/rollout_s", 0.0) + time.perf_counter() - t0
    t0 = time.perf_counter()
    golds = [p.record.answer for p in mine for _ in range(cfg.rollout.group_size)]
    scored = scorer.score(local, golds) if leader else None
    timings["time/reward_s"] = timings.get("time/reward_s", 0.0) + time.perf_counter() - t0
    mine_part = (shard_id, local, *scored) if leader else None
    parts = [mine_part]
    if dist.is_initialized() and dist.get_world_size() > 1:  # leaders publish, all receive
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine_part)
    parts = sorted((p for p in parts if p is not None), key=lambda p: p[0])
    batch = concat_batches([p[1] for p in parts])
    rewards = torch.cat([p[2] for p in parts])
    totals = {k: sum(p[3][k] for p in parts) for k in parts[0][3]}
    return batch, rewards, totals


def _prompt_metrics(prompt_source) -> dict[str, float]:
    return {"data/truncated_prompts": float(prompt_source.truncated_prompts)}


def _varied_groups(rewards: torch.Tensor, group_size: int) -> list[bool]:
    grouped = rewards.view(-1, group_size)
    return (grouped.amax(1) > grouped.amin(1)).tolist()


def collect_step(cfg, engine, scorer, prompt_source, step: int, version: int,
                 shard_fn: ShardFn) -> ScoredBatch:
    """The scored rollout of ``step`` (generated now, with weights of ``version``)."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    base_seed = step_seed(cfg.trainer.seed, step)
    if not cfg.rollout.dynamic_sampling.enabled:
        batch, rewards, counts = generate_and_score(
            cfg, engine, scorer, prompt_source.next_batch(), base_seed, shard_fn, timings)
        timings["time/rollout_stage_s"] = time.perf_counter() - start
        return ScoredBatch(step, version, batch, rewards, counts, prompt_source.state_dict(),
                           timings, _prompt_metrics(prompt_source))
    return _collect_dynamic(cfg, engine, scorer, prompt_source, step, version, shard_fn,
                            timings, start)


def _collect_dynamic(cfg, engine, scorer, prompt_source, step, version, shard_fn, timings,
                     start) -> ScoredBatch:
    dynamic = cfg.rollout.dynamic_sampling
    want, group = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    kept, dropped, rounds, generated, counts = [], [], 0, 0, {}
    while len(kept) < want and rounds < dynamic.max_rounds:
        need = want - len(kept)
        draw = need if rounds == 0 else max(need, math.ceil(need * dynamic.oversample))
        prompts = prompt_source.take(draw)
        # A different counter-based seed per round: a refill never repeats a draw.
        seed = step_seed(cfg.trainer.seed + 104729 * rounds, step)
        batch, rewards, round_counts = generate_and_score(
            cfg, engine, scorer, prompts, seed, shard_fn, timings)
        for key, value in round_counts.items():
            counts[key] = counts.get(key, 0) + value
        varied = _varied_groups(rewards, group)
        for g, ok in enumerate(varied):
            (kept if ok else dropped).append((batch, rewards, g))
        rounds += 1
        generated += len(varied)
    topped_up = max(0, want - len(kept))
    if topped_up:
        logger.warning("step %d: dynamic sampling found %d of %d groups with reward variance in "
                       "%d rounds (rollout.dynamic_sampling.max_rounds); topped up with %d "
                       "zero-variance groups so the batch keeps its size", step + 1, len(kept),
                       want, rounds, topped_up)
        kept += dropped[len(dropped) - topped_up:]
    chosen = kept[:want]
    batch = concat_batches([take_groups(b, [g]) for b, _, g in chosen])
    rewards = torch.cat([r.view(-1, group)[g] for _, r, g in chosen])
    timings["time/rollout_stage_s"] = time.perf_counter() - start
    metrics = {
        "dynamic_sampling/rounds": float(rounds),
        "dynamic_sampling/generated_groups": float(generated),
        "dynamic_sampling/dropped_groups": float(len(dropped)),
        "dynamic_sampling/varied_groups": float(len(kept) - topped_up),
        "dynamic_sampling/topped_up_groups": float(topped_up),
        "dynamic_sampling/generation_ratio": generated / want,  # generation per trained group
        **_prompt_metrics(prompt_source),
    }
    return ScoredBatch(step, version, batch, rewards, counts, prompt_source.state_dict(), timings,
                       metrics)
