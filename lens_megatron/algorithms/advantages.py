"""LENS advantage stage: confidence-calibrated rewards, then group normalization.

Paper: "Don't Waste Mistakes" (arXiv 2510.08696), Sec. 3.2, 5.1, App. C, App. D.2; the exact
conventions are DESIGN.md §2. Samples of one prompt are contiguous: the flat inputs of length
``B*G`` are viewed as ``[B, G]`` and every step below is a batched tensor op (no Python loop over
groups or samples), so the same code runs on CPU and CUDA tensors.

For sample i of a group:

* confidence ``p_i = exp(S_i / n_i)`` (length-normalized, Sec. 5.1), ``p_i = 0`` when ``n_i = 0``;
* ``difficulty_D = max(D_imp, 2 max_j p_j)`` with ``D_imp = 1 / ((1/G) sum_i r_i / p_i)`` (Eq. 14)
  in a mixed group, ``2 max_j p_j`` in a negative group;
* ``calibrated_reward = r_i - (1 - r_i) (1/G) p_i / (D - p_i)`` (Eq. 10 with the 1/G of Sec. 5.1);
* mixed groups: ``(r~ - mean) / (std + eps)`` (unbiased std); negative groups:
  ``negative_group_weight * (r~ - mean)``; positive groups: 0.

Numerics. The ratio ``q_i = p_i / (D - p_i)`` is invariant to scaling every ``p`` of a group by
the same factor (``D_imp`` and the floor ``2 max p`` both scale with it), so it is computed from
``u_i = p_i / max_j p_j = exp(l_i - max_j l_j)`` with ``l_i = S_i / n_i`` in float64. Confidences
that underflow (``S_i = -1e6``) therefore give the exact answer instead of 0/0, and because
``D >= 2 max p`` we have ``D - p_i >= max p`` (in units of max p: ``>= 1``): ``q_i`` lies in
``[0, 1]`` and can never divide by ~0. A sample with ``n_i = 0`` (or ``S_i = -inf``) has ``p_i = 0``
and ``q_i = 0``; a correct sample with ``p_i = 0`` makes ``D_imp = 0``, so the floor wins.
``S_i > 0`` (only numerical noise can make a log-prob sum positive) is clamped to 0, i.e. p <= 1.

Rewards outside {0, 1}. Rewards must lie in ``[0, 1]`` (``ValueError`` otherwise) and a fractional
``r`` is read as a soft correctness label: the MLE gradient of Theorem 1 with a soft label is
exactly ``r - (1 - r) * penalty``, so Eq. 10 is used unchanged. Group kinds come from the reward
*contrast*, which is what GRPO's normalization needs:

* positive: every ``r_i == 1`` -> advantages 0 (nothing to learn);
* mixed: the rewards are not all equal (for binary rewards: ``0 < #correct < G``);
* negative: every ``r_i`` equal to some ``c < 1`` (for binary rewards: all incorrect). Such a group
  has no verifiable contrast, only confidence differences, so it gets the negative-group treatment
  (de-mean only, weight alpha); its penalty is scaled by the incorrect mass ``1 - c``, and
  ``D_imp`` is used for ``c > 0`` where it is defined (``D = max(D_imp, floor)``).

``G = 1`` gives all zeros (no group statistics exist). A negative group whose calibrated rewards
are all equal (equal confidences) gets exact zeros, not rounding noise.

App. C preference functions (``preference``; the penalties are in ``preference.py``):

* ``"none"`` (default, rho = 1): Sec. 5.1 as above, with the floor multiplier ``m`` of
  ``D = max(D_imp, m max p)`` configurable (``d_floor_multiplier``, default 2; ``m > 1`` keeps
  ``D - p_i >= (m - 1) max p > 0``, ``m >= 2`` keeps the calibrated rewards in ``[-1, 1]``).
* ``"length"`` (``length_preference_gamma = gamma``): the negative penalty
  ``(1/G) p_i / (D - p_i)`` is replaced by ``(1/n_i) p_i / (gamma - p_i)`` (0 when ``n_i = 0``).
  D is not used. ``1/n_i`` plays the role of Sec. 5.1's ``1/G`` as the small scale; unlike the
  1/G form, sign invariance in mixed groups is not guaranteed (a single near-``gamma`` mistake
  can pull the group mean below the other mistakes). ``gamma`` must exceed the confidence of
  every sample with incorrect mass (``r < 1``), else ``ValueError``.
* ``"sampling"`` (rho = mu, the rollout engine's distribution): penalty ``w_i / (D - w_i)`` with
  the sequence ratio ``w_i = exp(S_i - M_i)`` (``M``: ``sampling_logprob_sums``, required) and
  ``D = max(G / sum r, m max w)``.
* ``"policy"`` (rho = pi_theta): penalty ``1 / (D - 1)`` with ``D = G / sum r``.

Every variant composes with the rest unchanged: mixed groups are z-scored, negative groups
de-meaned and weighted by alpha, positive groups 0, and the ``lens_groups`` ablation switches
apply. The App. C penalties carry no 1/G factor (App. C states them without one); ``sampling``
and ``policy`` give negative groups no signal (``D = inf``) and, at ``w = 1``, GRPO's
advantages (see ``preference.py``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .advantage_diagnostics import GROUP_MIXED, GROUP_NEGATIVE, GROUP_POSITIVE, AdvantageDiagnostics
from .preference import length_penalty, policy_penalty, sampling_penalty

__all__ = [
    "AdvantageConfig",
    "AdvantageDiagnostics",
    "GROUP_MIXED",
    "GROUP_NEGATIVE",
    "GROUP_POSITIVE",
    "compute_advantages",
    "compute_advantages_with_diagnostics",
]

ESTIMATORS = ("lens", "grpo")
LENS_GROUPS = ("all", "mixed", "negative")
PREFERENCES = ("none", "length", "sampling", "policy")
USES_D_FLOOR = ("none", "sampling")


@dataclass
class AdvantageConfig:
    """What the advantage stage computes.

    estimator: ``"lens"`` (calibrated rewards) or ``"grpo"`` (plain ``(r - mean)/(std + eps)``,
        negative and positive groups 0).
    lens_groups: App. D.2 ablation. ``"all"``: calibrate incorrect samples in mixed and negative
        groups (the paper's method); ``"mixed"``: calibrate only in mixed groups, negative groups
        stay 0; ``"negative"``: mixed groups are plain GRPO, negative groups get LENS.
    negative_group_weight: alpha, the weight of negative groups (Sec. 5.1, "Final Objective").
    preference: App. C's preference function rho. ``"none"`` (rho = 1, Sec. 5.1), ``"length"``
        (rho = gamma^|o|, needs ``length_preference_gamma``), ``"sampling"`` (rho = mu; the caller
        passes ``sampling_logprob_sums``), ``"policy"`` (rho = pi_theta, penalty 1/(D - 1)).
        None (default): ``"length"`` when ``length_preference_gamma`` is set, else ``"none"``.
    length_preference_gamma: gamma of App. C's length-preference negative reward; only with
        ``preference`` ``"length"`` (or None).
    d_floor_multiplier: m in ``D = max(estimate, m * max confidence)`` (Sec. 5.1: 2); used by
        ``preference`` ``"none"`` and ``"sampling"``; must be finite and > 1.
    std_eps: the epsilon added to the group std in mixed groups.
    """

    estimator: str = "lens"
    lens_groups: str = "all"
    negative_group_weight: float = 0.25
    preference: str | None = None
    length_preference_gamma: float | None = None
    d_floor_multiplier: float = 2.0
    std_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"AdvantageConfig.estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.lens_groups not in LENS_GROUPS:
            raise ValueError(
                f"AdvantageConfig.lens_groups must be one of {LENS_GROUPS}, got {self.lens_groups!r}"
            )
        alpha = float(self.negative_group_weight)
        if not (alpha >= 0.0 and alpha != float("inf")):
            raise ValueError(
                f"AdvantageConfig.negative_group_weight must be finite and >= 0, got {self.negative_group_weight!r}"
            )
        self._check_preference()
        if not (float(self.std_eps) > 0.0):
            raise ValueError(f"AdvantageConfig.std_eps must be > 0, got {self.std_eps!r}")

    @property
    def preference_function(self) -> str:
        """``preference`` with None resolved: ``"length"`` if ``length_preference_gamma`` is set,
        else ``"none"`` (the field itself stays None, so a config layer can still set gamma)."""
        if self.preference is not None:
            return self.preference
        return "none" if self.length_preference_gamma is None else "length"

    def _check_preference(self) -> None:
        gamma, preference = self.length_preference_gamma, self.preference_function
        if preference not in PREFERENCES:
            raise ValueError(f"AdvantageConfig.preference must be one of {PREFERENCES}, got {self.preference!r}")
        if gamma is not None:
            if not (float(gamma) > 0.0 and float(gamma) != float("inf")):
                raise ValueError(
                    f"AdvantageConfig.length_preference_gamma must be finite and > 0, got {gamma!r}"
                )
            if preference != "length":
                raise ValueError(f"AdvantageConfig.length_preference_gamma is only used with preference='length', "
                                 f"got preference={preference!r}; unset it")
            if self.estimator != "lens":
                raise ValueError("AdvantageConfig.length_preference_gamma is only used with estimator='lens'")
        elif preference == "length":
            raise ValueError("AdvantageConfig.preference='length' needs length_preference_gamma (gamma > 0)")
        if preference != "none" and self.estimator != "lens":
            raise ValueError(f"AdvantageConfig.preference={preference!r} is only used with estimator='lens'")
        m = float(self.d_floor_multiplier)
        if not (1.0 < m < float("inf")):
            raise ValueError(
                f"AdvantageConfig.d_floor_multiplier must be finite and > 1 (D - p_i >= (m - 1) max p "
                f"must stay positive; the paper uses 2), got {self.d_floor_multiplier!r}"
            )
        if m != 2.0 and (self.estimator != "lens" or preference not in USES_D_FLOOR):
            raise ValueError(f"AdvantageConfig.d_floor_multiplier is only used with estimator='lens' and "
                             f"preference in {USES_D_FLOOR}, got estimator={self.estimator!r}, "
                             f"preference={preference!r}; leave it at 2.0")


def _as_1d(name: str, x, device) -> torch.Tensor:
    t = torch.as_tensor(x, device=device)
    if t.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of length B*G, got shape {tuple(t.shape)}")
    return t.to(torch.float64)


def _validate_inputs(rewards, logprob_sums, response_lengths, group_size):
    """Checked float64 copies ``(r, S, n)`` of the inputs; ValueError naming the bad argument.

    The value checks are gathered into one host sync (one ``.tolist()``), which matters on CUDA.
    """
    device = rewards.device if isinstance(rewards, torch.Tensor) else None
    r = _as_1d("rewards", rewards, device)
    s = _as_1d("logprob_sums", logprob_sums, device)
    n = _as_1d("response_lengths", response_lengths, device)
    for name, t in (("logprob_sums", s), ("response_lengths", n)):
        if t.numel() != r.numel():
            raise ValueError(f"{name} has length {t.numel()} but rewards has length {r.numel()}")
    try:
        g = operator.index(group_size)
    except TypeError:
        g = 0
    if isinstance(group_size, bool) or g < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if r.numel() % g != 0:
        raise ValueError(f"len(rewards)={r.numel()} is not divisible by group_size={g}")
    checks = [
        (torch.isnan(r), "rewards contains NaN"),
        (torch.isnan(s), "logprob_sums contains NaN"),
        (torch.isnan(n), "response_lengths contains NaN"),
        ((r < 0) | (r > 1), "rewards must lie in [0, 1]"),
        (s == float("inf"), "logprob_sums contains +inf (a log-probability sum is <= 0)"),
        ((n < 0) | torch.isinf(n), "response_lengths must be finite and >= 0"),
    ]
    failed = torch.stack([bad.any() for bad, _ in checks]).tolist() if r.numel() else [False] * len(checks)
    for (_, message), fail in zip(checks, failed):
        if fail:
            if message.startswith("rewards must"):
                finite = r[~torch.isnan(r)]
                message += f", got min {finite.min().item()} max {finite.max().item()}"
            raise ValueError(message)
    return r, s, n, g


def classify_groups(r: torch.Tensor) -> torch.Tensor:
    """Group kind from the rewards ``[B, G]``: positive (all 1), mixed (contrast), else negative."""
    positive = (r == 1).all(dim=1)
    flat = (r == r[:, :1]).all(dim=1)
    kind = torch.full_like(positive, GROUP_MIXED, dtype=torch.int64)
    kind = torch.where(flat, torch.full_like(kind, GROUP_NEGATIVE), kind)
    return torch.where(positive, torch.full_like(kind, GROUP_POSITIVE), kind)


def log_confidence(s: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``l_i = log p_i = min(S_i, 0) / n_i``, ``-inf`` when ``n_i = 0`` (so ``p_i = 0``)."""
    has_tokens = n > 0
    return torch.where(has_tokens, s.clamp(max=0.0) / torch.where(has_tokens, n, 1.0), -float("inf"))


def _sampling_log_ratio(sampling_logprob_sums, s: torch.Tensor) -> torch.Tensor:
    """``log w = min(S, 0) - min(M, 0)``, the log sequence ratio pi_theta / mu (checked ``M``)."""
    if sampling_logprob_sums is None:
        raise ValueError("preference='sampling' needs sampling_logprob_sums: the rollout engine's "
                         "sum of log-probs over each response (rho = mu, App. C)")
    m = _as_1d("sampling_logprob_sums", sampling_logprob_sums, s.device)
    if m.numel() != s.numel():
        raise ValueError(f"sampling_logprob_sums has length {m.numel()} but rewards has length {s.numel()}")
    if m.numel() and bool((~torch.isfinite(m)).any()):
        raise ValueError("sampling_logprob_sums must be finite: a sampled response has non-zero "
                         "probability under the distribution that sampled it")
    return s.clamp(max=0.0) - m.clamp(max=0.0)


def difficulty_ratio(r: torch.Tensor, u: torch.Tensor, floor: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``difficulty_D / max_j p_j`` per group ``[B, 1]`` and whether ``D_imp`` beat the floor.

    ``D_imp / max p = G / sum_i r_i / u_i`` (Eq. 14); floor ``m`` (= ``m max p / max p``, Sec. 5.1:
    m = 2). Groups with no correct mass (``sum r = 0``, negative groups) use the floor only.
    """
    G = r.shape[1]
    inv_u = torch.where(r > 0, r / u, 0.0)  # r/u = inf when u = 0 -> D_imp = 0, floor wins
    total = inv_u.sum(dim=1, keepdim=True)
    d_imp = torch.where(total > 0, G / torch.where(total > 0, total, 1.0), 0.0)
    return torch.clamp(d_imp, min=floor), d_imp > floor


def confidence_penalty(r, l, n, cfg: AdvantageConfig, log_w=None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Penalty multiplying ``(1 - r_i)`` in the calibrated reward, all ``[B, G]`` float64.

    Returns ``(penalty, difficulty_D [B], d_imp_won [B])``. Sec. 5.1: ``(1/G) q_i`` with
    ``q_i = p_i / (D - p_i) = u_i / (d - u_i)``; App. C: ``preference.py`` (``log_w``: the log
    sequence ratio pi_theta / mu, for ``preference='sampling'``). ``d_imp_won``: D's estimate
    beat the floor (always true for ``policy``, which has no floor, in groups with sum r > 0).
    """
    G = r.shape[1]
    l_max = l.amax(dim=1, keepdim=True)
    has_p = l > -float("inf")
    u = torch.where(has_p, torch.exp(l - torch.where(has_p, l_max, 0.0)), 0.0)  # p_i / max p
    d, d_imp_won = difficulty_ratio(r, u, float(cfg.d_floor_multiplier))
    difficulty_D = (d * torch.exp(l_max)).squeeze(1)
    preference = cfg.preference_function
    if preference == "none":
        return (u / (d - u)) / G, difficulty_D, d_imp_won.squeeze(1)  # Sec. 5.1 calibrated ratio
    if preference == "length":  # D is not used; the Sec. 5.1 D is still reported
        return length_penalty(r, l, n, float(cfg.length_preference_gamma)), difficulty_D, d_imp_won.squeeze(1)
    if preference == "sampling":
        return sampling_penalty(r, log_w, float(cfg.d_floor_multiplier))
    penalty, D = policy_penalty(r)
    return penalty, D, r.sum(dim=1) > 0


def calibrated_reward(r: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """``r~_i = r_i - (1 - r_i) * penalty_i`` (Eq. 10, with Sec. 5.1's 1/G inside ``penalty``)."""
    return r - (1.0 - r) * penalty


def _group_normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``((x - mean) / (std + eps), x - mean)`` per row, exact zeros for rows with no spread."""
    centered = x - x.mean(dim=1, keepdim=True)
    if x.shape[1] > 1 and x.shape[0] > 0:
        std = x.std(dim=1, keepdim=True)  # unbiased, the torch.std default (DESIGN §2)
    else:
        std = torch.zeros_like(centered[:, :1])
    flat = (x == x[:, :1]).all(dim=1, keepdim=True)
    centered = torch.where(flat, 0.0, centered)
    return centered / (std + eps), centered


def compute_advantages_with_diagnostics(
    rewards: torch.Tensor,
    logprob_sums: torch.Tensor,
    response_lengths: torch.Tensor,
    group_size: int,
    cfg: AdvantageConfig | None = None,
    *,
    sampling_logprob_sums: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AdvantageDiagnostics]:
    """Advantages ``[B*G]`` float32 (on the device of ``rewards``) plus diagnostics.

    ``rewards`` in [0, 1], ``logprob_sums`` = ``S_i`` (sum of old-policy token log-probs over the
    response), ``response_lengths`` = ``n_i``; all 1-D of length ``B*G`` with each prompt's
    ``G = group_size`` samples contiguous. ``sampling_logprob_sums`` = ``M_i``, the rollout
    engine's log-prob sum of the same response: required by ``preference='sampling'``, not read
    otherwise.
    """
    cfg = cfg or AdvantageConfig()
    r, s, n, group_size = _validate_inputs(rewards, logprob_sums, response_lengths, group_size)
    log_w = None
    if cfg.estimator == "lens" and cfg.preference_function == "sampling":
        log_w = _sampling_log_ratio(sampling_logprob_sums, s).view(-1, group_size)
    r, s, n = (t.view(-1, group_size) for t in (r, s, n))
    kind = classify_groups(r)
    l = log_confidence(s, n)
    p = torch.exp(l)
    penalty, difficulty_D, d_imp_won = confidence_penalty(r, l, n, cfg, log_w)
    r_tilde = calibrated_reward(r, penalty)

    lens = cfg.estimator == "lens"
    calibrate_mixed = lens and cfg.lens_groups in ("all", "mixed")
    calibrate_negative = lens and cfg.lens_groups in ("all", "negative")
    mixed_adv, centered = _group_normalize(r_tilde if calibrate_mixed else r, cfg.std_eps)
    if calibrate_negative:
        centered = centered if calibrate_mixed else _group_normalize(r_tilde, cfg.std_eps)[1]
        negative_adv = cfg.negative_group_weight * centered  # alpha * J_GRPO[negative groups]
    else:
        negative_adv = torch.zeros_like(centered)
    k = kind.unsqueeze(1)
    adv = torch.where(k == GROUP_MIXED, mixed_adv, torch.where(k == GROUP_NEGATIVE, negative_adv, 0.0))
    diagnostics = AdvantageDiagnostics(kind, r, p, r_tilde, difficulty_D, d_imp_won, adv)
    return adv.reshape(-1).to(torch.float32), diagnostics


def compute_advantages(
    rewards: torch.Tensor,
    logprob_sums: torch.Tensor,
    response_lengths: torch.Tensor,
    group_size: int,
    cfg: AdvantageConfig | None = None,
    *,
    sampling_logprob_sums: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample advantages ``[B*G]`` float32; see the module docstring for the conventions."""
    return compute_advantages_with_diagnostics(rewards, logprob_sums, response_lengths, group_size, cfg,
                                               sampling_logprob_sums=sampling_logprob_sums)[0]
