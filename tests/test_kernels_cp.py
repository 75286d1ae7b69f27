"""Context parallelism: each sequence's tokens split over CP gloo ranks == one process.

Megatron's load-balanced layout (each sequence cut into 2·CP chunks, rank r holding chunks r
and 2·CP−1−r), for padded rows and for packed rows (segment_ids). The per-sequence sums,
counts and confidence must equal the single-process ones on every rank, per-token results
and the logits gradients must equal the single-process values at the rank's tokens, and
exactly one collective must run over the CP group (plus the one TP all-gather under TP);
backward none.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lens_kernels import linear_logprobs_and_confidence, logprobs_and_confidence
from seeds import random_seed
from test_kernels_tp import _COLLECTIVES

VOCAB, VALID = 96, 90


def cp_positions(length: int, cp: int, cp_rank: int) -> list[int]:
    """Megatron's load-balanced split of positions ``0..length-1`` (chunks r and 2cp−1−r)."""
    bounds = torch.linspace(0, length, 2 * cp + 1).round().long().tolist()
    mine = []
    for c in (cp_rank, 2 * cp - 1 - cp_rank):
        mine += list(range(bounds[c], bounds[c + 1]))
    return sorted(mine)


def _case(seed, packed: bool):
    """Logits [T, V] of 4 ragged sequences (packed) or [4, 12, V] (padded), mask, weights."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 13, (4,), generator=gen).tolist()
    if packed:
        seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
        shape = (seg.numel(),)
    else:
        seg, shape = None, (4, 12)
    logits = torch.randn(*shape, VOCAB, generator=gen) * 3
    targets = torch.randint(0, VALID, shape, generator=gen)
    mask = torch.rand(shape, generator=gen) < 0.8
    if not packed:
        mask &= torch.arange(12) < torch.tensor(lengths).unsqueeze(1)
    w_token = torch.randn(shape, generator=gen)
    w_seq = torch.randn(2, 4, generator=gen)
    return logits, targets, mask, seg, lengths, (w_token, w_seq)


def rank_tokens(seg, lengths, cp, cp_rank, packed):
    """Index of this CP rank's tokens: flat positions (packed) or columns (padded)."""
    if not packed:
        return torch.tensor(cp_positions(12, cp, cp_rank))
    starts = torch.tensor([0] + lengths).cumsum(0).tolist()
    return torch.tensor([starts[i] + p for i, n in enumerate(lengths)
                         for p in cp_positions(n, cp, cp_rank)])


def _take(t, idx, packed):
    return t[idx] if packed else t[:, idx]


def _run(logits, targets, mask, seg, weights, tp_group, cp_group, linear=False):
    """Forward + backward; returns outputs and the gradient of the (shard of the) logits."""
    w_token, w_seq = weights
    kwargs = dict(valid_vocab=VALID, temperature=0.9, return_entropy=True, cp_group=cp_group,
                  segment_ids=seg, num_segments=4 if seg is not None else None)
    x = logits.clone().requires_grad_(True)
    if linear:                       # hidden = the logits, weight = I: the gradients compare
        out = linear_logprobs_and_confidence(x, torch.eye(x.shape[-1]), targets, mask, tp_group,
                                             chunk_tokens=5, **kwargs)
    else:
        out = logprobs_and_confidence(x * 1, targets, mask, tp_group, inplace_backward=True,
                                      **kwargs)
    loss = (out.token_logprobs * w_token).sum() + (out.logprob_sum * w_seq[0]).sum()
    loss = loss + (out.confidence * w_seq[1] * 10).sum()
    return out, loss, x


def _recording_collectives():
    """Wrap every torch.distributed collective; log (name, ranks of its group)."""
    calls = []

    def wrap(name, fn):
        def logged(*args, **kwargs):
            group = kwargs.get("group")
            ranks = tuple(dist.get_process_group_ranks(group)) if group is not None else None
            calls.append((name, ranks))
            return fn(*args, **kwargs)
        return logged

    for name in _COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))
    return calls


def _cp_tp_rank(seed, tp, cp, packed, linear):
    """World rank = cp_rank·tp + tp_rank; TP groups are consecutive ranks, CP groups strided."""
    rank = dist.get_rank()
    tp_rank, cp_rank = rank % tp, rank // tp
    tp_groups = [dist.new_group(list(range(c * tp, (c + 1) * tp))) for c in range(cp)]
    cp_groups = [dist.new_group(list(range(t, tp * cp, tp))) for t in range(tp)]
    tp_group = tp_groups[cp_rank] if tp > 1 else None
    cp_group = cp_groups[tp_rank]
    calls = _recording_collectives()
    logits, targets, mask, seg, lengths, (w_token, w_seq) = _case(seed, packed)
    idx = rank_tokens(seg, lengths, cp, cp_rank, packed)
    v_local = VOCAB // tp
    shard = _take(logits, idx, packed)[..., tp_rank * v_local:(tp_rank + 1) * v_local]
    weights = (_take(w_token, idx, packed), w_seq)
    out, loss, x = _run(shard, _take(targets, idx, packed), _take(mask, idx, packed),
                        None if seg is None else seg[idx], weights, tp_group, cp_group, linear)
    forward_calls = list(calls)
    loss.backward()
    return {"out": {k: getattr(out, k).detach() for k in
                    ("token_logprobs", "logprob_sum", "num_tokens", "confidence", "entropy")},
            "grad": x.grad, "idx": idx, "tp_rank": tp_rank, "forward_calls": forward_calls,
            "backward_calls": calls[len(forward_calls):],
            "tp_ranks": tuple(range(cp_rank * tp, (cp_rank + 1) * tp)),
            "cp_ranks": tuple(range(tp_rank, tp * cp, tp))}


def _check(seed, tp, cp, packed, linear=False):
    from lens_megatron.parallel.spawn import run_in_processes

    per_rank = run_in_processes(_cp_tp_rank, tp * cp, args=(seed, tp, cp, packed, linear),
                                timeout=300.0)
    logits, targets, mask, seg, _, weights = _case(seed, packed)
    want, loss, x = _run(logits, targets, mask, seg, weights, None, None, linear)
    loss.backward()
    v_local = VOCAB // tp
    for got in per_rank:
        expected = [("all_reduce", got["cp_ranks"])]
        if tp > 1:
            expected = [(got["forward_calls"][0][0], got["tp_ranks"])] + expected
            assert expected[0][0] in ("all_gather_single", "all_gather_into_tensor")
        assert got["forward_calls"] == expected, got["forward_calls"]
        assert got["backward_calls"] == [], got["backward_calls"]
        o = got["out"]
        for key in ("logprob_sum", "confidence"):
            torch.testing.assert_close(o[key], getattr(want, key), atol=1e-5, rtol=1e-5)
        assert torch.equal(o["num_tokens"], want.num_tokens)
        for key in ("token_logprobs", "entropy"):
            torch.testing.assert_close(o[key], _take(getattr(want, key).detach(), got["idx"], packed),
                                       atol=2e-5, rtol=1e-5)
        cols = slice(got["tp_rank"] * v_local, (got["tp_rank"] + 1) * v_local)
        torch.testing.assert_close(got["grad"], _take(x.grad, got["idx"], packed)[..., cols],
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True])
def test_cp2_equals_single_process(packed):
    _check(random_seed(), tp=1, cp=2, packed=packed)


@pytest.mark.slow
def test_cp2_linear_packed_equals_single_process():
    _check(random_seed(), tp=1, cp=2, packed=True, linear=True)


@pytest.mark.slow
def test_cp2_tp2_equals_single_process():
    _check(random_seed(), tp=2, cp=2, packed=True)


def test_cp_split_covers_every_token_once():
    for length in (3, 7, 12):
        for cp in (1, 2, 4):
            got = sorted(p for r in range(cp) for p in cp_positions(length, cp, r))
            assert got == list(range(length))


def test_packed_cp_needs_num_segments(monkeypatch):
    import lens_kernels.sequences as seqs

    monkeypatch.setattr(seqs, "group_size_and_rank", lambda group: (2, 0))
    with pytest.raises(ValueError, match="num_segments is required with a cp_group"):
        logprobs_and_confidence(torch.randn(5, 10), torch.zeros(5, dtype=torch.long),
                                torch.ones(5, dtype=torch.bool), segment_ids=torch.zeros(5, dtype=torch.long),
                                cp_group=object())
