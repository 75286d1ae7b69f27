"""Public entry point: :func:`logprobs_and_confidence` (DESIGN §3 contract)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .autograd import KernelSpec, TokenLogprobFunction, resolve_backend
from .sequences import check_segments, confidence_from, sequence_results
from .tp import group_size_and_rank


@dataclass
class LogprobOutput:
    """Per-token and per-sequence results; every float tensor is fp32.

    token_logprobs [B, S] — log π(target | ·), 0 where mask == 0 (differentiable)
    logprob_sum    [B]    — Σ over masked-in tokens (differentiable)
    num_tokens     [B]    — number of masked-in tokens (int64)
    confidence     [B]    — exp(logprob_sum / num_tokens), 0 when num_tokens == 0
    entropy        [B, S] — per-token entropy (only with ``return_entropy=True``, else None)

    With ``segment_ids`` (packed rows) the per-token tensors keep the targets' shape
    (``[1, T]`` or ``[T]``) and the per-sequence ones are ``[num_segments]``; with a
    ``cp_group`` the per-sequence ones cover the tokens of every CP rank.
    """

    token_logprobs: torch.Tensor
    logprob_sum: torch.Tensor
    num_tokens: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor | None = None


@dataclass(frozen=True)
class Sequences:
    """How per-token results group into sequences (see :mod:`lens_kernels.sequences`)."""

    segment_ids: torch.Tensor | None = None   # flat [T] int64, or None: rows of [B, S]
    num_segments: int | None = None
    cp_group: object = None


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


def as_batched(x, targets, mask, segment_ids, num_segments, cp_group):
    """Packed inputs (``x [T, ·]``, ``targets/mask [T]``) → ``[1, T, ·]`` / ``[1, T]`` and a
    :class:`Sequences`; padded ``[B, S, ·]`` inputs pass through unchanged."""
    if segment_ids is None:
        if num_segments is not None:
            raise ValueError("num_segments needs segment_ids (packed rows); without them each "
                             "row of [B, S] is one sequence")
        return x, targets, mask, Sequences(cp_group=cp_group)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"with segment_ids the input must be one packed row [1, T, ·] or "
                         f"[T, ·], got shape {tuple(x.shape)}")
    tokens = x.shape[1]
    if targets.numel() != tokens or mask.numel() != tokens:
        raise ValueError(f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must hold "
                         f"T = {tokens} tokens ([T] or [1, T])")
    n = check_segments(segment_ids, tokens, num_segments, cp_group)
    seq = Sequences(segment_ids.reshape(-1).to(torch.int64), n, cp_group)
    return x, targets.reshape(1, tokens), mask.reshape(1, tokens), seq


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


def package_output(token, entropy, active, shape, with_entropy,
                   sequences: Sequences = Sequences()) -> LogprobOutput:
    """Per-token ``[N]`` results → :class:`LogprobOutput` (per-token tensors in ``shape``)."""
    grid = token.view(shape) if len(shape) == 2 else token.view(1, -1)   # [T] packed → [1, T]
    act = active.view(grid.shape)
    total, count, confidence = sequence_results(grid, act, sequences.segment_ids,
                                                sequences.num_segments, sequences.cp_group)
    return LogprobOutput(token.view(shape), total, count, confidence,
                         entropy.view(shape) if with_entropy else None)


def sequence_reduction(token_logprobs: torch.Tensor, mask: torch.Tensor):
    """(Σ_t log-prob, count, confidence = exp(Σ/count) or 0) over each row of ``[B, S]``.

    Plain differentiable torch on ``[B, S]``; empty rows give confidence 0 and zero grad.
    """
    total = token_logprobs.sum(-1)
    count = mask.sum(-1)
    return total, count, confidence_from(total, count)


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
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    cp_group=None,
) -> LogprobOutput:
    """Fused target log-probs, per-sequence sums and LENS confidence from (vocab-parallel) logits.

    ``logits [B, S, V_local]`` holds this rank's vocab shard (global columns
    ``[vocab_start_index, vocab_start_index + V_local)``; default ``rank · V_local`` in
    ``tp_group``); ``targets [B, S]`` are global ids; ``mask [B, S]`` bool or 0/1. Targets at
    masked positions are ignored (any value); masked-in targets must be valid ids
    ``< valid_vocab``. Columns with global id ``≥ valid_vocab`` (Megatron's padding) are
    excluded. ``temperature`` divides the logits without a copy. With ``tp_group`` of size
    > 1 exactly one collective (an all-gather of ``[B·S, 4]`` fp32) is issued per call;
    backward issues none.

    ``inplace_backward=True`` gives the logits buffer away: backward writes the gradient
    into it, and on the CPU path with fp32 logits (when a gradient is wanted) the forward
    already overwrites it with ``exp(x − max)`` so that backward needs no exponential. Use it
    only if nothing else reads the logits after this call.

    Packed rows (THD): ``logits [1, T, V_local]`` or ``[T, V_local]``, ``targets``/``mask``
    ``[1, T]`` or ``[T]``, ``segment_ids [T]`` the sequence index ``0..N-1`` of each token
    (−1: padding, left out). Per-token outputs keep the targets' shape; ``logprob_sum``,
    ``num_tokens`` and ``confidence`` are ``[N]`` (``N = num_segments``, default
    ``max(segment_ids) + 1``). Context parallelism: with ``cp_group`` of size > 1 the
    per-sequence sums and counts are all-reduced over it in ONE collective (a ``[2, N]``
    float64 tensor; ``num_segments`` required with packed rows); per-token results stay
    local. Its backward is the identity: sum the parameter gradients over the CP ranks.
    """
    logits, targets_b, mask_b, seqs = as_batched(logits, targets, mask, segment_ids,
                                                 num_segments, cp_group)
    check_inputs(logits.shape, logits.dtype, targets_b, mask_b, temperature)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    spec = build_spec(tp_group, logits.shape[-1], logits.device, temperature=temperature,
                      return_entropy=return_entropy, valid_vocab=valid_vocab,
                      vocab_start_index=vocab_start_index, inplace_backward=inplace_backward,
                      backend=backend)
    store = (spec.inplace_backward and spec.backend in ("cpu", "torch")
             and logits.dtype == torch.float32
             and torch.is_grad_enabled() and logits.requires_grad)
    spec = dataclasses.replace(spec, store_exp=store)
    flat_targets, active = flat_rows(targets_b, mask_b)
    token, entropy = TokenLogprobFunction.apply(logits, flat_targets, active, spec)
    return package_output(token, entropy, active, targets.shape, return_entropy, seqs)
