"""RL algorithm stages: LENS advantages, clipped policy loss, rollout-mismatch correction,
learning-signal metrics. Pure tensor math; process groups are passed in explicitly."""
from lens_megatron.algorithms.advantages import (
    AdvantageConfig,
    AdvantageDiagnostics,
    compute_advantages,
    compute_advantages_with_diagnostics,
)
from lens_megatron.algorithms.loss import ClippedPolicyLoss, LossConfig, compute_global_normalizer
from lens_megatron.algorithms.rollout_correction import (
    RolloutCorrectionConfig,
    rollout_correction_weights,
    sampling_logprobs,
)
from lens_megatron.algorithms.signal import LearningSignal, StallGuard, learning_signal

__all__ = [
    "AdvantageConfig",
    "AdvantageDiagnostics",
    "ClippedPolicyLoss",
    "LearningSignal",
    "LossConfig",
    "RolloutCorrectionConfig",
    "StallGuard",
    "compute_advantages",
    "compute_advantages_with_diagnostics",
    "compute_global_normalizer",
    "learning_signal",
    "rollout_correction_weights",
    "sampling_logprobs",
]
