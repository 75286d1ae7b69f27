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


@pytest.mark.parametrize("keep_fraction", [0.0, 0.3, 1.0])
def test_linear_matches_float64_reference(gen, keep_fraction):
    hidden, weight, targets, mask = _inputs(gen)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = linear_logprobs_and_confidence(h, w, targets, mask, valid_vocab=290, temperature=0.8,
                                         return_entropy=True, chunk_tokens=4,   # ragged chunks
                                         keep_fraction=keep_fraction)
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
    weights[0][1, :2] = 0.0          # masked-in tokens with a zero upstream gradient: skipped
    weights[2][1, :2] = 0.0
    weights[1][1] = 0.0
    _loss(out, weights).backward()
    _loss(ref, weights).backward()
    torch.testing.assert_close(h.grad.double(), hr.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), wr.grad, atol=2e-5, rtol=1e-4)
    assert (h.grad[~mask] == 0).all() and (h.grad[1, :2] == 0).all()


def test_linear_computes_only_the_rows_it_needs(gen, monkeypatch):
    """Masked rows never reach a GEMM; backward recomputes only rows with a gradient."""
    import lens_kernels.linear_logprob as lin

    calls = []
    real = lin._logits
    monkeypatch.setattr(lin, "_logits", lambda h, w, rows, out=None: (calls.append(rows.clone()),
                                                                        real(h, w, rows, out))[1])
    hidden, weight, targets, mask = _inputs(gen)
    h = hidden.clone().requires_grad_(True)
    out = linear_logprobs_and_confidence(h, weight, targets, mask, chunk_tokens=4, keep_fraction=0)
    active = set(mask.reshape(-1).nonzero().squeeze(1).tolist())
    assert set(torch.cat(calls).tolist()) == active and sum(map(len, calls)) == len(active)
    calls.clear()
    grad = torch.zeros(3, 5)
    grad[2] = 1.0
    out.token_logprobs.backward(grad)
    wanted = set((mask & (grad != 0)).reshape(-1).nonzero().squeeze(1).tolist())
    assert set(torch.cat(calls).tolist() if calls else []) == wanted
    assert (h.grad[:2] == 0).all()


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


def _packed_inputs(seed):
    """One packed row of 3 sequences (T = 12 tokens, divisible by TP=2 for SP) + weights."""
    gen = torch.Generator().manual_seed(seed)
    hidden, weight, targets, mask = _inputs(gen, bsz=1, seq=12, vocab=320)
    seg = torch.tensor([0] * 5 + [1] * 3 + [-1] + [2] * 3)
    mask[0, 8] = False                                   # the padding token
    w = [torch.randn(12, generator=gen), torch.randn(3, generator=gen),
         torch.randn(12, generator=gen)]
    return hidden[0], weight, targets[0], mask[0], seg, w


def _packed_loss(out, w):
    return ((out.token_logprobs * w[0]).sum() + (out.confidence * w[1]).sum()
            + (out.entropy * w[2]).sum())


_OPTS = dict(valid_vocab=290, temperature=0.9, return_entropy=True, num_segments=3, chunk_tokens=5)


def _linear_rank(seed, glue):
    """One TP rank with its weight shard: raw partial d_hidden, or through Megatron's glue."""
    from megatron.core.tensor_parallel import mappings

    from lens_megatron.parallel import cpu_mode

    cpu_mode.enable()                  # megatron's SP gather allocates on current_device()
    world, rank = dist.get_world_size(), dist.get_rank()
    hidden, weight, targets, mask, seg, w = _packed_inputs(seed)
    v_local = 320 // world
    w_shard = weight[rank * v_local:(rank + 1) * v_local].clone().requires_grad_(True)
    if glue == "sp":                                     # this rank holds a sequence shard
        rows = 12 // world
        h_leaf = hidden[rank * rows:(rank + 1) * rows].clone().requires_grad_(True)
        h = mappings.gather_from_sequence_parallel_region(h_leaf, True, group=dist.group.WORLD)
    else:
        h_leaf = hidden.clone().requires_grad_(True)
        h = (mappings.copy_to_tensor_model_parallel_region(h_leaf, group=dist.group.WORLD)
             if glue == "copy" else h_leaf)
    out = linear_logprobs_and_confidence(h, w_shard, targets, mask, dist.group.WORLD,
                                         segment_ids=seg, **_OPTS)
    _packed_loss(out, w).backward()
    return (out.token_logprobs.detach(), out.entropy.detach(), out.confidence.detach(),
            h_leaf.grad, w_shard.grad)


@pytest.mark.slow
@pytest.mark.parametrize("glue", ["none", "copy", "sp"])
def test_linear_tp2_equals_single_process(glue):
    """Vocab-parallel fused linear with segment_ids, temperature, entropy, padded vocab.

    ``none``: d_hidden is each rank's partial sum (their sum is the full gradient);
    ``copy`` (Megatron's copy_to_tensor_model_parallel_region) all-reduces it; ``sp``
    (gather_from_sequence_parallel_region) hands each rank its sequence shard's full grad.
    """
    from lens_megatron.parallel.spawn import run_in_processes

    seed = random_seed()
    ranks = run_in_processes(_linear_rank, 2, args=(seed, glue), timeout=240.0)
    hidden, weight, targets, mask, seg, w = _packed_inputs(seed)
    h, wt = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out = linear_logprobs_and_confidence(h, wt, targets, mask, segment_ids=seg, **_OPTS)
    _packed_loss(out, w).backward()
    for token, entropy, confidence, _, _ in ranks:
        torch.testing.assert_close(token, out.token_logprobs, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(entropy, out.entropy, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(confidence, out.confidence, atol=1e-6, rtol=1e-5)
    # (fp32 GEMMs over different vocab splits sum in a different order)
    tol = dict(atol=1e-4, rtol=1e-4)
    if glue == "none":
        torch.testing.assert_close(ranks[0][3] + ranks[1][3], h.grad, **tol)
    elif glue == "copy":
        for r in ranks:
            torch.testing.assert_close(r[3], h.grad, **tol)
    else:
        torch.testing.assert_close(torch.cat([ranks[0][3], ranks[1][3]]), h.grad, **tol)
    torch.testing.assert_close(torch.cat([r[4] for r in ranks]), wt.grad, **tol)
