"""Layer specs: Transformer Engine when importable, otherwise megatron-core local modules
with torch SDPA core attention (runs on CPU and GPU, no fused CUDA kernels needed)."""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from .packed_attention import packed_causal_attention, plan_buckets, segment_layout

TE_INSTALL_HINT = (
    "Transformer Engine is not installed. Install it on a CUDA machine with "
    "`pip install -e .[gpu]` (transformer-engine[pytorch]), or set model.fp8: null and "
    "model.transformer_impl: local."
)


def transformer_engine_available() -> bool:
    """True when ``transformer_engine.pytorch`` can be imported (checked without importing)."""
    return importlib.util.find_spec("transformer_engine") is not None


class SDPACoreAttention(MegatronModule):
    """Core attention over ``torch.nn.functional.scaled_dot_product_attention``.

    Same constructor/forward contract as megatron's ``DotProductAttention``; inputs are
    ``[s, b, heads, head_dim]`` (keys/values with ``num_query_groups`` heads; grouped-query
    attention runs without repeating K/V, ``enable_gqa``) and the output is
    ``[s_q, b, heads * head_dim]`` for this tensor-parallel rank.

    - ``s_q == s_k`` and no ``attention_mask``: SDPA's causal fast path (``is_causal=True``, no
      mask tensor), so flash / memory-efficient kernels can be picked.
    - otherwise causal masking is bottom-right aligned, so a query block that continues a KV
      cache (decode) attends to every cached key (SDPA's own ``is_causal`` aligns top-left,
      see DESIGN.md §7a); ``attention_mask`` (bool, True = masked out, broadcastable to
      ``[b, 1, s_q, s_k]``, used for left-padded prompts) is combined with it.
    - ``packed_seq_params`` with ``qkv_format="thd"``: megatron hands ``[T, heads, head_dim]``
      (batch squeezed) for one packed row; attention is causal within each document of
      ``cu_seqlens_q`` (offsets from ``cu_seqlens_q_padded`` when given), see
      ``models/packed_attention.py``; the output is ``[T, heads * head_dim]``.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        # Context parallelism: all-gather K/V over the CP group (models/context_attention.py).
        self.cp_attention = None
        if config.context_parallel_size != 1:
            from .context_attention import ContextParallelSDPAttention

            self.cp_attention = ContextParallelSDPAttention(
                config, layer_number, attn_mask_type, attention_type,
                attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        tp_size = config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp_size
        self.groups = config.num_query_groups // tp_size
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale
        self.dropout_p = (config.attention_dropout if attention_dropout is None
                          else attention_dropout)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if self.cp_attention is not None:
            return self.cp_attention(query, key, value, attention_mask, attn_mask_type,
                                     attention_bias, packed_seq_params)
        if attention_bias is not None:
            raise NotImplementedError("SDPA core attention: no attention bias")
        dropout = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None:
            return self._packed(query, key, value, packed_seq_params, dropout)
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # [b, h, sq, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        causal = sq == sk and attention_mask is None
        mask = None
        if not causal:
            mask = _causal_keep_mask(sq, sk, q.device)
            if attention_mask is not None:
                keep = ~attention_mask.to(torch.bool)
                mask = keep if mask is None else (keep & mask)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
            scale=self.softmax_scale, enable_gqa=self.groups != self.heads,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)

    def _packed(self, query, key, value, params, dropout):
        if params.qkv_format != "thd":
            raise NotImplementedError(
                "SDPA core attention: packed sequences need qkv_format='thd', got "
                f"{params.qkv_format!r}")
        if query.dim() == 4:  # [T, 1, h, d] if a caller did not squeeze the batch
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        starts, lengths, buckets = _thd_layout(params, self.heads)
        out = packed_causal_attention(query, key, value, starts, lengths, self.softmax_scale,
                                      dropout, buckets=buckets)
        return out.reshape(query.shape[0], self.heads * self.head_dim)


def _thd_layout(params, heads: int):
    """Documents (starts, lengths) and the bucket plan of a ``PackedSeqParams``, computed once
    per packed micro-batch and kept on the params object (every layer sees the same one; the
    cache holds the boundary tensors themselves and their versions, so a replaced or edited
    tensor is noticed)."""
    tensors = (params.cu_seqlens_q, params.cu_seqlens_q_padded, params.cu_seqlens_kv,
               params.cu_seqlens_kv_padded)
    versions = tuple(None if t is None else t._version for t in tensors)
    cached = getattr(params, "_lens_sdpa_layout", None)
    if cached is not None and cached[2] == (versions, heads) and \
            all(a is b for a, b in zip(cached[0], tensors)):
        return cached[1]
    cu_q = params.cu_seqlens_q.tolist()
    if params.cu_seqlens_kv is not None and params.cu_seqlens_kv.tolist() != cu_q:
        raise NotImplementedError("SDPA core attention: packed self-attention needs "
                                  "cu_seqlens_kv == cu_seqlens_q")
    padded = None if params.cu_seqlens_q_padded is None else params.cu_seqlens_q_padded.tolist()
    starts, lengths = segment_layout(cu_q, padded)
    layout = (starts, lengths, plan_buckets(lengths, heads))
    params._lens_sdpa_layout = (tensors, layout, (versions, heads))
    return layout


def _causal_keep_mask(sq: int, sk: int, device) -> Optional[torch.Tensor]:
    """Bottom-right aligned causal mask (True = attend), None when every key is visible."""
    if sq == 1:
        return None
    offset = sk - sq
    rows = torch.arange(sq, device=device).unsqueeze(1)
    cols = torch.arange(sk, device=device).unsqueeze(0)
    return cols <= rows + offset


class LocalRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm with megatron's constructor and sequence-parallel grad marking.

    megatron's ``WrappedTorchNorm`` refuses sequence parallelism; the norm itself is
    per-token, so it only needs its weight grad all-reduced across TP, which megatron does
    for parameters flagged ``sequence_parallel``.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))


def local_layer_spec():
    """megatron-core local modules + SDPA attention + our RMSNorm."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    spec.submodules.input_layernorm = LocalRMSNorm
    spec.submodules.pre_mlp_layernorm = LocalRMSNorm
    return spec


def transformer_engine_layer_spec():
    """megatron-core's Transformer Engine spec (fused norm+linear, TE attention, FP8)."""
    if not transformer_engine_available():
        raise RuntimeError(TE_INSTALL_HINT)
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_with_transformer_engine_spec,
    )

    return get_gpt_layer_with_transformer_engine_spec()


def resolve_transformer_impl(requested: str) -> str:
    """``auto`` -> ``transformer_engine`` when TE is importable and a GPU exists, else ``local``."""
    if requested == "auto":
        usable = transformer_engine_available() and torch.cuda.is_available()
        return "transformer_engine" if usable else "local"
    return requested


def layer_spec_for(transformer_impl: str):
    impl = resolve_transformer_impl(transformer_impl)
    if impl == "transformer_engine":
        return transformer_engine_layer_spec()
    if impl == "local":
        return local_layer_spec()
    raise ValueError(f"model.transformer_impl must be auto|local|transformer_engine, got {impl!r}")
