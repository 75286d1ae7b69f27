"""Rollout/trainer log-prob mismatch monitor.

Per step, compare the engine's sampling log-probs (``RolloutBatch.sampling_logprobs``) with the
actor's recomputed old log-probs on the response tokens. With ``Δ_t = old_t − rollout_t``:

* ``mean_abs_diff``: mean over all response tokens of ``|Δ_t|``;
* ``mean_exp_abs_diff``: mean over tokens of ``exp(|Δ_t|)`` (1 when identical; the usual
  "probability ratio" view of the mismatch, ≥ 1);
* ``max_abs_diff``: the largest ``|Δ_t|``;
* per sequence, the mean ``|Δ_t|`` over its response tokens (``sequence_mean_abs_diff``);
  with ``threshold`` set, sequences whose mean exceeds it get ``keep = False`` and are counted
  (``masked_sequences``, ``masked_fraction``). Sequences without response tokens are kept.

Non-finite differences (an engine log-prob of ``-inf`` for a token its truncation excluded, or
a NaN) are counted in ``nonfinite_tokens``, left out of the token aggregates, and make their
sequence's mean ``inf`` — so such a sequence is masked whenever a threshold is set.
Pure torch, batched, no Python loop over sequences; computed in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["MismatchStats", "logprob_mismatch"]


@dataclass
class MismatchStats:
    """Monitor output: ``keep [N] bool`` plus scalar metrics (``metrics()`` for logging)."""

    keep: torch.Tensor
    sequence_mean_abs_diff: torch.Tensor  # [N] float64
    mean_abs_diff: float
    mean_exp_abs_diff: float
    max_abs_diff: float
    tokens: int
    nonfinite_tokens: int
    masked_sequences: int

    @property
    def masked_fraction(self) -> float:
        n = self.keep.numel()
        return self.masked_sequences / n if n else 0.0

    def metrics(self, prefix: str = "mismatch/") -> dict[str, float]:
        return {
            f"{prefix}mean_abs_diff": self.mean_abs_diff,
            f"{prefix}mean_exp_abs_diff": self.mean_exp_abs_diff,
            f"{prefix}max_abs_diff": self.max_abs_diff,
            f"{prefix}tokens": float(self.tokens),
            f"{prefix}nonfinite_tokens": float(self.nonfinite_tokens),
            f"{prefix}masked_sequences": float(self.masked_sequences),
            f"{prefix}masked_fraction": self.masked_fraction,
        }


def logprob_mismatch(rollout_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                     mask: torch.Tensor, threshold: Optional[float] = None) -> MismatchStats:
    """Mismatch between engine and actor log-probs on ``mask`` positions (all ``[N, S]``).

    ``threshold``: mask (``keep = False``) sequences whose mean ``|Δ|`` is above it;
    ``None`` keeps everything. Values at positions outside ``mask`` are ignored.
    """
    if rollout_logprobs.dim() != 2:
        raise ValueError(f"rollout_logprobs must be [N, S], got shape {tuple(rollout_logprobs.shape)}")
    for name, t in (("old_logprobs", old_logprobs), ("mask", mask)):
        if t.shape != rollout_logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(rollout_logprobs.shape)}")
    if threshold is not None and not threshold >= 0:
        raise ValueError(f"threshold must be >= 0 or None, got {threshold!r}")
    valid = mask.bool()
    diff = (old_logprobs.detach().double() - rollout_logprobs.detach().double()).abs()
    finite = torch.isfinite(diff) & valid
    nonfinite = valid & ~finite
    clean = torch.where(finite, diff, 0.0)

    counts = valid.sum(dim=1)
    seq_mean = clean.sum(dim=1) / counts.clamp(min=1)
    seq_mean = torch.where(nonfinite.any(dim=1), torch.inf, seq_mean)
    keep = torch.ones_like(counts, dtype=torch.bool)
    if threshold is not None:
        keep = ~((seq_mean > threshold) & (counts > 0))

    n_finite = int(finite.sum())
    denom = max(n_finite, 1)
    return MismatchStats(
        keep=keep,
        sequence_mean_abs_diff=seq_mean,
        mean_abs_diff=float(clean.sum()) / denom,
        mean_exp_abs_diff=float(torch.where(finite, diff.exp(), 0.0).sum()) / denom if n_finite else 1.0,
        max_abs_diff=float(clean.max()) if clean.numel() else 0.0,
        tokens=int(valid.sum()),
        nonfinite_tokens=int(nonfinite.sum()),
        masked_sequences=int((~keep).sum()),
    )
