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


# ----------------------------------------------------------------------------- the guard alone
def test_stall_guard_counts_consecutive_steps():
    from lens_megatron.algorithms.signal import StallGuard

    guard = StallGuard(stall_steps=2)
    assert not guard.update(step_has_signal=False, loss_finite=True)
    assert not guard.update(step_has_signal=True, loss_finite=True)  # signal resets the count
    assert not guard.update(step_has_signal=False, loss_finite=True)
    assert guard.update(step_has_signal=False, loss_finite=True)
    assert "no learning signal for 2 consecutive steps" in guard.reason
    restored = StallGuard(2)
    restored.load_state_dict(guard.state_dict())
    assert restored.steps_without_signal == 2
    with pytest.raises(ValueError, match="stall_steps"):
        StallGuard(-1)


def test_one_nonfinite_step_is_skipped_not_fatal():
    """K consecutive non-finite steps stop the run, as the README promises; one does not."""
    from lens_megatron.algorithms.signal import StallGuard

    guard = StallGuard(stall_steps=3)
    assert not guard.update(True, loss_finite=False)
    assert not guard.update(True, loss_finite=False)
    assert not guard.update(True, loss_finite=True)  # a finite step resets the count
    assert not guard.update(True, loss_finite=False)
    assert not guard.update(True, loss_finite=False)
    assert guard.update(True, loss_finite=False)
    assert "not finite (NaN/inf) in 3 consecutive steps" in guard.reason
    restored = StallGuard(3)
    restored.load_state_dict(guard.state_dict())
    assert restored.nonfinite_in_a_row == 3
    off = StallGuard(stall_steps=0)  # 0 disables both checks
    assert not any(off.update(False, False) for _ in range(10))


# ----------------------------------------------------------------------------- in the trainer
def fp16_worker(tmp_dir, initial_scale, steps):
    from lens_megatron.trainer import LensTrainer
    from trainer_helpers import full_weights

    cfg = tiny_config(tmp_dir, "model.precision=fp16", f"optim.initial_loss_scale={initial_scale}",
                      "trainer.stall_steps=2", f"trainer.max_steps={steps}", "optim.lr=1e-2",
                      "lens.estimator=lens")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    before = full_weights(trainer)
    rows = []
    original = trainer.train_step

    def record():
        metrics = original()
        rows.append({k: v for k, v in metrics.items() if k.startswith(("train/", "total/"))})
        return metrics

    trainer.train_step = record
    trainer.run()
    after = full_weights(trainer)
    trainer.close()
    change = max(float((after[k] - before[k]).abs().max()) for k in before)
    return rows, trainer.step, change


def test_fp16_overflow_steps_are_skipped_and_counted(tmp_path):
    """fp16: megatron's loss scaler starts at 2^32, so the first updates overflow by design.
    They are skipped updates (counted, no weight change), not failures; the run goes on past
    trainer.stall_steps of them, the scale falls, and once it is small enough updates apply."""
    rows, step, change = run_in_processes(fp16_worker, 1, (str(tmp_path / "big"), 2.0**32, 3))[0]
    assert step == 3 and change == 0.0
    assert [r["train/overflow_skipped_updates"] for r in rows] == [1.0, 1.0, 1.0]
    assert [r["train/applied_updates"] for r in rows] == [0.0, 0.0, 0.0]
    scales = [r["train/loss_scale"] for r in rows]
    assert scales[0] == 2.0**32 and scales[-1] < scales[0]  # halves after the hysteresis
    assert rows[-1]["total/overflow_skipped_updates"] == 3.0
    rows, step, change = run_in_processes(fp16_worker, 1, (str(tmp_path / "small"), 256.0, 2))[0]
    assert step == 2 and change > 0
    assert all(r["train/applied_updates"] == 1.0 for r in rows)
    assert all(r["train/grad_norm"] > 0 for r in rows)


def partial_nonfinite_worker(tmp_dir):
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, "optim.updates_per_rollout=2", "trainer.max_steps=1",
                      "trainer.stall_steps=2")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    calls, syncs = [], []
    train_step = trainer.actor.train_step
    sync = trainer.engine.sync_weights

    def second_update_nan(tokens, old, advantages, normalizer, **kw):
        calls.append(len(calls))
        if len(calls) == 2:  # a real non-finite loss through the real path
            advantages = advantages.clone()
            advantages[0] = float("nan")
        return train_step(tokens, old, advantages, normalizer, **kw)

    trainer.actor.train_step = second_update_nan
    trainer.engine.sync_weights = lambda: syncs.append(1) or sync()
    metrics = trainer.train_step()
    trainer.close()
    return metrics, len(syncs)


def test_nonfinite_later_update_still_syncs_the_engine(tmp_path):
    """updates_per_rollout = 2, the second update's loss NaN: the first update changed the
    weights, so the engine is synced, and the metrics say one update was skipped."""
    metrics, syncs = run_in_processes(partial_nonfinite_worker, 1, (str(tmp_path),))[0]
    assert syncs == 1
    assert metrics["train/applied_updates"] == 1.0
    assert metrics["train/nonfinite_updates"] == 1.0
