"""model.fused_linear_logprobs in the actor: log-probs from hidden states × LM head without the
logits give the same token log-probs, entropy, loss, gradient norm and weights after one
optimizer step as the logits path — at one process (tied and untied head), TP=2, TP=2 with
sequence parallelism, PP=2, and packed (fp32)."""
from __future__ import annotations

import pytest
import torch

from lens_megatron.parallel.spawn import run_in_processes
from test_actor_packing import WIDTH, logprobs_then_train_step
from trainer_helpers import actor_weights, init_for, tiny_config

pytestmark = pytest.mark.slow


def _one_step(tmp_dir, fused, tp, pp, sp, tied, packed, devices):
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
                      devices=devices)
    if not torch.distributed.is_initialized() or not _megatron_ready():
        init_for(cfg)
    actor = LensActor(cfg, total_optimizer_steps=1)
    import lens_kernels

    calls = []
    fused_kernel = lens_kernels.linear_logprobs_and_confidence
    lens_kernels.linear_logprobs_and_confidence = lambda *a, **k: calls.append(1) or fused_kernel(*a, **k)
    _, out, metrics = logprobs_then_train_step(actor)
    old = out["token_logprobs"]
    weights = actor_weights(actor)
    lens_kernels.linear_logprobs_and_confidence = fused_kernel
    last_stage = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1 or tp > 1
    assert bool(calls) == (fused and last_stage), (fused, len(calls))  # the path under test ran
    return {"old": old[:, :WIDTH].cpu(), "entropy": out["entropy"][:, :WIDTH].cpu(),
            "loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "weights": weights}


def _megatron_ready() -> bool:
    from megatron.core import parallel_state

    return parallel_state.model_parallel_is_initialized()


def fused_worker(tmp_dir, tp, pp, sp, tied, packed, devices):
    """Both paths in one process (same layout, same seed): the logits path, then the fused one."""
    ref = _one_step(tmp_dir + "_logits", False, tp, pp, sp, tied, packed, devices)
    got = _one_step(tmp_dir + "_fused", True, tp, pp, sp, tied, packed, devices)
    return (ref, got) if torch.distributed.get_rank() == 0 else None


CASES = {"one process": (1, 1, False, False, False, 1),
         "one process tied": (1, 1, False, True, False, 1),
         "packed": (1, 1, False, False, True, 1),
         "TP=2 tied": (2, 1, False, True, False, 2),
         "TP=2 SP": (2, 1, True, False, False, 2),
         "PP=2": (1, 2, False, False, False, 2)}


@pytest.mark.parametrize("label", list(CASES))
def test_fused_linear_equals_the_logits_path(tmp_path, label):
    tp, pp, sp, tied, packed, devices = CASES[label]
    results = run_in_processes(fused_worker, devices,
                               (str(tmp_path / "run"), tp, pp, sp, tied, packed, devices))
    ref, got = [r for r in results if r][0]
    torch.testing.assert_close(got["old"], ref["old"], rtol=1e-5, atol=1e-5, msg=label)
    torch.testing.assert_close(got["entropy"], ref["entropy"], rtol=1e-5, atol=1e-5, msg=label)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7), label
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), label
    for name, value in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{label} {name}: {m}")
