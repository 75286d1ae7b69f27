"""Rows are grouped by length and micro-batches cut to the columns they need (through their
last response token); the results must equal those of unsorted full-width micro-batches, per-row
log-probs (back in the original order) and the optimizer step alike."""
from __future__ import annotations

import pytest
import torch

from lens_megatron.parallel.spawn import run_in_processes
from trainer_helpers import full_weights, init_for, tiny_config

pytestmark = pytest.mark.slow

WIDTH = 24


def _ragged_batch():
    from lens_megatron.actor import TokenBatch

    gen = torch.Generator().manual_seed(5)
    n = 8
    ids = torch.randint(3, 100, (n, WIDTH), generator=gen)
    response = torch.zeros(n, WIDTH, dtype=torch.bool)
    # prompt of 4 tokens, responses ending at very different places (one empty)
    ends = [6, 9, 5, 12, 7, 7, 10, 4]
    for row, end in enumerate(ends):
        response[row, 4:end] = True
        ids[row, end:] = 0
    return TokenBatch.from_rollout(ids, response), ends


def width_worker(tmp_dir, cut):
    from lens_megatron.actor import LensActor
    from lens_megatron.batching import plan_batches
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, "model.micro_batch_size=2", "rollout.prompts_per_step=2",
                      "rollout.group_size=4", "optim.adam_eps=1.0", "optim.lr=0.1",
                      f"model.arch.max_position_embeddings={WIDTH}")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    actor = trainer.actor
    widths = []
    original = actor._plan

    def plan(tokens):
        if cut:
            result = original(tokens)
        else:  # every row "needs" the full width: nothing is cut
            n, width = tokens.input_ids.shape
            result = plan_batches([width] * n, 1, micro_batch_size=2, full_width=width)
        widths.extend(mb.width for mb in result.micro_batches(0))
        return result

    actor._plan = plan
    tokens, _ = _ragged_batch()
    out = actor.compute_logprobs(tokens, entropy=True)
    old = out["token_logprobs"]
    advantages = torch.linspace(-1.0, 1.0, tokens.input_ids.shape[0])
    normalizer = torch.tensor(float(tokens.input_ids.shape[0]))
    metrics = actor.train_step(tokens, old + 0.01 * tokens.target_mask, advantages, normalizer)
    weights = full_weights(trainer)
    trainer.close()
    assert isinstance(actor, LensActor)
    return {"old": old, "entropy": out["entropy"], "loss": metrics["loss"], "weights": weights,
            "widths": widths}


def test_cut_micro_batches_equal_the_full_width(tmp_path):
    cut = run_in_processes(width_worker, 1, (str(tmp_path / "cut"), True))[0]
    full = run_in_processes(width_worker, 1, (str(tmp_path / "full"), False))[0]
    _, ends = _ragged_batch()
    # the targets of position t are at t + 1: a row ending at `end` needs end - 1 columns;
    # sorted by that, pairs of rows share a micro-batch
    needed = sorted(end - 1 for end in ends)
    expected = [max(needed[i], needed[i + 1]) for i in range(0, len(needed), 2)]
    assert expected == [4, 6, 8, 11]
    assert cut["widths"] == expected * 2, cut["widths"]      # log-probs pass, then training pass
    assert full["widths"] == [WIDTH] * 8
    assert cut["old"].shape == full["old"].shape == (8, WIDTH)
    torch.testing.assert_close(cut["old"], full["old"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cut["entropy"], full["entropy"], rtol=1e-5, atol=1e-6)
    assert cut["loss"] == pytest.approx(full["loss"], rel=1e-5, abs=1e-7)
    for name, value in full["weights"].items():
        torch.testing.assert_close(cut["weights"][name], value, rtol=1e-5, atol=1e-6)
