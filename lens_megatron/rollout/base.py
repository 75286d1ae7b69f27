"""The rollout interface: an engine turns prompts into G sampled responses each.

Both engines (the native Megatron sampler and vLLM) return a ``RolloutBatch`` in the same
layout, so everything downstream (rewards, log-probs, LENS, loss) is engine-agnostic.

Layout (N = prompts × G sequences, samples of one prompt contiguous):
- ``input_ids [N, S]``: prompt tokens then response tokens, right-padded with ``pad_id``.
- ``response_mask [N, S]``: True at the positions of response tokens (including the EOS
  token when one was generated).
- ``sampling_logprobs [N, S]``: the log-probability, under the distribution the engine
  actually sampled from (after temperature, top-k/top-p truncation and renormalisation),
  of each response token; 0 elsewhere. See ``lens_megatron.algorithms.rollout_correction``
  for why this convention.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch


@dataclass
class SamplingConfig:
    group_size: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    seed: int = 0
    # Index of this call's first sequence in the global batch: the native sampler's noise is
    # keyed by (seed, global sequence index, step), so a data-parallel split samples exactly
    # what one process would.
    row_offset: int = 0
    # Generate exactly max_new_tokens (benchmarks: fixed-length responses).
    ignore_eos: bool = False


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor  # [N, S] int64
    response_mask: torch.Tensor  # [N, S] bool
    sampling_logprobs: torch.Tensor  # [N, S] float32
    prompt_lengths: torch.Tensor  # [N] int64
    response_lengths: torch.Tensor  # [N] int64
    finished: torch.Tensor  # [N] bool — True when the response ended with EOS
    group_size: int
    pad_id: int
    response_texts: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_prompts(self) -> int:
        return self.num_sequences // self.group_size

    def validate(self) -> None:
        n, s = self.input_ids.shape
        for name in ("response_mask", "sampling_logprobs"):
            if tuple(getattr(self, name).shape) != (n, s):
                raise ValueError(f"RolloutBatch.{name} has shape {tuple(getattr(self, name).shape)}, "
                                 f"expected {(n, s)}")
        if n % self.group_size:
            raise ValueError(f"{n} sequences is not a multiple of group_size {self.group_size}")
        if not torch.equal(self.response_mask.sum(1).to(torch.int64), self.response_lengths):
            raise ValueError("RolloutBatch.response_lengths disagrees with response_mask")


def assemble_batch(prompts: list[list[int]], responses: list[list[int]],
                   logprobs: list[list[float]], finished: list[bool], group_size: int,
                   pad_id: int, texts: Optional[list[str]] = None) -> RolloutBatch:
    """Build a ``RolloutBatch`` from per-sequence token lists (prompt repeated per sample)."""
    n = len(responses)
    if not (len(prompts) == len(logprobs) == len(finished) == n):
        raise ValueError("prompts, responses, logprobs and finished must have one entry per sequence")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    width = max(lengths) if lengths else 0
    input_ids = torch.full((n, width), pad_id, dtype=torch.int64)
    mask = torch.zeros((n, width), dtype=torch.bool)
    sampled = torch.zeros((n, width), dtype=torch.float32)
    for i, (prompt, response, lp) in enumerate(zip(prompts, responses, logprobs)):
        if len(lp) != len(response):
            raise ValueError(f"sequence {i}: {len(lp)} log-probs for {len(response)} tokens")
        start, end = len(prompt), len(prompt) + len(response)
        input_ids[i, :start] = torch.tensor(prompt, dtype=torch.int64)
        if response:
            input_ids[i, start:end] = torch.tensor(response, dtype=torch.int64)
            mask[i, start:end] = True
            sampled[i, start:end] = torch.tensor(lp, dtype=torch.float32)
    return RolloutBatch(
        input_ids=input_ids, response_mask=mask, sampling_logprobs=sampled,
        prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.int64),
        response_lengths=torch.tensor([len(r) for r in responses], dtype=torch.int64),
        finished=torch.tensor(finished, dtype=torch.bool), group_size=group_size, pad_id=pad_id,
        response_texts=list(texts or []),
    )


def concat_batches(batches: list[RolloutBatch]) -> RolloutBatch:
    """Concatenate along sequences, right-padding to the widest batch."""
    if not batches:
        raise ValueError("nothing to concatenate")
    width = max(b.input_ids.shape[1] for b in batches)
    pad_id, group = batches[0].pad_id, batches[0].group_size

    def widen(t: torch.Tensor, fill) -> torch.Tensor:
        out = torch.full((t.shape[0], width), fill, dtype=t.dtype)
        out[:, : t.shape[1]] = t
        return out

    texts = [t for b in batches for t in b.response_texts]
    timings = {k: max(b.timings.get(k, 0.0) for b in batches) for b in batches for k in b.timings}
    return RolloutBatch(
        input_ids=torch.cat([widen(b.input_ids, pad_id) for b in batches]),
        response_mask=torch.cat([widen(b.response_mask, False) for b in batches]),
        sampling_logprobs=torch.cat([widen(b.sampling_logprobs, 0.0) for b in batches]),
        prompt_lengths=torch.cat([b.prompt_lengths for b in batches]),
        response_lengths=torch.cat([b.response_lengths for b in batches]),
        finished=torch.cat([b.finished for b in batches]),
        group_size=group, pad_id=pad_id,
        response_texts=texts if len(texts) == sum(b.num_sequences for b in batches) else [],
        timings=timings,
    )


class RolloutEngine(Protocol):
    """What the trainer needs from a generator."""

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> RolloutBatch:
        """G samples for every prompt (prompt token ids), samples of a prompt contiguous."""

    def sync_weights(self) -> dict[str, float]:
        """Make the engine use the actor's current weights; returns timings."""

    def sleep(self) -> None:
        """Release generation memory (KV cache) while training; no-op where meaningless."""

    def wake(self) -> None:
        """Re-acquire generation memory before the next rollout."""


def take_groups(batch: RolloutBatch, groups: list[int]) -> RolloutBatch:
    """The sequences of the given prompt groups (in that order), trimmed to their own width."""
    g = batch.group_size
    rows = torch.tensor([gi * g + j for gi in groups for j in range(g)], dtype=torch.long)
    width = int((batch.prompt_lengths[rows] + batch.response_lengths[rows]).max()) if len(rows) else 0
    texts = [batch.response_texts[i] for i in rows.tolist()] if batch.response_texts else []
    return RolloutBatch(
        input_ids=batch.input_ids[rows, :width], response_mask=batch.response_mask[rows, :width],
        sampling_logprobs=batch.sampling_logprobs[rows, :width],
        prompt_lengths=batch.prompt_lengths[rows], response_lengths=batch.response_lengths[rows],
        finished=batch.finished[rows], group_size=g, pad_id=batch.pad_id, response_texts=texts,
        timings=dict(batch.timings))
