"""The learning-signal guard in the trainer: a run whose steps give no gradient stops with a
clear message and a checkpoint; LENS on all-negative groups keeps learning."""
from __future__ import annotations

import os

import pytest

from lens_megatron.parallel.spawn import run_in_processes
from trainer_helpers import force_boxed_answers, init_for, tiny_config

pytestmark = pytest.mark.slow


def guard_worker(tmp_dir, estimator, judge):
    from lens_megatron.checkpoint.training_state import latest_checkpoint
    from lens_megatron.trainer import LensTrainer, TrainingStalled

    cfg = tiny_config(tmp_dir, f"lens.estimator={estimator}", "trainer.stall_steps=2",
                      "trainer.max_steps=3", f"reward.judge={judge}")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    if judge.endswith("always_correct_judge"):
        force_boxed_answers(trainer)
    message = None
    try:
        metrics = trainer.run()
    except TrainingStalled as exc:
        message, metrics = str(exc), {}
    saved = latest_checkpoint(trainer.ckpt_root)
    trainer.close()
    return message, trainer.step, saved, metrics


def test_guard_fires_on_all_positive_grpo(tmp_path):
    message, step, saved, _ = run_in_processes(
        guard_worker, 1, (str(tmp_path), "grpo", "trainer_helpers:always_correct_judge"),
        env={"PYTHONPATH": os.path.dirname(__file__)})[0]
    assert message is not None and "no learning signal for 2 consecutive steps" in message
    assert step == 2 and saved is not None and saved.endswith("step_000002")


def test_guard_does_not_fire_for_lens_on_all_negative(tmp_path):
    message, step, _, metrics = run_in_processes(
        guard_worker, 1, (str(tmp_path), "lens", "lens_megatron.rewards.judge:math_verify_judge"))[0]
    assert message is None and step == 3
    assert metrics["groups/negative_group_ratio"] == 1.0
    assert metrics["total/negative_groups_with_gradient"] == 6.0  # 2 groups × 3 steps
