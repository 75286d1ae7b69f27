"""Chunked torch implementation of the fused log-prob math (the CPU twin of the Triton kernels).

Same inputs, outputs and numerics as :mod:`lens_kernels.triton_logprob`: per-row packed
statistics ``(m, s, t, w)`` in the forward, and the gradient
``(a·(onehot − p) + b·p·(μ − x)) / T`` recomputed from the logits and the saved
log-sum-exp in the backward. Rows are processed in chunks sized so the fp32 temporaries
of one chunk stay in L2 (:data:`CHUNK_BYTES`); every elementwise step works in place on a
per-worker chunk buffer, so the extra memory is O(chunk) and the logits are read from
memory once per pass. bf16/fp16 logits are converted to fp32 one chunk at a time. Chunks
whose rows are all masked are skipped (forward: neutral statistics, backward: zeros).
Chunks are spread over worker threads (:mod:`lens_kernels.cpu_parallel`). Exponentials are
``exp2`` of the difference scaled by ``log₂e`` (~1.4x faster than ``exp`` on the sandbox CPU,
relative error ≤ ~4e-8·|x − shift|, largest where the value is smallest).
"""
from __future__ import annotations

import math

import torch

from .cpu_parallel import run_chunks

CHUNK_BYTES = 2 << 20      # fp32 bytes per chunk (L2 is 2 MiB per core on the sandbox)
_UNDERFLOW = 200.0         # exp(−200) == 0 in fp32: clamping there keeps (−inf)·0 out
_FP32_LOWEST = torch.finfo(torch.float32).min
SHIFT_SAMPLE = 512         # leading columns whose max (and the target's x) is the cheap shift
LOG2E = 1.0 / math.log(2.0)


def _row_views(*tensors: torch.Tensor) -> list[list[torch.Tensor]]:
    """``[B, S, V]`` tensors → matching lists of 2-D row views ``[rows, V]``.

    One view each when every tensor's batch dims merge, else one per batch element for all
    (e.g. Megatron's ``[S, B, V]`` logits transposed to ``[B, S, V]``).
    """
    try:
        return [[t.view(-1, t.shape[-1])] for t in tensors]
    except RuntimeError:
        return [list(t.unbind(0)) for t in tensors]


def _chunk_tasks(views, n_cols: int, flags: list) -> list[tuple[int, int, int, bool]]:
    """(view index, first row, end row, any row flagged) of every chunk of rows."""
    step = max(1, CHUNK_BYTES // (4 * max(n_cols, 1)))
    tasks, offset = [], 0
    for vi, view in enumerate(views):
        for r0 in range(0, view.shape[0], step):
            r1 = min(view.shape[0], r0 + step)
            tasks.append((vi, r0, r1, any(flags[offset + r0: offset + r1])))
        offset += view.shape[0]
    return tasks


def _view_offsets(views) -> list[int]:
    offsets, total = [], 0
    for view in views:
        offsets.append(total)
        total += view.shape[0]
    return offsets


class _ChunkBuffers:
    """Lazily allocated fp32 chunk buffers ``[rows, n_cols]`` (one per worker), reused."""

    def __init__(self, like: torch.Tensor, n_cols: int, count: int):
        self.like, self.n_cols, self.count, self.bufs = like, n_cols, count, ()

    def get(self, rows: int) -> tuple[torch.Tensor, ...]:
        if not self.bufs or self.bufs[0].shape[0] < rows:
            self.bufs = tuple(self.like.new_empty((rows, self.n_cols), dtype=torch.float32)
                              for _ in range(self.count))
        return tuple(b[:rows] for b in self.bufs)


def _target_logits(view, local_target, in_shard, n_valid, inv_temperature):
    """x at the local target for rows that own it, 0 elsewhere (fp32)."""
    idx = local_target.clamp(0, n_valid - 1).unsqueeze(1)
    picked = view.gather(1, idx).squeeze(1).float() * inv_temperature
    return torch.where(in_shard, picked, torch.zeros_like(picked))


def _scaled_fp32(x, inv_temperature, buf):
    """x/T as fp32: the logits view itself when already fp32 and T == 1, else ``buf``."""
    if x.dtype == torch.float32 and inv_temperature == 1.0:
        return x
    buf.copy_(x)
    if inv_temperature != 1.0:
        buf.mul_(inv_temperature)
    return buf


def _sum_exp(xs, shift_out, buf, s_out) -> None:
    """``s_out = Σ exp(xs − shift)`` per row, using ``buf`` (which may be ``xs``) as scratch."""
    shift = shift_out.clamp(min=_FP32_LOWEST).unsqueeze(1)   # all −inf row: x − shift = −inf
    torch.sum(torch.sub(xs, shift, out=buf).mul_(LOG2E).exp2_(), 1, out=s_out)


def _chunk_stats(x, inv_temperature, bufs, outs, target_x):
    """Write (m, s[, w]) of one chunk ``x [c, n_valid]`` into the row slices ``outs``.

    ``bufs`` holds one fp32 chunk buffer, or two when the entropy term ``w`` is wanted
    (``outs[2]`` not None). Without entropy the shift is the max over the first
    :data:`SHIFT_SAMPLE` columns and the target (a lower bound of the row max, so no
    underflow), which saves a full pass; it is kept when no sum overflowed (max − shift < 88)
    and otherwise the chunk is redone with the exact max.
    """
    m_out, s_out, w_out = outs
    xs = _scaled_fp32(x, inv_temperature, bufs[0])
    if w_out is None and xs.shape[1] > 2 * SHIFT_SAMPLE:
        torch.amax(xs[:, :SHIFT_SAMPLE], 1, out=m_out)
        torch.maximum(m_out, target_x, out=m_out)
        _sum_exp(xs, m_out, bufs[0], s_out)
        if bool(torch.isfinite(s_out).all()):
            return
        xs = _scaled_fp32(x, inv_temperature, bufs[0])       # bufs[0] was overwritten
    torch.amax(xs, 1, out=m_out)
    if w_out is None:
        _sum_exp(xs, m_out, bufs[0], s_out)
        return
    d = torch.sub(xs, m_out.clamp(min=_FP32_LOWEST).unsqueeze(1), out=bufs[0])   # x − m ≤ 0
    d.mul_(LOG2E).clamp_(min=-_UNDERFLOW * LOG2E)             # (x − m)·log₂e, finite
    e = torch.exp2(d, out=bufs[1])
    torch.sum(e, 1, out=s_out)
    torch.sum(d.mul_(e), 1, out=w_out).mul_(1.0 / LOG2E)      # Σ e·(x − m)


def chunked_row_stats(logits, targets, active, vocab_start, n_valid, inv_temperature,
                      with_entropy: bool, n_buffers: int, chunk_fn):
    """The driver both CPU row-statistics paths share: per-row accumulators ``m, s, t, w``
    (fp32), the target logits read first (before any chunk overwrites the logits), then
    ``chunk_fn(x, buffers, (m, s, w or None without entropy), target_x)`` on every chunk with
    an active row, in parallel over the chunk tasks. Returns ``(m, s, t, w, is_active)``."""
    rows, dev = targets.numel(), logits.device
    m = torch.full((rows,), float("-inf"), dtype=torch.float32, device=dev)
    s, t, w = (torch.zeros(rows, dtype=torch.float32, device=dev) for _ in range(3))
    is_active = active.bool()
    (views,) = _row_views(logits)
    offsets = _view_offsets(views)
    if rows and n_valid:
        local_target = targets - vocab_start
        in_shard = is_active & (local_target >= 0) & (local_target < n_valid)
        for view, off in zip(views, offsets):
            sl = slice(off, off + view.shape[0])
            t[sl] = _target_logits(view, local_target[sl], in_shard[sl], n_valid, inv_temperature)
        target_x = torch.where(in_shard, t, torch.full_like(t, -float("inf")))

        def work(tasks):
            buffers = _ChunkBuffers(logits, n_valid, n_buffers)
            for vi, r0, r1, _ in tasks:
                rs = slice(offsets[vi] + r0, offsets[vi] + r1)
                chunk_fn(views[vi][r0:r1, :n_valid], buffers.get(r1 - r0),
                         (m[rs], s[rs], w[rs] if with_entropy else None), target_x[rs])

        tasks = [task for task in _chunk_tasks(views, n_valid, is_active.tolist()) if task[3]]
        run_chunks(tasks, work, dev)
    return m, s, t, w, is_active


def packed_row_stats(m, s, t, w, is_active) -> torch.Tensor:
    """``[rows, 4]`` statistics, inactive rows neutral (``-inf, 0, 0, 0``)."""
    stats = torch.stack([m, s, t, w], dim=1)
    neutral = torch.tensor([float("-inf"), 0.0, 0.0, 0.0], device=stats.device)
    return torch.where(is_active.unsqueeze(1), stats, neutral)


def row_stats_torch(logits, targets, active, vocab_start, n_valid, inv_temperature,
                    with_entropy):
    """Packed per-row statistics ``[B*S, 4]`` fp32; same contract as ``launch_row_stats``."""
    def chunk(x, bufs, outs, target_x):
        _chunk_stats(x, inv_temperature, bufs, outs, target_x)

    m, s, t, w, is_active = chunked_row_stats(logits, targets, active, vocab_start, n_valid,
                                              inv_temperature, with_entropy,
                                              2 if with_entropy else 1, chunk)
    return packed_row_stats(m, s, t, w, is_active)


def _chunk_grad(x, out, lse, a, b, mean, inv_temperature, xs):
    """Write p·(b·(μ − x) − a)/T into ``out`` (fp32) for one chunk; onehot added by caller.

    ``b``/``mean`` are None without an entropy gradient; ``xs`` is then unused.
    """
    lse_col = lse.unsqueeze(1)
    if b is None:
        if inv_temperature == 1.0:
            torch.sub(x, lse_col, out=out)
        else:
            torch.add(-lse_col, x, alpha=inv_temperature, out=out)
        return out.mul_(LOG2E).exp2_().mul_((-a * inv_temperature).unsqueeze(1))
    xs.copy_(x)
    if inv_temperature != 1.0:
        xs.mul_(inv_temperature)
    torch.maximum(xs, (lse - _UNDERFLOW).unsqueeze(1), out=xs)   # p unchanged, no −inf
    torch.sub(xs, lse_col, out=out).mul_(LOG2E).exp2_()           # p
    c1 = (-b * inv_temperature).unsqueeze(1)
    c0 = (inv_temperature * (b * mean - a)).unsqueeze(1)
    xs.mul_(c1).add_(c0)
    return out.mul_(xs)


def _grad_chunk_task(view, dst, rs, n_valid, coefs, flags, buffers, inv_temperature):
    """Gradient of one chunk of rows ``rs`` written into ``dst`` (its slice of the output)."""
    lse, coef, ent_coef, mean, onehot_idx, onehot_val, needed = coefs
    direct = dst.dtype == torch.float32          # fp32: compute straight into the output
    bufs = buffers.get(dst.shape[0])
    out = dst[:, :n_valid] if direct else bufs[0]
    _chunk_grad(view[:, :n_valid], out, lse[rs], coef[rs],
                None if ent_coef is None else ent_coef[rs],
                None if mean is None else mean[rs], inv_temperature,
                bufs[-1] if bufs else None)
    out.scatter_add_(1, onehot_idx[rs], onehot_val[rs].unsqueeze(1))
    if not all(flags[rs]):
        out.masked_fill_(~needed[rs].unsqueeze(1), 0.0)
    if not direct:
        dst[:, :n_valid].copy_(out)
    if n_valid < dst.shape[1]:
        dst[:, n_valid:].zero_()


def row_grad_torch(logits, grad, targets, lse, coef, ent_coef, mean, vocab_start, n_valid,
                   inv_temperature):
    """Write the logits gradient into ``grad`` (may alias ``logits``); same contract as
    ``launch_row_grad``: ``coef``/``ent_coef`` are per-row upstream grads, 0 on masked rows."""
    local_target = targets - vocab_start
    in_shard = (local_target >= 0) & (local_target < n_valid)
    needed = coef != 0
    if ent_coef is not None:
        needed = needed | (ent_coef != 0)
    coefs = (lse, coef, ent_coef, mean, local_target.clamp(0, max(n_valid - 1, 0)).unsqueeze(1),
             torch.where(in_shard, coef * inv_temperature, torch.zeros_like(coef)), needed)
    flags = needed.tolist() if n_valid else [False] * targets.numel()
    views, gviews = _row_views(logits, grad)
    offsets = _view_offsets(views)
    n_bufs = int(grad.dtype != torch.float32) + int(ent_coef is not None)

    def work(tasks):
        buffers = _ChunkBuffers(grad, n_valid, n_bufs)
        for vi, r0, r1, any_needed in tasks:
            if not any_needed:                   # all rows masked: nothing to read
                gviews[vi][r0:r1].zero_()
                continue
            rs = slice(offsets[vi] + r0, offsets[vi] + r1)
            _grad_chunk_task(views[vi][r0:r1], gviews[vi][r0:r1], rs, n_valid, coefs, flags,
                             buffers, inv_temperature)

    run_chunks(_chunk_tasks(views, n_valid, flags), work, logits.device)
    return grad
