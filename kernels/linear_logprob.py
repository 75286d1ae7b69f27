"""Fused *linear* variant: hidden states × LM-head weight shard → log-probs, never the full logits.

``linear_logprobs_and_confidence(hidden [B,S,H], weight [V_local,H], targets, mask)`` gives
the same :class:`~lens_kernels.logprob.LogprobOutput` as
``logprobs_and_confidence(hidden @ weight.T, ...)`` but materialises logits for only
``chunk_tokens`` rows at a time:

* forward: per token chunk, ``logits_c = h_c @ Wᵀ`` (model dtype, like the unfused LM head)
  → the backend row statistics → the chunk is dropped. After all chunks, the same single
  all-gather + merge as the unfused path (:mod:`lens_kernels.tp`).
* backward: per chunk, recompute ``logits_c``, turn it *in place* into ``∂L/∂logits_c`` with
  the backend gradient kernel, then ``d_hidden_c = g_c @ W`` and ``d_W += g_cᵀ @ h_c``
  (fp32 accumulation).

Under tensor parallelism ``d_hidden`` is this rank's partial sum over its vocab shard,
exactly what Megatron's column-parallel LM head produces before the all-reduce in its
``copy_to_tensor_model_parallel_region`` backward; summing it over the TP ranks gives the
full gradient.
"""
from __future__ import annotations

import torch

from .autograd import (KernelSpec, backend_row_grad, backend_row_stats, backward_coefficients,
                       finish_forward)
from .logprob import LogprobOutput, build_spec, check_inputs, flat_rows, package_output

CPU_CHUNK_LOGITS_BYTES = 32 << 20     # logits bytes per chunk on CPU
GPU_CHUNK_LOGITS_BYTES = 1 << 30      # on GPU: large chunks keep the GEMMs efficient


def _chunk_tokens(n_rows: int, v_local: int, dtype: torch.dtype, device) -> int:
    budget = GPU_CHUNK_LOGITS_BYTES if device.type == "cuda" else CPU_CHUNK_LOGITS_BYTES
    return max(1, min(n_rows, budget // max(1, v_local * dtype.itemsize)))


class LinearTokenLogprobFunction(torch.autograd.Function):
    """(hidden [N,H], weight [V,H], targets [N], active [N] int8, spec, chunk) → (logprob, entropy)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, active, spec: KernelSpec, chunk: int):
        rows = hidden.shape[0]
        stats = hidden.new_empty((rows, 4), dtype=torch.float32)
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            logits = (hidden[r0:r1] @ weight.t()).unsqueeze(0)
            stats[r0:r1] = backend_row_stats(logits, targets[r0:r1], active[r0:r1], spec)
        token, entropy, lse, mean, act = finish_forward(ctx, stats, active, spec)
        ctx.save_for_backward(hidden, weight, targets, lse, mean, act)
        ctx.spec, ctx.chunk = spec, chunk
        return token, entropy

    @staticmethod
    def backward(ctx, grad_token, grad_entropy):
        hidden, weight, targets, lse, mean, act = ctx.saved_tensors
        spec: KernelSpec = ctx.spec
        coef, ent_coef = backward_coefficients(grad_token, grad_entropy, act, spec)
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                    if ctx.needs_input_grad[1] else None)
        for r0 in range(0, hidden.shape[0], ctx.chunk):
            rs = slice(r0, min(hidden.shape[0], r0 + ctx.chunk))
            logits = (hidden[rs] @ weight.t()).unsqueeze(0)
            backend_row_grad(logits, logits, targets[rs], lse[rs], coef[rs],   # in place
                             None if ent_coef is None else ent_coef[rs],
                             mean[rs] if ent_coef is not None else None, spec)
            grad_logits = logits[0]
            if d_hidden is not None:
                torch.matmul(grad_logits, weight, out=d_hidden[rs])
            if d_weight is not None:
                d_weight.addmm_(grad_logits.t().float(), hidden[rs].float())
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
    backend: str = "auto",
) -> LogprobOutput:
    """Log-probs/confidence of ``hidden [B,S,H] @ weight[V_local,H]ᵀ`` without the full logits.

    Same options and outputs as :func:`lens_kernels.logprobs_and_confidence`;
    ``chunk_tokens`` rows of logits exist at a time (default: ~32 MiB on CPU, ~1 GiB on GPU).
    """
    check_inputs(hidden.shape, hidden.dtype, targets, mask, temperature)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V_local, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    spec = build_spec(tp_group, weight.shape[0], hidden.device, temperature=temperature,
                      return_entropy=return_entropy, valid_vocab=valid_vocab,
                      vocab_start_index=vocab_start_index, backend=backend,
                      inplace_backward=False)   # unused: recomputed chunks are always reused
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_tokens or _chunk_tokens(flat_hidden.shape[0], weight.shape[0], hidden.dtype,
                                          hidden.device)
    flat_targets, active = flat_rows(targets, mask)
    token, entropy = LinearTokenLogprobFunction.apply(flat_hidden, weight, flat_targets, active,
                                                      spec, int(chunk))
    return package_output(token, entropy, active, targets.shape, return_entropy)
