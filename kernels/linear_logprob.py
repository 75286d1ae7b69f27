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

Training's form, :func:`linear_logprobs_with_loss`: when the loss is a sum of per-token terms
(the clipped surrogate, the NLL) it is evaluated and differentiated per chunk while the
chunk's logits are live, so ``d_hidden`` and ``d_W`` are made in forward with the logits
path's three GEMMs and nothing is recomputed; backward scales them by the upstream scalar.
Under TP each chunk's statistics are merged with one all-gather of ``[c, 4]``. CPU chunks
are 1/8 of the avoided logits (16–256 MiB), GPU ones ~1 GiB. The gradients are held from
forward to backward: ``d_hidden`` and this rank's ``[V/TP, H]`` ``d_W`` in the weight's dtype
(one per micro-batch whose backward is pending — on a pipeline's last stage, one; under the
interleaved schedule, up to the micro-batches in flight there).

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
from .tp import gather_row_stats, merge_row_stats

CPU_CHUNK_LOGITS_BYTES = 16 << 20     # logits bytes per chunk on CPU (GEMMs stay efficient)
GPU_CHUNK_LOGITS_BYTES = 1 << 30      # on GPU: large chunks keep the GEMMs efficient
KEEP_FRACTION = 0.2                   # default share of the avoided logits kept for backward
# linear_logprobs_with_loss on CPU: chunks of 1/8 of the logits it avoids (its peak extra
# memory is then ~0.19x of them at [4096 x 32000]; smaller chunks make the small-M GEMMs
# slower: BENCHMARKS.md §7), never more than 256 MiB
LOSS_CHUNK_SHARE = 1 / 8
CPU_MAX_CHUNK_LOGITS_BYTES = 256 << 20


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


def _chunk_tokens(n_rows: int, v_local: int, dtype: torch.dtype, device,
                  share_of_logits: float | None = None) -> int:
    """Rows per chunk: a fixed byte budget, or on CPU with ``share_of_logits`` that share of
    the call's logits, within [CPU_CHUNK_LOGITS_BYTES, CPU_MAX_CHUNK_LOGITS_BYTES]."""
    row_bytes = max(1, v_local * dtype.itemsize)
    if device.type == "cuda":
        budget = GPU_CHUNK_LOGITS_BYTES
    elif share_of_logits is None:
        budget = CPU_CHUNK_LOGITS_BYTES
    else:
        budget = min(max(CPU_CHUNK_LOGITS_BYTES, int(share_of_logits * n_rows * row_bytes)),
                     CPU_MAX_CHUNK_LOGITS_BYTES)
    return max(1, min(max(n_rows, 1), budget // row_bytes))


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


class LinearTokenLossFunction(torch.autograd.Function):
    """(hidden [N,H], weight [V,H], targets [N], active [N] int8, token_loss, spec, chunk)
    → (loss, logprob [N], entropy): the gradients are made in forward, chunk by chunk.

    Per chunk of active rows: ``logits_c = h_c @ Wᵀ`` → row statistics, merged over TP (one
    all-gather of ``[c, 4]`` per chunk) → the chunk's log-probs (and entropies) →
    ``token_loss(rows, logp_c, entropy_c)``, differentiated by autograd on those ``[c]``
    vectors alone → ``∂L/∂logits_c`` in place → ``d_hidden_c = g_c @ W``, ``d_W += g_cᵀ @ h_c``.
    Three GEMMs, like the logits path; backward only scales the stored gradients by the
    upstream scalar. Chunks whose rows all get a zero coefficient skip both gradient GEMMs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, active, token_loss, spec: KernelSpec, chunk: int):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = hidden.shape[0]
        token = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        entropy = (torch.zeros(n, dtype=torch.float32, device=hidden.device)
                   if spec.with_entropy else token.new_empty(0))
        d_hidden = torch.zeros_like(hidden) if want_h else None
        d_weight = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
                    if want_w else None)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        rows_all = active.nonzero().squeeze(1)
        buf = None
        for c0 in range(0, rows_all.numel(), chunk):
            rows = rows_all[c0:c0 + chunk]
            if buf is None:
                buf = hidden.new_empty((min(chunk, rows_all.numel()), weight.shape[0]))
            logits, h = _logits(hidden, weight, rows, buf)
            ones = torch.ones(rows.numel(), dtype=torch.int8, device=hidden.device)
            stats = backend_row_stats(logits.unsqueeze(0), targets[rows], ones, spec)
            merged = merge_row_stats(gather_row_stats(stats, spec.tp_group))
            logp = merged.target_logit - merged.lse
            token[rows] = logp
            ent = merged.entropy if spec.with_entropy else None
            if ent is not None:
                entropy[rows] = ent
            part, coef, ent_coef = _token_loss_and_coefficients(token_loss, rows, logp, ent)
            total += part
            if not (want_h or want_w) or not _any_nonzero(coef, ent_coef):
                continue
            view = logits.unsqueeze(0)
            backend_row_grad(view, view, targets[rows], merged.lse, coef, ent_coef,
                             merged.mean_logit if ent_coef is not None else None, spec)
            _accumulate(logits, h, rows, weight, d_hidden, d_weight)
        if d_weight is not None:
            d_weight = d_weight.to(weight.dtype)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.mark_non_differentiable(token, entropy)
        ctx.set_materialize_grads(False)
        return total, token, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_token, _grad_entropy):
        if getattr(ctx, "spent", False):
            raise RuntimeError("linear_logprobs_with_loss: the stored gradients were handed on "
                               "(and scaled in place) by an earlier backward; a second backward "
                               "through the same call (retain_graph) is not supported")
        ctx.spent = True
        d_hidden, d_weight = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None, None
        if not bool(grad_loss == 1):     # in place: a copy would be a second [V, H] gradient
            for grad in (d_hidden, d_weight):
                if grad is not None:
                    grad.mul_(grad_loss.to(grad.dtype))
        return d_hidden, d_weight, None, None, None, None, None


def _token_loss_and_coefficients(token_loss, rows, logp, entropy):
    """One chunk's loss and its fp32 coefficients ∂L/∂logp, ∂L/∂entropy (None if unused)."""
    with torch.enable_grad():
        lp = logp.detach().requires_grad_(True)
        ent = None if entropy is None else entropy.detach().requires_grad_(True)
        part = token_loss(rows, lp, ent)
        if not isinstance(part, torch.Tensor) or part.dim() != 0:
            raise ValueError("token_loss must return a 0-d tensor (the chunk's loss), got "
                             f"{type(part).__name__} {getattr(part, 'shape', '')}")
        leaves = [lp] if ent is None else [lp, ent]
        grads = (torch.autograd.grad(part, leaves, allow_unused=True) if part.requires_grad
                 else [None] * len(leaves))
    coef = torch.zeros_like(logp) if grads[0] is None else grads[0].float()
    ent_coef = None if ent is None or grads[1] is None else grads[1].float()
    return part.detach().float(), coef, ent_coef


def _any_nonzero(coef, ent_coef) -> bool:
    return bool((coef != 0).any()) or (ent_coef is not None and bool((ent_coef != 0).any()))


def linear_logprobs_with_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    token_loss,
    tp_group=None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    valid_vocab: int | None = None,
    vocab_start_index: int | None = None,
    chunk_tokens: int | None = None,
    backend: str = "auto",
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    cp_group=None,
) -> tuple[torch.Tensor, LogprobOutput]:
    """``(loss, outputs)`` of a loss that is a sum of per-token terms, without the logits.

    ``token_loss(rows, logp, entropy) -> 0-d tensor`` gives the loss of the masked-in tokens
    ``rows`` (int64 indices into the flattened ``targets``, ``[c]``) from their log-probs
    ``logp [c]`` (and entropies, ``None`` unless ``return_entropy``); it must be a sum over
    those tokens of terms that depend on each token's own log-prob/entropy (the clipped
    surrogate, the NLL, a KL to a reference — per-token constants indexed by ``rows``). The
    total loss is the sum over chunks; ``loss.backward()`` yields ``∂loss/∂hidden`` and
    ``∂loss/∂weight`` computed in the forward while each chunk's logits were live, so the
    call does the logits path's three GEMMs (:class:`LinearTokenLossFunction`) where
    :func:`linear_logprobs_and_confidence` + a loss does four. ``outputs`` is the
    :class:`LogprobOutput` of the same call, detached (for metrics). ``chunk_tokens``
    default: 1/8 of the call's logits on CPU (16–256 MiB), ~1 GiB on GPU. Options and the
    TP ``d_hidden`` reduction the caller adds are those of
    :func:`linear_logprobs_and_confidence`. One backward per call (the stored gradients
    are scaled in place).
    """
    call = _prepared_call(hidden, weight, targets, mask, segment_ids, num_segments, cp_group,
                          tp_group, temperature, return_entropy, valid_vocab, vocab_start_index,
                          backend)
    chunk = chunk_tokens or _chunk_tokens(call.n_active, weight.shape[0], hidden.dtype,
                                          hidden.device, LOSS_CHUNK_SHARE)
    loss, token, entropy = LinearTokenLossFunction.apply(call.hidden, weight, call.targets,
                                                         call.active, token_loss, call.spec,
                                                         int(chunk))
    return loss, package_output(token, entropy, call.active, targets.shape, return_entropy,
                                call.sequences)


@dataclass(frozen=True)
class PreparedCall:
    """One call's inputs as the autograd Functions take them: flat rows and the spec."""

    hidden: torch.Tensor        # [N, H]
    targets: torch.Tensor       # [N] int64
    active: torch.Tensor        # [N] int8
    n_active: int
    spec: KernelSpec
    sequences: object           # logprob.Sequences, for package_output


def _prepared_call(hidden, weight, targets, mask, segment_ids, num_segments, cp_group,
                   tp_group, temperature, return_entropy, valid_vocab, vocab_start_index,
                   backend) -> PreparedCall:
    """Shared by both entry points: packed/padded layout, checks, spec, flat rows."""
    hidden, targets_b, mask_b, seqs = as_batched(hidden, targets, mask, segment_ids,
                                                 num_segments, cp_group)
    check_inputs(hidden.shape, hidden.dtype, targets_b, mask_b, temperature)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V_local, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight ({weight.dtype}) and hidden ({hidden.dtype}) must share a dtype")
    spec = build_spec(tp_group, weight.shape[0], hidden.device, temperature=temperature,
                      return_entropy=return_entropy, valid_vocab=valid_vocab,
                      vocab_start_index=vocab_start_index, backend=backend,
                      inplace_backward=False)   # unused: the chunks are always our own
    flat_targets, active = flat_rows(targets_b, mask_b)
    return PreparedCall(hidden.reshape(-1, hidden.shape[-1]), flat_targets, active,
                        int(active.sum()), spec, seqs)


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
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must lie in [0, 1], got {keep_fraction}")
    call = _prepared_call(hidden, weight, targets, mask, segment_ids, num_segments, cp_group,
                          tp_group, temperature, return_entropy, valid_vocab, vocab_start_index,
                          backend)
    chunk = chunk_tokens or _chunk_tokens(call.n_active, weight.shape[0], hidden.dtype,
                                          hidden.device)
    keep = int(keep_fraction * call.n_active * weight.shape[0] * hidden.dtype.itemsize)
    token, entropy = LinearTokenLogprobFunction.apply(call.hidden, weight, call.targets,
                                                      call.active, call.spec,
                                                      LinearPlan(int(chunk), keep))
    return package_output(token, entropy, call.active, targets.shape, return_entropy,
                          call.sequences)
