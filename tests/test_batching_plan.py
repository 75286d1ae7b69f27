"""The batch plan: the invariants of ``lens_megatron.batching.plan`` on random inputs, the
stated balance bounds on long-tailed lengths, the padded path's widths, and the errors."""
from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lens_megatron.batching.plan import (BatchPlan, MicroBatch, SequenceTooLongError,
                                         plan_batches, plan_packed, plan_padded, round_up)


def lognormal(n, seed, median=300.0, cap=None):
    rng = random.Random(seed)
    out = [max(0, int(rng.lognormvariate(math.log(median), 1.0))) for _ in range(n)]
    return [min(x, cap) for x in out] if cap else out


@st.composite
def packed_case(draw):
    multiple = draw(st.sampled_from([1, 2, 4, 16]))
    budget = draw(st.integers(max(multiple, 8), 600))
    longest = (budget // multiple) * multiple
    lengths = draw(st.lists(st.integers(0, longest), min_size=0, max_size=50))
    return lengths, draw(st.integers(1, 6)), budget, multiple, draw(st.booleans())


@given(packed_case())
def test_packed_plan_invariants(case):
    lengths, dp, budget, multiple, same_shape = case
    plan = plan_packed(lengths, dp, budget, multiple, same_shape)
    plan.validate(lengths)
    assert plan.mode == "packed" and plan.dp_size == dp
    fed = [max(1, n) for n in lengths]
    assert sum(plan.rank_tokens()) == sum(fed)
    # micro-batches per rank: at least the lower bound, and empty slots only when unavoidable
    assert plan.num_micro_batches >= -(-max(plan.rank_tokens()) // plan.budget)
    empties = sum(not mb.rows for r in range(dp) for mb in plan.micro_batches(r))
    assert empties == 0 or empties == dp * plan.num_micro_batches - len(lengths)
    assert plan == plan_packed(list(lengths), dp, budget, multiple, same_shape)  # deterministic


@st.composite
def padded_case(draw):
    dp = draw(st.integers(1, 4))
    per_rank = draw(st.integers(1, 12))
    width = draw(st.sampled_from([8, 32, 64]))
    lengths = draw(st.lists(st.integers(0, width), min_size=dp * per_rank,
                            max_size=dp * per_rank))
    return lengths, dp, draw(st.integers(1, 5)), width, draw(st.booleans())


@given(padded_case())
def test_padded_plan_invariants(case):
    lengths, dp, mbs, width, same_shape = case
    multiple = 4 if width % 4 == 0 else 1
    plan = plan_padded(lengths, dp, mbs, multiple, same_shape, full_width=width)
    plan.validate(lengths, full_width=width)
    per_rank = len(lengths) // dp
    for r in range(dp):
        mbs_r = plan.micro_batches(r)
        assert len(plan.rows(r)) == per_rank
        assert len(mbs_r) == -(-per_rank // mbs)
        assert all(1 <= len(mb.rows) <= mbs for mb in mbs_r)
        for mb in mbs_r:
            expected = min(width, round_up(max(mb.lengths), multiple))
            assert mb.width == expected or same_shape
    costs = plan.rank_costs()
    largest_group = max(mb.padded_cost for r in range(dp) for mb in plan.micro_batches(r))
    if not same_shape:
        assert max(costs) - min(costs) <= largest_group
    assert plan == plan_padded(list(lengths), dp, mbs, multiple, same_shape, full_width=width)


def test_padded_plan_groups_rows_by_length_like_the_actor():
    """One rank: rows sorted by the columns they need, in groups of micro_batch_size, each
    cut to its longest row (the widths tests/test_actor_widths.py checks end to end)."""
    needed = [5, 8, 4, 11, 6, 6, 9, 3]
    plan = plan_padded(needed, 1, 2)
    assert [mb.width for mb in plan.micro_batches(0)] == [4, 6, 8, 11]
    assert [mb.rows for mb in plan.micro_batches(0)] == [(7, 2), (0, 4), (5, 1), (6, 3)]
    assert [mb.width for mb in plan_padded(needed, 1, 2, pad_multiple=4).micro_batches(0)] \
        == [4, 8, 8, 12]
    same = plan_padded(needed, 1, 2, same_shape=True)
    assert [mb.width for mb in same.micro_batches(0)] == [11] * 4
    capped = plan_padded(needed, 1, 2, pad_multiple=4, full_width=8)
    assert [mb.width for mb in capped.micro_batches(0)] == [4, 8, 8, 8]


def test_rows_without_targets_feed_one_column():
    plan = plan_padded([0, 0], 1, 2)
    assert plan.micro_batches(0) == (MicroBatch((0, 1), (1, 1), 1),)
    packed = plan_packed([0, 3, 0], 1, 8)
    assert packed.micro_batches(0)[0].lengths == (1, 3, 1)


def test_packed_balance_on_long_tailed_lengths():
    """Rank token loads: max - min <= the longest row (KK), and on lognormal lengths (sigma
    1) the max/min ratio stays below 1.001; micro-batches per rank are no more than one above
    the lower bound ceil(load / budget)."""
    for seed in range(3):
        lengths = lognormal(512, seed, cap=4096)
        for dp in (1, 2, 4, 8):
            for budget in (4096, 8192):
                plan = plan_packed(lengths, dp, budget, pad_multiple=2)
                plan.validate(lengths)
                loads = plan.rank_tokens()
                assert max(loads) - min(loads) <= max(lengths)
                assert max(loads) / min(loads) < 1.001, (seed, dp, budget, loads)
                lower = -(-max(loads) // budget)
                assert plan.num_micro_batches <= lower + 1, (plan.num_micro_batches, lower)


def test_packed_micro_batches_are_balanced_within_a_rank_under_pipeline_parallelism():
    """same_shape: every micro-batch takes the rank's largest T; KK keeps that close to the
    mean so little padding is added."""
    lengths = lognormal(256, 7, cap=2048)
    plan = plan_packed(lengths, 2, 4096, pad_multiple=8, same_shape=True)
    plan.validate(lengths)
    for r in range(2):
        mbs = plan.micro_batches(r)
        used = sum(mb.tokens for mb in mbs)
        assert used / (len(mbs) * mbs[0].width) > 0.97


def test_packed_prefers_splitting_to_empty_micro_batches():
    # ranks get {50, 30, 30} (2 micro-batches under 100) and {60, 30} (fits in one): the
    # second rank's bin is split rather than padded with an empty micro-batch
    plan = plan_packed([60, 50, 30, 30, 30], 2, 100)
    plan.validate([60, 50, 30, 30, 30])
    assert plan.num_micro_batches == 2
    assert sorted(mb.rows for mb in plan.micro_batches(1)) == [(0,), (2,)]
    assert all(mb.rows for r in range(2) for mb in plan.micro_batches(r))
    # fewer rows than slots: empty micro-batches are unavoidable, all padding
    plan = plan_packed([7], 2, 16, pad_multiple=4)
    assert [len(mb.rows) for mb in plan.micro_batches(1)] == [0]
    assert plan.micro_batches(1)[0].width == 4


def test_filling_an_empty_slot_moves_a_row_across_ranks():
    # balancing gives one rank {96} and the other {45, 32, 24} = 101: under a budget of 100
    # that rank needs 2 micro-batches, so the first would get an empty one; a row moves over
    lengths = [45, 32, 96, 24]
    plan = plan_packed(lengths, 2, 100)
    plan.validate(lengths)
    assert plan.num_micro_batches == 2
    assert [[mb.rows for mb in plan.micro_batches(r)] for r in range(2)] == \
        [[(0,), (1,)], [(2,), (3,)]]


def test_too_long_rows_name_the_config_key():
    with pytest.raises(SequenceTooLongError, match=r"row 1 needs 130 tokens.*"
                       r"model\.max_tokens_per_microbatch=128.*at least 130") as err:
        plan_packed([10, 130], 1, 128)
    assert "context_parallel_size" not in str(err.value)
    with pytest.raises(SequenceTooLongError, match=r"rounded down .*: 126.*"
                       r"model\.context_parallel_size > 1"):
        plan_packed([127], 1, 128, pad_multiple=6, context_parallel_hint=True)
    with pytest.raises(ValueError, match="below the alignment multiple"):
        plan_packed([1], 1, 3, pad_multiple=4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of"):
        plan_batches([1], 1)
    with pytest.raises(ValueError, match="exactly one of"):
        plan_batches([1], 1, micro_batch_size=1, max_tokens=8)
    with pytest.raises(ValueError, match="does not split evenly over 2"):
        plan_padded([1, 2, 3], 2, 1)
    with pytest.raises(ValueError, match="not a multiple of pad_multiple"):
        plan_padded([1, 2], 1, 1, pad_multiple=4, full_width=6)
    with pytest.raises(ValueError, match=">= 0"):
        plan_packed([-1], 1, 8)


def test_validate_catches_a_broken_plan():
    good = plan_packed([3, 4, 5], 1, 8)
    good.validate([3, 4, 5])
    lost = BatchPlan("packed", ((MicroBatch((0, 1), (3, 4), 8),),), 3, 1, 8)
    with pytest.raises(AssertionError, match="rows"):
        lost.validate([3, 4, 5])
    over = BatchPlan("packed", ((MicroBatch((0, 1, 2), (3, 4, 5), 12),),), 3, 1, 8)
    with pytest.raises(AssertionError, match="budget"):
        over.validate([3, 4, 5])
    uneven = BatchPlan("packed", ((MicroBatch((0,), (3,), 8),),
                                  (MicroBatch((1,), (4,), 8), MicroBatch((2,), (5,), 8))), 3, 1, 8)
    with pytest.raises(AssertionError, match="equal micro-batch counts"):
        uneven.validate([3, 4, 5])


def _contiguous_slices_cost(lengths, dp, mbs):
    """The busiest rank's padded cost when rank r takes rows [r n/dp, (r+1) n/dp) and groups
    them by length (the actor's behaviour before the plan)."""
    per = len(lengths) // dp
    worst = 0
    for r in range(dp):
        rows = sorted(range(r * per, (r + 1) * per), key=lambda i: (max(1, lengths[i]), i))
        groups = [rows[s:s + mbs] for s in range(0, per, mbs)]
        worst = max(worst, sum(len(g) * max(max(1, lengths[i]) for i in g) for g in groups))
    return worst


def test_padded_balance_beats_contiguous_slices_on_long_tailed_lengths():
    for seed in range(3):
        lengths = lognormal(256, seed)
        for dp in (2, 4, 8):
            for mbs in (2, 8):
                plan = plan_padded(lengths, dp, mbs)
                costs = plan.rank_costs()
                assert max(costs) <= _contiguous_slices_cost(lengths, dp, mbs), (seed, dp, mbs)
                if mbs == 2:  # small groups: tightly balanced
                    assert max(costs) / min(costs) < 1.02, (seed, dp, costs)


def test_packed_count_multiple_for_the_interleaved_schedule():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6]
    plain = plan_packed(lengths, 1, 64)
    assert plain.num_micro_batches == 1
    plan = plan_packed(lengths, 1, 64, count_multiple=2)
    assert plan.num_micro_batches == 2  # rounded up to the PP size, every row still once
    assert sorted(r for mb in plan.ranks[0] for r in mb.rows) == list(range(8))
    assert plan_packed(lengths, 2, 16, count_multiple=2).num_micro_batches % 2 == 0
    with pytest.raises(ValueError, match="count_multiple"):
        plan_packed(lengths, 1, 64, count_multiple=0)
