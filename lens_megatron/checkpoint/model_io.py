"""Model-only Megatron distributed checkpoints: save and load this rank's chunks, read the arch.

A checkpoint directory holds megatron-core's torch_dist files (``metadata.json``,
``common.pt``, ``.metadata``, ``__*.distcp``) written from the chunks' own
``sharded_state_dict()`` — hence loadable at any TP/PP/VPP (DESIGN.md §5b) — plus
``lens_checkpoint.json`` with the ``ModelArch`` and the parameter dtype, so a reader needs
nothing else to rebuild the model. The converter (``convert_hf_to_megatron``) writes the same
format without materialising a model (``dist_streaming``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..models.arch import ModelArch
from ..models.sharding import unwrap_model

CHECKPOINT_INFO_FILE = "lens_checkpoint.json"
CHECKPOINT_FORMAT = "lens-megatron/model-torch-dist/1"
MEGATRON_METADATA_FILE = "metadata.json"  # written last by megatron: marks a complete save
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Keys a model may request that a checkpoint written by another layer spec does not hold:
# Transformer Engine's FP8 metadata (empty without FP8).
_OPTIONAL_KEY_SUFFIX = "_extra_state"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or does not fit the model."""


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES[dtype]


def write_checkpoint_info(directory: str | os.PathLike, arch: ModelArch, params_dtype: str,
                          extra_metadata: Optional[dict[str, Any]] = None) -> None:
    """Write ``lens_checkpoint.json`` (architecture, dtype, caller's metadata)."""
    info = {"format": CHECKPOINT_FORMAT, "arch": dataclasses.asdict(arch),
            "params_dtype": params_dtype, "metadata": dict(extra_metadata or {})}
    with open(Path(directory) / CHECKPOINT_INFO_FILE, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")


def read_checkpoint_info(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``lens_checkpoint.json`` of a checkpoint directory."""
    path = Path(directory) / CHECKPOINT_INFO_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CHECKPOINT_INFO_FILE}, so its architecture "
                              "is unknown: pass the trainer config that made it (--arch-config "
                              "in tools/convert_megatron_to_hf.py)")
    with open(path, encoding="utf-8") as f:
        info = json.load(f)
    if info.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: unknown format {info.get('format')!r}, "
                              f"expected {CHECKPOINT_FORMAT!r}")
    return info


def read_checkpoint_arch(directory: str | os.PathLike) -> ModelArch:
    """The ``ModelArch`` a checkpoint was saved with."""
    return ModelArch(**read_checkpoint_info(directory)["arch"])


def chunks_sharded_state_dict(chunks: list) -> dict[str, Any]:
    """Megatron sharded state dict of this rank's model chunks (one entry per chunk).

    The entry names do not reach the checkpoint (only the ShardedTensor keys, which carry
    global layer indices), so a checkpoint saved with any number of chunks loads into any.
    """
    return {f"chunk{i}": unwrap_model(chunk).sharded_state_dict()
            for i, chunk in enumerate(chunks)}


def save_model_checkpoint(chunks: list, directory: str | os.PathLike, arch: ModelArch,
                          extra_metadata: Optional[dict[str, Any]] = None) -> None:
    """Save the model (weights only) as a Megatron distributed checkpoint. Collective.

    Every rank of the job calls it with its own chunks. ``directory`` must not already hold a
    checkpoint; making the save atomic (temp dir + rename) is the caller's business.
    """
    from megatron.core import dist_checkpointing

    from .dist_streaming import SynchronousTorchDistSaveStrategy

    directory = Path(directory)
    if (directory / MEGATRON_METADATA_FILE).exists():
        raise CheckpointError(f"{directory} already holds a checkpoint; refusing to overwrite")
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(chunks_sharded_state_dict(chunks), str(directory),
                            sharded_strategy=SynchronousTorchDistSaveStrategy())
    if dist.get_rank() == 0:
        dtype = next(unwrap_model(chunks[0]).parameters()).dtype
        write_checkpoint_info(directory, arch, dtype_name(dtype), extra_metadata)
    dist.barrier()


def load_model_checkpoint(chunks: list, directory: str | os.PathLike, strict: bool = True
                          ) -> None:
    """Load a Megatron distributed checkpoint into this rank's chunks. Collective.

    Works whatever TP/PP/VPP the checkpoint was saved at. Extra tensors in the checkpoint
    (e.g. optimizer state of a training checkpoint) are ignored. With ``strict``, a model
    parameter absent from the checkpoint is an error (``_extra_state`` FP8 metadata of
    Transformer Engine layers excepted).
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    directory = Path(directory)
    if not (directory / MEGATRON_METADATA_FILE).is_file():
        raise CheckpointError(f"{directory} is not a complete Megatron distributed checkpoint "
                              f"(no {MEGATRON_METADATA_FILE})")
    loaded, _, absent = dist_checkpointing.load(
        chunks_sharded_state_dict(chunks), str(directory),
        strict=StrictHandling.RETURN_UNEXPECTED)
    absent = sorted(k for k in absent if not k.endswith(_OPTIONAL_KEY_SUFFIX))
    if strict and absent:
        raise CheckpointError(f"{directory} lacks model tensors {absent[:8]}"
                              f"{' ...' if len(absent) > 8 else ''}")
    for i, chunk in enumerate(chunks):
        result = unwrap_model(chunk).load_state_dict(loaded[f"chunk{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(_OPTIONAL_KEY_SUFFIX)]
        if strict and missing:
            raise CheckpointError(f"{directory}: parameters {missing[:8]} were not loaded")
