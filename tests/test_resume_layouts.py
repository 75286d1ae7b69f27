"""Resuming a training checkpoint at another parallel layout: the optimizer state survives.

Each case trains 3 steps straight at layout A, and 2 steps at A then 1 more resumed at layout
B (2 Adam steps before the save, so a lost step count shows); the weights after step 3 must agree (exactly where only data parallelism changes, to
float32 reduction-order noise where TP changes). A control resumes the same checkpoint at B
but forgets the Adam moments; it must land measurably elsewhere, so the comparison can fail.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from lens_megatron.checkpoint import optimizer_state
from lens_megatron.parallel.spawn import run_in_processes
from trainer_helpers import full_weights, init_for, tiny_config


def layout_worker(run_dir, steps, tp, pp, devices, fmt, precision, forget_moments, vpp=None,
                  extra=()):
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(run_dir, f"trainer.max_steps={steps}", "exp_manager.resume=auto",
                      "lens.estimator=lens", f"model.tensor_model_parallel_size={tp}",
                      f"model.pipeline_model_parallel_size={pp}",
                      "optim.lr=0.01", f"exp_manager.optimizer_checkpoint_format={fmt}",
                      f"model.precision={precision}", *extra,
                      *([f"model.virtual_pipeline_model_parallel_size={vpp}"] if vpp else []),
                      devices=devices)
    init_for(cfg)
    trainer = LensTrainer(cfg)
    resumed_from = []
    original = trainer.maybe_resume

    def resume():
        path = original()
        resumed_from.append(path)
        if forget_moments:
            opt = trainer.actor.training.optimizer
            for inner in getattr(opt, "chained_optimizers", [opt]):
                for state in inner.optimizer.state.values():
                    state["exp_avg"].zero_()
                    state["exp_avg_sq"].zero_()
        return path

    trainer.maybe_resume = resume
    trainer.run()
    weights = full_weights(trainer)
    distributed = trainer.actor.training.distributed_optimizer
    trainer.close()
    return {"weights": weights, "resumed_from": resumed_from[0], "distributed": distributed}


def _run(run_dir, steps, layout, fmt, precision, forget_moments=False, extra=()):
    tp, pp, dp, *vpp = layout
    return run_in_processes(layout_worker, tp * pp * dp,
                            (str(run_dir), steps, tp, pp, tp * pp * dp, fmt, precision,
                             forget_moments, vpp[0] if vpp else None, extra),
                            timeout=600.0)[0]


def _max_diff(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


CASES = [
    # (format written at A, precision, layout A (tp, pp, dp[, vpp]), layout B, exact)
    pytest.param("fully_reshardable", "fp32", (1, 1, 2), (2, 1, 1), False,
                 id="distributed-dp2-to-plain-tp2"),
    pytest.param("dp_reshardable", "fp32", (2, 1, 1), (1, 1, 2), False,
                 id="plain-tp2-to-distributed-dp2"),
    # (DP=2 -> plain PP=2 without virtual stages is the same loader path as the VPP case below)
    pytest.param("fully_reshardable", "fp32", (1, 1, 2), (1, 2, 1, 2), False,
                 id="distributed-dp2-to-plain-pp2-vpp2"),
    pytest.param("fully_reshardable", "bf16", (1, 1, 2), (1, 1, 2), True,
                 id="fully-reshardable-bf16-same-layout"),
    pytest.param("dp_reshardable", "bf16", (1, 1, 1), (1, 1, 2), True,
                 id="plain-bf16-to-distributed-dp2"),
    # the default format resumed at the layout it was written at (a requeued DP=2 job): megatron
    # 0.16's loader left Adam at step 1 here, so step 3 used step 1's bias correction again
    pytest.param("dp_reshardable", "fp32", (1, 1, 2), (1, 1, 2), True,
                 id="dp-reshardable-dp2-same-layout"),
]


@pytest.mark.slow
@pytest.mark.parametrize("fmt,precision,layout_a,layout_b,exact", CASES)
def test_resume_at_another_layout_keeps_optimizer_state(tmp_path, fmt, precision, layout_a,
                                                        layout_b, exact):
    extra = ("model.arch.num_layers=4",) if len(layout_b) > 3 else ()   # VPP needs 2×2 layers
    straight = _run(tmp_path / "straight", 3, layout_a, fmt, precision, extra=extra)
    first = _run(tmp_path / "first", 2, layout_a, fmt, precision, extra=extra)
    assert first["resumed_from"] is None
    shutil.copytree(tmp_path / "first", tmp_path / "control")
    resumed = _run(tmp_path / "first", 3, layout_b, fmt, precision, extra=extra)
    assert resumed["resumed_from"] and os.path.basename(resumed["resumed_from"]) == "step_000002"
    assert resumed["distributed"] == (layout_b[2] > 1)
    diff = _max_diff(straight["weights"], resumed["weights"])
    if exact:
        assert diff == 0.0, f"resumed at {layout_b} differs from straight at {layout_a}: {diff}"
        return
    control = _run(tmp_path / "control", 3, layout_b, fmt, precision, forget_moments=True,
                   extra=extra)
    control_diff = _max_diff(straight["weights"], control["weights"])
    assert diff < 1e-4, f"resumed at {layout_b} differs from straight at {layout_a} by {diff}"
    assert control_diff > 1e-3 and control_diff > 50 * diff, (diff, control_diff)


# ----------------------------------------------------------------------------- refusals
LAYOUT_TP1 = {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1,
              "virtual_pipeline_model_parallel_size": 1, "data_parallel_size": 2}


def test_dp_reshardable_state_is_refused_at_another_tp_with_the_way_out():
    saved = {"format": optimizer_state.DP_RESHARDABLE, "adam_step": 1, "main_param_prefix": None,
             "layout": dict(LAYOUT_TP1, tensor_model_parallel_size=2, data_parallel_size=2)}
    with pytest.raises(RuntimeError) as err:
        optimizer_state.check_resumable(saved, optimizer_state.DP_RESHARDABLE, LAYOUT_TP1, "/ck")
    text = str(err.value)
    assert "tensor_model_parallel_size=2" in text and "tensor_model_parallel_size=1" in text
    assert "model.load=/ck" in text and "fully_reshardable" in text
    # another DP size at the same TP×PP is what dp_reshardable is for
    optimizer_state.check_resumable(saved, optimizer_state.DP_RESHARDABLE,
                                    dict(saved["layout"], data_parallel_size=4), "/ck")


def test_dp_reshardable_state_is_refused_into_one_rank():
    saved = {"format": optimizer_state.DP_RESHARDABLE, "adam_step": 1, "main_param_prefix": None,
             "layout": LAYOUT_TP1}
    with pytest.raises(RuntimeError, match="one data-parallel rank"):
        optimizer_state.check_resumable(saved, optimizer_state.PLAIN,
                                        dict(LAYOUT_TP1, data_parallel_size=1), "/ck")


def test_per_parameter_formats_resume_anywhere():
    for fmt in (optimizer_state.PLAIN, optimizer_state.FULLY_RESHARDABLE):
        saved = {"format": fmt, "adam_step": 3, "main_param_prefix": None, "layout": LAYOUT_TP1}
        for now in (optimizer_state.PLAIN, optimizer_state.DP_RESHARDABLE):
            optimizer_state.check_resumable(saved, now, dict(LAYOUT_TP1, tensor_model_parallel_size=4),
                                            "/ck")


def test_checkpoints_without_a_recorded_adam_step_do_not_cross_kinds():
    saved = {"format": optimizer_state.PLAIN, "adam_step": None, "main_param_prefix": None,
             "layout": None}
    with pytest.raises(RuntimeError, match="no recorded Adam step"):
        optimizer_state.check_resumable(saved, optimizer_state.DP_RESHARDABLE, LAYOUT_TP1, "/ck")
    optimizer_state.check_resumable(saved, optimizer_state.PLAIN, LAYOUT_TP1, "/ck")


def test_adam_step_setting_follows_the_optimizer_kind():
    plain = {"state": {0: {}}, "param_groups": [{"params": [0]}]}
    optimizer_state._set_step(plain, 5, distributed=False)
    assert torch.equal(plain["state"]["common_step"], torch.tensor(5.0))
    assert "step" not in plain["param_groups"][0]
    distributed = {"optimizer": {"param_groups": [{"params": [0]}, {"params": [1]}]},
                   "param_state": {}}
    optimizer_state._set_step(distributed, 5, distributed=True)
    assert [g["step"] for g in distributed["optimizer"]["param_groups"]] == [5.0, 5.0]
