"""Packed sequences (model.sequence_packing) in the actor: the same token log-probs, entropy,
loss and updated weights as padded micro-batches, at one process, TP=2 with sequence
parallelism, PP=2, PP=2 with virtual stages and DP=2 (fp32); and a trainer step packed end to
end."""
from __future__ import annotations

import pytest
import torch

from lens_megatron.parallel.spawn import run_in_processes
from trainer_helpers import full_weights, init_for, tiny_config

pytestmark = pytest.mark.slow

WIDTH = 40


def ragged_tokens(n: int = 12, pad_multiple: int = 1):
    """Long-tailed responses (one empty), prompts of different lengths."""
    from lens_megatron.actor import TokenBatch

    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 100, (n, WIDTH), generator=gen)
    response = torch.zeros(n, WIDTH, dtype=torch.bool)
    ends = [6, 38, 9, 5, 14, 7, 30, 10, 4, 21, 8, 12][:n]
    for row, end in enumerate(ends):
        start = 3 + row % 3
        response[row, start:end] = True
        ids[row, end:] = 0
    return TokenBatch.from_rollout(ids, response, pad_multiple)


def logprobs_then_train_step(actor):
    """The ragged batch, one old-log-prob pass (with entropy), then one training step on it
    with slightly off-policy old log-probs and advantages spread over [-1, 1]."""
    from lens_megatron.algorithms.loss import compute_global_normalizer

    tokens = ragged_tokens(pad_multiple=actor.pad_multiple)
    out = actor.compute_logprobs(tokens, entropy=True)
    old = out["token_logprobs"]
    advantages = torch.linspace(-1.0, 1.0, tokens.input_ids.shape[0])
    normalizer = compute_global_normalizer([tokens.target_mask], "sequence")
    metrics = actor.train_step(tokens, old + 0.01 * tokens.target_mask.to(old.device), advantages,
                               normalizer)
    return tokens, out, metrics


def actor_worker(tmp_dir, layout, packed, devices):
    from lens_megatron.trainer import LensTrainer

    tp, pp, sp, *vpp = layout
    cfg = tiny_config(tmp_dir, f"model.tensor_model_parallel_size={tp}",
                      *([f"model.virtual_pipeline_model_parallel_size={vpp[0]}"] if vpp else []),
                      f"model.pipeline_model_parallel_size={pp}",
                      f"model.sequence_parallel={str(sp).lower()}", "model.arch.num_layers=4",
                      f"model.sequence_packing={str(packed).lower()}",
                      "model.max_tokens_per_microbatch=64", "model.micro_batch_size=2",
                      "rollout.prompts_per_step=3", "rollout.group_size=4", "model.init_seed=3",
                      "optim.adam_eps=1.0", "optim.lr=0.1",
                      f"model.arch.max_position_embeddings={WIDTH + 8}", devices=devices)
    init_for(cfg)
    trainer = LensTrainer(cfg)
    actor = trainer.actor
    tokens, out, metrics = logprobs_then_train_step(actor)
    old = out["token_logprobs"]
    weights = full_weights(trainer)
    plan = actor._plan(tokens)
    trainer.close()
    if torch.distributed.get_rank() != 0:
        return None
    return {"old": old[:, :WIDTH].cpu(), "entropy": out["entropy"][:, :WIDTH].cpu(),
            "loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "weights": weights,
            "mode": plan.mode, "micro_batches": plan.num_micro_batches}


def _compare(got, ref, label):
    torch.testing.assert_close(got["old"], ref["old"], rtol=1e-5, atol=1e-5, msg=label)
    torch.testing.assert_close(got["entropy"], ref["entropy"], rtol=1e-5, atol=1e-5, msg=label)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), label
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), label
    for name, value in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{label} {name}: {m}")


def test_packed_equals_padded_at_every_layout(tmp_path):
    ref = run_in_processes(actor_worker, 1, (str(tmp_path / "padded"), (1, 1, False), False, 1))[0]
    assert ref["mode"] == "padded"
    cases = [("one process", (1, 1, False), 1), ("TP=2 SP", (2, 1, True), 2),
             ("PP=2", (1, 2, False), 2), ("PP=2 VPP=2", (1, 2, False, 2), 2),
             ("DP=2", (1, 1, False), 2)]
    for label, layout, devices in cases:
        got = [r for r in run_in_processes(
            actor_worker, devices, (str(tmp_path / label.replace(" ", "_")), layout, True, devices))
            if r is not None][0]
        assert got["mode"] == "packed", label
        assert got["micro_batches"] < 6, label  # 12 rows, 64-token budget: several per row
        _compare(got, ref, label)


def trainer_worker(tmp_dir, packed):
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, f"model.sequence_packing={str(packed).lower()}",
                      "model.max_tokens_per_microbatch=48", "model.init_seed=3",
                      "optim.adam_eps=1.0", "optim.lr=0.1")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    metrics = trainer.train_step()
    weights = full_weights(trainer)
    trainer.close()
    return {k: v for k, v in metrics.items() if k.startswith(("train/", "reward/"))}, weights


def test_trainer_step_packed_equals_padded(tmp_path):
    padded, w_padded = run_in_processes(trainer_worker, 1, (str(tmp_path / "a"), False))[0]
    packed, w_packed = run_in_processes(trainer_worker, 1, (str(tmp_path / "b"), True))[0]
    for key in ("train/loss", "train/grad_norm", "train/num_tokens", "train/num_sequences",
                "train/entropy_mean", "reward/mean"):
        assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-7), key
    for name, value in w_padded.items():
        torch.testing.assert_close(w_packed[name], value, rtol=1e-5, atol=1e-6)


def test_a_sequence_longer_than_the_budget_names_the_key(tmp_path):
    from lens_megatron.batching import SequenceTooLongError, needed_lengths, plan_batches

    tokens = ragged_tokens()
    with pytest.raises(SequenceTooLongError, match=r"model\.max_tokens_per_microbatch=16"):
        plan_batches(needed_lengths(tokens.target_mask), 1, max_tokens=16,
                     context_parallel_hint=True)
