"""Model architecture description (Llama-3.x / Qwen2.5 family) and its Megatron config.

``ModelArch`` says *what* the network is (sizes, RoPE, norms, biases, tying) independent
of how it is laid out on devices; ``ParallelLayout`` and ``Precision`` say *how* it runs.
``to_transformer_config`` turns the three into a megatron-core ``TransformerConfig``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F

SUPPORTED_FAMILIES = ("llama", "qwen2")


@dataclass
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (``rope_type: llama3`` in HF configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelArch:
    """A decoder-only transformer of the Llama/Qwen2 family."""

    family: str = "qwen2"
    vocab_size: int = 64
    hidden_size: int = 128
    ffn_hidden_size: int = 256
    num_layers: int = 2
    num_attention_heads: int = 2
    num_query_groups: int = 2  # key/value heads (GQA when < num_attention_heads)
    kv_channels: Optional[int] = None  # head dim; default hidden_size // heads
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rms_norm_eps: float = 1e-6
    qkv_bias: Optional[bool] = None  # default: True for qwen2 (always biased), False for llama
    tie_word_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.qkv_bias is None:
            self.qkv_bias = self.family == "qwen2"

    @property
    def head_dim(self) -> int:
        return int(self.kv_channels)

    def padded_vocab_size(self, tensor_parallel_size: int) -> int:
        """Vocab rounded up to a multiple of ``make_vocab_size_divisible_by * TP`` (Megatron)."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self) -> int:
        """Parameter count without vocab padding (embeddings counted once when tied)."""
        h, f, hd = self.hidden_size, self.ffn_hidden_size, self.head_dim
        q, kv = self.num_attention_heads * hd, self.num_query_groups * hd
        attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        mlp = 3 * h * f
        per_layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


@dataclass
class ParallelLayout:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1


@dataclass
class Precision:
    """``params`` is the compute dtype; ``fp8`` needs Transformer Engine."""

    params: str = "fp32"  # fp32 | bf16 | fp16
    fp8: Optional[str] = None  # None | hybrid | e4m3
    fp8_recipe: str = "delayed"  # delayed | tensorwise | mxfp8 | blockwise (TE >= 2)
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.params]


def to_transformer_config(
    arch: ModelArch, layout: ParallelLayout, precision: Precision, **overrides: Any
):
    """Build the megatron-core ``TransformerConfig`` for this model, layout and precision."""
    from megatron.core.transformer import TransformerConfig

    dtype = precision.torch_dtype
    kwargs: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        init_method_std=arch.init_std,
        perform_initialization=False,  # lens_megatron.models.init does it, layout-independently
        use_cpu_initialization=not torch.cuda.is_available(),
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.params == "bf16",
        fp16=precision.params == "fp16",
        # Under PP every micro-batch of one call has the same width, so p2p shapes are
        # fixed (megatron's variable_seq_lengths is tied to MoE dispatchers in 0.16).
        deallocate_pipeline_outputs=False,
        # gloo matches point-to-point messages between one pair of ranks by posting order;
        # with PP=2 both neighbours are the same rank and megatron's *batched* p2p ops swap
        # the forward and backward tensors in the interleaved (VPP) steady state. The
        # unbatched path orders sends/receives by rank parity and is exact on gloo.
        batch_p2p_comm=torch.cuda.is_available(),
    )
    if precision.fp8:
        kwargs.update(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama-3 RoPE frequency scaling (same formula as HF ``_compute_llama3_parameters``)."""
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    """The RoPE inverse frequencies (fp32) for this architecture, scaling applied."""
    dim = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if arch.rope_scaling is not None:
        inv_freq = llama3_scaled_inv_freq(inv_freq, arch.rope_scaling)
    return inv_freq

