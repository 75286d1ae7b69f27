"""Per-sequence reductions of per-token log-probs: padded rows, packed segments, context parallel.

Plain differentiable batched torch, no Python loop over sequences:

* padded layout ``[B, S]``: sequence ``b`` is row ``b``;
* packed layout (THD): one row of ``T`` tokens holding ``N`` sequences back to back, with
  ``segment_ids [T]`` = the sequence index ``0..N-1`` of each token or ``-1`` (alignment
  padding). Sums and counts are ``index_add`` over the segment ids.

Under context parallelism every CP rank holds a part of each sequence's tokens; the local
``(Σ log-prob, count)`` of all ``N`` sequences travel in ONE ``all_reduce`` of a ``[2, N]``
float64 tensor over ``cp_group`` (:class:`SumOverGroup`), and the confidence
``exp(Σ / count)`` is formed after it. The backward of that reduction is the identity: each
rank receives ``∂L/∂Σ`` for the tokens it holds, so the parameter gradients must be
*summed* over the CP ranks (Megatron's gradient reduction over the DP×CP group does this;
if it averages, the loss must be scaled by the CP size). No collective runs in backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .tp import group_size_and_rank


class SumOverGroup(torch.autograd.Function):
    """(Σ [N] differentiable, count [N] int64, group) → the same, summed over ``group``.

    One all-reduce of the packed ``[2, N]`` float64 tensor (float64: counts stay exact up to
    2^53). Backward: the identity on Σ (see the module docstring).
    """

    @staticmethod
    def forward(ctx, total, count, group):
        packed = torch.stack([total.double(), count.double()])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        count_out = packed[1].round().to(count.dtype)
        ctx.mark_non_differentiable(count_out)
        return packed[0].to(total.dtype), count_out

    @staticmethod
    def backward(ctx, grad_total, grad_count):
        return grad_total, None, None


def check_segments(segment_ids: torch.Tensor, num_tokens: int, num_segments, cp_group) -> int:
    """Validate ``segment_ids`` (``num_tokens`` ids in ``[-1, N)``) and return ``N``."""
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise TypeError(f"segment_ids must be integer sequence indices, got {segment_ids.dtype}")
    if segment_ids.numel() != num_tokens:
        raise ValueError(f"segment_ids must hold one id per token ({num_tokens}), got shape "
                         f"{tuple(segment_ids.shape)}")
    if num_segments is None and group_size_and_rank(cp_group)[0] > 1:
        raise ValueError("num_segments is required with a cp_group of size > 1: every CP rank "
                         "must reduce the same [N] tensor; pass the number of packed sequences")
    low, high = (torch.stack([segment_ids.min(), segment_ids.max()]).tolist()
                 if num_tokens else (-1, -1))
    n = high + 1 if num_segments is None else int(num_segments)
    if low < -1 or high >= n:
        raise ValueError(f"segment_ids must lie in [-1, num_segments={n}), got [{low}, {high}]")
    return max(n, 0)


def local_sums(token_logprobs, active, segment_ids=None, num_segments=None):
    """This rank's per-sequence ``(Σ log-prob, count)``; rows of ``[B, S]`` or segments.

    ``token_logprobs`` is 0 where ``active`` is false. With ``segment_ids`` (flat, one per
    token) the result has ``num_segments`` entries; tokens with id −1 are left out.
    """
    if segment_ids is None:
        return token_logprobs.sum(-1), active.long().sum(-1)
    seg = segment_ids.reshape(-1).to(torch.int64)
    inside = seg >= 0
    idx = torch.where(inside, seg, torch.zeros_like(seg))
    values = torch.where(inside, token_logprobs.reshape(-1), torch.zeros((), dtype=token_logprobs.dtype,
                                                                          device=seg.device))
    total = values.new_zeros(num_segments).index_add(0, idx, values)
    counted = (active.reshape(-1).bool() & inside).long()
    count = torch.zeros(num_segments, dtype=torch.int64, device=seg.device).index_add_(0, idx, counted)
    return total, count


def confidence_from(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """LENS confidence ``exp(Σ / count)``, 0 (with zero gradient) where ``count == 0``."""
    safe = count.clamp(min=1).to(total.dtype)
    return torch.where(count > 0, torch.exp(total / safe), torch.zeros_like(total))


def sequence_results(token_logprobs, active, segment_ids=None, num_segments=None, cp_group=None):
    """(Σ, count, confidence) per sequence, reduced over ``cp_group`` in one collective."""
    total, count = local_sums(token_logprobs, active, segment_ids, num_segments)
    if group_size_and_rank(cp_group)[0] > 1:
        total, count = SumOverGroup.apply(total, count, cp_group)
    return total, count, confidence_from(total, count)
