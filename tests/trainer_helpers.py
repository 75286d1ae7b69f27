"""Shared pieces for trainer tests: a tiny config and rank-side helpers."""
from __future__ import annotations

import time
import warnings

import torch

from lens_megatron.config import LensTrainConfig, load_config

TINY = [
    "data.task=arithmetic",
    "model.arch.vocab_size=103",
    "model.arch.hidden_size=64",
    "model.arch.ffn_hidden_size=128",
    "model.arch.num_layers=2",
    "model.arch.num_attention_heads=2",
    "model.arch.num_query_groups=2",
    "model.arch.max_position_embeddings=64",
    "model.transformer_impl=local",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "rollout.max_new_tokens=8",
    "model.micro_batch_size=2",
    "reward.num_workers=0",
    "trainer.progress_bar=false",
    "trainer.save_every=0",
    "optim.lr=1e-3",
]


def tiny_config(tmp_dir: str, *overrides: str, devices: int = 1) -> LensTrainConfig:
    return load_config(overrides=[*TINY, f"exp_manager.exp_dir={tmp_dir}",
                                  f"trainer.devices={devices}", *overrides])


def init_for(cfg: LensTrainConfig) -> None:
    """Inside a spawned rank (gloo group already up): Megatron groups for cfg's layout."""
    warnings.filterwarnings("ignore")
    from lens_megatron.parallel.initialize import initialize_from_config

    initialize_from_config(cfg)


def full_weights(trainer) -> dict[str, torch.Tensor]:
    return actor_weights(trainer.actor)


def actor_weights(actor) -> dict[str, torch.Tensor]:
    """The actor's whole model, unpadded vocab rows, on every rank (a collective)."""
    from lens_megatron.models.gather import gather_full_state_dict

    arch = actor.cfg.model.arch
    state = gather_full_state_dict(actor.chunks, arch.tie_word_embeddings)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in state:
            state[name] = state[name][: arch.vocab_size]
    return state


def hanging_judge(predicted: str, gold: str) -> bool:
    """A verifier that never returns (for the timeout test)."""
    while True:
        time.sleep(1.0)


def always_correct_judge(predicted: str, gold: str) -> bool:
    """Every boxed answer is right: a synthetic all-positive data set for the stall guard."""
    return True


def force_boxed_answers(trainer, text: str = "\\boxed{1}") -> None:
    """Make every generated response read ``text`` so the judge is called on each sample."""
    original = trainer.engine.generate

    def boxed(prompts, sampling):
        batch = original(prompts, sampling)
        batch.response_texts = [text] * batch.num_sequences
        return batch

    trainer.engine.generate = boxed


_calls = {"n": 0}


def every_third_correct_judge(predicted: str, gold: str) -> bool:
    """Deterministic mixed groups: every third judged sample is right (in-process verifier)."""
    _calls["n"] += 1
    return _calls["n"] % 3 == 0
