"""Rollout/trainer mismatch correction: importance weights ``pi_old / pi_rollout``.

The rollout engine (vLLM, bf16, its own kernels) samples from a distribution ``pi_rollout`` that
is not exactly the trainer's ``pi_old`` (the actor's recomputed log-probs). The clipped loss then
multiplies each token's surrogate by a detached weight (``rollout_weights`` of ``ClippedPolicyLoss``):

* ``tis_token``: ``w_t = min(pi_old / pi_rollout, cap)`` per token (truncated IS);
* ``tis_sequence``: ``w = min(exp(mean_t log(pi_old / pi_rollout)), cap)`` for every token of a
  sequence: the *geometric mean* per-token ratio, ``exp`` of the mean log-ratio, never of the sum
  (``exp(sum)`` under/overflows for long responses and scales with length);
* ``mis_token`` / ``mis_sequence``: masked IS. A token (sequence) whose ratio lies outside
  ``[mis_lower, mis_upper]`` gets weight 0; inside it keeps its IS weight ``w`` (not 1). Choice:
  ``w * 1{lower <= w <= upper}`` is the MIS estimator of Liu, Li et al. ("When Speed Kills
  Stability", 2025) and veRL's mask mode, which keep the true ratio on accepted samples so the
  correction stays unbiased there; masking to 1 would be rejection sampling without correction.
  Rejected tokens still count in the loss normalizer (like a zero-advantage sample), so the
  normalizer of an optimizer step does not depend on the correction.
* ``none``: weight 1 (the metrics are still computed, for monitoring).

Convention for ``rollout_logprobs`` under temperature / top-k / top-p: they must be the log-probs
of the distribution the engine *actually sampled from*: after temperature, top-k/top-p truncation
and renormalization (vLLM: ``logprobs_mode="processed_logprobs"``; its default
``"raw_logprobs"`` is the unprocessed model distribution). ``sampling_logprobs`` below is the
plain-torch reference of that quantity. The trainer's ``old_logprobs`` are log-probs of the full
(untruncated) distribution at the sampling temperature, so with a perfectly matched engine the
weight is ``w_t = Z_t``, the probability mass the truncation kept at step t (1 when top-p = 1 and
top-k is off, as in the paper's App. D.1): the correction then also removes the truncation bias.
MIS with ``mis_lower > Z_t`` rejects such tokens; raise ``top_p`` or lower ``mis_lower`` if that
is not wanted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ROLLOUT_CORRECTIONS", "RolloutCorrectionConfig", "rollout_correction_weights",
           "sampling_distribution", "sampling_logprobs"]

ROLLOUT_CORRECTIONS = ("none", "tis_token", "tis_sequence", "mis_token", "mis_sequence")


@dataclass
class RolloutCorrectionConfig:
    """``rollout_correction``: one of ``ROLLOUT_CORRECTIONS``; ``cap``: TIS truncation (>= 1);
    ``mis_lower`` <= 1 <= ``mis_upper``: MIS acceptance interval for the ratio."""

    rollout_correction: str = "none"
    cap: float = 2.0
    mis_lower: float = 0.5
    mis_upper: float = 2.0

    def __post_init__(self) -> None:
        if self.rollout_correction not in ROLLOUT_CORRECTIONS:
            raise ValueError(
                f"RolloutCorrectionConfig.rollout_correction must be one of {ROLLOUT_CORRECTIONS}, "
                f"got {self.rollout_correction!r}"
            )
        if not 1.0 <= float(self.cap) < float("inf"):
            raise ValueError(f"RolloutCorrectionConfig.cap must be finite and >= 1, got {self.cap!r}")
        if not 0.0 <= float(self.mis_lower) <= 1.0:
            raise ValueError(f"RolloutCorrectionConfig.mis_lower must be in [0, 1], got {self.mis_lower!r}")
        if not 1.0 <= float(self.mis_upper):
            raise ValueError(f"RolloutCorrectionConfig.mis_upper must be >= 1, got {self.mis_upper!r}")


def _masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp(min=1)


def _raw_log_weights(delta: torch.Tensor, valid: torch.Tensor, sequence_level: bool) -> torch.Tensor:
    """Per-token log-ratio (token level) or each sequence's mean log-ratio broadcast over it."""
    if not sequence_level:
        return delta
    mean = delta.sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1)
    return mean.expand_as(delta)  # geometric mean of the per-token ratios; never exp(sum)


def rollout_correction_weights(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    cfg: RolloutCorrectionConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Detached per-token weights ``[B, S]`` (0 at masked positions) and mismatch metrics.

    ``old_logprobs``: the actor's recomputed log-probs; ``rollout_logprobs``: the engine's
    log-probs of the sampled tokens (see the module docstring for top-p/top-k). Garbage at
    masked positions is ignored. Weights are computed in float64 and returned in the dtype
    of ``old_logprobs``.
    """
    if old_logprobs.dim() != 2:
        raise ValueError(f"old_logprobs must be [B, S], got shape {tuple(old_logprobs.shape)}")
    for name, t in (("rollout_logprobs", rollout_logprobs), ("mask", mask)):
        if t.shape != old_logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(old_logprobs.shape)}")
    mode = cfg.rollout_correction
    valid = mask.bool()
    delta = torch.where(valid, old_logprobs.detach().double() - rollout_logprobs.detach().double(), 0.0)
    raw = torch.exp(_raw_log_weights(delta, valid, mode.endswith("_sequence")))
    truncated = torch.zeros_like(valid)
    masked = torch.zeros_like(valid)
    if mode.startswith("tis"):
        truncated = raw > cfg.cap
        weights = raw.clamp(max=cfg.cap)
    elif mode.startswith("mis"):
        masked = (raw < cfg.mis_lower) | (raw > cfg.mis_upper)
        weights = torch.where(masked, 0.0, raw)
    else:
        weights = torch.ones_like(raw)
    weights = torch.where(valid, weights, 0.0)
    metrics = {
        "weight_mean": _masked_mean(weights, valid),
        "weight_max": weights.amax() if weights.numel() else weights.new_zeros(()),
        "raw_ratio_max": torch.where(valid, raw, 0.0).amax() if raw.numel() else raw.new_zeros(()),
        "truncated_fraction": _masked_mean(truncated.double(), valid),
        "masked_fraction": _masked_mean(masked.double(), valid),
        "mean_abs_log_ratio": _masked_mean(delta.abs(), valid),
        "mean_exp_abs_log_ratio": _masked_mean(torch.exp(delta.abs()), valid),
        "kl_rollout_k3": _masked_mean(torch.exp(delta) - 1.0 - delta, valid),  # KL(pi_rollout || pi_old)
    }
    return weights.to(old_logprobs.dtype), {k: v.detach() for k, v in metrics.items()}


def sampling_distribution(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Log-probs ``[..., V]`` of the distribution a sampler draws from: ``softmax(logits/T)``
    restricted to the top-k tokens (``top_k <= 0``: off), then to the smallest top-ranked set
    whose mass reaches ``top_p`` (vLLM order: top-k, then top-p on the renormalized top-k
    distribution), renormalized; ``-inf`` outside the kept set. float32 result.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    scaled = logits.float() if temperature == 1.0 else logits.float() / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    by_k, by_p = 0 < top_k < logp.shape[-1], top_p < 1.0
    if not (by_k or by_p):
        return logp  # nothing truncated (the decode hot path: no mask, no reduction)
    keep = torch.ones_like(logp, dtype=torch.bool)
    if by_k:
        kth = logp.topk(top_k, dim=-1).values[..., -1:]
        keep &= logp >= kth
    if by_p:
        renorm = torch.log_softmax(logp.masked_fill(~keep, -float("inf")), dim=-1)
        sorted_logp, order = renorm.sort(dim=-1, descending=True)
        probs = sorted_logp.exp()
        keep_sorted = (probs.cumsum(dim=-1) - probs) < top_p  # mass strictly above this token
        keep_sorted[..., 0] = True
        keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
    if bool(keep.all()):
        return logp
    return torch.log_softmax(logp.masked_fill(~keep, -float("inf")), dim=-1)


def sampling_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Log-probs of ``tokens`` under ``sampling_distribution`` (``logits`` ``[..., V]``,
    ``tokens`` ``[...]``); ``-inf`` for a token outside the kept set. This is what
    ``rollout_logprobs`` must hold.
    """
    kept = sampling_distribution(logits, temperature, top_k, top_p)
    return kept.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
