"""Layer specs: Transformer Engine when importable, otherwise megatron-core local modules
with torch SDPA core attention (runs on CPU and GPU, no fused CUDA kernels needed)."""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

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
    ``[s, b, heads, head_dim]`` (keys/values with ``num_query_groups`` heads) and the output
    is ``[s_q, b, heads * head_dim]`` for this tensor-parallel rank. Causal masking is
    bottom-right aligned, so a query block that continues a KV cache (decode) attends to
    every cached key (SDPA's own ``is_causal`` aligns top-left, see DESIGN.md §7a).
    ``attention_mask`` (optional, bool, True = masked out, broadcastable to
    ``[b, 1, s_q, s_k]``) is combined with the causal mask (used for left-padded prompts).
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs the Transformer Engine layer spec")
        tp_size = config.tensor_model_parallel_size
        self.heads = config.num_attention_heads // tp_size
        self.groups = config.num_query_groups // tp_size
        self.head_dim = config.kv_channels
        self.softmax_scale = softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPA core attention: no packed sequences / attention bias")
        sq, b = query.shape[0], query.shape[1]
        sk = key.shape[0]
        q = query.permute(1, 2, 0, 3)  # [b, h, sq, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if self.groups != self.heads:
            repeat = self.heads // self.groups
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        mask = _causal_keep_mask(sq, sk, q.device)
        if attention_mask is not None:
            keep = ~attention_mask.to(torch.bool)
            mask = keep if mask is None else (keep & mask)
        dropout = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout,
            is_causal=False, scale=self.softmax_scale,
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)


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
