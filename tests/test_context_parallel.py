"""parallel/context.py: megatron's load-balanced CP layout, its inverse, positions and the THD
partition, checked against megatron-core's own functions (and a 2-rank gloo gather)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_megatron.parallel import context as cp
from lens_megatron.parallel.spawn import run_in_processes


def test_padding_multiple():
    assert cp.padding_multiple(1) == 1  # no CP: nothing to split
    assert cp.padding_multiple(1, tp_size=2, sequence_parallel=True, local_multiple=16) == 32
    assert cp.padding_multiple(2) == 4
    assert cp.padding_multiple(4) == 8
    assert cp.padding_multiple(2, tp_size=2) == 4  # TP matters only under SP
    assert cp.padding_multiple(2, tp_size=2, sequence_parallel=True) == 8
    assert cp.padding_multiple(2, local_multiple=16) == 64  # each rank's chunks multiples of 16
    assert cp.padded_length(13, 4) == 16 and cp.padded_length(16, 4) == 16
    assert cp.padded_length(0, 4) == 0


def test_chunks_are_megatrons():
    # CP=2: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 (megatron's docstring example)
    assert cp.chunk_ids(0, 2) == (0, 3) and cp.chunk_ids(1, 2) == (1, 2)
    assert cp.local_positions(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert cp.local_positions(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert cp.local_positions(12, 1, 3).tolist() == [2, 3, 8, 9]
    assert cp.local_positions(7, 0, 1).tolist() == list(range(7))  # CP=1 is the identity
    assert cp.thd_local_index([0, 3, 8], 0, 1).tolist() == list(range(8))


@pytest.mark.parametrize("cp_size", [2, 3, 4])
def test_split_equals_megatron_get_batch_on_this_cp_rank(monkeypatch, cp_size):
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    seq = 6 * cp_size
    tokens = torch.randint(0, 100, (3, seq))
    hidden = torch.randn(3, seq, 5)
    for rank in range(cp_size):
        monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: cp_size)
        monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda: rank)
        theirs = get_batch_on_this_cp_rank({"tokens": tokens.clone(), "hidden": hidden.clone()})
        assert torch.equal(cp.split_for_rank(tokens, rank, cp_size), theirs["tokens"])
        assert torch.equal(cp.split_for_rank(hidden, rank, cp_size), theirs["hidden"])
        # [s, b, ...] layout (megatron's activations, RoPE tables) along dim 0
        sb = hidden.transpose(0, 1)
        assert torch.equal(cp.split_for_rank(sb, rank, cp_size, seq_dim=0),
                           theirs["hidden"].transpose(0, 1))


@pytest.mark.parametrize("cp_size", [2, 4])
def test_thd_partition_equals_megatron_thd_rope_partition(cp_size):
    """megatron's THD RoPE (``_get_thd_freqs_on_this_cp_rank``) and TE's THD partition agree
    with ours: each document slot, chunk r then chunk 2CP-1-r."""
    from megatron.core.models.common.embeddings.rope_utils import _get_thd_freqs_on_this_cp_rank

    slots = [4 * cp_size, 2 * cp_size, 6 * cp_size]
    cu_padded = [0, slots[0], slots[0] + slots[1], sum(slots)]
    table = torch.arange(max(slots)).view(-1, 1, 1, 1).float()  # freqs[p] = p
    for rank in range(cp_size):
        index = cp.thd_local_index(cu_padded, rank, cp_size)
        local_cu = [c // cp_size for c in cu_padded]
        for d in range(3):
            mine = index[local_cu[d]:local_cu[d + 1]] - cu_padded[d]  # in-document positions
            x = torch.empty(local_cu[d + 1] - local_cu[d])
            theirs = _get_thd_freqs_on_this_cp_rank(rank, cp_size, x, table).flatten().long()
            assert torch.equal(mine, theirs)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(1, 3))
def test_split_then_gather_is_identity(cp_size, length, batch):
    seq = cp.padded_length(length, cp.padding_multiple(cp_size))
    x = torch.randn(batch, seq, 3)
    parts = [cp.split_for_rank(x, r, cp_size) for r in range(cp_size)]
    gathered = torch.cat(parts, dim=1)  # what the all-gather returns (rank-major)
    assert torch.equal(gathered.index_select(1, cp.gather_order(seq, cp_size)), x)
    # every position held exactly once, each rank S/CP of them
    held = torch.cat([cp.local_positions(seq, r, cp_size) for r in range(cp_size)])
    assert sorted(held.tolist()) == list(range(seq))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.lists(st.integers(0, 23), min_size=1, max_size=5))
def test_thd_layout_split_then_gather_is_identity(cp_size, lengths):
    multiple = cp.padding_multiple(cp_size)
    layouts = [cp.thd_layout(lengths, r, cp_size, multiple) for r in range(cp_size)]
    total = int(layouts[0].cu_seqlens_padded[-1])
    packed = torch.randn(1, total)
    parts = [cp.split_thd_for_rank(packed, lay.cu_seqlens_padded, r, cp_size)
             for r, lay in enumerate(layouts)]
    order = cp.thd_gather_order(layouts[0].cu_seqlens_padded, cp_size)
    assert torch.equal(torch.cat(parts, dim=1).index_select(1, order), packed)
    for r, lay in enumerate(layouts):
        assert torch.equal(lay.local_cu_seqlens_padded * cp_size, lay.cu_seqlens_padded)
        assert lay.index.numel() == total // cp_size == int(lay.local_cu_seqlens_padded[-1])
        assert lay.cu_seqlens.tolist()[-1] == sum(lengths)
        # in-document positions: the slot start subtracted, and never beyond the slot
        starts = lay.cu_seqlens_padded[:-1].long()
        local = lay.local_cu_seqlens_padded.tolist()
        for d in range(len(lengths)):
            seg = slice(local[d], local[d + 1])
            assert torch.equal(lay.positions[seg], lay.index[seg] - starts[d])


def test_thd_positions_within_documents():
    lay = cp.thd_layout([5, 2], 0, 2, multiple=4)  # slots 8 and 4
    assert lay.cu_seqlens.tolist() == [0, 5, 7]
    assert lay.cu_seqlens_padded.tolist() == [0, 8, 12]
    assert lay.local_cu_seqlens_padded.tolist() == [0, 4, 6]
    assert lay.index.tolist() == [0, 1, 6, 7, 8, 11]
    assert lay.positions.tolist() == [0, 1, 6, 7, 0, 3]
    assert lay.max_seqlen == 8


def test_errors_name_the_key_and_the_fix():
    message = r"model.context_parallel_size=2.*multiple of 4.*pad it to 12"
    with pytest.raises(ValueError, match=message):
        cp.split_for_rank(torch.zeros(1, 10), 0, 2)
    with pytest.raises(ValueError, match="multiple of 2\\*CP = 4"):
        cp.thd_local_index([0, 6], 0, 2)
    with pytest.raises(ValueError, match="cp_rank must be in"):
        cp.chunk_ids(2, 2)


def _gather_worker(seq: int):
    import torch.distributed as dist

    rank, size = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(2, seq, 3, generator=generator)
    local = cp.split_for_rank(full, rank, size)
    back = cp.gather_from_ranks(local, dist.group.WORLD)
    sb_back = cp.gather_from_ranks(local.transpose(0, 1), dist.group.WORLD, seq_dim=0)
    lay = cp.thd_layout([7, 3, 9], rank, size, cp.padding_multiple(size))
    packed = torch.randn(1, int(lay.cu_seqlens_padded[-1]), generator=generator)
    thd_back = cp.gather_thd_from_ranks(
        cp.split_thd_for_rank(packed, lay.cu_seqlens_padded, rank, size),
        lay.cu_seqlens_padded, dist.group.WORLD)
    return (torch.equal(back, full), torch.equal(sb_back.transpose(0, 1), full),
            torch.equal(thd_back, packed), back.requires_grad)


@pytest.mark.slow
def test_gather_from_ranks_over_gloo():
    for result in run_in_processes(_gather_worker, 2, (12,)):
        assert result == (True, True, True, False)
