"""What the LENS advantage stage saw (``compute_advantages_with_diagnostics``): the per-group and
per-sample tensors it computed and scalar diagnostics for the logger. Re-exported by
``advantages``."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AdvantageDiagnostics", "GROUP_MIXED", "GROUP_NEGATIVE", "GROUP_POSITIVE"]

GROUP_MIXED, GROUP_NEGATIVE, GROUP_POSITIVE = 0, 1, 2


@dataclass
class AdvantageDiagnostics:
    """What the advantage stage saw: the per-group/per-sample tensors it computed, and the scalar
    diagnostics as properties (0-d tensors, computed only when read: ``compute_advantages`` pays
    nothing for them, and nothing syncs with the device until ``as_dict``).

    Ratios are over groups; ``mean_abs_advantage_*`` over the samples of that kind of group and
    ``mean_calibrated_reward_incorrect`` over samples with ``r == 0`` (each 0 when there are none).
    ``d_imp_won_fraction``: fraction of mixed groups where D's estimate (``D_imp``; for
    ``preference`` ``sampling``/``policy`` the inverse correct rate) exceeded the floor
    ``m max p`` (``policy`` has no floor: 1 for every mixed group). ``difficulty_D`` is absolute
    (``D / max p`` times ``max p``), may underflow to 0 for tiny p, and is ``inf`` for groups
    without correct mass under ``sampling``/``policy``. ``confidence`` is always ``p_i``.
    """

    group_kind: torch.Tensor  # [B] int64: GROUP_MIXED / GROUP_NEGATIVE / GROUP_POSITIVE
    rewards: torch.Tensor  # [B, G] float64
    confidence: torch.Tensor  # [B, G] float64, p_i
    calibrated_reward: torch.Tensor  # [B, G] float64, r~_i (Eq. 10)
    difficulty_D: torch.Tensor  # [B] float64
    d_imp_won: torch.Tensor  # [B] bool, D's estimate > floor m max p
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
