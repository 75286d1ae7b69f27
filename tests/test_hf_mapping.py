"""HF <-> Megatron mapping without Megatron processes: configs, names, fused layouts.

The end-to-end checks (converted checkpoints give HF's logits at TP=1/TP=2/PP=2) are in
``test_conversion.py``; here each layout rule is pinned against an independent construction.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lens_megatron.checkpoint import hf_mapping
from lens_megatron.checkpoint.hf_mapping import (
    UnsupportedModelError,
    arch_from_hf_config,
    assemble_canonical,
    canonical_to_hf,
    hf_config_from_arch,
    hf_to_canonical,
    megatron_to_hf_tensors,
)
from lens_megatron.models.arch import rope_inv_freq
from lens_megatron.models.sharding import shard_of, shard_spec

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def llama_config(**overrides) -> LlamaConfig:
    kwargs = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                  rope_scaling=dict(LLAMA3_ROPE), max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def qwen2_config(**overrides) -> Qwen2Config:
    kwargs = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=512)
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def test_llama_config_maps_to_arch():
    arch = arch_from_hf_config(llama_config().to_dict())
    assert (arch.family, arch.vocab_size, arch.hidden_size, arch.ffn_hidden_size) == \
        ("llama", 300, 64, 128)
    assert (arch.num_layers, arch.num_attention_heads, arch.num_query_groups, arch.head_dim) == \
        (2, 4, 2, 16)
    assert arch.rope_theta == 500000.0 and arch.rms_norm_eps == 1e-5
    assert not arch.qkv_bias and not arch.tie_word_embeddings
    assert arch.rope_scaling.factor == 8.0 and arch.rope_scaling.high_freq_factor == 4.0
    assert arch.rope_scaling.original_max_position_embeddings == 64


def test_qwen2_config_maps_to_arch():
    arch = arch_from_hf_config(qwen2_config().to_dict())
    assert arch.family == "qwen2" and arch.qkv_bias and arch.tie_word_embeddings
    assert arch.rope_theta == 1000000.0 and arch.rope_scaling is None and arch.rms_norm_eps == 1e-6


def test_transformers_4_style_config_maps_the_same():
    """Hub configs written by transformers 4.x: rope_theta/rope_scaling ("type" key)."""
    legacy = {"architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 256, "torch_dtype": "bfloat16",
              "rope_scaling": {**{k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"},
                               "type": "llama3"}}
    assert arch_from_hf_config(legacy) == arch_from_hf_config(llama_config().to_dict())


def test_rope_frequencies_match_transformers():
    """ModelArch's RoPE (theta + llama3 scaling) reproduces HF's inv_freq."""
    for config, model_class in ((llama_config(), LlamaForCausalLM),
                                (qwen2_config(), Qwen2ForCausalLM)):
        model = model_class(config)
        ours = rope_inv_freq(arch_from_hf_config(config.to_dict()))
        torch.testing.assert_close(ours, model.model.rotary_emb.inv_freq.float(),
                                   rtol=1e-6, atol=0)


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
    (llama_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}).to_dict(), "yarn"),
    (llama_config(attention_bias=True).to_dict(), "attention_bias"),
    (qwen2_config(use_sliding_window=True, sliding_window=64).to_dict(), "sliding"),
    ({**llama_config().to_dict(), "hidden_act": "gelu"}, "gelu"),
])
def test_unsupported_models_are_refused_by_name(config, message):
    with pytest.raises(UnsupportedModelError, match=message):
        arch_from_hf_config(config)


def test_expected_tensors_match_transformers_state_dicts():
    for config in (llama_config(), qwen2_config(), qwen2_config(tie_word_embeddings=False)):
        model = (LlamaForCausalLM if isinstance(config, LlamaConfig) else Qwen2ForCausalLM)(config)
        state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight")  # save_pretrained drops the tied copy too
        assert hf_mapping.expected_hf_tensors(arch_from_hf_config(config.to_dict())) == state


def _labelled(rows: int, cols: int, start: float) -> torch.Tensor:
    """Row r holds start + r in every column (a tensor whose rows say where they came from)."""
    return (start + torch.arange(rows, dtype=torch.float32)).unsqueeze(1).expand(rows, cols) \
        .contiguous()


def test_qkv_is_interleaved_per_kv_group_with_bias_alike():
    arch = arch_from_hf_config(qwen2_config(num_attention_heads=8, num_key_value_heads=2,
                                            hidden_size=64).to_dict())
    hd, h = arch.head_dim, arch.hidden_size  # 8 heads of 8, 2 groups: 4 q heads per group
    q, k, v = _labelled(64, h, 0.0), _labelled(16, h, 1000.0), _labelled(16, h, 2000.0)
    tensors = {"model.layers.1.self_attn.q_proj.weight": q,
               "model.layers.1.self_attn.k_proj.weight": k,
               "model.layers.1.self_attn.v_proj.weight": v}
    fused = assemble_canonical("decoder.layers.1.self_attention.linear_qkv.weight",
                               tensors.__getitem__, arch)
    expected = torch.cat([torch.cat([q[g * 32:(g + 1) * 32], k[g * hd:(g + 1) * hd],
                                     v[g * hd:(g + 1) * hd]]) for g in range(2)])
    assert torch.equal(fused, expected)
    # Megatron's contiguous TP split then gives rank r exactly KV group r and its q heads.
    assert torch.equal(shard_of(fused, shard_spec("decoder.layers.1.self_attention.linear_qkv"
                                                  ".weight"), 1, 2), expected[48:])
    biases = {n.replace("weight", "bias"): t[:, 0].clone() for n, t in tensors.items()}
    fused_bias = assemble_canonical("decoder.layers.1.self_attention.linear_qkv.bias",
                                    biases.__getitem__, arch)
    assert torch.equal(fused_bias, expected[:, 0])
    assert dict(canonical_to_hf("decoder.layers.1.self_attention.linear_qkv.bias", fused_bias,
                                arch)).keys() == biases.keys()


def test_fc1_is_gate_then_up_and_vocab_rows_are_padded_with_zeros():
    arch = arch_from_hf_config(llama_config().to_dict())
    gate, up = torch.randn(128, 64), torch.randn(128, 64)
    fc1 = assemble_canonical("decoder.layers.0.mlp.linear_fc1.weight",
                             {"model.layers.0.mlp.gate_proj.weight": gate,
                              "model.layers.0.mlp.up_proj.weight": up}.__getitem__, arch)
    assert torch.equal(fc1, torch.cat([gate, up]))
    embedding = torch.randn(300, 64)
    padded = assemble_canonical("embedding.word_embeddings.weight",
                                lambda name: embedding, arch, padded_vocab_size=384)
    assert padded.shape == (384, 64) and torch.equal(padded[:300], embedding)
    assert not padded[300:].any()
    (name, back), = canonical_to_hf("embedding.word_embeddings.weight", padded, arch)
    assert name == "model.embed_tokens.weight" and torch.equal(back, embedding)


def _random_hf_state(arch, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator).to(dtype)
            for name, shape in hf_mapping.expected_hf_tensors(arch).items()}


@pytest.mark.parametrize("config", [llama_config(), qwen2_config(),
                                    qwen2_config(tie_word_embeddings=False)],
                         ids=["llama-untied", "qwen2-tied", "qwen2-untied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_tensor_round_trips_bit_exactly(config, dtype):
    arch = arch_from_hf_config(config.to_dict())
    hf_state = _random_hf_state(arch, dtype=dtype)
    canonical = [(rule.canonical, assemble_canonical(rule.canonical, hf_state.__getitem__, arch,
                                                     arch.padded_vocab_size(2), dtype))
                 for rule in hf_mapping.tensor_rules(arch)]
    back = dict(megatron_to_hf_tensors(iter(canonical), arch))
    assert back.keys() == hf_state.keys()
    for name, tensor in hf_state.items():
        assert back[name].dtype == dtype and torch.equal(back[name], tensor), name


def test_single_tensor_inverse_and_clear_shape_errors():
    arch = arch_from_hf_config(llama_config().to_dict())
    k = torch.randn(32, 64)
    part = hf_to_canonical("model.layers.1.self_attn.k_proj.weight", k, arch)
    assert part.name == "decoder.layers.1.self_attention.linear_qkv.weight"
    full = torch.zeros(128, 64)
    part.write_into(full)
    assert torch.equal(full[32:48], k[:16]) and torch.equal(full[96:112], k[16:])
    with pytest.raises(ValueError, match=r"k_proj.*shape \(16, 64\).*\(32, 64\)"):
        hf_to_canonical("model.layers.1.self_attn.k_proj.weight", torch.zeros(16, 64), arch)
    with pytest.raises(KeyError, match="model.layers.7"):
        hf_to_canonical("model.layers.7.mlp.up_proj.weight", torch.zeros(128, 64), arch)


def test_transformer_engine_names_map_like_local_ones():
    arch = arch_from_hf_config(llama_config().to_dict())
    norm = torch.randn(64)
    for name in ("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight",
                 "decoder.layers.1.input_layernorm.weight"):
        assert canonical_to_hf(name, norm, arch)[0][0] == "model.layers.1.input_layernorm.weight"
    assert canonical_to_hf("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", norm, arch)[0][0] \
        == "model.layers.0.post_attention_layernorm.weight"


def test_hf_export_streams_one_tensor_at_a_time():
    arch = arch_from_hf_config(qwen2_config().to_dict())
    consumed = []

    def source():
        for rule in hf_mapping.tensor_rules(arch):
            consumed.append(rule.canonical)
            yield rule.canonical, torch.zeros(hf_mapping.canonical_shape(rule.canonical, arch))

    stream = megatron_to_hf_tensors(source(), arch)
    assert next(stream)[0] == "model.embed_tokens.weight" and len(consumed) == 1


@pytest.mark.parametrize("config", [llama_config(), qwen2_config()], ids=["llama", "qwen2"])
def test_exported_config_round_trips_through_transformers(config, tmp_path):
    import json

    arch = arch_from_hf_config(config.to_dict())
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf_config_from_arch(arch, torch.bfloat16), f)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.dtype == torch.bfloat16
    assert arch_from_hf_config(loaded.to_dict()) == arch
