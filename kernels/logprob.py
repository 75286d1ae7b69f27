"""Public entry point: :func:`logprobs_and_confidence` (DESIGN §3 contract)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .autograd import KernelSpec, TokenLogprobFunction, resolve_backend
from .tp import group_size_and_rank


@dataclass
class LogprobOutput:
    """Per-token and per-sequence results; every float tensor is fp32.

    token_logprobs [B, S] — log π(target | ·), 0 where mask == 0 (differentiable)
    logprob_sum    [B]    — Σ over masked-in tokens (differentiable)
    num_tokens     [B]    — number of masked-in tokens (int64)
    confidence     [B]    — exp(logprob_sum / num_tokens), 0 when num_tokens == 0
    entropy        [B, S] — per-token entropy (only with ``return_entropy=True``, else None)
    """

    token_logprobs: torch.Tensor
    logprob_sum: torch.Tensor
    num_tokens: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor | None = None


def check_inputs(logits_shape, dtype, targets, mask, temperature) -> None:
    """Shapes/dtypes of a call; ``logits_shape`` is ``[B, S, V_local]`` (or ``[B, S, H]``)."""
    if len(logits_shape) != 3:
        raise ValueError(f"expected a [B, S, V_local] tensor, got shape {tuple(logits_shape)}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"inputs must be fp32/bf16/fp16, got {dtype}")
    if tuple(targets.shape) != tuple(logits_shape[:2]) or tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must be "
                         f"[B, S] = {tuple(logits_shape[:2])}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be integer vocab ids, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def build_spec(tp_group, v_local, device, *, temperature, return_entropy, valid_vocab,
               vocab_start_index, inplace_backward, backend) -> KernelSpec:
    """Resolve the shard offset, valid width and backend of one call into a KernelSpec."""
    _, rank = group_size_and_rank(tp_group)
    start = rank * v_local if vocab_start_index is None else int(vocab_start_index)
    n_valid = v_local if valid_vocab is None else min(max(int(valid_vocab) - start, 0), v_local)
    return KernelSpec(tp_group=tp_group, vocab_start=start, n_valid=n_valid,
                      inv_temperature=1.0 / float(temperature), with_entropy=bool(return_entropy),
                      inplace_backward=bool(inplace_backward),
                      backend=resolve_backend(backend, device))


def flat_rows(targets, mask):
    """``[B, S]`` targets/mask → flat int64 targets and int8 active flags ``[B·S]``."""
    return targets.reshape(-1).to(torch.int64), (mask.reshape(-1) != 0).to(torch.int8)


def package_output(token, entropy, active, shape, with_entropy) -> LogprobOutput:
    """Per-token ``[N]`` results → :class:`LogprobOutput` with the per-sequence reduction."""
    token = token.view(shape)
    total, count, confidence = sequence_reduction(token, active.view(shape).long())
    return LogprobOutput(token, total, count, confidence,
                         entropy.view(shape) if with_entropy else None)


def sequence_reduction(token_logprobs: torch.Tensor, mask: torch.Tensor):
    """(Σ_t log-prob, count, confidence = exp(Σ/count) or 0) over each row of ``[B, S]``.

    Plain differentiable torch on ``[B, S]``; empty rows give confidence 0 and zero grad.
    """
    total = token_logprobs.sum(-1)
    count = mask.sum(-1)
    safe = count.clamp(min=1).to(total.dtype)
    confidence = torch.where(count > 0, torch.exp(total / safe), torch.zeros_like(total))
    return total, count, confidence


def logprobs_and_confidence(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    tp_group=None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    valid_vocab: int | None = None,
    vocab_start_index: int | None = None,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> LogprobOutput:
    """Fused target log-probs, per-sequence sums and LENS confidence from (vocab-parallel) logits.

    ``logits [B, S, V_local]`` holds this rank's vocab shard (global columns
    ``[vocab_start_index, vocab_start_index + V_local)``; default ``rank · V_local`` in
    ``tp_group``); ``targets [B, S]`` are global ids; ``mask [B, S]`` bool or 0/1. Targets at
    masked positions are ignored (any value); masked-in targets must be valid ids
    ``< valid_vocab``. Columns with global id ``≥ valid_vocab`` (Megatron's padding) are
    excluded. ``temperature`` divides the logits without a copy. With ``tp_group`` of size
    > 1 exactly one collective (an all-gather of ``[B·S, 4]`` fp32) is issued per call;
    backward issues none. ``inplace_backward=True`` lets backward write the gradient into
    the logits buffer (only if nothing else needs the logits afterwards).
    """
    check_inputs(logits.shape, logits.dtype, targets, mask, temperature)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    spec = build_spec(tp_group, logits.shape[-1], logits.device, temperature=temperature,
                      return_entropy=return_entropy, valid_vocab=valid_vocab,
                      vocab_start_index=vocab_start_index, inplace_backward=inplace_backward,
                      backend=backend)
    flat_targets, active = flat_rows(targets, mask)
    token, entropy = TokenLogprobFunction.apply(logits, flat_targets, active, spec)
    return package_output(token, entropy, active, targets.shape, return_entropy)
