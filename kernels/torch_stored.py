"""Chunked torch path that keeps ``exp(x − m)`` in the logits buffer (fp32, in-place mode, CPU).

On a CPU the fused log-prob is bound by the exponential, not by memory: on the 2-core
sandbox one ``exp`` over ``[4096, 32000]`` fp32 costs ~100 ms, a read+write pass ~45 ms. The
recompute path (:mod:`lens_kernels.torch_logprob`) evaluates the exponential twice — forward
statistics and backward softmax. When the caller gives the logits buffer away
(``inplace_backward=True``) and the logits are fp32, this path evaluates it once:

* forward (:func:`row_stats_store_torch`), per chunk of rows: exact row max ``m`` (of
  x = logit/T), ``d = x − m`` in an L2-sized buffer, ``e = 2^(d·log₂e)`` written straight
  into the logits chunk (the buffer now holds ``e ∈ [0, 1]``), ``s = Σ e`` and, with entropy,
  ``w = Σ e·d``. The packed statistics ``(m, s, t, w)`` are the same as the recompute path's,
  so the single-collective TP merge (:mod:`lens_kernels.tp`) is unchanged.
* backward (:func:`row_grad_stored_torch`): ``p = e·c`` with the per-row ``c = exp(m − lse)``
  (lse after the merge), so the gradient ``(a·(onehot − p) + b·p·(μ − x))/T`` is one pass:
  ``e ← e·(−a·c/T)`` plus the one-hot term. Only an entropy gradient (``b ≠ 0``) needs
  ``x − m = ln e`` back, one ``log2`` per element; a detached entropy (the actor's metric)
  costs nothing in backward.

Rows are exact-max shifted, so ``e ≤ 1`` and ``c ≤ 1``: if ``c`` underflows, every ``p`` of
the shard is below it (< 1e-38) and its gradient terms vanish. ``exp2`` of the pre-scaled
difference is ~1.4x faster than ``exp`` here; its relative error (≤ ~4e-8·|d|, measured) is
largest where ``e`` is smallest. The float64 reference is :mod:`lens_kernels.reference`
(:func:`~lens_kernels.reference.reference_row_stats` for the statistics,
:func:`~lens_kernels.reference.reference_row_grad` for the gradient from the stored values).
"""
from __future__ import annotations

import torch

from .cpu_parallel import run_chunks
from .torch_logprob import (LOG2E, _ChunkBuffers, _chunk_tasks, _row_views, _view_offsets,
                            chunked_row_stats, packed_row_stats)

_FP32_LOWEST = torch.finfo(torch.float32).min
_TINY = torch.finfo(torch.float32).tiny  # ln of a zero e is clamped here (its p·(…) is 0)


def _store_chunk(x, inv_temperature, buf, outs) -> None:
    """Overwrite the fp32 chunk ``x [c, n_valid]`` with ``exp(x/T − m)``; write (m, s[, w])."""
    m_out, s_out, w_out = outs
    torch.amax(x, 1, out=m_out)
    if inv_temperature != 1.0:
        m_out.mul_(inv_temperature)               # max(x/T) = max(x)/T (rounding is monotonic)
    shift = m_out.clamp(min=_FP32_LOWEST).unsqueeze(1)    # all −inf row: d = −inf, e = 0
    if inv_temperature == 1.0:
        torch.sub(x, shift, out=buf)
    else:
        torch.add(-shift, x, alpha=inv_temperature, out=buf)
    buf.mul_(LOG2E)                               # d·log₂e ≤ 0 (−inf on −inf logits)
    torch.exp2(buf, out=x)                        # e, into the logits buffer
    torch.sum(x, 1, out=s_out)
    if w_out is not None:                         # Σ e·d·log₂e; nansum drops the (−inf)·0 terms
        torch.nansum(buf.mul_(x), 1, out=w_out)


def row_stats_store_torch(logits, targets, active, vocab_start, n_valid, inv_temperature,
                          with_entropy):
    """Packed ``[B*S, 4]`` statistics like ``row_stats_torch``; ``logits`` (fp32) ends up
    holding ``exp(x − m)`` on the valid columns of every chunk with an active row."""
    if logits.dtype != torch.float32:
        raise TypeError(f"the stored-exp path needs fp32 logits, got {logits.dtype}")

    def chunk(x, bufs, outs, target_x):
        _store_chunk(x, inv_temperature, bufs[0], outs)

    m, s, t, w, is_active = chunked_row_stats(logits, targets, active, vocab_start, n_valid,
                                              inv_temperature, with_entropy, 1, chunk)
    return packed_row_stats(m, s, t, w * (1.0 / LOG2E), is_active)


def stored_scale(shift: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Per-row ``c = exp(m − lse)`` that turns the stored ``e`` into ``p`` (0 without mass)."""
    finite = torch.isfinite(shift) & torch.isfinite(lse)
    return torch.where(finite, torch.exp(torch.where(finite, shift - lse, torch.zeros_like(lse))),
                       torch.zeros_like(lse))


def _entropy_grad_chunk(e, rs, coefs, buf, inv_temperature) -> None:
    """In place on one chunk ``e [c, n_valid]``: e → (−a·p + b·p·(μ − x))/T (no one-hot yet)."""
    scale, coef, ent_coef, mean, shift = coefs
    k = (scale[rs] * inv_temperature).unsqueeze(1)
    b = ent_coef[rs].unsqueeze(1)
    # μ − x = (μ − m) − ln e;  g/p = b·(μ − m) − a − b·ln2·log₂ e
    torch.log2(torch.clamp(e, min=_TINY), out=buf)
    buf.mul_(-b / LOG2E).add_(b * (mean[rs] - shift[rs]).unsqueeze(1) - coef[rs].unsqueeze(1))
    e.mul_(buf.mul_(k))


def _entropy_grad(views, offsets, n_valid, coefs, flags, inv_temperature) -> None:
    """The entropy-gradient case, chunk by chunk (it needs ``ln e``, one ``log2`` per element)."""
    def work(tasks):
        buffers = _ChunkBuffers(views[0], n_valid, 1)
        for vi, r0, r1, any_needed in tasks:
            if any_needed:
                _entropy_grad_chunk(views[vi][r0:r1, :n_valid], slice(offsets[vi] + r0, offsets[vi] + r1),
                                    coefs, buffers.get(r1 - r0)[0], inv_temperature)

    run_chunks(_chunk_tasks(views, n_valid, flags), work, views[0].device)


def row_grad_stored_torch(stored, targets, scale, shift, coef, ent_coef, mean, vocab_start,
                          n_valid, inv_temperature):
    """Turn ``stored`` (the buffer :func:`row_stats_store_torch` filled) into the logits
    gradient in place and return it. ``scale = c`` and ``shift = m`` are per row;
    ``coef``/``ent_coef`` are the upstream grads, 0 on masked rows (their rows become 0).

    Without an entropy gradient this is Megatron-like whole-buffer work, a few large ops per
    run of rows with a gradient (one per sequence in the usual prompt | response | padding
    layout): a multiply by the per-row ``−a·c/T`` (one read + write), the one-hot scatter;
    runs without a gradient and padded columns are zero-filled (written, never read).
    """
    local_target = targets - vocab_start
    in_shard = (local_target >= 0) & (local_target < n_valid)
    needed = coef != 0
    if ent_coef is not None:
        needed = needed | (ent_coef != 0)
    (views,) = _row_views(stored)
    offsets = _view_offsets(views)
    if ent_coef is not None and n_valid:
        _entropy_grad(views, offsets, n_valid, (scale, coef, ent_coef, mean, shift),
                      needed.tolist(), inv_temperature)
    onehot_idx = local_target.clamp(0, max(n_valid - 1, 0)).unsqueeze(1)
    onehot_val = torch.where(in_shard, coef * inv_temperature, torch.zeros_like(coef)).unsqueeze(1)
    k = (-coef * scale * inv_temperature).unsqueeze(1)
    for view, off in zip(views, offsets):
        for r0, r1, any_needed in _runs(needed[off:off + view.shape[0]]):
            rows, rs = view[r0:r1], slice(off + r0, off + r1)
            if not (any_needed and n_valid):
                rows.zero_()                     # no gradient: whatever the buffer held
                continue
            if ent_coef is None:
                rows[:, :n_valid].mul_(k[rs])
            rows[:, :n_valid].scatter_add_(1, onehot_idx[rs], onehot_val[rs])
            if n_valid < view.shape[1]:
                rows[:, n_valid:].zero_()
    return stored


def _runs(flags: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Maximal runs ``(start, end, value)`` of equal values in a 1-D bool tensor."""
    if flags.numel() == 0:
        return []
    f = flags.to(torch.int8)
    cuts = ((f[1:] != f[:-1]).nonzero().squeeze(1) + 1).tolist()
    bounds = [0, *cuts, f.numel()]
    values = f[bounds[:-1]].tolist()
    return [(a, b, bool(v)) for a, b, v in zip(bounds[:-1], bounds[1:], values)]
