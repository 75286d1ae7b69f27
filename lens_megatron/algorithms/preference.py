"""App. C preference-aware penalties: the factor multiplying ``(1 - r_i)`` in the calibrated
reward ``r~_i = r_i - (1 - r_i) * penalty_i`` when the optimal policy is ``pi* ∝ rho * p*``.

Paper ("Don't Waste Mistakes", arXiv 2510.08696) App. C, Eqs. 20-23: with a preference
function ``rho(q, o) >= 0`` the difficulty becomes ``D = {sum_o p*(q, o) rho(q, o)}^-1`` and the
MLE gradient's negative term ``pi_theta / (D rho - pi_theta)``. All functions take ``[B, G]``
float64 tensors (one row per prompt, samples contiguous) and are batched tensor ops.

* ``length`` (rho = gamma^|o|): App. C's closing simplification
  ``(1/n_i) p_i / (gamma - p_i)`` with the length-normalized confidence ``p_i``; D is not used.
* ``sampling`` (rho = mu, the distribution that sampled the rollouts): ``D`` is the inverse
  empirical correct rate ``G / sum_i r_i`` and the penalty is
  ``pi_theta(o_i) / (D mu(o_i) - pi_theta(o_i)) = w_i / (D - w_i)`` with the *sequence*
  importance ratio ``w_i = pi_theta(o_i) / mu(o_i) = exp(S_i - M_i)`` (``S``: the trainer's
  old-policy log-prob sums, ``M``: the rollout engine's). ``D`` is floored like Sec. 5.1's,
  ``D = max(G / sum r, m * max_j w_j)`` (``m = d_floor_multiplier``), so that ``D - w_i >=
  (m - 1) max w > 0``: the penalty lies in ``[0, 1/(m - 1)]`` and never divides by ~0.
  Computed in units of ``max_j w_j`` (``u_i = exp(Delta_i - max Delta)``) and with ``log D`` so
  that extreme ratios neither overflow nor give 0 * inf.
* ``policy`` (rho = pi_theta, i.e. mu = pi_theta, so w = 1): the penalty is exactly
  ``1 / (D - 1) = k / (G - k)`` with ``k = sum_i r_i``, the same for every sample of the group
  (App. C: "the commonly used uniform weights (Arnal et al.; Zhu et al.) emerge as a special
  case"). No floor: ``G - k > 0`` whenever a sample has ``r < 1``.

For ``sampling`` and ``policy`` a group with no correct mass (``sum r = 0``) has ``D = inf`` and
penalty 0 (App. C's estimate of D is undefined there; the limit is 0), so negative groups carry
no signal. With a constant penalty per group (``policy``, or ``sampling`` at ``mu = pi_theta``)
``r~`` is an increasing affine function of ``r`` within the group, so the mixed-group z-score
returns GRPO's advantages (up to ``std_eps``): the uniform weight is absorbed by the
normalization.
"""
from __future__ import annotations

import math

import torch

__all__ = ["length_penalty", "policy_penalty", "sampling_penalty"]


def length_penalty(r: torch.Tensor, l: torch.Tensor, n: torch.Tensor, gamma: float) -> torch.Tensor:
    """``(1/n_i) p_i / (gamma - p_i)`` for samples with ``r_i < 1`` and ``n_i > 0``, else 0.

    ``l = log p`` (``-inf`` where ``n = 0``). ``ValueError`` when a sample with incorrect mass
    has ``p_i >= gamma`` (the MLE's ``log(1 - pi / (D rho))`` is undefined there).
    """
    p = torch.exp(l)
    incorrect_p = torch.where(r < 1, p, 0.0)
    if incorrect_p.numel() and incorrect_p.max() >= gamma:
        raise ValueError(
            f"length_preference_gamma={gamma} must exceed every confidence p_i of a sample with r < 1; "
            f"max such p_i = {incorrect_p.max().item():.6g}"
        )
    used = (n > 0) & (r < 1)  # correct samples never use it (and may have p >= gamma)
    return torch.where(used, p / torch.where(used, gamma - p, 1.0) / torch.where(used, n, 1.0), 0.0)


def _correct_mass(r: torch.Tensor) -> torch.Tensor:
    return r.sum(dim=1, keepdim=True)  # k = sum_i r_i, [B, 1]


def policy_penalty(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(penalty [B, G], D [B])`` for rho = pi_theta: ``1 / (D - 1) = k / (G - k)``, ``D = G / k``.

    Groups with ``k = 0`` get ``D = inf`` and penalty 0; groups with ``k = G`` (every ``r = 1``)
    get ``D = 1`` and penalty 0 (no sample has incorrect mass to penalize).
    """
    G = r.shape[1]
    k = _correct_mass(r)
    has_wrong = k < G
    penalty = torch.where(has_wrong, k / torch.where(has_wrong, G - k, 1.0), 0.0)
    D = torch.where(k > 0, G / torch.where(k > 0, k, 1.0), math.inf)
    return penalty.expand_as(r), D.squeeze(1)


def sampling_penalty(r: torch.Tensor, log_w: torch.Tensor, floor_multiplier: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(penalty [B, G], D [B], estimate_won [B])`` for rho = mu.

    ``log_w = S - M``, the log sequence importance ratio ``log pi_theta / mu`` (``-inf`` where
    ``pi_theta`` gives the sequence zero probability, so ``w = 0``). ``estimate_won``: the
    inverse correct rate beat the floor ``m * max w``.
    """
    G = r.shape[1]
    k = _correct_mass(r)
    has_w = log_w > -math.inf
    top = log_w.amax(dim=1, keepdim=True)
    top_finite = torch.where(top > -math.inf, top, 0.0)
    u = torch.where(has_w, torch.exp(log_w - top_finite), 0.0)  # w_i / max_j w_j, in [0, 1]
    # log(D_emp / max w); +inf when k = 0 (D_emp = inf) or every w = 0 (max w = 0)
    log_d_emp = torch.where(k > 0, math.log(G) - torch.log(torch.where(k > 0, k, 1.0)), math.inf)
    log_d_emp = torch.where(top > -math.inf, log_d_emp - top_finite, math.inf)
    log_floor = math.log(floor_multiplier)
    d = torch.exp(torch.clamp(log_d_emp, min=log_floor))  # D / max w, >= m
    penalty = torch.where(torch.isinf(d), 0.0, u / (d - u))
    d_emp = G / torch.where(k > 0, k, 1.0)
    D = torch.where(top > -math.inf, torch.exp(torch.log(d) + top_finite), d_emp)  # max w = 0: D_emp
    D = torch.where(k > 0, D, math.inf)
    return penalty, D.squeeze(1), (log_d_emp > log_floor).squeeze(1)
