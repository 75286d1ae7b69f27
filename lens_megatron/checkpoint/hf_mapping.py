"""Hugging Face Llama-3.x / Qwen2.5 <-> lens-megatron: configs, tensor names and layouts.

Two small tables drive everything: ``GLOBAL_RULES`` and ``LAYER_RULES`` say which HF tensors
make up each *canonical* Megatron parameter (local-spec name, global layer index — see
``lens_megatron.models.sharding``) and how they are fused:

- ``copy``:  the same tensor (norms, attention output projection, fc2).
- ``vocab``: the same rows; Megatron's copy has extra zero rows up to the padded vocab size.
- ``qkv``:   ``linear_qkv`` = per-KV-group interleaving: for each KV group g its
  ``heads/groups`` query heads, then k_g, then v_g, ``head_dim`` rows each (bias alike).
- ``gated``: ``linear_fc1`` = ``[gate; up]``.

``hf_to_canonical`` places one HF tensor into its canonical parameter and
``canonical_to_hf`` / ``megatron_to_hf_tensors`` split canonical tensors back into HF ones,
one tensor at a time (the weight sync to the rollout engine streams through them).
Transformer Engine names (``linear_qkv.layer_norm_weight`` ...) are accepted wherever a
canonical name is.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch

from ..models.arch import ModelArch, RopeScaling
from ..models.sharding import canonical_name as normalize_canonical_name

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
HF_ARCHITECTURE_OF_FAMILY = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}
# HF tensors that carry no parameters of ours (old checkpoints store RoPE buffers).
IGNORED_HF_TENSOR_RE = re.compile(r".*\.rotary_emb\.inv_freq$")


class UnsupportedModelError(ValueError):
    """The HF model uses an architecture or feature this converter does not handle."""


# (canonical name, HF names, fusion). Layer rules use "{i}" for the global layer index.
GLOBAL_RULES = (
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab"),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    ("output_layer.weight", ("lm_head.weight",), "vocab"),  # untied embeddings only
)
LAYER_RULES = (
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
    ("self_attention.linear_qkv.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    ("self_attention.linear_qkv.bias",  # qkv_bias (Qwen2) only
     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gated"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
)
_CANONICAL_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class TensorRule:
    """One canonical parameter and the HF tensors it is fused from."""

    canonical: str
    hf_names: tuple[str, ...]
    fusion: str  # copy | vocab | qkv | gated


def _rule_applies(canonical: str, arch: ModelArch) -> bool:
    if canonical.endswith("linear_qkv.bias"):
        return arch.qkv_bias
    if canonical == "output_layer.weight":
        return not arch.tie_word_embeddings
    return True


def tensor_rules(arch: ModelArch) -> list[TensorRule]:
    """Every canonical parameter of ``arch`` in model order, with its HF sources."""
    rules = [TensorRule(*GLOBAL_RULES[0])]
    for i in range(arch.num_layers):
        for suffix, hf_suffixes, fusion in LAYER_RULES:
            rules.append(TensorRule(f"decoder.layers.{i}.{suffix}",
                                    tuple(f"model.layers.{i}.{s}" for s in hf_suffixes), fusion))
    rules += [TensorRule(*rule) for rule in GLOBAL_RULES[1:]]
    return [r for r in rules if _rule_applies(r.canonical, arch)]


def rule_for_canonical(name: str, arch: ModelArch) -> TensorRule:
    """The rule of a canonical (or Transformer Engine) parameter name."""
    name = normalize_canonical_name(name, 0, arch.tie_word_embeddings)
    for canonical, hf_names, fusion in GLOBAL_RULES:
        if name == canonical and _rule_applies(name, arch):
            return TensorRule(canonical, hf_names, fusion)
    match = _CANONICAL_LAYER_RE.match(name)
    if match and int(match.group(1)) < arch.num_layers and _rule_applies(name, arch):
        i = match.group(1)
        for suffix, hf_suffixes, fusion in LAYER_RULES:
            if match.group(2) == suffix:
                return TensorRule(name, tuple(f"model.layers.{i}.{s}" for s in hf_suffixes),
                                  fusion)
    raise KeyError(f"no Hugging Face mapping for Megatron parameter {name!r} of this model")


def rule_for_hf(hf_name: str, arch: ModelArch) -> tuple[TensorRule, int]:
    """The rule an HF tensor belongs to and its position among the rule's HF names."""
    match = _HF_LAYER_RE.match(hf_name)
    if match and int(match.group(1)) < arch.num_layers:
        for suffix, hf_suffixes, _ in LAYER_RULES:
            if match.group(2) in hf_suffixes:
                rule = rule_for_canonical(f"decoder.layers.{match.group(1)}.{suffix}", arch)
                return rule, rule.hf_names.index(hf_name)
    for canonical, hf_names, _ in GLOBAL_RULES:
        if hf_name in hf_names and _rule_applies(canonical, arch):
            return rule_for_canonical(canonical, arch), hf_names.index(hf_name)
    raise KeyError(f"HF tensor {hf_name!r} has no place in a {arch.family} model of this shape")


# ---------------------------------------------------------------- shapes and views

def canonical_shape(name: str, arch: ModelArch, padded_vocab_size: Optional[int] = None
                    ) -> tuple[int, ...]:
    """Full (unsharded) shape of a canonical parameter; vocab rows padded when asked."""
    rule = rule_for_canonical(name, arch)
    h, hd = arch.hidden_size, arch.head_dim
    if rule.fusion == "vocab":
        return (padded_vocab_size or arch.vocab_size, h)
    if rule.fusion == "qkv":
        rows = (arch.num_attention_heads + 2 * arch.num_query_groups) * hd
        return (rows,) if rule.canonical.endswith(".bias") else (rows, h)
    if rule.fusion == "gated":
        return (2 * arch.ffn_hidden_size, h)
    if rule.canonical.endswith("linear_proj.weight"):
        return (h, arch.num_attention_heads * hd)
    if rule.canonical.endswith("linear_fc2.weight"):
        return (h, arch.ffn_hidden_size)
    return (h,)  # norms


def _part_view(full: torch.Tensor, rule: TensorRule, part: int, arch: ModelArch) -> torch.Tensor:
    """The view of the canonical tensor ``full`` that HF tensor number ``part`` occupies."""
    if rule.fusion == "copy":
        return full
    if rule.fusion == "vocab":
        return full[: arch.vocab_size]
    if rule.fusion == "gated":
        return full.view(2, arch.ffn_hidden_size, *full.shape[1:])[part]
    groups = arch.num_query_groups
    per_group = arch.num_attention_heads // groups
    grouped = full.view(groups, per_group + 2, arch.head_dim, *full.shape[1:])
    return grouped[:, :per_group] if part == 0 else grouped[:, per_group + part - 1]


def hf_tensor_shape(hf_name: str, arch: ModelArch) -> tuple[int, ...]:
    """The shape an HF tensor must have for this architecture."""
    rule, part = rule_for_hf(hf_name, arch)
    meta = torch.empty(canonical_shape(rule.canonical, arch), device="meta")
    view = _part_view(meta, rule, part, arch)
    if rule.fusion == "qkv":  # [groups, heads_per_group?, head_dim, ...] -> [rows, ...]
        rest = tuple(meta.shape[1:])
        return (view.numel() // max(1, _prod(rest)), *rest)
    return tuple(view.shape)


def _prod(values: Iterable[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def expected_hf_tensors(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of ``arch`` with its shape, in model order."""
    return {hf: hf_tensor_shape(hf, arch) for rule in tensor_rules(arch) for hf in rule.hf_names}


@dataclass(frozen=True)
class CanonicalPart:
    """One HF tensor and where it goes inside its canonical Megatron parameter."""

    name: str  # canonical parameter
    rule: TensorRule
    part: int  # index into rule.hf_names
    tensor: torch.Tensor
    arch: ModelArch

    def write_into(self, full: torch.Tensor) -> None:
        """Copy the HF tensor into its rows of the full canonical tensor (casts dtype)."""
        view = _part_view(full, self.rule, self.part, self.arch)
        view.copy_(self.tensor.reshape(view.shape))


def hf_to_canonical(hf_name: str, tensor: torch.Tensor, arch: ModelArch) -> CanonicalPart:
    """Inverse of ``canonical_to_hf`` for one HF tensor (shape-checked)."""
    rule, part = rule_for_hf(hf_name, arch)
    expected = hf_tensor_shape(hf_name, arch)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"HF tensor {hf_name!r} has shape {tuple(tensor.shape)}, but the "
                         f"config implies {expected}")
    return CanonicalPart(rule.canonical, rule, part, tensor, arch)


def assemble_canonical(name: str, read_hf: Callable[[str], torch.Tensor], arch: ModelArch,
                       padded_vocab_size: Optional[int] = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full canonical tensor ``name`` built from its HF tensors (padded vocab rows 0)."""
    rule = rule_for_canonical(name, arch)
    full = torch.zeros(canonical_shape(name, arch, padded_vocab_size), dtype=dtype)
    for hf_name in rule.hf_names:
        hf_to_canonical(hf_name, read_hf(hf_name), arch).write_into(full)
    return full


def canonical_to_hf(name: str, full: torch.Tensor, arch: ModelArch
                    ) -> list[tuple[str, torch.Tensor]]:
    """Split one full canonical tensor (vocab rows padded or not) into its HF tensors."""
    rule = rule_for_canonical(name, arch)
    expected = canonical_shape(name, arch, padded_vocab_size=full.shape[0])
    if tuple(full.shape) != expected or (rule.fusion == "vocab"
                                         and full.shape[0] < arch.vocab_size):
        raise ValueError(f"Megatron tensor {name!r} has shape {tuple(full.shape)}, expected "
                         f"{canonical_shape(name, arch)} (vocab rows may be padded)")
    out = []
    for part, hf_name in enumerate(rule.hf_names):
        view = _part_view(full, rule, part, arch)
        out.append((hf_name, view.reshape(hf_tensor_shape(hf_name, arch)).contiguous()))
    return out


def megatron_to_hf_tensors(named_full_tensors: Iterable[tuple[str, torch.Tensor]],
                           arch: ModelArch) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(canonical_name, full_tensor)`` pairs (``iter_full_parameters``) as HF pairs."""
    for name, full in named_full_tensors:
        yield from canonical_to_hf(name, full, arch)


# ---------------------------------------------------------------- configs

def _rope_settings(config: Mapping[str, Any]) -> tuple[float, Optional[dict]]:
    """(rope_theta, scaling dict or None) from a transformers 4.x or 5.x config."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or None
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type") or (scaling or {}).get("rope_type") \
        or (scaling or {}).get("type") or "default"
    if rope_type == "default":
        return float(theta), None
    return float(theta), {**(scaling or {}), **params, "rope_type": rope_type}


def _check_supported(config: Mapping[str, Any], family: str) -> None:
    def refuse(feature: str) -> None:
        raise UnsupportedModelError(f"{config.get('architectures')}: {feature} is not "
                                    "supported by the lens-megatron converter")

    if config.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act={config.get('hidden_act')!r} (only silu/SwiGLU)")
    if family == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        refuse("attention_bias/mlp_bias on Llama")
    if family == "qwen2":
        if config.get("use_sliding_window"):
            refuse("sliding-window attention (use_sliding_window: true)")
        if any(t != "full_attention" for t in config.get("layer_types") or ()):
            refuse("sliding-window layers in layer_types")
    _, scaling = _rope_settings(config)
    if scaling is not None and scaling["rope_type"] != "llama3":
        refuse(f"rope scaling type {scaling['rope_type']!r} (only llama3 or none)")


def arch_from_hf_config(config: Mapping[str, Any]) -> ModelArch:
    """``ModelArch`` of an HF ``config.json`` (Llama-3.x or Qwen2/2.5); refuses anything else."""
    architectures = list(config.get("architectures") or [])
    if not architectures and config.get("model_type") in HF_ARCHITECTURE_OF_FAMILY:
        architectures = [HF_ARCHITECTURE_OF_FAMILY[config["model_type"]]]  # config never saved
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"architectures={architectures}: only {sorted(SUPPORTED_ARCHITECTURES)} are supported")
    family = SUPPORTED_ARCHITECTURES[architectures[0]]
    _check_supported(config, family)
    theta, scaling = _rope_settings(config)
    heads = int(config["num_attention_heads"])
    rope = None if scaling is None else RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    return ModelArch(
        family=family, vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]), ffn_hidden_size=int(config["intermediate_size"]),
        num_layers=int(config["num_hidden_layers"]), num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        kv_channels=int(config.get("head_dim") or config["hidden_size"] // heads),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        rope_theta=theta, rope_scaling=rope, rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        qkv_bias=family == "qwen2", tie_word_embeddings=bool(config.get("tie_word_embeddings")),
        init_std=float(config.get("initializer_range", 0.02)),
    )


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config_from_arch(arch: ModelArch, dtype: torch.dtype,
                        base: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """An HF ``config.json`` for ``arch``; ``base`` (the original config) keeps token ids etc.

    RoPE is written both the transformers 4.x way (``rope_theta``/``rope_scaling``, read by
    vLLM) and the 5.x way (``rope_parameters``); the dtype as ``torch_dtype`` and ``dtype``.
    """
    scaling = None
    if arch.rope_scaling is not None:
        s = arch.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    config = {k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "rope_scaling")}
    config.update(
        architectures=[HF_ARCHITECTURE_OF_FAMILY[arch.family]], model_type=arch.family,
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size, num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads, num_key_value_heads=arch.num_query_groups,
        head_dim=arch.head_dim, max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.rms_norm_eps, hidden_act="silu", rope_theta=arch.rope_theta,
        rope_scaling=scaling,
        rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": arch.rope_theta},
        tie_word_embeddings=arch.tie_word_embeddings, initializer_range=arch.init_std,
        torch_dtype=_DTYPE_NAMES[dtype], dtype=_DTYPE_NAMES[dtype],
    )
    if arch.family == "llama":
        config.update(attention_bias=False, mlp_bias=False)
    else:
        config.update(use_sliding_window=False, max_window_layers=arch.num_layers,
                      layer_types=["full_attention"] * arch.num_layers)
    return config
