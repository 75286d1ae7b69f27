"""Rule-based rewards: last-boxed-answer extraction + math-verify with a hard timeout.

This package does not import torch (its worker processes stay light); ``RewardResult``
converts to a tensor on demand.
"""

from lens_megatron.rewards.boxed import extract_last_boxed
from lens_megatron.rewards.judge import (
    DEFAULT_JUDGE,
    AnswerParseError,
    math_verify_judge,
    parse_gold_answer,
    resolve_judge,
)
from lens_megatron.rewards.math_verify_reward import (
    MathVerifyReward,
    RewardCounters,
    RewardResult,
)
from lens_megatron.rewards.verifier_pool import JudgeOutcome, VerifierPool

__all__ = [
    "DEFAULT_JUDGE",
    "AnswerParseError",
    "JudgeOutcome",
    "MathVerifyReward",
    "RewardCounters",
    "RewardResult",
    "VerifierPool",
    "extract_last_boxed",
    "math_verify_judge",
    "parse_gold_answer",
    "resolve_judge",
]
