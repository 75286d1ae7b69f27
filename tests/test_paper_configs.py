"""The paper configs (examples/configs) reproduce the paper's protocol (Sec. 6, App. D.1):
512 trajectories (32 questions × 16 samples) per optimizer step, at most 4 off-policy updates
per rollout (veRL's train batch of 128 = 4 × 32 prompts), so 2,048 trajectories per rollout;
no rollout correction (not in the paper); the training mix of tools/build_train_mix.py."""
import os

import pytest

from lens_megatron.config import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")
PAPER = {"llama31_8b_instruct_lens.yaml": 3e-7, "qwen25_3b_base_lens.yaml": 1e-6}  # App. D.1 lr


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_batch_structure(name):
    cfg = load_config(os.path.join(CONFIGS, name), environment=False)  # runs config.validate
    rollout = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    assert cfg.rollout.group_size == 16
    assert rollout == 2048
    assert cfg.optim.updates_per_rollout == 4
    per_update = rollout // cfg.optim.updates_per_rollout  # what the trainer's _updates slices
    assert per_update == 512 and per_update // cfg.rollout.group_size == 32
    assert per_update % (cfg.data_parallel_size * cfg.model.micro_batch_size) == 0


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_recipe(name):
    cfg = load_config(os.path.join(CONFIGS, name), environment=False)
    assert cfg.loss.rollout_correction == "none"
    assert (cfg.lens.estimator, cfg.lens.lens_groups, cfg.lens.negative_group_weight) == ("lens", "all", 0.25)
    assert cfg.lens.preference_function == "none" and cfg.lens.d_floor_multiplier == 2.0
    assert (cfg.loss.clip_eps_low, cfg.loss.clip_eps_high, cfg.loss.kl_coef) == (0.2, 0.2, 0.0)
    assert cfg.loss.normalization == "sequence"
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.max_new_tokens) == (1.0, 1.0, 4096)
    assert cfg.optim.lr == pytest.approx(PAPER[name])
    assert cfg.data.train_path == "data/lens_train_mix.jsonl"
