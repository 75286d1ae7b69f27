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

App. C length preference (``length_preference_gamma = gamma``): the negative penalty
``(1/G) p_i / (D - p_i)`` is replaced by ``(1/n_i) p_i / (gamma - p_i)`` (0 when ``n_i = 0``), i.e.
``r~_i = r_i - (1 - r_i) (1/n_i) p_i / (gamma - p_i)``. It composes with everything else unchanged:
mixed groups are z-scored, negative groups de-meaned and weighted by alpha, positive groups 0, and
the ``lens_groups`` ablation switches apply. D is not used. ``1/n_i`` plays the role of Sec. 5.1's
``1/G`` as the small scale; unlike the 1/G form, sign invariance in mixed groups is not guaranteed
(a single near-``gamma`` mistake can pull the group mean below the other mistakes). ``gamma`` must
exceed the confidence of every sample with incorrect mass (``r < 1``), else ``ValueError``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

__all__ = [
    "AdvantageConfig",
    "AdvantageDiagnostics",
    "GROUP_MIXED",
    "GROUP_NEGATIVE",
    "GROUP_POSITIVE",
    "compute_advantages",
    "compute_advantages_with_diagnostics",
]

GROUP_MIXED, GROUP_NEGATIVE, GROUP_POSITIVE = 0, 1, 2
ESTIMATORS = ("lens", "grpo")
LENS_GROUPS = ("all", "mixed", "negative")


@dataclass
class AdvantageConfig:
    """What the advantage stage computes.

    estimator: ``"lens"`` (calibrated rewards) or ``"grpo"`` (plain ``(r - mean)/(std + eps)``,
        negative and positive groups 0).
    lens_groups: App. D.2 ablation. ``"all"``: calibrate incorrect samples in mixed and negative
        groups (the paper's method); ``"mixed"``: calibrate only in mixed groups, negative groups
        stay 0; ``"negative"``: mixed groups are plain GRPO, negative groups get LENS.
    negative_group_weight: alpha, the weight of negative groups (Sec. 5.1, "Final Objective").
    length_preference_gamma: gamma of App. C's length-preference negative reward; None (default)
        uses Sec. 5.1's difficulty-D penalty.
    std_eps: the epsilon added to the group std in mixed groups.
    """

    estimator: str = "lens"
    lens_groups: str = "all"
    negative_group_weight: float = 0.25
    length_preference_gamma: float | None = None
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
        gamma = self.length_preference_gamma
        if gamma is not None:
            if not (float(gamma) > 0.0 and float(gamma) != float("inf")):
                raise ValueError(
                    f"AdvantageConfig.length_preference_gamma must be finite and > 0, got {gamma!r}"
                )
            if self.estimator != "lens":
                raise ValueError("AdvantageConfig.length_preference_gamma is only used with estimator='lens'")
        if not (float(self.std_eps) > 0.0):
            raise ValueError(f"AdvantageConfig.std_eps must be > 0, got {self.std_eps!r}")


@dataclass
class AdvantageDiagnostics:
    """What the advantage stage saw: the per-group/per-sample tensors it computed, and the scalar
    diagnostics as properties (0-d tensors, computed only when read: ``compute_advantages`` pays
    nothing for them, and nothing syncs with the device until ``as_dict``).

    Ratios are over groups; ``mean_abs_advantage_*`` over the samples of that kind of group and
    ``mean_calibrated_reward_incorrect`` over samples with ``r == 0`` (each 0 when there are none).
    ``d_imp_won_fraction``: fraction of mixed groups where ``D_imp`` exceeded the floor ``2 max p``.
    ``difficulty_D`` is absolute (``D / max p`` times ``max p``) and may underflow to 0 for tiny p.
    """

    group_kind: torch.Tensor  # [B] int64: GROUP_MIXED / GROUP_NEGATIVE / GROUP_POSITIVE
    rewards: torch.Tensor  # [B, G] float64
    confidence: torch.Tensor  # [B, G] float64, p_i
    calibrated_reward: torch.Tensor  # [B, G] float64, r~_i (Eq. 10)
    difficulty_D: torch.Tensor  # [B] float64
    d_imp_won: torch.Tensor  # [B] bool, D_imp > 2 max p
    advantages: torch.Tensor  # [B, G] float64

    SCALARS = (
        "mixed_group_ratio", "negative_group_ratio", "positive_group_ratio",
        "mean_abs_advantage_mixed", "mean_abs_advantage_negative", "mean_abs_advantage_positive",
        "mean_calibrated_reward_incorrect", "d_imp_won_fraction", "negative_groups_with_signal",
        "mean_confidence", "max_abs_advantage",
    )

    def _ratio(self, kind: int) -> torch.Tensor:
        return (self.group_kind == kind).sum().double() / max(self.group_kind.numel(), 1)

    def _mean_abs(self, kind: int) -> torch.Tensor:
        sel = (self.group_kind == kind).unsqueeze(1).expand_as(self.advantages)
        return torch.where(sel, self.advantages.abs(), 0.0).sum() / sel.sum().clamp(min=1)

    mixed_group_ratio = property(lambda self: self._ratio(GROUP_MIXED))
    negative_group_ratio = property(lambda self: self._ratio(GROUP_NEGATIVE))
    positive_group_ratio = property(lambda self: self._ratio(GROUP_POSITIVE))
    mean_abs_advantage_mixed = property(lambda self: self._mean_abs(GROUP_MIXED))
    mean_abs_advantage_negative = property(lambda self: self._mean_abs(GROUP_NEGATIVE))
    mean_abs_advantage_positive = property(lambda self: self._mean_abs(GROUP_POSITIVE))

    @property
    def mean_calibrated_reward_incorrect(self) -> torch.Tensor:
        incorrect = self.rewards == 0
        return torch.where(incorrect, self.calibrated_reward, 0.0).sum() / incorrect.sum().clamp(min=1)

    @property
    def d_imp_won_fraction(self) -> torch.Tensor:
        mixed = self.group_kind == GROUP_MIXED
        return (self.d_imp_won & mixed).sum().double() / mixed.sum().clamp(min=1)

    @property
    def negative_groups_with_signal(self) -> torch.Tensor:
        return ((self.group_kind == GROUP_NEGATIVE) & (self.advantages != 0).any(dim=1)).sum()

    @property
    def mean_confidence(self) -> torch.Tensor:
        return self.confidence.sum() / max(self.confidence.numel(), 1)

    @property
    def max_abs_advantage(self) -> torch.Tensor:
        return self.advantages.abs().amax() if self.advantages.numel() else self.advantages.new_zeros(())

    def as_dict(self, prefix: str = "adv/") -> dict[str, float]:
        """The scalar diagnostics as Python floats (one host sync), for a logger."""
        values = torch.stack([getattr(self, n).double() for n in self.SCALARS]).tolist()
        return {prefix + n: v for n, v in zip(self.SCALARS, values)}


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


def difficulty_ratio(r: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``difficulty_D / max_j p_j`` per group ``[B, 1]`` and whether ``D_imp`` beat the floor.

    ``D_imp / max p = G / sum_i r_i / u_i`` (Eq. 14); floor 2 (= ``2 max p / max p``). Groups with
    no correct mass (``sum r = 0``, negative groups) use the floor only.
    """
    G = r.shape[1]
    inv_u = torch.where(r > 0, r / u, 0.0)  # r/u = inf when u = 0 -> D_imp = 0, floor wins
    total = inv_u.sum(dim=1, keepdim=True)
    d_imp = torch.where(total > 0, G / torch.where(total > 0, total, 1.0), 0.0)
    return torch.clamp(d_imp, min=2.0), d_imp > 2.0


def confidence_penalty(r, l, n, cfg: AdvantageConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Penalty multiplying ``(1 - r_i)`` in the calibrated reward, all ``[B, G]`` float64.

    Returns ``(penalty, difficulty_D [B], d_imp_won [B])``. Sec. 5.1: ``(1/G) q_i`` with
    ``q_i = p_i / (D - p_i) = u_i / (d - u_i)``; App. C: ``(1/n_i) p_i / (gamma - p_i)``.
    """
    G = r.shape[1]
    l_max = l.amax(dim=1, keepdim=True)
    has_p = l > -float("inf")
    u = torch.where(has_p, torch.exp(l - torch.where(has_p, l_max, 0.0)), 0.0)  # p_i / max p
    d, d_imp_won = difficulty_ratio(r, u)
    difficulty_D = (d * torch.exp(l_max)).squeeze(1)
    if cfg.length_preference_gamma is None:
        return (u / (d - u)) / G, difficulty_D, d_imp_won.squeeze(1)  # Sec. 5.1 calibrated ratio
    gamma = float(cfg.length_preference_gamma)
    p = torch.exp(l)
    incorrect_p = torch.where(r < 1, p, 0.0)
    if incorrect_p.numel() and incorrect_p.max() >= gamma:
        raise ValueError(
            f"length_preference_gamma={gamma} must exceed every confidence p_i of a sample with r < 1; "
            f"max such p_i = {incorrect_p.max().item():.6g}"
        )
    used = (n > 0) & (r < 1)  # correct samples never use it (and may have p >= gamma)
    pref = torch.where(used, p / torch.where(used, gamma - p, 1.0) / torch.where(used, n, 1.0), 0.0)  # App. C
    return pref, difficulty_D, d_imp_won.squeeze(1)


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
) -> tuple[torch.Tensor, AdvantageDiagnostics]:
    """Advantages ``[B*G]`` float32 (on the device of ``rewards``) plus diagnostics.

    ``rewards`` in [0, 1], ``logprob_sums`` = ``S_i`` (sum of old-policy token log-probs over the
    response), ``response_lengths`` = ``n_i``; all 1-D of length ``B*G`` with each prompt's
    ``G = group_size`` samples contiguous.
    """
    cfg = cfg or AdvantageConfig()
    r, s, n, group_size = _validate_inputs(rewards, logprob_sums, response_lengths, group_size)
    r, s, n = (t.view(-1, group_size) for t in (r, s, n))
    kind = classify_groups(r)
    l = log_confidence(s, n)
    p = torch.exp(l)
    penalty, difficulty_D, d_imp_won = confidence_penalty(r, l, n, cfg)
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
) -> torch.Tensor:
    """Per-sample advantages ``[B*G]`` float32; see the module docstring for the conventions."""
    return compute_advantages_with_diagnostics(rewards, logprob_sums, response_lengths, group_size, cfg)[0]
