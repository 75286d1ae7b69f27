"""Layout-independent deterministic initialisation.

Every parameter's *full* tensor is drawn from a generator seeded by (seed, canonical name),
then this rank's shard is cut from it. The same seed therefore gives bit-identical networks
at TP=1, TP=2, PP=2, VPP, ... — which is what lets the tests compare layouts exactly, and
makes a from-scratch run reproducible when the cluster shape changes. Cost: one full tensor
at a time per rank (bounded by the largest tensor, not the model).
"""
from __future__ import annotations

import hashlib
import math

import torch

from .arch import ModelArch
from .sharding import full_shape, iter_canonical_parameters, shard_of, shard_spec


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def full_initial_value(name: str, shape: torch.Size, arch: ModelArch, seed: int) -> torch.Tensor:
    """The full fp32 initial tensor of canonical parameter ``name``."""
    if name.endswith("layernorm.weight"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    std = arch.init_std
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        std = arch.init_std / math.sqrt(2.0 * arch.num_layers)  # GPT-2 scaled output init
    generator = torch.Generator().manual_seed(_seed_for(seed, name))
    value = torch.randn(shape, generator=generator) * std
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        value[arch.vocab_size:] = 0.0  # padded vocab rows stay zero
    return value


@torch.no_grad()
def initialize_deterministically(chunks, arch: ModelArch, seed: int, tp_rank: int,
                                 tp_size: int) -> None:
    """Fill every parameter of ``chunks`` with its layout-independent initial value."""
    for _, name, param in iter_canonical_parameters(chunks, arch.tie_word_embeddings):
        spec = shard_spec(name)
        shape = full_shape(spec, param.shape, tp_size)
        full = full_initial_value(name, shape, arch, seed)
        param.copy_(shard_of(full, spec, tp_rank, tp_size).to(param.dtype))
