"""Shared pieces for tests that run real megatron-core in several gloo processes.

Functions here run inside spawned ranks (see ``lens_megatron.parallel.spawn``).
"""
from __future__ import annotations

import warnings

import torch

from lens_megatron.models.arch import ModelArch, ParallelLayout, Precision, RopeScaling

SEQ = 16
MICRO_BATCH = 2


def tiny_arch(family: str = "qwen2", **overrides) -> ModelArch:
    base = dict(
        family=family, vocab_size=100, hidden_size=64, ffn_hidden_size=128, num_layers=4,
        num_attention_heads=4, num_query_groups=2, qkv_bias=family == "qwen2",
        rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64)
        if family == "llama" else None,
    )
    base.update(overrides)
    return ModelArch(**base)


def setup_model(tp: int, pp: int, vpp=None, arch: ModelArch | None = None, seed: int = 7,
                precision: str = "fp32", sequence_parallel: bool = False):
    """Initialise Megatron's groups and build this rank's model chunks."""
    warnings.filterwarnings("ignore")
    from lens_megatron.models.builder import build_model_chunks
    from lens_megatron.parallel.initialize import initialize_model_parallel

    initialize_model_parallel(tp, pp, vpp)
    arch = arch or tiny_arch()
    layout = ParallelLayout(tp, pp, vpp, sequence_parallel=sequence_parallel)
    chunks = build_model_chunks(arch, layout, Precision(precision), "local", seed=seed)
    return arch, chunks


def token_batch(num_micro_batches: int, vocab: int = 100, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab, (MICRO_BATCH, SEQ), generator=generator)
        for _ in range(num_micro_batches)
    ]


def position_ids(batch: torch.Tensor) -> torch.Tensor:
    return torch.arange(batch.shape[1]).unsqueeze(0).expand(batch.shape[0], -1)
