"""Clipped policy loss (paper Eq. 3; DESIGN §4), NeMo-RL style: a typed config + a small callable.

Per response token t of sequence i, with ``rho = exp(clamp(logp - old_logp, -c, c))`` and the
sequence advantage ``A_i`` broadcast over its tokens:

    surrogate_t = min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)          # Eq. 3
    dual clip (A < 0, optional c > 1): surrogate_t = max(surrogate_t, c A)
    rollout correction (optional, detached weight w_t): surrogate_t *= w_t
    objective_t = surrogate_t - beta * KL_t(pi || pi_ref)   (only when beta > 0; k1 or k3)

Aggregation: ``"sequence"`` (paper): ``sum_i (1/n_i) sum_t objective_t / N_seq``;
``"token"`` (DAPO): ``sum_{i,t} objective_t / N_tok``. The loss is ``-objective``. ``N`` is the
*global* count for the whole optimizer step (all micro-batches, all DP ranks), passed in by the
caller (see ``compute_global_normalizer``), so summing the micro-batch losses over micro-batches
and ranks gives exactly the full-batch loss and gradient. The rollout weights multiply the policy
term only, not the KL penalty.

The log-ratio is clamped to ``[-c, c]`` (``log_ratio_clamp``, default 20) before the exp: with
``A < 0`` and no dual clip the surrogate ``rho A`` is unbounded below, and one token whose
log-prob jumped (or whose old log-prob was garbage) would overflow ``exp`` and make the loss
infinite. A clamped token contributes ``e^{±c} A`` and no gradient (the clamp is flat there);
``num_log_ratio_clamped`` counts them.

Masked positions (``mask == 0``) contribute nothing to the loss, the gradient or the metrics even
if their log-probs are NaN/inf garbage: they are removed with ``torch.where`` before any
arithmetic, never by multiplying with the mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["ClippedPolicyLoss", "LossConfig", "compute_global_normalizer"]

NORMALIZATIONS = ("sequence", "token")
KL_ESTIMATORS = ("k1", "k3")
MAX_LOG_RATIO_CLAMP = 80.0  # e^80 = 5.5e34 < float32 max 3.4e38


@dataclass
class LossConfig:
    """Clipped-surrogate settings. eps: PPO clip range (paper: 0.2); ``dual_clip_c``: None or > 1;
    ``normalization``: "sequence" (paper Eq. 3) or "token" (DAPO); ``kl_coef``: beta (paper 0);
    ``kl_estimator``: "k1" (``log pi/pi_ref``) or "k3" (``pi_ref/pi - log(pi_ref/pi) - 1``);
    ``log_ratio_clamp``: c, ``logp - old_logp`` is clamped to ``[-c, c]`` before the exp,
    ``0 < c <= 80`` (``e^c`` must stay finite in float32)."""

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: float | None = None
    normalization: str = "sequence"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    log_ratio_clamp: float = 20.0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.clip_eps_low) < 1.0:
            raise ValueError(f"LossConfig.clip_eps_low must be in [0, 1), got {self.clip_eps_low!r}")
        if not 0.0 <= float(self.clip_eps_high) < float("inf"):
            raise ValueError(f"LossConfig.clip_eps_high must be finite and >= 0, got {self.clip_eps_high!r}")
        if self.dual_clip_c is not None and not float(self.dual_clip_c) > 1.0:
            raise ValueError(f"LossConfig.dual_clip_c must be None or > 1, got {self.dual_clip_c!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"LossConfig.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if not 0.0 <= float(self.kl_coef) < float("inf"):
            raise ValueError(f"LossConfig.kl_coef must be finite and >= 0, got {self.kl_coef!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"LossConfig.kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if not 0.0 < float(self.log_ratio_clamp) <= MAX_LOG_RATIO_CLAMP:
            raise ValueError(
                f"LossConfig.log_ratio_clamp must be in (0, {MAX_LOG_RATIO_CLAMP:g}] (exp of it must stay "
                f"finite in float32; peers use 20), got {self.log_ratio_clamp!r}"
            )


def compute_global_normalizer(
    masks: Sequence[torch.Tensor],
    normalization: str,
    dp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """The global normalizer for one optimizer step, an int64 0-d tensor.

    ``masks``: this rank's micro-batch response masks, each ``[B_mb, S_mb]``. ``"sequence"``
    counts sequences with at least one response token (all-padding rows do not count);
    ``"token"`` counts response tokens. With ``dp_group`` the count is summed over that process
    group (one all-reduce, on the device of the first mask: CUDA under NCCL).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if len(masks) == 0:
        raise ValueError("masks must hold at least one micro-batch mask")
    counts = []
    for m in masks:
        if m.dim() != 2:
            raise ValueError(f"each mask must be [B, S], got shape {tuple(m.shape)}")
        valid = m.bool()
        counts.append(valid.any(dim=1).sum() if normalization == "sequence" else valid.sum())
    total = torch.stack([c.to(masks[0].device, torch.int64) for c in counts]).sum()
    if dp_group is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=dp_group)
    return total


def _kl_penalty(log_ratio_ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from ``log_ratio_ref = log pi_ref - log pi``."""
    if estimator == "k1":
        return -log_ratio_ref  # log pi / pi_ref
    return torch.exp(log_ratio_ref) - log_ratio_ref - 1.0  # k3, >= 0


@dataclass
class TokenTerms:
    """Per-token parts of the objective (see :meth:`ClippedPolicyLoss.token_objective`)."""

    objective: torch.Tensor       # 0 where not valid
    ratio: torch.Tensor
    log_ratio: torch.Tensor       # clamped
    raw_log_ratio: torch.Tensor
    kl_ref: torch.Tensor | None


def _masked_mean(x: torch.Tensor, valid: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, 0.0).sum() / count


class ClippedPolicyLoss:
    """``loss, metrics = ClippedPolicyLoss(cfg)(logprobs, old_logprobs, advantages, mask, N)``."""

    def __init__(self, cfg: LossConfig | None = None) -> None:
        self.cfg = cfg or LossConfig()

    @staticmethod
    def _check(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_weights, entropy):
        if logprobs.dim() != 2:
            raise ValueError(f"logprobs must be [B, S], got shape {tuple(logprobs.shape)}")
        shaped = {"old_logprobs": old_logprobs, "mask": mask, "ref_logprobs": ref_logprobs,
                  "rollout_weights": rollout_weights, "entropy": entropy}
        for name, t in shaped.items():
            if t is not None and t.shape != logprobs.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(logprobs.shape)}")
        if advantages.shape != logprobs.shape[:1]:
            raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({logprobs.shape[0]},)")

    def _normalizer(self, global_normalizer, device) -> torch.Tensor:
        n = torch.as_tensor(global_normalizer, device=device)
        if n.dim() != 0:
            raise ValueError(f"global_normalizer must be a scalar, got shape {tuple(n.shape)}")
        if not isinstance(global_normalizer, torch.Tensor) and float(global_normalizer) < 0:
            raise ValueError(f"global_normalizer must be >= 0, got {global_normalizer!r}")
        return n.clamp(min=1)  # a count of 0 means nothing contributes: loss exactly 0, not NaN

    def __call__(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        global_normalizer: torch.Tensor | float,
        ref_logprobs: torch.Tensor | None = None,
        rollout_weights: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        tokens_per_sequence: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Micro-batch loss (a 0-d tensor with grad w.r.t. ``logprobs``) and detached metrics.

        ``logprobs``/``old_logprobs``/``mask`` ``[B, S]``; ``advantages`` ``[B]``;
        ``global_normalizer`` the global sequence or token count (``compute_global_normalizer``);
        ``ref_logprobs`` required when ``kl_coef > 0``; ``rollout_weights`` ``[B, S]`` from
        ``rollout_correction_weights``; ``entropy`` ``[B, S]`` only for the metrics;
        ``tokens_per_sequence`` ``[B]``: each sequence's response-token count when this call
        sees only part of its tokens (context parallelism: the per-sequence mean of Eq. 3 must
        divide by the whole sequence's count, not by the tokens on this rank).
        """
        cfg = self.cfg
        self._check(logprobs, old_logprobs, advantages, mask, ref_logprobs, rollout_weights, entropy)
        valid = mask.bool()
        adv = advantages.detach().to(logprobs.dtype).unsqueeze(1).expand_as(logprobs)
        terms = self.token_objective(logprobs, old_logprobs, adv, valid, ref_logprobs,
                                     rollout_weights)
        objective, ratio, log_ratio, kl_ref = (terms.objective, terms.ratio, terms.log_ratio,
                                               terms.kl_ref)
        if cfg.normalization == "sequence":
            counts = valid.sum(dim=1) if tokens_per_sequence is None else tokens_per_sequence
            tokens_per_seq = counts.clamp(min=1).to(objective.dtype)
            total = (objective.sum(dim=1) / tokens_per_seq).sum()  # per-sequence mean, Eq. 3
        else:
            total = objective.sum()
        loss = -total / self._normalizer(global_normalizer, logprobs.device).to(total.dtype)
        metrics = self._metrics(loss, ratio, log_ratio, adv, valid, kl_ref, rollout_weights, entropy)
        metrics["num_log_ratio_clamped"] = (valid & (terms.raw_log_ratio.detach().abs()
                                                      > cfg.log_ratio_clamp)).sum()
        return loss, metrics

    def token_objective(self, logprobs, old_logprobs, advantages, valid, ref_logprobs=None,
                        rollout_weights=None) -> TokenTerms:
        """Per-token ``objective_t`` (0 where not ``valid``) and its parts, elementwise on
        tensors of any one shape (``advantages`` already broadcast to the tokens)."""
        cfg = self.cfg
        adv = advantages.detach().to(logprobs.dtype)
        raw_log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), 0.0)
        c = float(cfg.log_ratio_clamp)
        log_ratio = raw_log_ratio.clamp(-c, c)
        ratio = torch.exp(log_ratio)
        clipped_ratio = ratio.clamp(1.0 - cfg.clip_eps_low, 1.0 + cfg.clip_eps_high)
        surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)  # Eq. 3
        if cfg.dual_clip_c is not None:
            surrogate = torch.where(adv < 0, torch.maximum(surrogate, cfg.dual_clip_c * adv), surrogate)
        if rollout_weights is not None:
            surrogate = surrogate * torch.where(valid, rollout_weights.detach().to(surrogate.dtype), 0.0)
        objective = surrogate
        kl_ref = None
        if cfg.kl_coef > 0:
            if ref_logprobs is None:
                raise ValueError("ref_logprobs is required when LossConfig.kl_coef > 0")
            kl_ref = _kl_penalty(torch.where(valid, ref_logprobs.detach() - logprobs, 0.0), cfg.kl_estimator)
            objective = objective - cfg.kl_coef * kl_ref
        return TokenTerms(torch.where(valid, objective, 0.0), ratio, log_ratio, raw_log_ratio,
                          kl_ref)

    def token_loss(self, old_logprobs, advantages, valid, token_weights, ref_logprobs=None,
                   rollout_weights=None):
        """``token_loss(rows, logp, entropy)``: the loss of the tokens ``rows`` of flat
        per-token tensors (``advantages`` per token; ``token_weights`` each token's share of
        the aggregation, :func:`token_weights`), i.e. ``-Σ objective_t · weight_t`` — the
        form ``lens_kernels.linear_logprobs_with_loss`` differentiates chunk by chunk.
        Summed over all tokens it is this loss (up to float summation order)."""
        def loss_of(rows, logp, entropy=None):
            pick = (lambda t: None if t is None else t.index_select(0, rows))
            terms = self.token_objective(logp, pick(old_logprobs), pick(advantages),
                                         pick(valid), pick(ref_logprobs), pick(rollout_weights))
            return -(terms.objective * pick(token_weights).to(terms.objective.dtype)).sum()

        return loss_of

    def token_weights(self, valid, sequence_of_token, num_sequences, global_normalizer,
                      tokens_per_sequence=None) -> torch.Tensor:
        """Each token's weight in the aggregation (flat ``valid``/``sequence_of_token``):
        ``1 / (n_i N_seq)`` ("sequence": ``n_i`` its sequence's token count, or
        ``tokens_per_sequence`` under CP) or ``1 / N_tok`` ("token"); 0 where not valid."""
        f64 = torch.float64       # exact for any count; cast to the log-probs' dtype in use
        n = self._normalizer(global_normalizer, valid.device).to(f64)
        weight = torch.where(valid, 1.0 / n, torch.zeros((), dtype=f64, device=valid.device))
        if self.cfg.normalization == "sequence":
            seq = sequence_of_token.clamp(min=0)
            counts = (torch.zeros(num_sequences, dtype=f64, device=valid.device)
                      .index_add_(0, seq, valid.to(f64))
                      if tokens_per_sequence is None else tokens_per_sequence.to(f64))
            weight = weight / counts.clamp(min=1).index_select(0, seq)
        return weight

    @torch.no_grad()
    def _metrics(self, loss, ratio, log_ratio, adv, valid, kl_ref, rollout_weights, entropy):
        cfg = self.cfg
        count = valid.sum().clamp(min=1)
        clipped = ((adv > 0) & (ratio > 1 + cfg.clip_eps_high)) | ((adv < 0) & (ratio < 1 - cfg.clip_eps_low))
        metrics = {
            "loss": loss.detach(),
            "clip_fraction": _masked_mean(clipped.to(ratio.dtype), valid, count),
            "approx_kl": _masked_mean(ratio - 1.0 - log_ratio, valid, count),  # k3 of KL(old || new)
            "ratio_mean": _masked_mean(ratio, valid, count),
            "ratio_max": torch.where(valid, ratio, 0.0).amax() if ratio.numel() else ratio.new_zeros(()),
            "num_tokens": valid.sum(),
            "num_sequences": valid.any(dim=1).sum(),
        }
        c = float("inf") if cfg.dual_clip_c is None else cfg.dual_clip_c
        metrics["dual_clip_fraction"] = _masked_mean(((adv < 0) & (ratio > c)).to(ratio.dtype), valid, count)
        if kl_ref is not None:
            metrics["kl_ref"] = _masked_mean(kl_ref.detach(), valid, count)
        if rollout_weights is not None:
            metrics["rollout_weight_mean"] = _masked_mean(rollout_weights.detach(), valid, count)
        if entropy is not None:
            metrics["entropy_mean"] = _masked_mean(entropy.detach(), valid, count)
        return {k: v.detach() for k, v in metrics.items()}
