"""Micro-batch layouts and their inverses: padded cuts and packed rows back to the batch."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_megatron.batching.layout import (needed_lengths, pack_micro_batch, pad_micro_batch,
                                           scatter_rows)
from lens_megatron.batching.plan import plan_packed, plan_padded


def ragged_batch(ends, width=12, seed=0):
    """Rows of prompt 3 + response up to ``ends[i]``; targets/mask in token coordinates."""
    gen = torch.Generator().manual_seed(seed)
    n = len(ends)
    ids = torch.randint(1, 50, (n, width), generator=gen)
    response = torch.zeros(n, width, dtype=torch.bool)
    for row, end in enumerate(ends):
        response[row, 3:end] = True
        ids[row, end:] = 0
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    mask = torch.zeros_like(response)
    mask[:, :-1] = response[:, 1:]
    return ids, targets, mask


def test_needed_lengths_are_through_the_last_target():
    _, _, mask = ragged_batch([6, 9, 3, 12])
    # a row whose response ends at `end` has its last target at end - 2: needs end - 1
    assert needed_lengths(mask) == [5, 8, 0, 11]


@given(st.lists(st.integers(3, 12), min_size=1, max_size=9), st.integers(1, 4),
       st.sampled_from([1, 2, 4]))
@settings(max_examples=60)
def test_padded_cut_and_unpack_round_trip(ends, mbs, multiple):
    ids, targets, mask = ragged_batch(ends)
    old = torch.randn(ids.shape)
    adv = torch.randn(len(ends))
    plan = plan_padded(needed_lengths(mask), 1, mbs, multiple, full_width=12)
    layouts = [pad_micro_batch(ids, targets, mask, mb, {"old": old}, {"adv": adv})
               for mb in plan.micro_batches(0)]
    for layout, mb in zip(layouts, plan.micro_batches(0)):
        assert layout.input_ids.shape == (len(mb.rows), mb.width)
        assert torch.equal(layout.rows, torch.tensor(mb.rows))
        assert torch.equal(layout.sequence_extras["adv"], adv[list(mb.rows)])
        assert torch.equal(layout.position_ids[0], torch.arange(mb.width))
    # every target position survives the cut: the masked log-probs go back exactly
    back = scatter_rows(layouts, [lay.token_extras["old"] for lay in layouts], len(ends), 12)
    assert torch.equal(torch.where(mask, back, 0.0), torch.where(mask, old, 0.0))
    assert torch.equal(scatter_rows(layouts, [lay.mask for lay in layouts], len(ends), 12), mask)


def test_padded_cut_pads_past_the_batch_width():
    ids, targets, mask = ragged_batch([12, 5])
    mb = plan_padded([11, 4], 1, 2, pad_multiple=8).micro_batches(0)[0]  # width 16 > 12
    layout = pad_micro_batch(ids, targets, mask, mb)
    assert layout.input_ids.shape == (2, 16) and not layout.mask[:, 12:].any()
    assert torch.equal(layout.unpack(layout.input_ids, 2, 12), ids)


@given(st.lists(st.integers(3, 12), min_size=1, max_size=9), st.sampled_from([1, 4, 8]),
       st.integers(1, 3))
@settings(max_examples=60)
def test_packed_layout_and_inverses(ends, multiple, dp):
    ids, targets, mask = ragged_batch(ends)
    old = torch.randn(ids.shape)
    adv = torch.randn(len(ends))
    lengths = needed_lengths(mask)
    plan = plan_packed(lengths, dp, 32, multiple)
    results, layouts = [], []
    for rank in range(dp):
        for mb in plan.micro_batches(rank):
            p = pack_micro_batch(ids, targets, mask, mb, {"old": old}, {"adv": adv})
            _check_packed(p, mb, ids, targets, mask, old, adv)
            layouts.append(p)
            results.append(p.token_extras["old"])
    back = scatter_rows(layouts, results, len(ends), 12)
    assert torch.equal(torch.where(mask, back, 0.0), torch.where(mask, old, 0.0))
    assert torch.equal(scatter_rows(layouts, [p.mask for p in layouts], len(ends), 12), mask)


def _check_packed(p, mb, ids, targets, mask, old, adv):
    total, n = mb.width, len(mb.rows)
    assert p.input_ids.shape == p.targets.shape == p.mask.shape == (1, total)
    assert p.cu_seqlens.dtype == p.cu_seqlens_padded.dtype == torch.int32
    assert int(p.cu_seqlens_padded[-1]) == total
    segments = (p.cu_seqlens_padded[1:] - p.cu_seqlens_padded[:-1]).tolist()
    assert p.max_seqlen == max(segments) and sum(segments) == total
    for i, (row, length) in enumerate(zip(mb.rows, mb.lengths)):
        start = int(p.cu_seqlens[i])
        assert int(p.cu_seqlens[i + 1]) - start == length
        sl = slice(start, start + length)
        assert torch.equal(p.input_ids[0, sl], ids[row, :length])
        assert torch.equal(p.targets[0, sl], targets[row, :length])  # the row's own targets
        assert torch.equal(p.mask[0, sl], mask[row, :length])
        assert torch.equal(p.position_ids[0, sl], torch.arange(length))
        assert torch.equal(p.segment_ids[sl], torch.full((length,), i))
        assert torch.equal(p.token_extras["old"][0, sl], old[row, :length])
    real = sum(mb.lengths)
    assert (p.segment_ids[real:] == -1).all() and not p.mask[0, real:].any()
    assert torch.equal(p.sequence_extras["adv"], adv[list(mb.rows)])
    view = p.rows_view(p.input_ids)
    assert view.shape == (n, max(mb.lengths, default=0))
    for i, (row, length) in enumerate(zip(mb.rows, mb.lengths)):
        assert torch.equal(view[i, :length], ids[row, :length]) and not view[i, length:].any()
    if n:
        assert torch.equal(p.expand(p.sequence_extras["adv"])[0, :real],
                           adv[list(mb.rows)].repeat_interleave(torch.tensor(mb.lengths)))


def test_packed_positions_restart_and_padding_continues_the_last_document():
    ids, targets, mask = ragged_batch([6, 4, 9])
    plan = plan_packed(needed_lengths(mask), 1, 24, pad_multiple=8)
    mb = plan.micro_batches(0)[0]
    p = pack_micro_batch(ids, targets, mask, mb)
    assert mb.lengths == (5, 3, 8) and mb.width == 16
    assert p.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7]
    assert p.cu_seqlens.tolist() == [0, 5, 8, 16] == p.cu_seqlens_padded.tolist()
    plan = plan_packed(needed_lengths(mask), 1, 24, pad_multiple=6)
    p = pack_micro_batch(ids, targets, mask, plan.micro_batches(0)[0])
    assert p.cu_seqlens.tolist() == [0, 5, 8, 16] and p.cu_seqlens_padded.tolist() == [0, 5, 8, 18]
    assert p.position_ids[0, 16:].tolist() == [8, 9] and p.max_seqlen == 10


def test_empty_packed_micro_batch_is_one_padding_segment():
    ids, targets, mask = ragged_batch([6])
    plan = plan_packed(needed_lengths(mask), 2, 16, pad_multiple=4)
    empty = plan.micro_batches(1)[0]
    p = pack_micro_batch(ids, targets, mask, empty)
    assert p.cu_seqlens.tolist() == [0, 0] and p.cu_seqlens_padded.tolist() == [0, 4]
    assert p.max_seqlen == 4 and not p.mask.any() and (p.segment_ids == -1).all()
    assert p.rows_view(p.input_ids).shape == (0, 0)
    assert not p.unpack(p.input_ids.float(), 1, 12).any()


def test_rows_view_and_unpack_are_differentiable():
    ids, targets, mask = ragged_batch([6, 9, 5])
    p = pack_micro_batch(ids, targets, mask, plan_packed(needed_lengths(mask), 1, 32, 4)
                         .micro_batches(0)[0])
    values = torch.randn(p.input_ids.shape, requires_grad=True)
    weights = torch.randn(len(p.lengths), max(p.lengths))
    (p.rows_view(values) * weights).sum().backward()
    expected = torch.zeros_like(values)
    for i, length in enumerate(p.lengths):
        start = int(p.cu_seqlens[i])
        expected[0, start:start + length] = weights[i, :length]
    assert torch.equal(values.grad, expected)
    values.grad = None
    p.unpack(values, 3, 12).sum().backward()
    assert torch.equal(values.grad, (p.segment_ids >= 0).float()[None])


def test_to_moves_every_tensor():
    ids, targets, mask = ragged_batch([6, 9])
    mb = plan_packed(needed_lengths(mask), 1, 32).micro_batches(0)[0]
    p = pack_micro_batch(ids, targets, mask, mb, {"old": torch.randn(ids.shape)},
                         {"adv": torch.randn(2)}).to("meta")
    tensors = [v for v in vars(p).values() if isinstance(v, torch.Tensor)]
    tensors += list(p.token_extras.values()) + list(p.sequence_extras.values())
    assert len(tensors) == 10 and all(t.device.type == "meta" for t in tensors)
    q = pad_micro_batch(ids, targets, mask, mb, {"old": torch.randn(ids.shape)}).to("meta")
    assert all(t.device.type == "meta" for t in (q.rows, q.input_ids, q.token_extras["old"]))


def test_build_micro_batches_of_every_rank_complete_the_batch():
    """What the actor runs: each DP rank builds its layouts; the scattered per-rank results
    summed over ranks (an all-reduce) give the whole batch in the original row order."""
    from lens_megatron.batching.layout import build_micro_batches

    ids, targets, mask = ragged_batch([6, 9, 5, 12, 7, 4, 10, 8])
    old = torch.randn(ids.shape)
    lengths = needed_lengths(mask)
    for plan in (plan_packed(lengths, 2, 20, pad_multiple=2),
                 plan_padded(lengths, 2, 2, pad_multiple=2, full_width=12)):
        total = torch.zeros(ids.shape)
        for rank in range(2):
            layouts = build_micro_batches(plan, rank, ids, targets, mask, {"old": old})
            assert len(layouts) == plan.num_micro_batches
            assert all(type(lay).__name__.lower().startswith(plan.mode[:3]) for lay in layouts)
            total += scatter_rows(layouts, [lay.token_extras["old"] for lay in layouts], 8, 12)
        assert torch.equal(torch.where(mask, total, 0.0), torch.where(mask, old, 0.0))
