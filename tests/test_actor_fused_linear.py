"""model.fused_linear_logprobs in the actor: log-probs from hidden states × LM head without the
logits give the same token log-probs, entropy, loss, gradient norm and weights after one
optimizer step as the logits path — at one process (tied and untied head), TP=2, TP=2 with
sequence parallelism, PP=2, and packed (fp32); and with the loss's other terms (k3 KL to the
reference, rollout-correction weights, token normalisation) followed by a warm-start NLL step,
at one process and TP=2 with SP. Training runs ``linear_logprobs_with_loss`` (the loss
differentiated inside the chunks), the old-log-prob pass the forward-only kernel."""
from __future__ import annotations

import pytest
import torch

from lens_megatron.parallel.spawn import run_in_processes
from test_actor_packing import WIDTH, logprobs_then_train_step, ragged_tokens
from trainer_helpers import actor_weights, init_for, tiny_config

pytestmark = pytest.mark.slow


def _kl_rollout_weights_then_nll(actor):
    """k3 KL (reference shifted so its gradient is not 0), rollout weights, token
    normalisation; then one warm-start NLL step on the same tokens."""
    from lens_megatron.algorithms.loss import compute_global_normalizer

    tokens = ragged_tokens(pad_multiple=actor.pad_multiple)
    mask = tokens.target_mask.to(actor.device)
    out = actor.compute_logprobs(tokens, entropy=True)
    ref = actor.compute_logprobs(tokens, reference=True)["token_logprobs"] - 0.05 * mask
    weights = 0.5 + torch.rand(tokens.input_ids.shape, generator=torch.Generator().manual_seed(5))
    advantages = torch.linspace(-1.0, 1.0, tokens.input_ids.shape[0])
    metrics = actor.train_step(tokens, out["token_logprobs"] + 0.01 * mask, advantages,
                               compute_global_normalizer([tokens.target_mask], "token"),
                               rollout_weights=weights.to(actor.device), ref_logprobs=ref)
    metrics["nll"] = actor.sft_step(tokens)["loss"]
    return tokens, out, metrics


def _one_step(tmp_dir, fused, tp, pp, sp, tied, packed, devices, kl=False):
    from lens_megatron.actor import LensActor

    cfg = tiny_config(tmp_dir, f"model.fused_linear_logprobs={str(fused).lower()}",
                      f"model.tensor_model_parallel_size={tp}",
                      f"model.pipeline_model_parallel_size={pp}",
                      f"model.sequence_parallel={str(sp).lower()}",
                      f"model.arch.tie_word_embeddings={str(tied).lower()}",
                      f"model.sequence_packing={str(packed).lower()}",
                      "model.max_tokens_per_microbatch=64", "model.arch.num_layers=4",
                      "model.micro_batch_size=2", "rollout.prompts_per_step=3",
                      "rollout.group_size=4", "model.init_seed=3", "optim.adam_eps=1.0",
                      "optim.lr=0.1", f"model.arch.max_position_embeddings={WIDTH + 8}",
                      *(["loss.kl_coef=0.1", "loss.kl_estimator=k3", "loss.normalization=token"]
                        if kl else []),
                      devices=devices)
    if not torch.distributed.is_initialized() or not _megatron_ready():
        init_for(cfg)
    actor = LensActor(cfg, total_optimizer_steps=1)
    import lens_kernels

    calls = {"linear_logprobs_and_confidence": [], "linear_logprobs_with_loss": []}
    originals = {name: getattr(lens_kernels, name) for name in calls}
    for name, fn in originals.items():
        setattr(lens_kernels, name, lambda *a, _n=name, _f=fn, **k: calls[_n].append(1) or _f(*a, **k))
    try:
        _, out, metrics = (_kl_rollout_weights_then_nll if kl else logprobs_then_train_step)(actor)
    finally:
        for name, fn in originals.items():
            setattr(lens_kernels, name, fn)
    old = out["token_logprobs"]
    weights = actor_weights(actor)
    last_stage = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1 or tp > 1
    # the paths under test ran: forward-only log-probs, and training with in-chunk gradients
    for name, made in calls.items():
        assert bool(made) == (fused and last_stage), (fused, name, len(made))
    return {"old": old[:, :WIDTH].cpu(), "entropy": out["entropy"][:, :WIDTH].cpu(),
            "loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "weights": weights,
            "nll": metrics.get("nll")}


def _megatron_ready() -> bool:
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()


def fused_worker(tmp_dir, tp, pp, sp, tied, packed, devices, kl=False):
    """Both paths in one process (same layout, same seed): the logits path, then the fused one."""
    ref = _one_step(tmp_dir + "_logits", False, tp, pp, sp, tied, packed, devices, kl)
    got = _one_step(tmp_dir + "_fused", True, tp, pp, sp, tied, packed, devices, kl)
    return (ref, got) if torch.distributed.get_rank() == 0 else None


CASES = {"one process": (1, 1, False, False, False, 1),
         "one process tied": (1, 1, False, True, False, 1),
         "packed": (1, 1, False, False, True, 1),
         "TP=2 tied": (2, 1, False, True, False, 2),
         "TP=2 SP": (2, 1, True, False, False, 2),
         "PP=2": (1, 2, False, False, False, 2),
         "KL + rollout weights + NLL": (1, 1, False, False, False, 1, True),
         "KL + rollout weights + NLL TP=2 SP": (2, 1, True, False, False, 2, True)}


@pytest.mark.parametrize("label", list(CASES))
def test_fused_linear_equals_the_logits_path(tmp_path, label):
    tp, pp, sp, tied, packed, devices, *kl = CASES[label]
    results = run_in_processes(fused_worker, devices,
                               (str(tmp_path / "run"), tp, pp, sp, tied, packed, devices, *kl))
    ref, got = [r for r in results if r][0]
    torch.testing.assert_close(got["old"], ref["old"], rtol=1e-5, atol=1e-5, msg=label)
    torch.testing.assert_close(got["entropy"], ref["entropy"], rtol=1e-5, atol=1e-5, msg=label)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), label
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), label
    if ref["nll"] is not None:
        assert got["nll"] == pytest.approx(ref["nll"], rel=1e-5), label
    for name, value in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{label} {name}: {m}")
