"""Merge per-shard row statistics across tensor-parallel ranks with ONE collective.

Every backend produces, per token row and for this rank's vocab shard, the packed fp32
statistics ``(m, s, t, w)``: a shift ``m`` (the shard max in the Triton kernel; any value
with ``m ≤ max x < m + 88`` in the torch path; −inf if the shard has no valid column),
``s = Σ exp(x − m)`` over the shard (x = logit/T), ``t`` = the target's x if this shard owns
the target else 0, and ``w = Σ exp(x − m)·(x − m)`` (only meaningful with entropy).

:func:`gather_row_stats` all-gathers the ``[N, 4]`` buffer once (``[TP, N, 4]`` result) —
one collective instead of an all-reduce per statistic (a max and a sum cannot share one
all-reduce). :func:`merge_row_stats` then merges locally, in the same way on every rank,
from per-shard log-sum-exp ``ℓ_r = m_r + log s_r``, shard entropy ``H_r = log s_r − w_r/s_r``
and shard mean ``μ_r = m_r + w_r/s_r``, with shard weights ``π_r = exp(ℓ_r − lse)``:

    lse = logsumexp_r ℓ_r,   t = Σ_r t_r,   μ = Σ_r π_r μ_r,   H = Σ_r π_r (H_r − log π_r).

(The entropy form never subtracts two large numbers, so ±1e4 logits keep full precision.)
With a group of size 1 (or ``None``) the gather is the identity and nothing is
communicated: the non-TP path is this same code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

STATS_WIDTH = 4  # packed per-row stats: (shift m, Σexp(x−m), target x, Σexp(x−m)·(x−m))


@dataclass
class MergedStats:
    """Global per-row quantities after the merge (fp32, shape ``[N]``)."""

    lse: torch.Tensor            # log Σ_j exp(x_j) over the whole (valid) vocab
    target_logit: torch.Tensor   # x at the target id (0 if no rank owns it)
    mean_logit: torch.Tensor     # μ = Σ_j p_j x_j (softmax-weighted mean of x)
    entropy: torch.Tensor        # −Σ_j p_j log p_j


def group_size_and_rank(group) -> tuple[int, int]:
    """(world size, rank) of ``group``; ``(1, 0)`` for ``None`` or when not distributed."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def gather_row_stats(stats: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``stats [N, k]`` over ``group`` in a single collective → ``[TP, N, k]``."""
    world, _ = group_size_and_rank(group)
    if world == 1:
        return stats.unsqueeze(0)
    stats = stats.contiguous()
    # concatenated form [TP*N, k] (gloo rejects the stacked [TP, N, k] output)
    gathered = stats.new_empty((world * stats.shape[0],) + tuple(stats.shape[1:]))
    # torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, stats, group=group)
    return gathered.view((world,) + tuple(stats.shape))


def merge_row_stats(gathered: torch.Tensor) -> MergedStats:
    """Merge ``[TP, N, 4]`` shard statistics (pure, local, no communication)."""
    m, s, t, w = gathered.unbind(-1)
    has_mass = s > 0
    zero = torch.zeros_like(s)
    safe_s = torch.where(has_mass, s, torch.ones_like(s))
    safe_m = torch.where(has_mass, m, zero)                  # shards without mass: m may be −inf
    shard_lse = torch.where(has_mass, safe_m + torch.log(safe_s), torch.full_like(s, -float("inf")))
    shard_mean_offset = torch.where(has_mass, w / safe_s, zero)
    top = shard_lse.amax(0)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    lse = top + torch.log(torch.exp(shard_lse - top).sum(0))
    log_weight = torch.where(has_mass, shard_lse - lse, zero)        # log π_r
    weight = torch.where(has_mass, torch.exp(log_weight), zero)
    shard_entropy = torch.log(safe_s) - shard_mean_offset
    return MergedStats(
        lse=lse,
        target_logit=t.sum(0),
        mean_logit=(weight * (safe_m + shard_mean_offset)).sum(0),
        entropy=(weight * (shard_entropy - log_weight)).sum(0),
    )
