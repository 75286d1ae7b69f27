"""DAPO dynamic sampling in the rollout stage: zero-variance groups are dropped and refilled, with
a cap on the rounds; the batch never changes size; everything is counted. A stand-in engine and
verifier make the reward pattern exact (no model needed)."""
from __future__ import annotations

import pytest
import torch

from lens_megatron.config import load_config
from lens_megatron.data.prompt_source import PromptSource
from lens_megatron.rollout.base import assemble_batch
from lens_megatron.rollout.generation import collect_step
from lens_megatron.tokenizer import build_tokenizer

G = 4


class EchoEngine:
    """Answers every prompt with one token; records what it was asked to generate."""

    def __init__(self) -> None:
        self.calls = []

    def wake(self):
        pass

    def sleep(self):
        pass

    def generate(self, prompts, sampling):
        self.calls.append((len(prompts), sampling.seed))
        seqs = [list(p) for p in prompts for _ in range(sampling.group_size)]
        responses = [[5] for _ in seqs]
        batch = assemble_batch(seqs, responses, [[-1.0]] * len(seqs), [True] * len(seqs),
                               sampling.group_size, 0)
        batch.response_texts = ["x"] * len(seqs)
        return batch


class RuleScorer:
    """Reward by the gold answer: ``varied(gold)`` -> alternate 1/0 in the group, else all 0."""

    def __init__(self, varied) -> None:
        self.varied = varied

    def score(self, batch, golds):
        rewards = [float(self.varied(g) and i % 2 == 0) for i, g in enumerate(golds)]
        return torch.tensor(rewards), {"timeouts": 0}


def _setup(*overrides):
    cfg = load_config(overrides=["data.task=arithmetic", "rollout.prompts_per_step=3",
                                 "model.micro_batch_size=4",
                                 f"rollout.group_size={G}", "rollout.dynamic_sampling.enabled=true",
                                 *overrides])
    tok = build_tokenizer("char", None)
    source = PromptSource(cfg.data, tok, cfg.rollout.prompts_per_step,
                          cfg.rollout.max_prompt_length, one_at_a_time=True)
    return cfg, source


def _whole(n):
    return slice(0, n), 0, True


def _groups_vary(rewards):
    grouped = rewards.view(-1, G)
    return bool((grouped.amax(1) > grouped.amin(1)).all())


def test_drops_zero_variance_groups_and_refills_to_the_batch_size():
    cfg, source = _setup("rollout.dynamic_sampling.oversample=2.0",
                         "rollout.dynamic_sampling.max_rounds=20")
    engine = EchoEngine()
    scored = collect_step(cfg, engine, RuleScorer(lambda gold: int(gold) % 3 == 0), source,
                          step=0, version=0, shard_fn=_whole)
    m = scored.metrics
    assert scored.batch.num_sequences == 3 * G and scored.rewards.numel() == 3 * G
    assert _groups_vary(scored.rewards)
    assert m["dynamic_sampling/topped_up_groups"] == 0
    assert m["dynamic_sampling/generated_groups"] == sum(n for n, _ in engine.calls)
    assert m["dynamic_sampling/dropped_groups"] >= 1
    assert m["dynamic_sampling/varied_groups"] >= 3
    assert (m["dynamic_sampling/dropped_groups"] + m["dynamic_sampling/varied_groups"]
            == m["dynamic_sampling/generated_groups"])
    assert m["dynamic_sampling/rounds"] == len(engine.calls) >= 2
    assert engine.calls[0][0] == 3  # the first round draws the batch
    assert all(n >= 2 * 1 for n, _ in engine.calls[1:])  # refills over-sample
    assert len({seed for _, seed in engine.calls}) == len(engine.calls)  # fresh noise per round
    assert m["dynamic_sampling/generation_ratio"] == m["dynamic_sampling/generated_groups"] / 3


def test_round_cap_tops_up_and_never_shrinks_the_batch(caplog):
    cfg, source = _setup("rollout.dynamic_sampling.max_rounds=2")
    scored = collect_step(cfg, EchoEngine(), RuleScorer(lambda gold: False), source,
                          step=4, version=4, shard_fn=_whole)
    m = scored.metrics
    assert scored.batch.num_sequences == 3 * G
    assert m["dynamic_sampling/rounds"] == 2 and m["dynamic_sampling/topped_up_groups"] == 3
    assert "topped up with 3 zero-variance groups" in caplog.text


def test_deterministic_and_resumable():
    """The same step twice gives the same batch; the prompt position after it is recorded, so
    a resumed run continues from exactly there."""
    def run():
        cfg, source = _setup("rollout.dynamic_sampling.max_rounds=20")
        scored = collect_step(cfg, EchoEngine(), RuleScorer(lambda g: int(g) % 3 == 0), source,
                              0, 0, _whole)
        return scored, source

    (a, src_a), (b, _) = run(), run()
    assert torch.equal(a.batch.input_ids, b.batch.input_ids)
    cfg, fresh = _setup()
    fresh.load_state_dict(a.data_state)
    assert [p.token_ids for p in fresh.take(2)] == [p.token_ids for p in src_a.take(2)]


def test_config_validation_names_the_keys():
    from lens_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.dynamic_sampling.oversample"):
        load_config(overrides=["data.task=arithmetic", "rollout.dynamic_sampling.oversample=0.5"])
    with pytest.raises(ConfigError, match="rollout.dynamic_sampling.max_rounds"):
        load_config(overrides=["data.task=arithmetic", "rollout.dynamic_sampling.max_rounds=0"])
