"""How each local Megatron parameter relates to the full (unsharded) tensor.

One table serves deterministic initialisation (the same seed gives the same network at
any TP/PP layout), checkpoint conversion (HF <-> Megatron) and the weight sync to the
rollout engine (gather full tensors from TP shards). Names are *canonical*: local-spec
parameter names with the global (not per-stage) layer index; Transformer Engine names
(``linear_qkv.layer_norm_weight`` ...) map onto them.

Layouts of the tensor-parallel dimension:
- ``replicated``: every TP rank holds the full tensor (norms).
- ``contiguous``: rank r holds chunk r along ``partition_dim`` (embeddings, output layer,
  fused QKV — whose per-KV-group interleaved rows make the chunks exactly the TP shards —,
  attention output projection, fc2).
- ``gated``: ``linear_fc1`` of a SwiGLU MLP; the full tensor is ``[gate; up]`` and rank r
  holds ``[gate_r; up_r]``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")

# Transformer Engine layer-spec names -> local-spec canonical names.
TE_TO_LOCAL_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


@dataclass(frozen=True)
class ShardSpec:
    canonical_name: str
    layout: str  # replicated | contiguous | gated
    partition_dim: int  # meaningful for contiguous / gated


def canonical_name(local_name: str, layer_offset: int, tied_output: bool) -> str:
    """Local parameter name of one model chunk -> canonical global name."""
    name = local_name
    for te_suffix, local_suffix in TE_TO_LOCAL_NAMES.items():
        if name.endswith(te_suffix):
            name = name[: -len(te_suffix)] + local_suffix
    match = _LAYER_RE.match(name)
    if match:
        global_index = int(match.group(1)) + layer_offset
        name = f"decoder.layers.{global_index}." + name[match.end():]
    if tied_output and name == "output_layer.weight":
        # The last stage's copy of a tied embedding (PP > 1) is the embedding itself.
        return "embedding.word_embeddings.weight"
    return name


def shard_spec(name: str) -> ShardSpec:
    """Tensor-parallel layout of a canonical parameter."""
    if name.endswith("layernorm.weight") or name.endswith("final_layernorm.weight"):
        return ShardSpec(name, "replicated", 0)
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return ShardSpec(name, "contiguous", 0)
    if ".self_attention.linear_qkv." in name:
        return ShardSpec(name, "contiguous", 0)
    if name.endswith("self_attention.linear_proj.weight") or name.endswith("mlp.linear_fc2.weight"):
        return ShardSpec(name, "contiguous", 1)
    if name.endswith("mlp.linear_fc1.weight"):
        return ShardSpec(name, "gated", 0)
    raise KeyError(f"no tensor-parallel layout known for parameter {name!r}")


def full_shape(spec: ShardSpec, local_shape: torch.Size, tp_size: int) -> torch.Size:
    shape = list(local_shape)
    if spec.layout != "replicated":
        shape[spec.partition_dim] *= tp_size
    return torch.Size(shape)


def shard_of(full: torch.Tensor, spec: ShardSpec, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's shard of the full tensor."""
    if spec.layout == "replicated" or tp_size == 1:
        return full
    if spec.layout == "contiguous":
        return full.chunk(tp_size, dim=spec.partition_dim)[tp_rank]
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)


def full_from_shards(shards: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """Inverse of ``shard_of`` given every rank's shard in TP-rank order."""
    if spec.layout == "replicated" or len(shards) == 1:
        return shards[0]
    if spec.layout == "contiguous":
        return torch.cat(shards, dim=spec.partition_dim)
    gates, ups = zip(*(s.chunk(2, dim=0) for s in shards))
    return torch.cat([torch.cat(gates, 0), torch.cat(ups, 0)], dim=0)


def layer_offset_of(chunk: torch.nn.Module) -> int:
    """Global index of a model chunk's first transformer layer (0 when it has none)."""
    layers = getattr(getattr(chunk, "decoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return int(layers[0].layer_number) - 1


def iter_canonical_parameters(
    chunks: list[torch.nn.Module], tied_output: bool
) -> Iterator[tuple[str, str, torch.nn.Parameter]]:
    """Yield ``(local_name, canonical_name, param)`` for every parameter of every chunk."""
    for chunk in chunks:
        module = unwrap_model(chunk)
        offset = layer_offset_of(module)
        for local_name, param in module.named_parameters():
            yield local_name, canonical_name(local_name, offset, tied_output), param


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers (anything exposing ``.module``)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module
