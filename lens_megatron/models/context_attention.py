"""Causal attention under context parallelism for the local (SDPA) layer spec.

Each CP rank holds the queries, keys and values of its two load-balanced chunks
(``parallel/context.py``). Keys and values are all-gathered over the CP group (Llama-3 style:
K and V packed into one tensor, one collective), put back in sequence order, and each local
query chunk attends to the keys at global positions up to its own (chunk ``c`` of length ``L``
sees keys ``[0, (c+1)·L)``, bottom-right causal). The backward of the gather is a
reduce-scatter: every rank computed gradients for all keys/values from its own queries, and the
owner of a token receives their sum. dQ stays local. Both collectives run on gloo (torch >= 2.13:
``all_gather_into_tensor`` and ``reduce_scatter_tensor``), so CP runs on CPU.

Work per rank is balanced: rank ``r``'s chunks see ``(r+1)·L`` and ``(2·CP−r)·L`` keys, together
``(2·CP+1)·L`` on every rank. Memory: the gathered K/V of the whole sequence live on every rank
(``2 · S · groups · head_dim`` per layer), the attention scores only for the local queries.

Packed (THD) input: per document slot the same two-chunk attention, with the slot's own keys
(``cu_seqlens_padded``, global, as megatron's ``PackedSeqParams`` holds it); tokens past a
document's real length (slot padding) get a zero output, as in the CP=1 packed attention.

Grouped-query attention (``groups < heads``) runs without repeating K/V (SDPA ``enable_gqa``),
so only ``groups`` heads travel.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from ..parallel.context import int_list, chunk_ids, thd_gather_order


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over ``group`` (rank-major); backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        size = dist.get_world_size(group)
        local = local.contiguous()
        out = local.new_empty((size * local.shape[0], *local.shape[1:]))
        dist.all_gather_into_tensor(out, local, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        size = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def gather_sequence(local: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather along dim 0 (backward: reduce-scatter of the gradient)."""
    if dist.get_world_size(group) == 1:
        return local
    return _GatherSequence.apply(local, group)


def _gather_kv(key: torch.Tensor, value: torch.Tensor, group, order: torch.Tensor):
    """K and V of the whole sequence (dim 0), in sequence order, through one collective."""
    split = key.shape[-1]
    packed = torch.cat([key, value], dim=-1)
    full = gather_sequence(packed, group).index_select(0, order)
    return full[..., :split], full[..., split:]


def _chunk_attention(q, k, v, key_offset: int, scale, dropout_p: float, gqa: bool):
    """``q [b, h, L, d]`` at global positions ``key_offset + i`` against keys ``[b, g, K, d]``
    at positions ``0..K-1`` (``K = key_offset + L``), causal (bottom-right)."""
    rows = torch.arange(q.shape[2], device=q.device).unsqueeze(1)
    cols = torch.arange(k.shape[2], device=q.device).unsqueeze(0)
    keep = cols <= rows + key_offset
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p,
                                          scale=scale, enable_gqa=gqa)


def _two_chunk_attention(query, key_full, value_full, cp_rank: int, cp_size: int,
                         scale, dropout_p: float):
    """``query [n, b, h, d]`` (this rank's two chunks of a sequence of ``n·CP`` tokens) against
    that sequence's keys/values ``[n·CP, b, g, d]`` in sequence order. Returns ``[n, b, h, d]``."""
    n = query.shape[0]
    if n == 0:
        return query.new_zeros(query.shape)
    chunk = n // 2
    gqa = key_full.shape[2] != query.shape[2]
    k = key_full.permute(1, 2, 0, 3)  # [b, g, S, d]
    v = value_full.permute(1, 2, 0, 3)
    outs = []
    for j, c in enumerate(chunk_ids(cp_rank, cp_size)):
        q = query[j * chunk:(j + 1) * chunk].permute(1, 2, 0, 3)
        end = (c + 1) * chunk
        out = _chunk_attention(q, k[:, :, :end], v[:, :, :end], c * chunk, scale, dropout_p, gqa)
        outs.append(out.permute(2, 0, 1, 3))
    return torch.cat(outs, dim=0)


def context_parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               cp_group, softmax_scale: Optional[float] = None,
                               dropout_p: float = 0.0) -> torch.Tensor:
    """Causal self-attention of a padded batch under CP.

    ``query [s, b, heads, d]``, ``key``/``value [s, b, groups, d]``: this rank's two chunks
    (``s = S/CP``). Returns ``[s, b, heads·d]`` — the same rows a CP=1 causal attention over the
    whole sequence gives for this rank's positions."""
    cp_size, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    s = query.shape[0]
    if s % 2:
        raise ValueError(f"a CP rank holds two equal chunks; got {s} local tokens")
    order = _sequence_order(s * cp_size, cp_size, query.device)
    key_full, value_full = _gather_kv(key, value, cp_group, order)
    out = _two_chunk_attention(query, key_full, value_full, cp_rank, cp_size, softmax_scale,
                               dropout_p)
    return out.reshape(s, query.shape[1], -1)


def context_parallel_thd_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                   cp_group, cu_seqlens, cu_seqlens_padded,
                                   softmax_scale: Optional[float] = None,
                                   dropout_p: float = 0.0) -> torch.Tensor:
    """Per-document causal attention of one packed row under CP.

    ``query [t, heads, d]``, ``key``/``value [t, groups, d]``: this rank's tokens
    (``t = T/CP``, TE's THD partition); ``cu_seqlens``/``cu_seqlens_padded`` global. Returns
    ``[t, heads·d]``; slot padding rows are zero."""
    cp_size, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    cu, cu_padded = int_list(cu_seqlens), int_list(cu_seqlens_padded)
    order = thd_gather_order(cu_padded, cp_size, query.device)
    key_full, value_full = _gather_kv(key, value, cp_group, order)
    outs = []
    for i in range(len(cu_padded) - 1):
        start, end = cu_padded[i], cu_padded[i + 1]
        local = slice(start // cp_size, end // cp_size)
        out = _two_chunk_attention(query[local].unsqueeze(1), key_full[start:end].unsqueeze(1),
                                   value_full[start:end].unsqueeze(1), cp_rank, cp_size,
                                   softmax_scale, dropout_p).squeeze(1)
        outs.append(out * _real_rows(cu[i + 1] - cu[i], end - start, cp_rank, cp_size, out))
    out = torch.cat(outs) if outs else query.new_zeros(query.shape)
    return out.reshape(query.shape[0], -1)


def _real_rows(length: int, slot: int, cp_rank: int, cp_size: int, like) -> torch.Tensor:
    """``[n, 1, 1]`` 1/0: which of this rank's rows of a slot are real tokens (not padding)."""
    chunk = slot // (2 * cp_size)
    positions = torch.cat([torch.arange(c * chunk, (c + 1) * chunk)
                           for c in chunk_ids(cp_rank, cp_size)])
    return (positions < length).to(device=like.device, dtype=like.dtype).view(-1, 1, 1)


_ORDER_CACHE: dict = {}


def _sequence_order(seq_len: int, cp_size: int, device) -> torch.Tensor:
    """``gather_order`` of a padded sequence, cached (every layer of a step asks the same)."""
    from ..parallel.context import gather_order

    key = (seq_len, cp_size, str(device))
    if key not in _ORDER_CACHE:
        if len(_ORDER_CACHE) > 64:
            _ORDER_CACHE.clear()
        _ORDER_CACHE[key] = gather_order(seq_len, cp_size, device)
    return _ORDER_CACHE[key]


class ContextParallelSDPAttention(MegatronModule):
    """Core attention for the local spec under CP, with megatron's ``DotProductAttention``
    constructor/forward contract (``[s, b, heads, d]`` in, ``[s, b, heads·d]`` out; THD
    ``[t, heads, d]`` with ``PackedSeqParams``). The CP group is resolved once, here: from
    ``pg_collection.cp`` when megatron passes it, else megatron's context-parallel group."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        if group is None:
            from megatron.core import parallel_state

            group = parallel_state.get_context_parallel_group()
        self.cp_group = group
        self.softmax_scale = softmax_scale
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None or attention_mask is not None:
            raise NotImplementedError(
                "context-parallel SDPA attention is causal self-attention only: no attention "
                "mask (left-padded prompts) and no attention bias")
        dropout = self.dropout_p if self.training else 0.0
        if packed_seq_params is None:
            return context_parallel_attention(query, key, value, self.cp_group,
                                              self.softmax_scale, dropout)
        p = packed_seq_params
        if p.qkv_format != "thd":
            raise NotImplementedError(
                f"packed sequences need qkv_format='thd', got {p.qkv_format!r}")
        if query.dim() == 4:
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        padded = p.cu_seqlens_q_padded if p.cu_seqlens_q_padded is not None else p.cu_seqlens_q
        return context_parallel_thd_attention(query, key, value, self.cp_group, p.cu_seqlens_q,
                                              padded, self.softmax_scale, dropout)
