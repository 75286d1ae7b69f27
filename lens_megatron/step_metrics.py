"""The metrics of one training step (the ``metrics.jsonl`` row): pure functions of what the step
computed. ``trainer.py`` runs the step; this module only names and summarises its results."""
from __future__ import annotations

import torch

from .algorithms.advantages import GROUP_MIXED, GROUP_NEGATIVE


def confidence_by_group_kind(diag) -> dict[str, float]:
    """Mean confidence p̄ of wrong answers in negative and in mixed groups, and the mean over
    negative groups of their most confident wrong answer's p̄."""
    conf, wrong = diag.confidence, diag.rewards < 1.0
    negative = diag.group_kind == GROUP_NEGATIVE
    out = {"confidence/max_wrong_in_negative_groups":
           float(conf.max(1).values[negative].mean()) if bool(negative.any()) else float("nan")}
    for name, kind in (("negative", GROUP_NEGATIVE), ("mixed", GROUP_MIXED)):
        chosen = (diag.group_kind == kind).unsqueeze(1) & wrong
        out[f"confidence/wrong_in_{name}_groups"] = (
            float(conf[chosen].mean()) if bool(chosen.any()) else float("nan"))
    return out


def update_effect(new: torch.Tensor, old: torch.Tensor, mask: torch.Tensor, diag) -> dict[str, float]:
    """How a step's own update moved the per-token log-prob (log p̄) of its samples (``new`` vs
    ``old`` token log-probs): in negative groups for the most and the least confident wrong answer
    of each group (LENS pushes the former down and, its advantages being zero-mean, the latter
    up), and in mixed groups for wrong and right answers."""
    delta = ((new - old) * mask).sum(1) / mask.sum(1).clamp(min=1)
    delta = delta.view(diag.rewards.shape).double()
    negative = diag.group_kind == GROUP_NEGATIVE
    rows = torch.arange(delta.shape[0], device=delta.device)
    most = delta[rows, diag.confidence.argmax(1)][negative]
    least = delta[rows, diag.confidence.argmin(1)][negative]
    wrong, mixed = diag.rewards < 1.0, (diag.group_kind == GROUP_MIXED).unsqueeze(1)
    parts = {"negative_groups_most_confident": most, "negative_groups_least_confident": least,
             "mixed_groups_wrong": delta[mixed & wrong],
             "mixed_groups_correct": delta[mixed & ~wrong]}
    return {f"update_effect/{k}": float(v.mean()) if v.numel() else float("nan")
            for k, v in parts.items()}


def step_metrics(scored, advantages, diag, signal, extra: dict[str, float]) -> dict[str, float]:
    """The row for one step: rollout, rewards, groups, confidence, learning signal, staleness,
    and ``extra`` (mismatch, train, totals, timings, setup) as given."""
    batch, rewards = scored.batch, scored.rewards
    correct = rewards >= 1.0
    tokens = int(batch.response_lengths.sum() + batch.prompt_lengths.sum())
    out = {
        "reward/mean": float(rewards.mean()),
        "reward/accuracy": float(correct.float().mean()),
        "response/length_mean": float(batch.response_lengths.float().mean()),
        "response/finished_fraction": float(batch.finished.float().mean()),
        "advantage/mean": float(advantages.mean()),
        "advantage/abs_mean": float(advantages.abs().mean()),
        "rollout/weight_version": float(scored.weight_version),
        "rollout/version_lag": float(scored.step - scored.weight_version),
    }
    out.update(diag.as_dict(prefix="groups/"))
    out.update(confidence_by_group_kind(diag))
    out.update(signal.as_dict())
    out.update({f"reward/{k}": float(v) for k, v in scored.reward_counts.items()})
    out.update(scored.metrics)
    out.update(extra)
    step_s = extra.get("time/step_s", 0.0)
    out["throughput/tokens_per_s"] = tokens / max(step_s, 1e-9)
    return out


__all__ = ["confidence_by_group_kind", "step_metrics", "update_effect"]
