"""A megatron-core GPTModel over one packed row of ragged sequences (THD, per-document causal
attention, per-document RoPE) gives the logits and parameter gradients of the padded
per-sequence forward — in one process, and at TP=2 with sequence parallelism."""
from __future__ import annotations

import pytest
import torch

from lens_megatron.parallel.spawn import run_in_processes
from megatron_helpers import setup_model

LENGTHS = [7, 3, 12, 5, 10]  # 37 tokens: alignment padding at every multiple > 1
VOCAB = 100


def _rows(seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(LENGTHS) + 4
    ids = torch.randint(1, VOCAB, (len(LENGTHS), width), generator=gen)
    targets = torch.roll(ids, -1, dims=1)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for row, n in enumerate(LENGTHS):
        mask[row, :n] = True
    weights = torch.randn(len(LENGTHS), width, VOCAB, generator=gen)  # a fixed linear loss
    return ids, targets, mask, weights


def _full_logits(logits, arch):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    return gather_from_tensor_model_parallel_region(logits)[..., :arch.vocab_size]


def _grads(chunks):
    """Parameter gradients, sequence-parallel ones summed over TP (as megatron's grad
    finalisation does), by name."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    out = {}
    for name, p in chunks[0].named_parameters():
        grad = p.grad.detach().clone()
        if getattr(p, "sequence_parallel", False) and \
                parallel_state.get_tensor_model_parallel_world_size() > 1:
            dist.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
        out[name] = grad
    return out


def _padded_pass(model, arch, ids, mask, weights, multiple):
    width = -(-max(LENGTHS) // multiple) * multiple
    cut = ids[:, :width]
    positions = torch.arange(width).expand_as(cut)
    logits = _full_logits(model(cut, positions, None), arch)
    w = torch.where(mask[:, :width, None], weights[:, :width], 0.0)
    (logits * w).sum().backward()
    return torch.where(mask[:, :width, None], logits, 0.0).detach()


def _packed_pass(model, arch, ids, targets, mask, weights, multiple, use_thd=True):
    from lens_megatron.batching import needed_lengths, pack_micro_batch, plan_packed
    from lens_megatron.models.packed import packed_seq_params

    plan = plan_packed(needed_lengths(mask), 1, 64, pad_multiple=multiple)
    assert plan.num_micro_batches == 1
    mb = pack_micro_batch(ids, targets, mask, plan.micro_batches(0)[0],
                          {"weights": weights})
    assert mb.input_ids.shape[1] > sum(LENGTHS) or multiple == 1  # alignment padding present
    params = packed_seq_params(mb) if use_thd else None
    logits = _full_logits(model(mb.input_ids, mb.position_ids, None, packed_seq_params=params),
                          arch)
    real = mb.mask[..., None]
    (logits * torch.where(real, mb.token_extras["weights"], 0.0)).sum().backward()
    unpacked = mb.unpack(torch.where(real, logits, 0.0).detach(), len(LENGTHS), ids.shape[1])
    return unpacked[:, :max(LENGTHS)], mb


def packed_vs_padded_worker(tp, sequence_parallel):
    from megatron.core import parallel_state

    from lens_megatron.parallel import cpu_mode

    arch, chunks = setup_model(tp, 1, sequence_parallel=sequence_parallel)
    model = chunks[0]
    ids, targets, mask, weights = _rows()
    multiple = tp if sequence_parallel else 4
    with cpu_mode.cuda_to_cpu():
        padded = _padded_pass(model, arch, ids, mask, weights, multiple)[:, :max(LENGTHS)]
        padded_grads = _grads(chunks)
        model.zero_grad()
        packed, mb = _packed_pass(model, arch, ids, targets, mask, weights, multiple)
        packed_grads = _grads(chunks)
        model.zero_grad()
        mixed, _ = _packed_pass(model, arch, ids, targets, mask, weights, multiple,
                                use_thd=False)
    if parallel_state.get_tensor_model_parallel_rank() != 0:
        return None
    return {"padded": padded, "packed": packed, "mixed": mixed, "padded_grads": padded_grads,
            "packed_grads": packed_grads, "T": mb.input_ids.shape[1]}


def _check(result):
    assert result["padded"].shape == result["packed"].shape == (len(LENGTHS), max(LENGTHS), VOCAB)
    torch.testing.assert_close(result["packed"], result["padded"], rtol=1e-5, atol=1e-5)
    # without THD the same packed row attends across documents: different logits
    first = LENGTHS[0]
    torch.testing.assert_close(result["mixed"][0, :first], result["padded"][0, :first],
                               rtol=1e-5, atol=1e-5)
    assert (result["mixed"][1:] - result["padded"][1:]).abs().max() > 1e-2
    assert result["packed_grads"].keys() == result["padded_grads"].keys()
    for name, grad in result["padded_grads"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(result["packed_grads"][name], grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_packed_forward_and_gradients_equal_the_padded_per_sequence_pass():
    result = run_in_processes(packed_vs_padded_worker, 1, (1, False))[0]
    assert result["T"] == 40
    _check(result)


@pytest.mark.slow
def test_packed_forward_at_tp2_with_sequence_parallelism():
    results = run_in_processes(packed_vs_padded_worker, 2, (2, True))
    assert results[1] is None
    _check(results[0])
    single = run_in_processes(packed_vs_padded_worker, 1, (1, False))[0]
    torch.testing.assert_close(results[0]["packed"], single["padded"], rtol=1e-5, atol=1e-5)


def rope_worker():
    """What megatron's RoPE does under THD with our boundaries: positions restart per
    document — and the trap when the RoPE table is exactly T long."""
    from megatron.core.models.common.embeddings import rope_utils

    from lens_megatron.batching import needed_lengths, pack_micro_batch, plan_packed
    from lens_megatron.models.packed import packed_seq_params
    from lens_megatron.parallel import cpu_mode

    arch, chunks = setup_model(1, 1)
    model = chunks[0]
    ids, targets, mask, _ = _rows()
    mb = pack_micro_batch(ids, targets, mask,
                          plan_packed(needed_lengths(mask), 1, 64, 8).micro_batches(0)[0])
    calls = []
    real = rope_utils._apply_rotary_pos_emb_thd

    def spy(t, cu_seqlens, freqs, *args, **kwargs):
        calls.append((cu_seqlens.tolist(), freqs.shape[0], t.shape[0]))
        return real(t, cu_seqlens, freqs, *args, **kwargs)

    rope_utils._apply_rotary_pos_emb_thd = spy
    try:
        with cpu_mode.cuda_to_cpu():
            model(mb.input_ids, mb.position_ids, None, packed_seq_params=packed_seq_params(mb))
    finally:
        rope_utils._apply_rotary_pos_emb_thd = real
    # direct: THD RoPE over the packed row == RoPE of each document from position 0
    with cpu_mode.cuda_to_cpu():
        freqs = model.rotary_pos_emb(mb.max_seqlen)
        table_t = model.rotary_pos_emb(mb.input_ids.shape[1])
    config = model.config
    x = torch.randn(mb.input_ids.shape[1], 2, arch.head_dim)
    packed = rope_utils.apply_rotary_pos_emb(x, freqs, config, cu_seqlens=mb.cu_seqlens_padded)
    trap = rope_utils.apply_rotary_pos_emb(x, table_t, config, cu_seqlens=mb.cu_seqlens_padded)
    per_doc = []
    for s, e in zip(mb.cu_seqlens_padded[:-1].tolist(), mb.cu_seqlens_padded[1:].tolist()):
        per_doc.append(rope_utils.apply_rotary_pos_emb(x[s:e, None], freqs[:e - s], config)[:, 0])
    return {"calls": calls, "cu": mb.cu_seqlens_padded.tolist(), "max": mb.max_seqlen,
            "T": mb.input_ids.shape[1], "packed": packed, "per_doc": torch.cat(per_doc),
            "trap": trap,
            "slot": rope_utils.apply_rotary_pos_emb(x[:, None], table_t, config)[:, 0]}


def test_megatron_rope_restarts_per_document_under_thd():
    r = run_in_processes(rope_worker, 1)[0]
    # every layer's q and k go through the THD RoPE with our padded boundaries
    assert len(r["calls"]) == 2 * 4 and all(c == (r["cu"], r["max"], r["T"]) for c in r["calls"])
    assert r["max"] < r["T"]
    torch.testing.assert_close(r["packed"], r["per_doc"], rtol=0, atol=1e-6)
    # the trap: a table of exactly T rows switches megatron to absolute offsets (slot positions)
    torch.testing.assert_close(r["trap"], r["slot"], rtol=0, atol=1e-6)
    assert (r["trap"] - r["per_doc"]).abs().max() > 1e-2


# Packed micro-batches through megatron's schedule at PP=2 and TP=2 with SP (log-probs, loss,
# gradients and weights equal to padded) are tested through the actor in test_actor_packing.py.
