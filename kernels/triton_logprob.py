"""Raw Triton kernels for the fused log-prob (forward statistics and backward gradient).

Two kernels, one program per token row, each looping over this rank's vocab shard in
blocks of ``BLOCK_V`` columns (the shard width need not be a multiple of the block):

* :func:`row_stats_kernel` — one read of the row in its own dtype, fp32 accumulation:
  online max ``m`` and ``s = Σ exp(x - m)`` (x = logit / T), the target logit when the
  target lies in this shard (0 otherwise), and optionally the centred entropy term
  ``w = Σ exp(x - m)·(x - m)``. Output: packed ``stats[row] = (m, s, t, w)`` fp32 — the
  exact buffer that :mod:`lens_kernels.tp` all-gathers across tensor-parallel ranks.
* :func:`row_grad_kernel` — recomputes ``p = exp(x - lse)`` from the logits and the saved
  per-row log-sum-exp and writes ``(a·(onehot - p) + b·p·(μ - x)) / T`` straight into the
  gradient buffer in the logits dtype (which may be the logits buffer itself: each block
  is read before it is written, so in-place is safe). Rows with ``a = b = 0`` (masked
  tokens) write zeros without reading the logits.

Columns at or beyond ``n_valid`` (Megatron's vocab padding) are excluded from the
softmax and get zero gradient. The float64 reference for both kernels is
:mod:`lens_kernels.reference`; the chunked CPU twin is :mod:`lens_kernels.torch_logprob`.

The launch configurations live in :data:`KERNEL_CONFIGS` / :func:`select_config`; the AOT
test (``tests/test_kernels_aot.py``) compiles every one of them for sm_90a.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .tp import STATS_WIDTH


@triton.jit
def row_stats_kernel(
    logits_ptr, targets_ptr, active_ptr, stats_ptr,
    seq_len, stride_b, stride_s, n_valid, vocab_start, inv_temperature,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    """Per-row (max, Σexp, target logit, Σexp·(x-max)) over this shard; fp32 accumulation."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // seq_len) * stride_b + (row % seq_len) * stride_s
    m = float("-inf")
    s = 0.0
    w = 0.0
    t = 0.0
    if tl.load(active_ptr + row) != 0:
        for start in range(0, n_valid, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < n_valid, other=float("-inf")).to(tl.float32)
            x = x * inv_temperature
            m_new = tl.maximum(m, tl.max(x, axis=0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - shift)
            # clamp x - m at -200 (exp underflows to 0 there anyway) so (-inf)*0 never occurs
            d = tl.maximum(x - shift, -200.0)
            e = tl.exp(d)
            if WITH_ENTROPY:
                # rescale the centred sum to the new max (m = -inf only while s == 0)
                m_old = tl.where(m == float("-inf"), shift, m)
                w = alpha * (w + (m_old - shift) * s) + tl.sum(e * d, axis=0)
            s = s * alpha + tl.sum(e, axis=0)
            m = m_new
        local_target = tl.load(targets_ptr + row) - vocab_start
        if (local_target >= 0) & (local_target < n_valid):
            t = tl.load(base + local_target).to(tl.float32) * inv_temperature
    out = stats_ptr + row * 4
    tl.store(out + 0, m)
    tl.store(out + 1, s)
    tl.store(out + 2, t)
    tl.store(out + 3, w)


@triton.jit
def row_grad_kernel(
    logits_ptr, grad_ptr, targets_ptr, lse_ptr, coef_ptr, ent_coef_ptr, mean_ptr,
    seq_len, stride_b, stride_s, grad_stride_b, grad_stride_s,
    n_valid, n_cols, vocab_start, inv_temperature,
    BLOCK_V: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    """grad = (a·(onehot - p) + b·p·(μ - x)) / T, p recomputed from logits and the saved lse."""
    row = tl.program_id(0).to(tl.int64)
    bi = row // seq_len
    si = row % seq_len
    src = logits_ptr + bi * stride_b + si * stride_s
    dst = grad_ptr + bi * grad_stride_b + si * grad_stride_s
    a = tl.load(coef_ptr + row)
    b = 0.0
    mean = 0.0
    if WITH_ENTROPY:
        b = tl.load(ent_coef_ptr + row)
        mean = tl.load(mean_ptr + row)
    needed = a != 0.0
    if WITH_ENTROPY:
        needed = needed | (b != 0.0)
    if needed:
        lse = tl.load(lse_ptr + row)
        local_target = tl.load(targets_ptr + row) - vocab_start
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < n_valid
            x = tl.load(src + cols, mask=valid, other=float("-inf")).to(tl.float32)
            x = x * inv_temperature
            if WITH_ENTROPY:
                x = tl.maximum(x, lse - 200.0)  # p unchanged (exp(-200) == 0), no (-inf)*0
            p = tl.exp(x - lse)
            g = tl.where(cols == local_target, a, 0.0) - a * p
            if WITH_ENTROPY:
                g += b * p * (mean - x)
            g = tl.where(valid, g * inv_temperature, 0.0)
            tl.store(dst + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)
    else:
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            zero = tl.zeros([BLOCK_V], dtype=tl.float32)
            tl.store(dst + cols, zero.to(grad_ptr.dtype.element_ty), mask=cols < n_cols)


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration the launcher can pick (also compiled ahead of time in CI)."""

    kernel: str          # "stats" or "grad"
    dtype: torch.dtype   # logits dtype (the gradient has the same dtype)
    block_v: int
    num_warps: int
    with_entropy: bool


_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# 16 KiB of logits per block load: 8 (fp32) / 16 (bf16, fp16) values per thread at 16 warps;
# ptxas reports 30-58 registers and no spills on sm_90a (python -m lens_kernels.aot).
_BLOCK_V = {torch.float32: 4096, torch.bfloat16: 8192, torch.float16: 8192}
_NUM_WARPS = 16

KERNEL_CONFIGS: tuple[KernelConfig, ...] = tuple(
    KernelConfig(kernel, dtype, _BLOCK_V[dtype], _NUM_WARPS, ent)
    for kernel in ("stats", "grad")
    for dtype in _TRITON_DTYPE
    for ent in (False, True)
)


def select_config(kernel: str, dtype: torch.dtype, with_entropy: bool) -> KernelConfig:
    """The configuration used for ``kernel`` on logits of ``dtype`` (one per combination)."""
    for cfg in KERNEL_CONFIGS:
        if (cfg.kernel, cfg.dtype, cfg.with_entropy) == (kernel, dtype, with_entropy):
            return cfg
    raise ValueError(f"no Triton configuration for {kernel} on {dtype}; use fp32/bf16/fp16")


def triton_dtype_name(dtype: torch.dtype) -> str:
    """Triton's signature name for a torch dtype (``*bf16`` pointers in AOT signatures)."""
    return _TRITON_DTYPE[dtype]


def is_interpreted() -> bool:
    """True when the kernels were built by ``TRITON_INTERPRET=1`` (they then run on CPU)."""
    return not isinstance(row_stats_kernel, triton.runtime.JITFunction)


def _batch_strides(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def launch_row_stats(logits, targets, active, vocab_start, n_valid, inv_temperature, with_entropy,
                     block_v=None):
    """Launch :func:`row_stats_kernel`; returns packed stats ``[B*S, 4]`` fp32.

    ``logits`` is ``[B, S, V_local]`` with unit stride on the vocab axis; ``targets`` and
    ``active`` are flat ``[B*S]`` (int64 global ids, int8 0/1). ``block_v`` overrides the
    configured block width (tests use small blocks to exercise the multi-block loop).
    """
    bsz, seq, _ = logits.shape
    rows = bsz * seq
    stats = torch.empty(rows, STATS_WIDTH, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return stats
    cfg = select_config("stats", logits.dtype, with_entropy)
    row_stats_kernel[(rows,)](
        logits, targets, active, stats,
        seq, *_batch_strides(logits), n_valid, vocab_start, inv_temperature,
        BLOCK_V=block_v or cfg.block_v, WITH_ENTROPY=with_entropy, num_warps=cfg.num_warps,
    )
    return stats


def launch_row_grad(logits, grad, targets, lse, coef, ent_coef, mean, vocab_start, n_valid,
                    inv_temperature, block_v=None):
    """Launch :func:`row_grad_kernel` writing into ``grad`` (may be ``logits`` itself).

    ``coef`` (a) and optional ``ent_coef`` (b) are per-row fp32 upstream gradients of the
    token log-prob and entropy, already zero on masked rows; ``mean`` is the per-row μ.
    """
    bsz, seq, n_cols = logits.shape
    rows = bsz * seq
    if rows == 0:
        return grad
    with_entropy = ent_coef is not None
    cfg = select_config("grad", logits.dtype, with_entropy)
    row_grad_kernel[(rows,)](
        logits, grad, targets, lse, coef,
        ent_coef if with_entropy else coef, mean if with_entropy else lse,
        seq, *_batch_strides(logits), *_batch_strides(grad),
        n_valid, n_cols, vocab_start, inv_temperature,
        BLOCK_V=block_v or cfg.block_v, WITH_ENTROPY=with_entropy, num_warps=cfg.num_warps,
    )
    return grad
