"""Per-document causal attention over a packed (THD) token stream, in plain torch SDPA.

A packed stream holds several documents back to back, ``q [T, heads, d]`` and
``k, v [T, groups, d]`` (grouped-query attention: ``heads`` a multiple of ``groups``).
Document ``i`` occupies ``[starts[i], starts[i] + lengths[i])``; every token attends causally
to the tokens of its own document only. Tokens outside every document (alignment padding)
attend to nothing and get a zero output (and so no gradient).

Three exact implementations, all over ``torch.nn.functional.scaled_dot_product_attention``:

- ``segments``: one SDPA call per document with ``is_causal=True``;
- ``bucketed``: documents sorted by length and cut into buckets; each bucket is gathered into
  ``[n_b, heads, L_b, d]`` (right-padded to its longest document ``L_b``) and run as one
  ``is_causal=True`` call. Right padding needs no mask: under top-left causal alignment a
  real query only sees keys at or before its position, all real. Fewer calls, more padded
  work; ``plan_buckets`` trades the two with a cost model;
- ``dense``: one SDPA call with a ``[T, T]`` block-diagonal causal mask (quadratic in T).

``packed_causal_attention(..., method="auto")`` picks ``bucketed`` with its cost model, which
falls back to one bucket per document (= ``segments``) when documents differ in length and to
one batched call when they are many and similar. FlexAttention and jagged nested tensors are
not options on CPU (no FlexAttention backward on CPU; jagged SDPA refuses ``is_causal``),
measured in ``tools/bench_packed_attention.py``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

METHODS = ("auto", "segments", "bucketed", "dense")

# Cost model of one SDPA call, in units of one query-key pair per head-dim element:
# CALL_OVERHEAD is the fixed cost of a call (dispatch + autograd bookkeeping) expressed as an
# equivalent number of query-key pairs; measured on this CPU (tools/bench_packed_attention.py).
CALL_OVERHEAD_PAIRS = 16_384


def segment_layout(cu_seqlens: Sequence[int], cu_seqlens_padded: Optional[Sequence[int]] = None
                   ) -> tuple[list[int], list[int]]:
    """Document starts and real lengths from megatron/TE THD boundaries.

    ``cu_seqlens [n+1]`` are the cumulative real lengths; ``cu_seqlens_padded [n+1]`` (when
    given) the cumulative padded lengths: document i then starts at ``cu_seqlens_padded[i]``
    and its real tokens are the first ``cu_seqlens[i+1] - cu_seqlens[i]`` of its slot.
    """
    cu = [int(c) for c in cu_seqlens]
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    base = cu if cu_seqlens_padded is None else [int(c) for c in cu_seqlens_padded]
    if len(base) != len(cu):
        raise ValueError("cu_seqlens and cu_seqlens_padded must have the same length")
    starts = base[:-1]
    for start, length, end in zip(starts, lengths, base[1:]):
        if length < 0 or start + length > end:
            raise ValueError(f"malformed THD boundaries: cu_seqlens={cu}, padded={base}")
    return starts, lengths


def plan_buckets(lengths: Sequence[int], heads: int = 1,
                 call_overhead_pairs: int = CALL_OVERHEAD_PAIRS) -> list[list[int]]:
    """Group document indices into buckets for ``bucketed``: minimise
    ``sum_b (overhead + n_b * L_b^2 / 2)`` over contiguous runs of the length-sorted
    documents (exact dynamic programme, O(n^2)). Empty documents are left out."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    n = len(order)
    if n == 0:
        return []
    overhead = call_overhead_pairs / max(1, heads)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j (longest) documents
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # bucket = order[i:j], its longest is order[i]
            longest = lengths[order[i]]
            cost = best[i] + overhead + (j - i) * longest * (longest + 1) / 2
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], n
    while j > 0:
        buckets.append(order[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


def _sdpa(q, k, v, scale, dropout_p, causal: bool, mask=None):
    """SDPA over ``[..., h, L, d]`` with grouped-query K/V (no repeat; torch >= 2.5)."""
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale,
        enable_gqa=q.shape[-3] != k.shape[-3])


def _segments(q, k, v, starts, lengths, scale, dropout_p):
    total, heads, dim = q.shape
    pieces, cursor = [], 0
    for start, length in sorted(zip(starts, lengths)):
        if length == 0:
            continue
        if start > cursor:
            pieces.append(q.new_zeros(start - cursor, heads, dim))
        sl = slice(start, start + length)
        # 4-D [1, h, L, d]: torch's CPU flash kernel takes 4-D inputs only (3-D runs the math path)
        out = _sdpa(q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                    v[sl].transpose(0, 1)[None], scale, dropout_p, causal=True)
        pieces.append(out[0].transpose(0, 1))
        cursor = start + length
    if cursor < total:
        pieces.append(q.new_zeros(total - cursor, heads, dim))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _bucketed(q, k, v, starts, lengths, scale, dropout_p, buckets):
    total, heads, dim = q.shape
    values, source, filled = [], torch.full((total,), -1, dtype=torch.long), 0
    for bucket in buckets:
        longest = lengths[bucket[0]]
        offsets = torch.arange(longest)
        start = torch.tensor([starts[i] for i in bucket])
        real = offsets[None, :] < torch.tensor([lengths[i] for i in bucket])[:, None]
        index = torch.where(real, start[:, None] + offsets, start[:, None])  # [n_b, L_b]
        positions = index[real]
        device_index = index.to(q.device)
        qb, kb, vb = (t[device_index].permute(0, 2, 1, 3) for t in (q, k, v))  # [n_b, h, L_b, d]
        ob = _sdpa(qb, kb, vb, scale, dropout_p, causal=True).permute(0, 2, 1, 3)
        values.append(ob[real.to(q.device)])
        source[positions] = torch.arange(filled, filled + len(positions))
        filled += len(positions)
    values.append(q.new_zeros(1, heads, dim))  # what padding positions read
    source[source < 0] = filled
    return torch.cat(values)[source.to(q.device)]


def document_mask(starts, lengths, total: int, device=None) -> torch.Tensor:
    """``[T, T]`` bool, True = attend: same document and key at or before the query.
    Padding rows attend to themselves only (no fully masked row; their outputs are zeroed)."""
    segment = torch.full((total,), -1, dtype=torch.long, device=device)
    for i, (start, length) in enumerate(zip(starts, lengths)):
        segment[start:start + length] = i
    pos = torch.arange(total, device=device)
    same = (segment.unsqueeze(1) == segment.unsqueeze(0)) & (segment.unsqueeze(1) >= 0)
    keep = same & (pos.unsqueeze(0) <= pos.unsqueeze(1))
    return keep | torch.diag(segment < 0)


def _dense(q, k, v, starts, lengths, scale, dropout_p):
    total = q.shape[0]
    mask = document_mask(starts, lengths, total, q.device)
    out = _sdpa(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                scale, dropout_p, causal=False, mask=mask)[0].transpose(0, 1)
    real = torch.zeros(total, dtype=out.dtype, device=q.device)
    for start, length in zip(starts, lengths):
        real[start:start + length] = 1
    return out * real[:, None, None]


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            starts: Sequence[int], lengths: Sequence[int],
                            scale: Optional[float] = None, dropout_p: float = 0.0,
                            method: str = "auto",
                            buckets: Optional[list[list[int]]] = None) -> torch.Tensor:
    """Per-document causal attention, ``q [T, h, d]``, ``k, v [T, g, d]`` -> ``[T, h, d]``
    (zeros outside every document). ``buckets`` (from ``plan_buckets``) may be passed to
    reuse one plan across layers; ``method`` is one of ``METHODS``."""
    if method not in METHODS:
        raise ValueError(f"packed attention method must be one of {METHODS}, got {method!r}")
    if method == "segments":
        return _segments(q, k, v, starts, lengths, scale, dropout_p)
    if method == "dense":
        return _dense(q, k, v, starts, lengths, scale, dropout_p)
    if buckets is None:
        buckets = plan_buckets(lengths, heads=q.shape[1])
    if not buckets:
        return q.new_zeros(q.shape)
    if all(len(b) == 1 for b in buckets):
        return _segments(q, k, v, starts, lengths, scale, dropout_p)
    return _bucketed(q, k, v, starts, lengths, scale, dropout_p, buckets)
