"""Packed (THD) per-document causal attention and the SDPA core attention module.

Every implementation is compared with a float64 per-document reference (outputs and input
gradients); the SDPA module's non-packed paths (causal fast path, GQA without repeated K/V)
are compared with the implementation they replaced (dense bottom-right mask, repeated K/V).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lens_megatron.models.packed_attention import (METHODS, document_mask,
                                                   packed_causal_attention, plan_buckets,
                                                   segment_layout)


def reference(q, k, v, starts, lengths):
    """float64, repeated K/V, explicit softmax; zeros outside every document."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    for s, n in zip(starts, lengths):
        if n == 0:
            continue
        qs = q[s:s + n].double().transpose(0, 1)
        ks = k[s:s + n].double().repeat_interleave(rep, 1).transpose(0, 1)
        vs = v[s:s + n].double().repeat_interleave(rep, 1).transpose(0, 1)
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        out[s:s + n] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out


def _inputs(total, heads, groups, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(total, h, dim, generator=gen, requires_grad=True)
            for h in (heads, groups, groups)]


LAYOUTS = {
    # name: (cu_seqlens, cu_seqlens_padded)
    "ragged": ([0, 5, 6, 19, 27], None),
    "tail_padding": ([0, 7, 9, 20], [0, 7, 9, 24]),
    "gaps_between_documents": ([0, 3, 9, 14], [0, 4, 12, 20]),  # per-document padding (CP)
    "many_equal_short": (list(range(0, 49, 4)), None),
    "one_document": ([0, 24], None),
    "empty_document": ([0, 6, 6, 11], [0, 6, 8, 16]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 1)])
def test_packed_attention_matches_the_float64_reference(layout, method, heads, groups):
    cu, padded = LAYOUTS[layout]
    starts, lengths = segment_layout(cu, padded)
    total = (padded or cu)[-1]
    q, k, v = _inputs(total, heads, groups)
    out = packed_causal_attention(q, k, v, starts, lengths, method=method)
    expected = reference(q.detach(), k.detach(), v.detach(), starts, lengths)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-6)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference(qd, kd, vd, starts, lengths).backward(grad.double())
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        torch.testing.assert_close(got.double(), want, rtol=0, atol=5e-6)


def test_reference_is_per_document():
    """Cross-document attention changes the result (the check above can fail)."""
    starts, lengths = [0, 5], [5, 7]
    q, k, v = _inputs(12, 2, 2)
    one_doc = reference(q.detach(), k.detach(), v.detach(), [0], [12])
    two_docs = reference(q.detach(), k.detach(), v.detach(), starts, lengths)
    torch.testing.assert_close(one_doc[:5], two_docs[:5], rtol=0, atol=1e-12)
    assert (one_doc[5:] - two_docs[5:]).abs().max() > 1e-3


def test_bucket_plan_trades_calls_for_padding():
    # many equal short documents: one call
    assert len(plan_buckets([16] * 64, heads=4)) == 1
    # a few long different documents: one call each (padding would cost more than calls)
    assert plan_buckets([2000, 1000, 500], heads=4) == [[0], [1], [2]]
    # every document exactly once, longest first within a bucket, empty ones left out
    buckets = plan_buckets([30, 0, 8, 9, 31, 700, 8], heads=8)
    assert sorted(i for b in buckets for i in b) == [0, 2, 3, 4, 5, 6]
    assert buckets[0] == [5]
    assert plan_buckets([0, 0]) == []
    # many heads per rank: every document alone (batching measured slower there)
    assert plan_buckets([16] * 64, heads=16) == [[i] for i in range(64)]
    # documents of RL rows (~100 tokens) stay alone even with few heads
    assert all(len(b) == 1 for b in plan_buckets([90, 120, 100, 140, 95], heads=4))


def test_document_mask():
    mask = document_mask([0, 2], [2, 1], 4)
    assert mask.tolist() == [[True, False, False, False], [True, True, False, False],
                             [False, False, True, False], [False, False, False, True]]


def test_segment_layout_rejects_overlaps():
    with pytest.raises(ValueError, match="malformed THD"):
        segment_layout([0, 5, 9], [0, 4, 9])
    with pytest.raises(ValueError, match="same length"):
        segment_layout([0, 5], [0, 5, 9])


# ---------------------------------------------------------------------------- the module
def _module(heads, groups, dim=16):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lens_megatron.models.layer_spec import SDPACoreAttention

    config = TransformerConfig(num_layers=1, hidden_size=heads * dim, num_attention_heads=heads,
                               num_query_groups=groups, kv_channels=dim, attention_dropout=0.0)
    return SDPACoreAttention(config, 1, AttnMaskType.causal, "self")


def old_core_attention(query, key, value, attention_mask, heads, groups):
    """The implementation before the causal fast path: dense bottom-right mask, repeated K/V."""
    sq, b = query.shape[0], query.shape[1]
    sk = key.shape[0]
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
    if groups != heads:
        k = k.repeat_interleave(heads // groups, dim=1)
        v = v.repeat_interleave(heads // groups, dim=1)
    mask = None
    if sq != 1:
        mask = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + (sk - sq)
    if attention_mask is not None:
        keep = ~attention_mask.to(torch.bool)
        mask = keep if mask is None else keep & mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


CASES = {
    "prefill": (12, 12, False),
    "left_padded": (12, 12, True),
    "kv_cache_block": (5, 12, False),
    "decode_token": (1, 12, False),
    "decode_left_padded": (1, 12, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 1)])
def test_module_matches_the_old_implementation(case, heads, groups):
    sq, sk, padded = CASES[case]
    gen = torch.Generator().manual_seed(3)
    b, dim = 3, 16
    query = torch.randn(sq, b, heads, dim, generator=gen, requires_grad=True)
    key = torch.randn(sk, b, groups, dim, generator=gen, requires_grad=True)
    value = torch.randn(sk, b, groups, dim, generator=gen, requires_grad=True)
    attention_mask = None
    if padded:  # row i has i left-padded keys, hidden from the real queries
        attention_mask = torch.zeros(b, 1, sq, sk, dtype=torch.bool)
        for i in range(b):
            attention_mask[i, 0, max(0, i - (sk - sq)):, :i] = True
    module = _module(heads, groups, dim)
    new = module(query, key, value, attention_mask)
    inputs = [t.detach().clone().requires_grad_() for t in (query, key, value)]
    old = old_core_attention(*inputs, attention_mask, heads, groups)
    torch.testing.assert_close(new, old, rtol=0, atol=1e-6)
    grad = torch.randn(new.shape, generator=gen)
    new.backward(grad)
    old.backward(grad)
    for got, want in zip((query, key, value), inputs):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-6)


def test_module_takes_the_causal_fast_path_and_gqa_without_repeat(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        calls.append((attn_mask is None, is_causal, enable_gqa, k.shape[1]))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    module = _module(4, 2)
    module(torch.randn(8, 1, 4, 16), torch.randn(8, 1, 2, 16), torch.randn(8, 1, 2, 16), None)
    module(torch.randn(3, 1, 4, 16), torch.randn(8, 1, 2, 16), torch.randn(8, 1, 2, 16), None)
    assert calls == [(True, True, True, 2), (False, False, True, 2)]


def test_module_packed_thd_equals_per_document_calls():
    from megatron.core.packed_seq_params import PackedSeqParams

    heads, groups, dim = 4, 2, 16
    module = _module(heads, groups, dim)
    cu, padded = [0, 5, 13, 16], [0, 5, 13, 20]
    q, k, v = _inputs(20, heads, groups, dim)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
                             cu_seqlens_kv=torch.tensor(cu, dtype=torch.int32),
                             cu_seqlens_q_padded=torch.tensor(padded, dtype=torch.int32),
                             cu_seqlens_kv_padded=torch.tensor(padded, dtype=torch.int32),
                             max_seqlen_q=8, max_seqlen_kv=8)
    out = module(q, k, v, None, packed_seq_params=params)
    assert out.shape == (20, heads * dim)
    for s, e in zip(cu[:-1], cu[1:]):
        alone = module(q[s:e, None], k[s:e, None], v[s:e, None], None)[:, 0]
        torch.testing.assert_close(out[s:e], alone, rtol=0, atol=1e-6)
    assert not out[16:].any()
    again = module(q, k, v, None, packed_seq_params=params)  # the cached layout
    assert torch.equal(again, out)
    with pytest.raises(NotImplementedError, match="qkv_format='thd'"):
        module(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd"))


def test_module_notices_changed_boundaries():
    from megatron.core.packed_seq_params import PackedSeqParams

    module = _module(2, 2)
    q, k, v = _inputs(10, 2, 2)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=6, max_seqlen_kv=6)
    two = module(q, k, v, None, packed_seq_params=params)
    cu[1] = 7  # the cached tensor edited in place
    other = module(q, k, v, None, packed_seq_params=params)
    params.cu_seqlens_q = params.cu_seqlens_kv = torch.tensor([0, 10], dtype=torch.int32)
    one = module(q, k, v, None, packed_seq_params=params)
    expected = [reference(q.detach(), k.detach(), v.detach(), *segment_layout(b))
                for b in ([0, 4, 10], [0, 7, 10], [0, 10])]
    for got, want in zip((two, other, one), expected):
        torch.testing.assert_close(got.double(), want.reshape(10, -1), rtol=0, atol=1e-6)
