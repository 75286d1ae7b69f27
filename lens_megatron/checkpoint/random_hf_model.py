"""Random Hugging Face Llama/Qwen2 models written tensor by tensor (tests and benchmarks).

The weights never exist all at once: each tensor is drawn from its own seeded generator and
handed to ``SafetensorsShardWriter``, so a ~1B-parameter model needs about one shard of memory.
Norm weights are ``1 + noise`` and biases non-zero, so a mapping that confuses them shows up.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..models.arch import ModelArch
from .conversion import DTYPES, staged_output_dir
from .hf_files import SafetensorsShardWriter, write_json
from .hf_mapping import expected_hf_tensors, hf_config_from_arch


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def random_hf_tensor(name: str, shape: tuple[int, ...], arch: ModelArch, seed: int
                     ) -> torch.Tensor:
    """The fp32 random value of HF tensor ``name`` (deterministic in ``seed`` and ``name``)."""
    generator = _generator(seed, name)
    noise = torch.randn(shape, generator=generator)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * noise
    if name.endswith(".bias"):
        return 0.1 * noise
    return arch.init_std * noise


def write_random_hf_model(out: str | os.PathLike, arch: ModelArch, dtype: str = "fp32",
                          seed: int = 0, max_shard_bytes: int = 2 << 30) -> Path:
    """Write ``config.json`` + safetensors shards of a random model with architecture ``arch``."""
    with staged_output_dir(out) as stage:
        writer = SafetensorsShardWriter(stage, max_shard_bytes)
        for name, shape in expected_hf_tensors(arch).items():
            writer.add(name, random_hf_tensor(name, shape, arch, seed).to(DTYPES[dtype]))
        writer.finish()
        write_json(stage / "config.json", hf_config_from_arch(arch, DTYPES[dtype]))
    return Path(out).absolute()
