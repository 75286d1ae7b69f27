"""Fused linear variant (stretch): hidden × LM-head shard → log-probs without the full logits."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from lens_kernels import linear_logprobs_and_confidence, logprobs_and_confidence
from lens_kernels.reference import reference_logprobs
from seeds import random_seed


@pytest.fixture
def gen():
    seed = random_seed()
    return torch.Generator().manual_seed(seed)


def _inputs(gen, bsz=3, seq=5, hid=16, vocab=300, valid=290, dtype=torch.float32):
    hidden = torch.randn(bsz, seq, hid, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hid, generator=gen) / hid ** 0.5 * 4).to(dtype)
    targets = torch.randint(0, valid, (bsz, seq), generator=gen)
    mask = torch.rand(bsz, seq, generator=gen) < 0.7
    mask[0] = False
    return hidden, weight, targets, mask


def _loss(out, w):
    return ((out.token_logprobs * w[0]).sum() + (out.confidence * w[1]).sum()
            + (out.entropy * w[2]).sum())


def test_linear_matches_float64_reference(gen):
    hidden, weight, targets, mask = _inputs(gen)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = linear_logprobs_and_confidence(h, w, targets, mask, valid_vocab=290, temperature=0.8,
                                         return_entropy=True, chunk_tokens=4)   # ragged chunks
    hr = hidden.double().requires_grad_(True)
    wr = weight.double().requires_grad_(True)
    ref = reference_logprobs(hr @ wr.t(), targets, mask, 0.8, 290)
    torch.testing.assert_close(out.token_logprobs.double(), ref.token_logprobs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref.entropy, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.confidence.double(), ref.confidence, atol=1e-6, rtol=1e-4)
    conf = ref.confidence.detach()
    weights = [torch.randn(3, 5, generator=gen).double(),
               torch.randn(3, generator=gen).double() / torch.where(conf > 0, conf, 1.0),
               torch.randn(3, 5, generator=gen).double()]
    _loss(out, weights).backward()
    _loss(ref, weights).backward()
    torch.testing.assert_close(h.grad.double(), hr.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=2e-5, rtol=1e-4)
    assert (h.grad[~mask] == 0).all()


def test_linear_equals_unfused_in_bf16(gen):
    hidden, weight, targets, mask = _inputs(gen, dtype=torch.bfloat16)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    fused = linear_logprobs_and_confidence(h1, w1, targets, mask, valid_vocab=290, chunk_tokens=6)
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    plain = logprobs_and_confidence(h2 @ w2.t(), targets, mask, valid_vocab=290)
    torch.testing.assert_close(fused.token_logprobs, plain.token_logprobs, atol=1e-4, rtol=1e-4)
    fused.logprob_sum.sum().backward()
    plain.logprob_sum.sum().backward()
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), atol=2e-2, rtol=2e-2)


def _linear_rank(seed):
    """One TP rank: its weight shard; returns outputs, the partial d_hidden and d_weight shard."""
    world, rank = dist.get_world_size(), dist.get_rank()
    hidden, weight, targets, mask = _inputs(torch.Generator().manual_seed(seed), vocab=320)
    v_local = 320 // world
    h = hidden.clone().requires_grad_(True)
    w = weight[rank * v_local:(rank + 1) * v_local].clone().requires_grad_(True)
    out = linear_logprobs_and_confidence(h, w, targets, mask, dist.group.WORLD, valid_vocab=290,
                                         return_entropy=True, chunk_tokens=7)
    (out.token_logprobs.sum() + out.confidence.sum() + out.entropy.sum()).backward()
    return out.token_logprobs.detach(), out.entropy.detach(), h.grad, w.grad


@pytest.mark.slow
def test_linear_tp2_equals_single_process():
    from lens_megatron.parallel.spawn import run_in_processes

    seed = random_seed()
    ranks = run_in_processes(_linear_rank, 2, args=(seed,), timeout=240.0)
    hidden, weight, targets, mask = _inputs(torch.Generator().manual_seed(seed), vocab=320)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = linear_logprobs_and_confidence(h, w, targets, mask, valid_vocab=290, return_entropy=True)
    (out.token_logprobs.sum() + out.confidence.sum() + out.entropy.sum()).backward()
    for token, entropy, _, _ in ranks:
        torch.testing.assert_close(token, out.token_logprobs, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, out.entropy, atol=2e-5, rtol=1e-5)
    # d_hidden is a per-rank partial sum (Megatron all-reduces it in the column-parallel op)
    # (fp32 GEMMs over different vocab splits sum in a different order)
    torch.testing.assert_close(ranks[0][2] + ranks[1][2], h.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat([r[3] for r in ranks]), w.grad, atol=1e-4, rtol=1e-4)
