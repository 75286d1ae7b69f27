"""Fused *linear* variant: hidden states × LM-head weight shard → log-probs, never the full logits.

``linear_logprobs_and_confidence(hidden [B,S,H], weight [V_local,H], targets, mask)`` gives
the same :class:`~lens_kernels.logprob.LogprobOutput` as
``logprobs_and_confidence(hidden @ weight.T, ...)`` but materialises logits for only
``chunk_tokens`` rows at a time (plus, optionally, a bounded number of kept chunks):

* forward: only masked-in rows are computed. Per chunk of them, ``logits_c = h_c @ Wᵀ``
  (model dtype, like the unfused LM head) → the backend row statistics. The first chunks,
  up to ``keep_fraction`` of the logits the call avoids, are kept for backward (on the fp32
  CPU path holding ``exp(x − m)``, :mod:`lens_kernels.torch_stored`); the others are
  dropped. After all chunks, the same single all-gather + merge as the unfused path
  (:mod:`lens_kernels.tp`).
* backward: rows whose upstream gradient is 0 (masked, or a zero coefficient such as a
  zero advantage) get a zero ``d_hidden`` and cost nothing. A kept chunk is turned into
  ``∂L/∂logits_c`` in place; every other chunk of needed rows recomputes ``logits_c`` first.
  Then ``d_hidden_c = g_c @ W`` and ``d_W += g_cᵀ @ h_c`` (fp32 accumulation).

Cost: a GEMM-bound call does ``4 − keep_fraction`` GEMMs of ``[N, H] × [H, V]`` where the
unfused path does 3 (forward, ``d_hidden``, ``d_W``): the recompute is the price of never
holding the logits. Only the rows the loss needs are computed in either pass.

Tensor parallelism (vocab-parallel LM head, ``weight`` = this rank's ``[V/TP, H]`` shard):
``d_hidden`` is this rank's *partial* sum over its vocab shard, ``d_weight`` its shard's
full gradient. The caller reproduces what Megatron's ``ColumnParallelLinear`` does around
its GEMM: without sequence parallelism pass
``megatron.core.tensor_parallel.copy_to_tensor_model_parallel_region(hidden)`` (identity
forward, all-reduce of ``d_hidden`` over TP in backward); with sequence parallelism pass
``gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)``
(all-gather of the sequence shards forward, reduce-scatter of ``d_hidden`` backward).
``tests/test_kernels_linear.py`` checks both against one process.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .autograd import (KernelSpec, backend_row_grad, backend_row_stats, backward_coefficients,
                       finish_forward, stored_row_grad, stored_row_stats, stored_saved)
from .logprob import (LogprobOutput, as_batched, build_spec, check_inputs, flat_rows,
                      package_output)

CPU_CHUNK_LOGITS_BYTES = 16 << 20     # logits bytes per chunk on CPU (GEMMs stay efficient)
GPU_CHUNK_LOGITS_BYTES = 1 << 30      # on GPU: large chunks keep the GEMMs efficient
KEEP_FRACTION = 0.2                   # default share of the avoided logits kept for backward


@dataclass(frozen=True)
class LinearPlan:
    """Chunking of one call: rows per chunk and the byte budget of chunks kept for backward."""

    chunk: int
    keep_bytes: int


@dataclass
class KeptChunk:
    """Logits of forward rows ``rows`` kept for backward (``stored``: they hold exp(x − m))."""

    rows: torch.Tensor
    logits: torch.Tensor     # [c, V_local]
    stored: bool


def _chunk_tokens(n_rows: int, v_local: int, dtype: torch.dtype, device) -> int:
    budget = GPU_CHUNK_LOGITS_BYTES if device.type == "cuda" else CPU_CHUNK_LOGITS_BYTES
    return max(1, min(max(n_rows, 1), budget // max(1, v_local * dtype.itemsize)))


def _logits(hidden, weight, rows, out=None):
    """``hidden[rows] @ weightᵀ`` → ``[c, V_local]`` in the model dtype (into ``out`` if given)."""
    h = hidden.index_select(0, rows)
    if out is None:
        return h @ weight.t(), h
    return torch.mm(h, weight.t(), out=out[: rows.numel()]), h


def _forward_chunks(hidden, weight, targets, active, spec: KernelSpec, plan: LinearPlan):
    """Row statistics ``[N, 4]`` of the active rows, chunk by chunk; returns (stats, kept)."""
    rows_all = active.nonzero().squeeze(1)
    stats = torch.tensor([float("-inf"), 0.0, 0.0, 0.0], device=hidden.device).repeat(
        hidden.shape[0], 1)
    store = spec.backend in ("cpu", "torch") and hidden.dtype == torch.float32
    kept, kept_bytes, buf = [], 0, None
    for c0 in range(0, rows_all.numel(), plan.chunk):
        rows = rows_all[c0:c0 + plan.chunk]
        chunk_bytes = rows.numel() * weight.shape[0] * hidden.dtype.itemsize
        keep = kept_bytes + chunk_bytes <= plan.keep_bytes
        if keep:
            logits, _ = _logits(hidden, weight, rows)
        else:
            if buf is None:
                buf = hidden.new_empty((plan.chunk, weight.shape[0]))
            logits, _ = _logits(hidden, weight, rows, buf)
        ones = torch.ones(rows.numel(), dtype=torch.int8, device=hidden.device)
        args = (logits.unsqueeze(0), targets[rows], ones)
        stats[rows] = (stored_row_stats if keep and store else backend_row_stats)(*args, spec)
        if keep:
            kept.append(KeptChunk(rows, logits, store))
            kept_bytes += chunk_bytes
    return stats, kept


def _accumulate(grad_logits, h, rows, weight, d_hidden, d_weight) -> None:
    """``d_hidden[rows] = g @ W`` and ``d_W += gᵀ @ h`` for one chunk of rows."""
    if d_hidden is not None:
        d_hidden.index_copy_(0, rows, grad_logits @ weight)
    if d_weight is not None:
        if grad_logits.dtype == torch.float32:
            d_weight.addmm_(grad_logits.t(), h)
        else:
            d_weight.addmm_(grad_logits.t().float(), h.float())


def _chunk_grad(logits, rows, saved, coef, ent_coef, spec: KernelSpec, stored: bool):
    """Turn one chunk of logits (or stored exp values) into its logits gradient, in place."""
    targets, lse, mean, scale, shift = saved
    ent = None if ent_coef is None else ent_coef[rows]
    mu = None if ent_coef is None else mean[rows]
    if stored:
        return stored_row_grad(logits.unsqueeze(0), targets[rows], scale[rows], shift[rows],
                               coef[rows], ent, mu, spec)[0]
    view = logits.unsqueeze(0)
    backend_row_grad(view, view, targets[rows], lse[rows], coef[rows], ent, mu, spec)
    return logits


class LinearTokenLogprobFunction(torch.autograd.Function):
    """(hidden [N,H], weight [V,H], targets [N], active [N] int8, spec, plan) → (logprob, entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, active, spec: KernelSpec, plan: LinearPlan):
        stats, kept = _forward_chunks(hidden, weight, targets, active, spec, plan)
        token, entropy, lse, mean, act = finish_forward(ctx, stats, active, spec)
        ctx.save_for_backward(hidden, weight, targets, lse, mean, act, *stored_saved(stats, lse))
        ctx.spec, ctx.plan, ctx.kept = spec, plan, kept
        return token, entropy

    @staticmethod
    def backward(ctx, grad_token, grad_entropy):
        hidden, weight, targets, lse, mean, act, scale, shift = ctx.saved_tensors
        spec: KernelSpec = ctx.spec
        kept, ctx.kept = ctx.kept, None
        coef, ent_coef = backward_coefficients(grad_token, grad_entropy, act, spec)
        needed = coef != 0 if ent_coef is None else (coef != 0) | (ent_coef != 0)
        d_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                    if ctx.needs_input_grad[1] else None)
        saved = (targets, lse, mean, scale, shift)
        pending = needed.clone()
        while kept:
            chunk = kept.pop(0)          # dropped as soon as it is used: memory falls as we go
            pending[chunk.rows] = False
            if bool(needed[chunk.rows].any()):
                grad = _chunk_grad(chunk.logits, chunk.rows, saved, coef, ent_coef, spec,
                                   chunk.stored)
                _accumulate(grad, hidden.index_select(0, chunk.rows), chunk.rows, weight,
                            d_hidden, d_weight)
            del chunk
        rows_all = pending.nonzero().squeeze(1)
        buf = None
        for c0 in range(0, rows_all.numel(), ctx.plan.chunk):
            rows = rows_all[c0:c0 + ctx.plan.chunk]
            if buf is None:
                buf = hidden.new_empty((min(ctx.plan.chunk, rows_all.numel()), weight.shape[0]))
            logits, h = _logits(hidden, weight, rows, buf)
            grad = _chunk_grad(logits, rows, saved, coef, ent_coef, spec, False)
            _accumulate(grad, h, rows, weight, d_hidden, d_weight)
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
        return d_hidden, d_weight, None, None, None, None


def linear_logprobs_and_confidence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    tp_group=None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    valid_vocab: int | None = None,
    vocab_start_index: int | None = None,
    chunk_tokens: int | None = None,
    keep_fraction: float = KEEP_FRACTION,
    backend: str = "auto",
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    cp_group=None,
) -> LogprobOutput:
    """Log-probs/confidence of ``hidden [B,S,H] @ weight[V_local,H]ᵀ`` without the full logits.

    Same options and outputs as :func:`lens_kernels.logprobs_and_confidence` (packed rows:
    ``hidden [1, T, H]`` or ``[T, H]`` with ``segment_ids``; ``cp_group``; ``tp_group`` with
    ``weight`` this rank's vocab shard — see the module docstring for the ``d_hidden``
    reduction the caller must add). ``chunk_tokens`` rows of logits are computed at a time
    (default: ~16 MiB on CPU, ~1 GiB on GPU); up to ``keep_fraction`` (0..1) of the logits
    of the masked-in rows are kept from forward to backward instead of being recomputed
    (0: least memory, one extra GEMM; the bytes kept are that share of ``rows · V_local ·
    itemsize``).
    """
    hidden, targets_b, mask_b, seqs = as_batched(hidden, targets, mask, segment_ids,
                                                 num_segments, cp_group)
    check_inputs(hidden.shape, hidden.dtype, targets_b, mask_b, temperature)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V_local, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight ({weight.dtype}) and hidden ({hidden.dtype}) must share a dtype")
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must lie in [0, 1], got {keep_fraction}")
    spec = build_spec(tp_group, weight.shape[0], hidden.device, temperature=temperature,
                      return_entropy=return_entropy, valid_vocab=valid_vocab,
                      vocab_start_index=vocab_start_index, backend=backend,
                      inplace_backward=False)   # unused: the chunks are always our own
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets, active = flat_rows(targets_b, mask_b)
    n_active = int(active.sum())
    chunk = chunk_tokens or _chunk_tokens(n_active, weight.shape[0], hidden.dtype, hidden.device)
    keep = int(keep_fraction * n_active * weight.shape[0] * hidden.dtype.itemsize)
    token, entropy = LinearTokenLogprobFunction.apply(flat_hidden, weight, flat_targets, active,
                                                      spec, LinearPlan(int(chunk), keep))
    return package_output(token, entropy, active, targets.shape, return_entropy, seqs)
