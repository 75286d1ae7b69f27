"""Per-document causal attention over a packed (THD) token stream, in plain torch SDPA.

A packed stream holds several documents back to back, ``q [T, heads, d]`` and
``k, v [T, groups, d]`` (grouped-query attention: ``heads`` a multiple of ``groups``).
Document ``i`` occupies ``[starts[i], starts[i] + lengths[i])``; every token attends causally
to the tokens of its own document only. Tokens outside every document (alignment padding)
attend to nothing and get a zero output (and so no gradient).

Three exact implementations, all over ``torch.nn.functional.scaled_dot_product_attention``
(grouped-query K/V passed as they are, ``enable_gqa``):

- ``segments``: one ``is_causal=True`` call per document. The documents are views from one
  ``torch.split`` (its backward is one concatenation; slicing ``q[s:e]`` per document would
  make each backward write a full ``[T, h, d]`` gradient — 5x slower at 143 documents);
- ``bucketed``: like ``segments``, but buckets of several documents (from ``plan_buckets``)
  run as one right-padded ``[n_b, heads, L_b, d]`` call. Right padding needs no mask: under
  top-left causal alignment a real query only sees keys at or before its position, all real;
- ``dense``: one SDPA call with a ``[T, T]`` block-diagonal causal mask (quadratic in T; the
  reference-style option, 4-8x slower here).

``method="auto"`` is ``bucketed`` under the cost model below: per-document calls for the
documents of RL rows (prompt + response, ~100+ tokens: measured fastest), batched calls only
for many tiny documents (~1.5x faster at 4-24 tokens, 4 heads). FlexAttention and jagged
nested tensors are not options on CPU (FlexAttention: "does not support backward on CPU";
jagged SDPA refuses ``is_causal``), as ``tools/bench_packed_attention.py`` reports.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

METHODS = ("auto", "segments", "bucketed", "dense")

# Cost model of the per-bucket SDPA calls (plan_buckets), in query-key pairs per head:
#   one document alone:       CALL_OVERHEAD_PAIRS / heads + L (L + 1) / 2
#   n >= 2 documents batched: BATCH_OVERHEAD_FACTOR * CALL_OVERHEAD_PAIRS / heads
#                               + BATCH_PAIR_PENALTY * n L_max (L_max + 1) / 2
# Measured on this CPU (torch 2.13, 1 thread, head_dim 64; tools/bench_packed_attention.py
# --calibrate and the grid): a causal SDPA call costs ~0.2 ms (4 heads) to ~0.3 ms (16 heads)
# at L=8, ~35 ns per pair x head at large L, i.e. ~6-9k pairs x heads of overhead; a padded
# batch of short documents runs ~2x slower per pair than the documents one by one, so only
# documents far shorter than that overhead (a few dozen tokens) are worth batching; a batched
# call also runs a few more ops (concatenate, gather, select, split): twice the overhead.
# With many heads per rank batching lost even on tiny documents (16 heads, 4-24 tokens:
# 1.05-1.16x slower; 4 heads: 0.73-0.87x), so above BATCH_MAX_HEADS every document runs alone.
CALL_OVERHEAD_PAIRS = 8192
BATCH_PAIR_PENALTY = 2.0
BATCH_OVERHEAD_FACTOR = 2.0
BATCH_MAX_HEADS = 8


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
                 call_overhead_pairs: int = CALL_OVERHEAD_PAIRS,
                 batch_penalty: float = BATCH_PAIR_PENALTY) -> list[list[int]]:
    """Group document indices into buckets: minimise the cost model above over contiguous
    runs of the length-sorted documents (an exact dynamic programme, O(n^2)); each bucket is
    longest first. Empty documents are left out. ``heads``: query heads on this rank."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (-lengths[i], i))
    n = len(order)
    if n == 0:
        return []
    if heads > BATCH_MAX_HEADS:
        return [[i] for i in order]
    overhead = call_overhead_pairs / max(1, heads)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j (longest) documents
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # bucket = order[i:j], its longest is order[i]
            longest = lengths[order[i]]
            alone = j - i == 1
            cost = (best[i] + overhead * (1.0 if alone else BATCH_OVERHEAD_FACTOR)
                    + (1.0 if alone else batch_penalty) * (j - i) * longest * (longest + 1) / 2)
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


def _pieces(starts, lengths, total):
    """Sizes tiling [0, T) into documents and gaps, and which pieces are documents."""
    sizes, is_doc, cursor = [], [], 0
    for start, length in sorted((s, n) for s, n in zip(starts, lengths) if n > 0):
        if start > cursor:
            sizes.append(start - cursor)
            is_doc.append(False)
        sizes.append(length)
        is_doc.append(True)
        cursor = start + length
    if cursor < total:
        sizes.append(total - cursor)
        is_doc.append(False)
    return sizes, is_doc


def _doc_attention(qs, ks, vs, scale, dropout_p):
    """One document ``[L, h, d]``: 4-D ``[1, h, L, d]`` for SDPA (torch's CPU flash kernel
    takes 4-D inputs only; 3-D runs the math path)."""
    o = _sdpa(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], vs.transpose(0, 1)[None],
              scale, dropout_p, causal=True)
    return o[0].transpose(0, 1)


def _batch_attention(qs, ks, vs, lengths, scale, dropout_p):
    """Several documents ``[L_i, h, d]`` as one right-padded ``[n, h, L_max, d]`` call.

    The documents are concatenated and gathered into the padded batch with an index local
    to them (so the gather's backward is proportional to their tokens, not to T)."""
    longest = max(lengths)
    offsets = torch.arange(longest)
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    real = offsets[None, :] < torch.tensor(lengths)[:, None]  # [n, L_max]
    index = torch.where(real, starts[:, None] + offsets, 0).to(qs[0].device)
    q, k, v = (torch.cat(t)[index].permute(0, 2, 1, 3) for t in (qs, ks, vs))
    out = _sdpa(q, k, v, scale, dropout_p, causal=True).permute(0, 2, 1, 3)
    return out[real.to(out.device)].split(lengths)


def _segments(q, k, v, starts, lengths, scale, dropout_p, buckets=None):
    """Per-document attention; ``buckets`` (lists of document indices) of more than one
    document run as one batched call. Documents are views from ``torch.split`` — not slices:
    the backward of a split is one concatenation, while each slice's backward writes a full
    ``[T, h, d]`` gradient (quadratic in the number of documents)."""
    sizes, is_doc = _pieces(starts, lengths, q.shape[0])
    doc_pieces = [j for j, d in enumerate(is_doc) if d]
    by_start = sorted((s, i) for i, (s, n) in enumerate(zip(starts, lengths)) if n > 0)
    piece_of = {i: j for (_, i), j in zip(by_start, doc_pieces)}
    qs, ks, vs = q.split(sizes), k.split(sizes), v.split(sizes)
    out = [None if d else torch.zeros_like(p) for p, d in zip(qs, is_doc)]
    if buckets is None:
        buckets = [[i] for _, i in by_start]
    for bucket in buckets:
        pieces = [piece_of[i] for i in bucket]
        if len(bucket) == 1:
            j = pieces[0]
            out[j] = _doc_attention(qs[j], ks[j], vs[j], scale, dropout_p)
            continue
        outs = _batch_attention([qs[j] for j in pieces], [ks[j] for j in pieces],
                                [vs[j] for j in pieces], [lengths[i] for i in bucket],
                                scale, dropout_p)
        for j, o in zip(pieces, outs):
            out[j] = o
    return torch.cat(out) if len(out) > 1 else out[0]


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
    return _segments(q, k, v, starts, lengths, scale, dropout_p, buckets)
