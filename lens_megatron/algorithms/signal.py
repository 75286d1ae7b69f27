"""Learning-signal metrics and a stall guard for the trainer (pure functions, no state but the guard).

A group "gives no gradient" when every advantage in it is exactly 0: all-correct (positive) groups
always, all-incorrect (negative) groups under GRPO or when their confidences are all equal under
LENS, and any other group whose rewards are all equal (``compute_advantages`` writes exact zeros
for groups without spread, so ``|A| > 0`` is the test). A sequence carries gradient when
``|A| > 0`` and it has at least one response token.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["LearningSignal", "StallGuard", "learning_signal"]


@dataclass
class LearningSignal:
    """Fractions are over all groups of the step; counts are plain ints."""

    num_groups: int
    zero_advantage_positive_fraction: float  # all-correct groups (never give gradient)
    zero_advantage_negative_fraction: float  # all-incorrect groups that gave no gradient
    zero_advantage_other_fraction: float  # other groups with all A = 0 (e.g. equal fractional rewards)
    effective_sequences: int  # |A| > 0 and >= 1 response token
    negative_groups_with_gradient: int

    @property
    def has_signal(self) -> bool:
        return self.effective_sequences > 0

    def as_dict(self, prefix: str = "signal/") -> dict[str, float]:
        return {prefix + k: float(v) for k, v in asdict(self).items()}


def learning_signal(
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    group_size: int,
    response_lengths: torch.Tensor | None = None,
) -> LearningSignal:
    """Summarize which groups/sequences of a step carry gradient. 1-D inputs of length ``B*G``,
    each prompt's samples contiguous; ``response_lengths`` None means every response has tokens."""
    r = torch.as_tensor(rewards).reshape(-1)
    a = torch.as_tensor(advantages, device=r.device).reshape(-1)
    if a.numel() != r.numel():
        raise ValueError(f"advantages has length {a.numel()} but rewards has length {r.numel()}")
    if group_size < 1 or r.numel() % group_size != 0:
        raise ValueError(f"len(rewards)={r.numel()} is not divisible by group_size={group_size}")
    carries = a.abs() > 0
    if response_lengths is not None:
        n = torch.as_tensor(response_lengths, device=r.device).reshape(-1)
        if n.numel() != r.numel():
            raise ValueError(f"response_lengths has length {n.numel()} but rewards has length {r.numel()}")
        carries = carries & (n > 0)
    r, carries = r.view(-1, group_size), carries.view(-1, group_size)
    positive = (r == 1).all(dim=1)
    negative = (r == 0).all(dim=1)
    silent = ~carries.any(dim=1)
    groups = r.shape[0]
    counts = torch.stack([
        (positive & silent).sum(),
        (negative & silent).sum(),
        (~positive & ~negative & silent).sum(),
        carries.sum(),
        (negative & ~silent).sum(),
    ]).tolist()  # one host sync
    denom = max(groups, 1)
    return LearningSignal(
        num_groups=groups,
        zero_advantage_positive_fraction=counts[0] / denom,
        zero_advantage_negative_fraction=counts[1] / denom,
        zero_advantage_other_fraction=counts[2] / denom,
        effective_sequences=int(counts[3]),
        negative_groups_with_gradient=int(counts[4]),
    )


class StallGuard:
    """Stop after ``stall_steps`` consecutive steps without gradient signal, or ``stall_steps``
    consecutive non-finite steps (NaN/inf loss or gradient: the step updated no weight).

    ``update(step_has_signal, loss_finite)`` returns True when training should stop; ``reason``
    then says why. A single non-finite step is skipped and counted, never fatal on its own
    (fp16 loss-scale overflows are not non-finite steps: megatron's scaler skips those by
    design). ``stall_steps = 0`` disables both checks.
    """

    def __init__(self, stall_steps: int) -> None:
        if isinstance(stall_steps, bool) or not isinstance(stall_steps, int) or stall_steps < 0:
            raise ValueError(f"stall_steps must be an int >= 0, got {stall_steps!r}")
        self.stall_steps = stall_steps
        self.steps_seen = 0
        self.steps_without_signal = 0
        self.nonfinite_in_a_row = 0
        self.reason = ""

    def update(self, step_has_signal: bool, loss_finite: bool) -> bool:
        self.steps_seen += 1
        self.reason = ""
        self.nonfinite_in_a_row = 0 if loss_finite else self.nonfinite_in_a_row + 1
        if loss_finite:
            self.steps_without_signal = 0 if step_has_signal else self.steps_without_signal + 1
        if not self.stall_steps:
            return False
        if self.nonfinite_in_a_row >= self.stall_steps:
            self.reason = (f"the loss or gradient was not finite (NaN/inf) in "
                           f"{self.nonfinite_in_a_row} consecutive steps (up to step "
                           f"{self.steps_seen}); those steps changed no weights")
            return True
        if self.steps_without_signal >= self.stall_steps:
            self.reason = (
                f"no learning signal for {self.steps_without_signal} consecutive steps "
                "(every advantage was zero: all groups positive, or negative without gradient)"
            )
            return True
        return False

    def state_dict(self) -> dict[str, int]:
        return {"steps_seen": self.steps_seen, "steps_without_signal": self.steps_without_signal,
                "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps_seen = int(state["steps_seen"])
        self.steps_without_signal = int(state["steps_without_signal"])
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))  # older checkpoints
