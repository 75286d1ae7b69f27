"""models/context_attention.py on 2 and 4 gloo ranks (CP=2, and CP=2 x TP=2 with the heads
split): outputs and the gradients of Q/K/V equal one process's full causal attention (float64
reference, fp32 CP run, 1e-5), GQA, sequence lengths that are not powers of two (padded), and
packed documents. One all-gather forward and one reduce-scatter backward per call."""
from __future__ import annotations

import math

import pytest
import torch

from lens_megatron.parallel import context as cp
from lens_megatron.parallel.spawn import run_in_processes

pytestmark = pytest.mark.slow

TOL = dict(atol=1e-5, rtol=1e-5)


def _groups(tp: int):
    """megatron's order (TP fastest): rank = cp_rank * TP + tp_rank."""
    import torch.distributed as dist

    world = dist.get_world_size()
    cp_size = world // tp
    mine = None
    for t in range(tp):
        ranks = [c * tp + t for c in range(cp_size)]
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine, dist.get_rank() // tp, dist.get_rank() % tp, cp_size


def _reference(q, k, v):
    """Full causal attention, float64, GQA by repeating K/V (independent of the CP code)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    return _attend(q64, k64, v64), (q64, k64, v64)


def _attend(q64, k64, v64):
    heads, groups = q64.shape[2], k64.shape[2]
    kk = k64.repeat_interleave(heads // groups, dim=2)
    vv = v64.repeat_interleave(heads // groups, dim=2)
    scores = torch.einsum("sbhd,tbhd->bhst", q64, kk) / math.sqrt(q64.shape[-1])
    s = q64.shape[0]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), vv)


def _count_collectives():
    import torch.distributed as dist

    counts = {"all_gather_into_tensor": 0, "reduce_scatter_tensor": 0}
    originals = {name: getattr(dist, name) for name in counts}

    def wrap(name):
        def counted(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return counted

    for name in counts:
        setattr(dist, name, wrap(name))
    return counts


def padded_worker(tp: int, cases):
    from lens_megatron.models.context_attention import context_parallel_attention

    group, cp_rank, tp_rank, cp_size = _groups(tp)
    counts = _count_collectives()
    report = []
    for seed, length, batch, heads, groups, dim in cases:
        seq = cp.padded_length(length, cp.padding_multiple(cp_size))
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(seq, batch, heads, dim, generator=g)
        k = torch.randn(seq, batch, groups, dim, generator=g)
        v = torch.randn(seq, batch, groups, dim, generator=g)
        weight = torch.randn(seq, batch, heads, dim, generator=g)
        ref, leaves = _reference(q, k, v)
        (ref * weight.double()).sum().backward()

        h, gr = heads // tp, groups // tp  # this TP rank's heads, contiguous blocks

        def mine(t, per):
            return cp.split_for_rank(t[:, :, tp_rank * per:(tp_rank + 1) * per], cp_rank,
                                     cp_size, seq_dim=0)

        lq, lk, lv = (mine(t, p).clone().requires_grad_() for t, p in ((q, h), (k, gr), (v, gr)))
        before = dict(counts)
        out = context_parallel_attention(lq, lk, lv, group)
        (out * mine(weight, h).reshape(out.shape)).sum().backward()
        calls = {n: counts[n] - before[n] for n in counts}
        expect = [mine(ref.detach(), h).reshape(out.shape)] + [
            mine(leaf.grad, p) for leaf, p in zip(leaves, (h, gr, gr))]
        got = [out, lq.grad, lk.grad, lv.grad]
        report.append((seq, [float((a.double() - b).abs().max()) for a, b in zip(got, expect)],
                       [torch.allclose(a.double(), b, **TOL) for a, b in zip(got, expect)], calls))
    return report


CASES = [  # seed, length, batch, heads, query groups, head dim
    (0, 13, 2, 4, 2, 8),   # GQA, padded 13 -> 16
    (1, 37, 1, 4, 4, 16),  # MHA, 37 -> 40
    (2, 50, 3, 8, 2, 4),   # 4 heads per KV group, 50 -> 52
]


@pytest.mark.parametrize("tp", [1, 2])
def test_cp_attention_equals_full_attention(tp):
    results = run_in_processes(padded_worker, 2 * tp, (tp, CASES), timeout=300)
    for rank_report in results:
        for seq, errors, close, calls in rank_report:
            assert all(close), (seq, errors)
            assert calls == {"all_gather_into_tensor": 1, "reduce_scatter_tensor": 1}, calls


def _thd_reference(q, k, v, cu, cu_padded):
    """Per-document causal attention over each document's real tokens; padding rows zero."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for i in range(len(cu) - 1):
        start, n = cu_padded[i], cu[i + 1] - cu[i]
        if n:
            seg = slice(start, start + n)
            ref = _attend(*(t[seg].unsqueeze(1) for t in leaves)).squeeze(1)
            out = out.index_put((torch.arange(start, start + n),), ref)
    return out, leaves


def thd_worker(cases):
    import torch.distributed as dist

    from lens_megatron.models.context_attention import context_parallel_thd_attention

    rank, size = dist.get_rank(), dist.get_world_size()
    report = []
    for seed, lengths, heads, groups, dim in cases:
        lay = cp.thd_layout(lengths, rank, size, cp.padding_multiple(size))
        cu, cu_padded = lay.cu_seqlens.tolist(), lay.cu_seqlens_padded.tolist()
        g = torch.Generator().manual_seed(seed)
        total = cu_padded[-1]
        q = torch.randn(total, heads, dim, generator=g)
        k = torch.randn(total, groups, dim, generator=g)
        v = torch.randn(total, groups, dim, generator=g)
        weight = torch.randn(total, heads, dim, generator=g)
        ref, leaves = _thd_reference(q, k, v, cu, cu_padded)
        (ref * weight.double()).sum().backward()

        def mine(t):
            return t.index_select(0, lay.index)

        lq, lk, lv = (mine(t).clone().requires_grad_() for t in (q, k, v))
        out = context_parallel_thd_attention(lq, lk, lv, dist.group.WORLD, lay.cu_seqlens,
                                             lay.cu_seqlens_padded)
        (out * mine(weight).reshape(out.shape)).sum().backward()
        expect = [mine(ref.detach()).reshape(out.shape)] + [mine(leaf.grad) for leaf in leaves]
        got = [out, lq.grad, lk.grad, lv.grad]
        report.append([torch.allclose(a.double(), b, **TOL) for a, b in zip(got, expect)])
    return report


def test_cp_thd_attention_equals_per_document_attention():
    cases = [(3, [5, 11, 1], 4, 2, 8), (4, [16, 0, 9, 3], 2, 1, 8)]
    for rank_report in run_in_processes(thd_worker, 2, (cases,), timeout=300):
        assert all(all(r) for r in rank_report), rank_report
