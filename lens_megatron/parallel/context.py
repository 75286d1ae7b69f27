"""Context parallelism (CP): megatron's load-balanced sequence layout, as pure functions.

A sequence of padded length ``S`` (a multiple of ``2·CP``) is cut into ``2·CP`` equal chunks;
CP rank ``r`` holds chunks ``r`` and ``2·CP−1−r``, in that order, so that under causal attention
every rank does the same work (megatron-core's ``get_batch_on_this_cp_rank``; RoPE is sliced the
same way by ``RotaryEmbedding`` through ``get_pos_emb_on_this_cp_rank``).

Packed (THD) input follows Transformer Engine's ``thd_get_partitioned_indices``: every document's
slot in the packed row (``cu_seqlens_padded``, each slot a multiple of ``2·CP``) is cut the same
way, and rank ``r``'s tokens are, document after document, chunk ``r`` then chunk ``2·CP−1−r`` of
that document. Rank ``r``'s boundaries are ``cu_seqlens_padded // CP``; megatron's
``PackedSeqParams`` keeps the *global* ``cu_seqlens`` / ``cu_seqlens_padded`` (TE and megatron's
THD RoPE divide by CP themselves).

A padded ``[b, S]`` batch is the THD case with one slot ``[0, S]`` shared by every row, and is
computed by the same code. Everything here takes ``(cp_rank, cp_size)`` or ``cp_group``
explicitly and reads no megatron global state. Every split has a tested inverse
(``split_* ∘ gather_*`` = identity, ``tests/test_context_parallel.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------- padding


def padding_multiple(cp_size: int, tp_size: int = 1, sequence_parallel: bool = False,
                     local_multiple: int = 1) -> int:
    """The multiple a sequence (or a THD document slot) is padded to.

    ``2·CP`` under CP (two equal chunks per rank; 1 without CP), ``×TP`` under sequence
    parallelism (each rank's ``S/CP`` tokens are scattered over TP), ``×local_multiple`` so that
    every rank's share ``S/(CP·TP)`` is a multiple of it (16 for FP8 GEMMs). At CP=1 this is the
    actor's multiple without CP (``ModelConfig.sequence_multiple``)."""
    if cp_size < 1 or tp_size < 1 or local_multiple < 1:
        raise ValueError(f"sizes must be >= 1, got cp={cp_size} tp={tp_size} "
                         f"local_multiple={local_multiple}")
    chunks = 2 * cp_size if cp_size > 1 else 1
    return chunks * (tp_size if sequence_parallel else 1) * local_multiple


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple`` (0 stays 0)."""
    return -(-int(length) // multiple) * multiple


def chunk_ids(cp_rank: int, cp_size: int) -> tuple[int, int]:
    """The two global chunk indices CP rank ``cp_rank`` holds, in its local order."""
    _check_rank(cp_rank, cp_size)
    return cp_rank, 2 * cp_size - 1 - cp_rank


def _check_rank(cp_rank: int, cp_size: int) -> None:
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, cp_size), got cp_rank={cp_rank} "
                         f"cp_size={cp_size}")


# --------------------------------------------------------------------------- index maps


def thd_local_index(cu_seqlens_padded: Sequence[int] | torch.Tensor, cp_rank: int,
                    cp_size: int, device=None) -> torch.Tensor:
    """Global token indices (into the packed row) that CP rank ``cp_rank`` holds, in its local
    order: for each document slot, chunk ``r`` then chunk ``2·CP−1−r`` of that slot (TE's
    ``thd_get_partitioned_indices``). Every slot length must be a multiple of ``2·CP``."""
    _check_rank(cp_rank, cp_size)
    cu = int_list(cu_seqlens_padded)
    if cp_size == 1:  # no split: every token, in order
        return torch.arange(cu[-1] if cu else 0, device=device)
    first, second = chunk_ids(cp_rank, cp_size)
    pieces = []
    for start, end in zip(cu[:-1], cu[1:]):
        slot = end - start
        if slot < 0 or slot % (2 * cp_size):
            raise ValueError(
                f"each document slot must be a non-negative multiple of 2*CP = {2 * cp_size} "
                f"tokens (pad it with padding_multiple()), got a slot of {slot} in "
                f"cu_seqlens_padded={cu}")
        chunk = slot // (2 * cp_size)
        pieces.append(torch.arange(start + first * chunk, start + (first + 1) * chunk))
        pieces.append(torch.arange(start + second * chunk, start + (second + 1) * chunk))
    index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return index.to(device=device, dtype=torch.long)


def thd_gather_order(cu_seqlens_padded: Sequence[int] | torch.Tensor, cp_size: int,
                     device=None) -> torch.Tensor:
    """The permutation that turns the rank-major concatenation of every rank's local tokens
    (what an all-gather returns) back into the packed row's order:
    ``packed = gathered[thd_gather_order(...)]``."""
    forward = torch.cat([thd_local_index(cu_seqlens_padded, r, cp_size)
                         for r in range(cp_size)])
    inverse = torch.empty_like(forward)
    inverse[forward] = torch.arange(forward.numel())
    return inverse.to(device=device)


def local_positions(seq_len: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """Global positions ``[S/CP]`` of the tokens CP rank ``cp_rank`` holds of a padded sequence
    of length ``seq_len`` — its position ids (megatron's RoPE uses the same positions)."""
    check_sequence_length(seq_len, cp_size)
    return thd_local_index([0, seq_len], cp_rank, cp_size, device)


def gather_order(seq_len: int, cp_size: int, device=None) -> torch.Tensor:
    """``thd_gather_order`` of a padded sequence of length ``seq_len``."""
    check_sequence_length(seq_len, cp_size)
    return thd_gather_order([0, seq_len], cp_size, device)


def check_sequence_length(seq_len: int, cp_size: int, multiple: Optional[int] = None) -> None:
    """Raise when ``seq_len`` is not a multiple of ``multiple`` (default ``padding_multiple``)."""
    multiple = multiple or padding_multiple(cp_size)
    if seq_len % multiple:
        raise ValueError(
            f"model.context_parallel_size={cp_size}: the sequence length {seq_len} must be a "
            f"multiple of {multiple} (2 x CP chunks, x TP under sequence parallelism); pad it "
            f"to {padded_length(seq_len, multiple)} (parallel.context.padding_multiple)")


def int_list(values) -> list[int]:
    if isinstance(values, torch.Tensor):
        return [int(v) for v in values.tolist()]
    return [int(v) for v in values]


# --------------------------------------------------------------------------- split / gather


def split_for_rank(x: torch.Tensor, cp_rank: int, cp_size: int, seq_dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of a padded tensor along ``seq_dim`` (``[b, S]`` → ``[b, S/CP]``
    with ``seq_dim=1``; ``[S, b, ...]`` with ``seq_dim=0``)."""
    index = local_positions(x.shape[seq_dim], cp_rank, cp_size, x.device)
    return x.index_select(seq_dim, index)


def split_thd_for_rank(x: torch.Tensor, cu_seqlens_padded, cp_rank: int, cp_size: int,
                       seq_dim: int = 1) -> torch.Tensor:
    """This rank's tokens of a packed tensor (``[1, T]`` ids with ``seq_dim=1``)."""
    total = int_list(cu_seqlens_padded)[-1]
    if x.shape[seq_dim] != total:
        raise ValueError(f"packed tensor has {x.shape[seq_dim]} tokens along dim {seq_dim}, "
                         f"cu_seqlens_padded ends at {total}")
    return x.index_select(seq_dim, thd_local_index(cu_seqlens_padded, cp_rank, cp_size,
                                                   x.device))


@torch.no_grad()
def gather_from_ranks(local: torch.Tensor, cp_group, seq_dim: int = 1) -> torch.Tensor:
    """Inverse of ``split_for_rank``: all-gather every rank's chunks over ``cp_group`` and put
    them back in sequence order (one collective). Returns a tensor without autograd history
    (for log-prob passes; training keeps per-token values local)."""
    cp_size = dist.get_world_size(cp_group)
    gathered = _all_gather_dim(local, cp_group, seq_dim, cp_size)
    order = gather_order(gathered.shape[seq_dim], cp_size, local.device)
    return gathered.index_select(seq_dim, order)


@torch.no_grad()
def gather_thd_from_ranks(local: torch.Tensor, cu_seqlens_padded, cp_group,
                          seq_dim: int = 1) -> torch.Tensor:
    """Inverse of ``split_thd_for_rank`` (one all-gather, no autograd history)."""
    cp_size = dist.get_world_size(cp_group)
    gathered = _all_gather_dim(local, cp_group, seq_dim, cp_size)
    order = thd_gather_order(cu_seqlens_padded, cp_size, local.device)
    return gathered.index_select(seq_dim, order)


def _all_gather_dim(local: torch.Tensor, group, dim: int, size: int) -> torch.Tensor:
    """All-gather along ``dim`` (rank-major), through one ``all_gather_into_tensor``."""
    if size == 1:
        return local
    moved = local.movedim(dim, 0).contiguous()
    out = moved.new_empty((size * moved.shape[0], *moved.shape[1:]))
    dist.all_gather_into_tensor(out, moved, group=group)
    return out.movedim(0, dim)


# --------------------------------------------------------------------------- THD layout


@dataclass
class ThdCpLayout:
    """One packed row under CP, as megatron's THD CP path expects it.

    ``cu_seqlens`` / ``cu_seqlens_padded`` are global (what ``PackedSeqParams`` holds);
    ``local_cu_seqlens_padded`` (= ``cu_seqlens_padded // CP``) are this rank's document
    boundaries; ``index`` are the global packed positions of this rank's tokens (split the
    ids, targets and masks with it); ``positions`` the position of each of them inside its
    own document (position ids)."""

    cu_seqlens: torch.Tensor  # [n+1] int32, global, real lengths
    cu_seqlens_padded: torch.Tensor  # [n+1] int32, global, slots
    local_cu_seqlens_padded: torch.Tensor  # [n+1] int32, this rank
    index: torch.Tensor  # [T/CP] long
    positions: torch.Tensor  # [T/CP] long
    max_seqlen: int  # longest slot (global), for PackedSeqParams.max_seqlen_q/kv


def thd_layout(lengths: Sequence[int], cp_rank: int, cp_size: int, multiple: int,
               device=None) -> ThdCpLayout:
    """The THD CP layout of documents of real ``lengths``, each slot padded to ``multiple``
    (a multiple of ``2·CP``, see ``padding_multiple``)."""
    if multiple % padding_multiple(cp_size):
        raise ValueError(f"multiple {multiple} must be a multiple of padding_multiple(CP) = "
                         f"{padding_multiple(cp_size)}")
    slots = [padded_length(n, multiple) for n in lengths]
    cu = [0]
    cu_padded = [0]
    for n, slot in zip(lengths, slots):
        cu.append(cu[-1] + int(n))
        cu_padded.append(cu_padded[-1] + slot)
    index = thd_local_index(cu_padded, cp_rank, cp_size)
    starts = torch.tensor(cu_padded[:-1], dtype=torch.long)
    doc = torch.searchsorted(torch.tensor(cu_padded[1:]), index, right=True)
    as_int = dict(dtype=torch.int32, device=device)
    return ThdCpLayout(
        cu_seqlens=torch.tensor(cu, **as_int),
        cu_seqlens_padded=torch.tensor(cu_padded, **as_int),
        local_cu_seqlens_padded=torch.tensor([c // cp_size for c in cu_padded], **as_int),
        index=index.to(device),
        positions=(index - starts[doc]).to(device),
        max_seqlen=max(slots, default=0),
    )


# --------------------------------------------------------------------------- RoPE


def rope_for_rank(pos_emb: torch.Tensor, seq_dim: int, cp_group) -> torch.Tensor:
    """This rank's rows of a full-length RoPE table (same result as megatron-core 0.16's
    ``get_pos_emb_on_this_cp_rank``, which allocates with ``pin_memory=True`` and so fails on a
    machine without CUDA); ``parallel/cpu_mode.py`` can install it in CPU mode."""
    cp_size = dist.get_world_size(cp_group)
    cp_rank = dist.get_rank(cp_group)
    return split_for_rank(pos_emb, cp_rank, cp_size, seq_dim)
