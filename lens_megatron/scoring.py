"""Scoring a rollout: the configured verifier (math-verify by default) on each response,
with per-batch failure counts."""
from __future__ import annotations

import torch

from .rewards import MathVerifyReward
from .rollout.base import RolloutBatch


class RolloutScorer:
    """Owns the verifier process pool for the life of the trainer (created once)."""

    def __init__(self, reward_cfg) -> None:
        self.reward = MathVerifyReward(timeout_s=reward_cfg.timeout_s,
                                       num_workers=reward_cfg.num_workers,
                                       judge=reward_cfg.judge)
        # Warm up now: the workers' imports (sympy, antlr: seconds of CPU each) then happen
        # before training, not during the first steps. Its counts do not enter any metric.
        self.reward(["\\boxed{1}"] * max(1, reward_cfg.num_workers),
                    ["1"] * max(1, reward_cfg.num_workers))

    def score(self, batch: RolloutBatch, gold_answers: list[str]):
        """(rewards [N] float32, counters dict) for the batch's decoded responses."""
        if len(batch.response_texts) != batch.num_sequences:
            raise ValueError("the rollout engine returned no decoded response texts to score")
        result = self.reward(batch.response_texts, gold_answers)
        return result.as_tensor(torch.float32), result.counters.as_dict()

    def close(self) -> None:
        self.reward.close()
