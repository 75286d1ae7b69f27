"""HF <-> Megatron checkpoint conversion (streaming; the command lines are in ``convert_cli``).

HF -> Megatron: validate everything readable from headers first (architecture, features,
every tensor's shape, TP/PP divisibility), then write the distributed checkpoint tensor by
tensor (``dist_streaming.write_checkpoint_from_source``), then ``lens_checkpoint.json``, the
original ``hf_config.json``, the tokenizer files and ``lens_config.yaml`` (the ``model:``
section the trainer loads). Megatron -> HF: one layer at a time into safetensors shards.

Output goes to a temporary directory beside the target, renamed into place at the end and
removed on any failure: a failed conversion leaves nothing half-written behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml

from ..models.arch import ModelArch
from . import hf_mapping
from .hf_files import (
    HFCheckpointError,
    HFCheckpointReader,
    SafetensorsShardWriter,
    copy_tokenizer_files,
    read_json,
    write_json,
)
from .model_io import read_checkpoint_info, write_checkpoint_info

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_DTYPE_NAMES = {torch_dtype: name for name, torch_dtype in DTYPES.items()}
TOKENIZER_SUBDIR = "tokenizer"
HF_CONFIG_COPY = "hf_config.json"
LENS_CONFIG_FILE = "lens_config.yaml"


@dataclass
class ConversionResult:
    """What a conversion wrote (for ``--report`` and tests)."""

    output_dir: Path
    arch: ModelArch
    dtype: str
    num_tensors: int
    total_bytes: int
    largest_shard_bytes: int  # largest tensor shard (HF->Megatron) / safetensors file (back)


@contextlib.contextmanager
def staged_output_dir(target: str | os.PathLike) -> Iterator[Path]:
    """A temp dir beside ``target``, renamed to ``target`` on success, deleted on failure."""
    target = Path(target).absolute()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"output {target} already exists and is not empty; "
                              "choose another --out or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the result is a normal dir
    try:
        yield stage
        if target.exists():
            target.rmdir()
        os.replace(stage, target)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def check_parallel_layout(arch: ModelArch, tp: int, pp: int) -> None:
    """TP must divide heads, KV heads and the FFN size; PP must divide the layers."""
    problems = [f"{what} ({value}) is not divisible by {name}={size}"
                for what, value, name, size in (
                    ("num_attention_heads", arch.num_attention_heads, "TP", tp),
                    ("num_key_value_heads", arch.num_query_groups, "TP", tp),
                    ("intermediate_size", arch.ffn_hidden_size, "TP", tp),
                    ("num_hidden_layers", arch.num_layers, "PP", pp))
                if size < 1 or value % size]
    if problems:
        raise ValueError("invalid parallel layout: " + "; ".join(problems))


def check_hf_tensors(reader: HFCheckpointReader, arch: ModelArch) -> int:
    """Every expected tensor present with the config's shape, nothing unknown. Returns bytes."""
    expected = hf_mapping.expected_hf_tensors(arch)
    for name, shape in expected.items():
        if name not in reader.file_of:
            raise HFCheckpointError(f"tensor {name!r} is missing from {reader.directory}")
        found = reader.shape(name)
        if found != shape:
            raise HFCheckpointError(
                f"tensor {name!r} in {reader.file_of[name]} has shape {found}, but config.json "
                f"implies {shape} (mismatched config?)")
    ignorable = {"lm_head.weight"} if arch.tie_word_embeddings else set()
    unknown = sorted(n for n in reader.names() if n not in expected and n not in ignorable
                     and not hf_mapping.IGNORED_HF_TENSOR_RE.match(n))
    if unknown:
        raise hf_mapping.UnsupportedModelError(
            f"{reader.directory} holds tensors this converter does not map: {unknown[:6]}")
    return sum(_prod(s) for s in expected.values())


def _prod(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def resolve_dtype(requested: str, hf_config: dict) -> str:
    """``auto`` -> the HF model's own dtype (fp32 when unknown)."""
    if requested != "auto":
        return requested
    name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    return _HF_DTYPES.get(str(name).replace("torch.", ""), "fp32")


def lens_model_config(arch: ModelArch, output_dir: Path, tokenizer_path: Path, dtype: str,
                      tp: int, pp: int) -> dict:
    """The ``model:`` section of a trainer config that starts from this checkpoint."""
    return {"model": {
        "arch": dataclasses.asdict(arch),
        "tokenizer": {"type": "hf", "path": str(tokenizer_path)},
        "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
        "precision": dtype, "load": str(output_dir),
    }}


def convert_hf_to_megatron(hf_dir: str | os.PathLike, out: str | os.PathLike, tp: int = 1,
                           pp: int = 1, dtype: str = "auto", progress: bool = True
                           ) -> ConversionResult:
    """Convert an HF Llama/Qwen2 directory into a Megatron distributed checkpoint."""
    from tqdm import tqdm

    from .dist_streaming import single_process_model_parallel, write_checkpoint_from_source

    reader = HFCheckpointReader(hf_dir)
    arch = hf_mapping.arch_from_hf_config(reader.config)
    check_parallel_layout(arch, tp, pp)
    num_elements = check_hf_tensors(reader, arch)
    dtype = resolve_dtype(dtype, reader.config)
    torch_dtype = DTYPES[dtype]
    padded = arch.padded_vocab_size(1)

    def source(name: str) -> torch.Tensor:
        return hf_mapping.assemble_canonical(name, reader.get, arch, padded, torch_dtype)

    final = Path(out).absolute()
    with staged_output_dir(final) as stage:
        bar = tqdm(desc="HF -> Megatron", unit="tensor", disable=not progress)
        try:
            with single_process_model_parallel():
                largest = write_checkpoint_from_source(stage, arch, torch_dtype, source, bar)
        finally:
            bar.close()
            reader.close()
        write_checkpoint_info(stage, arch, dtype, {"source": str(Path(hf_dir).absolute()),
                                                   "tensor_model_parallel_size": tp,
                                                   "pipeline_model_parallel_size": pp})
        write_json(stage / HF_CONFIG_COPY, reader.config)
        copied = copy_tokenizer_files(hf_dir, stage / TOKENIZER_SUBDIR)
        tokenizer = final / TOKENIZER_SUBDIR if copied else Path(hf_dir).absolute()
        with open(stage / LENS_CONFIG_FILE, "w", encoding="utf-8") as f:
            yaml.safe_dump(lens_model_config(arch, final, tokenizer, dtype, tp, pp), f,
                           sort_keys=False)
    return ConversionResult(final, arch, dtype, len(hf_mapping.tensor_rules(arch)),
                            num_elements * torch_dtype.itemsize, largest)


def read_arch_config(path: str | os.PathLike) -> ModelArch:
    """``model.arch`` of a trainer YAML (e.g. a ``lens_config.yaml``)."""
    with open(path, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    try:
        return ModelArch(**config["model"]["arch"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} has no valid model.arch section: {exc}") from None


def convert_megatron_to_hf(megatron_dir: str | os.PathLike, out: str | os.PathLike,
                           dtype: Optional[str] = None, max_shard_bytes: int = 2 << 30,
                           progress: bool = True, arch_config: Optional[str] = None
                           ) -> ConversionResult:
    """Convert a Megatron checkpoint into an HF directory (safetensors + config).

    The architecture comes from the checkpoint's ``lens_checkpoint.json`` or, for
    checkpoints without one (training checkpoints), from ``arch_config`` (a trainer YAML).
    ``dtype`` defaults to the checkpoint's.
    """
    from tqdm import tqdm

    from .dist_streaming import iter_checkpoint_tensors, single_process_model_parallel

    megatron_dir = Path(megatron_dir)
    if arch_config is None:
        info = read_checkpoint_info(megatron_dir)
        arch, dtype = ModelArch(**info["arch"]), dtype or info["params_dtype"]
    else:
        arch = read_arch_config(arch_config)
    base = read_json(megatron_dir / HF_CONFIG_COPY) if (megatron_dir / HF_CONFIG_COPY).is_file() \
        else None
    count, written_dtype = 0, DTYPES[dtype] if dtype else None
    with staged_output_dir(out) as stage:
        writer = SafetensorsShardWriter(stage, max_shard_bytes)
        with single_process_model_parallel(), tqdm(
                desc="Megatron -> HF", unit="tensor", total=len(hf_mapping.tensor_rules(arch)),
                disable=not progress) as bar:
            for name, full in iter_checkpoint_tensors(megatron_dir, arch):
                written_dtype = written_dtype or full.dtype  # the checkpoint's own dtype
                for hf_name, tensor in hf_mapping.canonical_to_hf(name, full, arch):
                    writer.add(hf_name, tensor.to(written_dtype))
                    count += 1
                bar.update(1)
        writer.finish()
        write_json(stage / "config.json", hf_mapping.hf_config_from_arch(arch, written_dtype, base))
        copy_tokenizer_files(megatron_dir / TOKENIZER_SUBDIR, stage)
    return ConversionResult(Path(out).absolute(), arch, _DTYPE_NAMES[written_dtype], count,
                            writer.total_bytes, writer.largest_shard_bytes)


__all__ = ["ConversionResult", "convert_hf_to_megatron", "convert_megatron_to_hf",
           "check_parallel_layout", "staged_output_dir"]
