"""The native Megatron sampler: KV cache == recomputation, every layout samples the same
tokens, and the returned log-probs are those of the sampling distribution."""
from __future__ import annotations

import functools

import pytest
import torch

from lens_megatron.parallel.spawn import run_in_processes
from lens_megatron.rollout.megatron_sampler import gumbel_noise
from megatron_helpers import setup_model, tiny_arch

PROMPTS = [[1, 5, 6, 7], [1, 9, 9], [1, 3, 4, 5, 6, 7, 8]]


def generate_worker(tp, pp, vpp, kv_cache, sequence_parallel=False, top_k=-1, top_p=1.0,
                    lean=True):
    from lens_megatron.rollout.base import SamplingConfig
    from lens_megatron.rollout.megatron_sampler import MegatronSampler

    arch, chunks = setup_model(tp, pp, vpp, tiny_arch(init_std=0.5),
                               sequence_parallel=sequence_parallel)
    sampler = MegatronSampler(chunks, arch, eos_id=2, pad_id=0, kv_cache=kv_cache,
                              sequence_parallel=sequence_parallel, tp_size=tp, lean=lean)
    batch = sampler.generate(PROMPTS, SamplingConfig(group_size=2, max_new_tokens=10, seed=3,
                                                     top_k=top_k, top_p=top_p))
    batch.validate()
    return batch


# (tp, pp, vpp, kv_cache, sequence_parallel, top_k, top_p, lean): TP=1 with the cache runs both
# the lean decoder and megatron's modules; sequence parallelism (recompute mode) alone and
# across pipeline stages, where a stage hands on only its [seq/TP, b, h] slice.
LAYOUTS = [(1, 1, None, True), (1, 1, None, True, False, -1, 1.0, False), (2, 1, None, True),
           (1, 2, None, True), (1, 2, 2, True), (2, 1, None, False, True),
           (2, 2, None, False, True)]


@functools.lru_cache(maxsize=1)
def _one_process_reference():
    ref = run_in_processes(generate_worker, 1, (1, 1, None, False))[0]
    assert ref.num_sequences == 6 and bool((ref.response_lengths > 0).all())
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("case", LAYOUTS, ids=lambda c: "tp{}-pp{}-vpp{}-kv{}".format(*c[:4])
                         + ("-sp" if len(c) > 4 and c[4] else "")
                         + ("-megatron" if len(c) > 7 and not c[7] else ""))
def test_every_layout_and_cache_mode_samples_the_same_tokens(case):
    ref = _one_process_reference()
    for got in run_in_processes(generate_worker, case[0] * case[1], case):
        assert torch.equal(got.input_ids, ref.input_ids), case
        torch.testing.assert_close(got.sampling_logprobs, ref.sampling_logprobs,
                                   rtol=0, atol=1e-4, msg=str(case))


def logprob_consistency_worker(top_k, top_p):
    """The sampler's log-probs equal rollout_correction.sampling_logprobs of the model's
    logits at the sampling temperature, with truncation (top-k / top-p)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from lens_megatron.algorithms.rollout_correction import sampling_logprobs
    from lens_megatron.parallel import cpu_mode

    from lens_megatron.models.arch import ParallelLayout, Precision
    from lens_megatron.models.builder import build_model_chunks

    batch = generate_worker(1, 1, None, True, top_k=top_k, top_p=top_p)
    arch = tiny_arch(init_std=0.5)  # the same seeded network, rebuilt for a full forward
    chunks = build_model_chunks(arch, ParallelLayout(), Precision(), "local", seed=7)
    positions = torch.arange(batch.input_ids.shape[1]).unsqueeze(0).expand_as(batch.input_ids)
    with cpu_mode.cuda_to_cpu(), torch.no_grad():
        logits = chunks[0](batch.input_ids, positions, None)
        logits = gather_from_tensor_model_parallel_region(logits)[..., : arch.vocab_size]
    expected = sampling_logprobs(logits[:, :-1], batch.input_ids[:, 1:], 1.0, max(top_k, 0), top_p)
    mask = batch.response_mask[:, 1:]
    return batch.sampling_logprobs[:, 1:][mask], expected[mask]


@pytest.mark.slow
@pytest.mark.parametrize("top_k,top_p", [(-1, 1.0), (5, 1.0), (-1, 0.7)])
def test_sampler_logprobs_are_those_of_the_sampling_distribution(top_k, top_p):
    got, expected = run_in_processes(logprob_consistency_worker, 1, (top_k, top_p))[0]
    assert got.numel() > 0 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_gumbel_noise_is_a_pure_function_of_its_counters():
    rows = torch.tensor([0, 1, 7])
    a = gumbel_noise(11, rows, 3, 50)
    assert torch.equal(a, gumbel_noise(11, rows, 3, 50))
    assert torch.equal(a[2], gumbel_noise(11, torch.tensor([7]), 3, 50)[0])  # batching-invariant
    assert not torch.equal(a, gumbel_noise(12, rows, 3, 50))
    assert not torch.equal(a, gumbel_noise(11, rows, 4, 50))
    assert bool(torch.isfinite(a).all())


def test_gumbel_max_draws_follow_the_distribution():
    # 20k draws of a 4-way categorical through argmax(logp + noise): frequencies within 3σ.
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logp = probs.log().expand(20000, 4)
    draws = torch.argmax(logp + gumbel_noise(5, torch.arange(20000), 0, 4), dim=1)
    freq = torch.bincount(draws, minlength=4).float() / 20000
    sigma = (probs * (1 - probs) / 20000).sqrt()
    assert bool(((freq - probs).abs() < 3 * sigma + 1e-3).all()), freq


def lean_vs_megatron_worker(family):
    """The lean decoder's next-token logits equal megatron's full forward at every step of a
    left-padded batch of different prompt lengths."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from lens_megatron.parallel import cpu_mode
    from lens_megatron.rollout.lean_decoder import LeanDecoder

    arch, chunks = setup_model(1, 1, None, tiny_arch(family, init_std=0.5))
    decoder = LeanDecoder(chunks, arch, eps=arch.rms_norm_eps)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    ids = torch.zeros((len(PROMPTS), int(lengths.max())), dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, ids.shape[1] - len(p):] = torch.tensor(p)
    continuation = torch.tensor([[11, 12, 13], [21, 22, 23], [31, 32, 33]])
    got = [decoder.prefill(ids, lengths, 4)] + [decoder.step(continuation[:, t]) for t in range(3)]
    worst = 0.0
    for row, prompt in enumerate(PROMPTS):
        full = torch.tensor([prompt + continuation[row].tolist()])
        positions = torch.arange(full.shape[1]).unsqueeze(0)
        with cpu_mode.cuda_to_cpu(), torch.no_grad():
            logits = gather_from_tensor_model_parallel_region(chunks[0](full, positions, None))
        for t in range(4):
            expected = logits[0, len(prompt) - 1 + t, : arch.vocab_size]
            worst = max(worst, (got[t][row] - expected).abs().max().item())
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_lean_decoder_matches_megatron_forward(family):
    worst = run_in_processes(lean_vs_megatron_worker, 1, (family,))[0]
    assert worst < 1e-4, worst
