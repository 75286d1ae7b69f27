"""The GPU path on an emulated CUDA machine (tests/cuda_emulation.py): the actor, the native
sampler (lean decoder and megatron's KV path) and a trainer step put everything the model, the
kernel or a collective touches on the model's device — a host tensor in a device op, or in a
collective, raises here exactly where it would on a GPU. Each run is also compared with the
plain CPU run: the emulation changes where tensors are said to live, not the numbers."""
from __future__ import annotations

import pytest
import torch

from lens_megatron.parallel.spawn import run_in_processes
from trainer_helpers import full_weights, init_for, tiny_config

pytestmark = pytest.mark.slow

EMULATED_OVERRIDES = ("trainer.backend=gloo", "model.init_seed=5", "optim.lr=0.05",
                      "optim.adam_eps=1.0")


def _emulated(flag: bool):
    import contextlib

    from cuda_emulation import emulated_cuda

    if not flag:
        return contextlib.nullcontext(None)
    return emulated_cuda()


def _torch_kernel_backend():
    """The fused kernel's torch twin on the emulated device (Triton needs a real GPU here)."""
    import sys

    import lens_kernels  # noqa: F401 - loads its submodules

    for name, module in list(sys.modules.items()):
        if name.startswith("lens_kernels") and hasattr(module, "resolve_backend"):
            original = module.resolve_backend
            module.resolve_backend = (
                lambda backend, device, _orig=original: "torch" if backend == "auto"
                else _orig(backend, device))


def _host_rollout(n: int = 8, prompt: int = 5, response: int = 7, vocab: int = 100):
    from lens_megatron.rollout.base import assemble_batch

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (prompt,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(3, vocab, (1 + i % response,), generator=g).tolist()
                 for i in range(n)]
    logprobs = [[-1.0] * len(r) for r in responses]
    return assemble_batch(prompts, responses, logprobs, [False] * n, 4, 0)


def actor_worker(tmp_dir: str, emulate: bool):
    import logging

    from lens_megatron.actor import LensActor, TokenBatch
    from lens_megatron.algorithms.loss import compute_global_normalizer

    _torch_kernel_backend()
    warnings_seen = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings_seen.append(record.getMessage())
    logging.getLogger("lens_megatron.models.builder").addHandler(handler)
    # auto: no TE here, so the local spec (warned about once on a GPU); kl_coef builds the
    # frozen reference model too (a second build_model_chunks call: still one warning).
    cfg = tiny_config(tmp_dir, *EMULATED_OVERRIDES, "rollout.group_size=4",
                      "model.transformer_impl=auto", "loss.kl_coef=0.05")
    with _emulated(emulate) as mode:
        init_for(cfg)
        actor = LensActor(cfg, total_optimizer_steps=2)
        if mode is not None:
            params = [p for c in actor.chunks for p in c.parameters()]
            assert params and all(p.is_cuda for p in params), "the model is not on the device"
        batch = _host_rollout()
        tokens = TokenBatch.from_rollout(batch.input_ids, batch.response_mask)  # host
        out = actor.compute_logprobs(tokens, entropy=True)
        old = out["token_logprobs"]
        ref = actor.compute_logprobs(tokens, reference=True)["token_logprobs"]
        if mode is not None:
            assert actor.device.type == "cuda"
            assert old.is_cuda and out["entropy"].is_cuda and ref.is_cuda
        assert len(warnings_seen) == (1 if emulate else 0), warnings_seen
        advantages = torch.linspace(-1.0, 1.0, tokens.input_ids.shape[0])  # host, as planned
        normalizer = compute_global_normalizer([tokens.target_mask], "sequence")
        metrics = actor.train_step(tokens, old, advantages, normalizer, ref_logprobs=ref)
        assert metrics["grad_norm"] > 0
        new = actor.compute_logprobs(tokens)["token_logprobs"]
        return {"old": old.cpu(), "new": new.cpu(), "grad_norm": metrics["grad_norm"],
                "checked": 0 if mode is None else mode.checked_ops}


def test_device_placement_actor_logprobs_and_train_step(tmp_path):
    plain = run_in_processes(actor_worker, 1, (str(tmp_path / "cpu"), False))[0]
    emulated = run_in_processes(actor_worker, 1, (str(tmp_path / "gpu"), True))[0]
    assert emulated["checked"] > 1000  # the tracking mode really saw the step
    torch.testing.assert_close(emulated["old"], plain["old"], rtol=0, atol=0)
    torch.testing.assert_close(emulated["new"], plain["new"], rtol=1e-6, atol=1e-6)
    assert emulated["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)


def sampler_worker(tmp_dir: str, emulate: bool):
    from lens_megatron.actor import LensActor
    from lens_megatron.rollout.base import SamplingConfig
    from lens_megatron.rollout.megatron_sampler import MegatronSampler

    _torch_kernel_backend()
    cfg = tiny_config(tmp_dir, *EMULATED_OVERRIDES, "model.arch.init_std=0.5")
    prompts = [[1, 5, 6, 7], [1, 9, 9], [1, 3, 4, 5, 6, 7, 8]]
    sampling = SamplingConfig(group_size=2, max_new_tokens=6, seed=3)
    results = {}
    with _emulated(emulate):
        init_for(cfg)
        actor = LensActor(cfg, total_optimizer_steps=1)
        for label, kv_cache, lean in (("lean", True, True), ("megatron_kv", True, False),
                                      ("recompute", False, False)):
            sampler = MegatronSampler(actor.chunks, cfg.model.arch, eos_id=2, pad_id=0,
                                      kv_cache=kv_cache, lean=lean)
            assert (sampler.lean is not None) == (label == "lean")
            batch = sampler.generate(prompts, sampling)
            batch.validate()
            results[label] = (batch.input_ids, batch.sampling_logprobs)
    return results


def test_device_placement_native_sampler_lean_and_megatron_kv_paths(tmp_path):
    plain = run_in_processes(sampler_worker, 1, (str(tmp_path / "cpu"), False))[0]
    emulated = run_in_processes(sampler_worker, 1, (str(tmp_path / "gpu"), True))[0]
    for label in ("lean", "megatron_kv", "recompute"):
        assert torch.equal(emulated[label][0], plain[label][0]), label
        torch.testing.assert_close(emulated[label][1], plain[label][1], rtol=0, atol=1e-5)
        assert torch.equal(emulated[label][0], plain["lean"][0]), label


def trainer_worker(tmp_dir: str, emulate: bool, devices: int = 1):
    from lens_megatron.trainer import LensTrainer

    _torch_kernel_backend()
    cfg = tiny_config(tmp_dir, *EMULATED_OVERRIDES, "loss.kl_coef=0.05",
                      "loss.rollout_correction=tis_token", "rollout.mismatch_mask_threshold=5.0",
                      "trainer.measure_update_effect=true", "optim.updates_per_rollout=2",
                      "model.micro_batch_size=2", devices=devices)
    with _emulated(emulate):
        init_for(cfg)
        trainer = LensTrainer(cfg)
        metrics = trainer.train_step()
        weights = full_weights(trainer)
        trainer.close()
    keep = {k: v for k, v in metrics.items() if not k.startswith(("time/", "throughput/"))}
    return {"metrics": keep, "weights": {k: v.cpu() for k, v in weights.items()}}


def _assert_same_step(got, ref) -> None:
    assert set(got["metrics"]) == set(ref["metrics"])
    for key, value in ref["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True), key
    for name, value in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6)


def test_device_placement_trainer_step(tmp_path):
    plain = run_in_processes(trainer_worker, 1, (str(tmp_path / "cpu"), False))[0]
    emulated = run_in_processes(trainer_worker, 1, (str(tmp_path / "gpu"), True))[0]
    assert plain["metrics"]["train/grad_norm"] > 0
    _assert_same_step(emulated, plain)


def test_device_placement_trainer_step_data_parallel_collectives(tmp_path):
    """DP=2: every gather, broadcast and all-reduce of the step gets device tensors."""
    plain = run_in_processes(trainer_worker, 1, (str(tmp_path / "cpu"), False))[0]
    emulated = run_in_processes(trainer_worker, 2, (str(tmp_path / "gpu"), True, 2))
    for got in emulated:
        _assert_same_step(got, plain)


def run_worker(tmp_dir: str):
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, "model.transformer_impl=auto", "trainer.max_steps=1")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    trainer.run()
    trainer.close()
    return trainer.run_dir


def test_transformer_impl_auto_is_recorded_as_resolved(tmp_path):
    """config.yaml and every metrics row say which implementation ``auto`` chose (no TE on
    this machine: the local spec)."""
    import json
    import os

    import yaml

    run_dir = run_in_processes(run_worker, 1, (str(tmp_path),))[0]
    with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
        assert yaml.safe_load(f)["model"]["transformer_impl"] == "local"
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    assert rows and all(row["setup/transformer_engine"] == 0.0 for row in rows)
