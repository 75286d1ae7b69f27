"""Hugging Face model directories: lazy safetensors reading, sharded writing, tokenizer files.

``HFCheckpointReader`` opens ``model.safetensors`` or the shards listed in
``model.safetensors.index.json`` lazily (``safetensors.safe_open``): shapes come from the
headers, and a tensor is read only when asked for, so a converter holds one tensor at a time.
``SafetensorsShardWriter`` writes tensors as they come into shards of at most
``max_shard_bytes`` plus the index, the layout ``transformers`` and vLLM load.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
    "generation_config.json",
)


class HFCheckpointError(ValueError):
    """An HF model directory is incomplete or inconsistent; the message names the file."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise HFCheckpointError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise HFCheckpointError(f"{path} is not valid JSON: {exc}") from None


class HFCheckpointReader:
    """Read-only, lazy view of an HF model directory (config + safetensors weights)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise HFCheckpointError(f"HF model directory {self.directory} does not exist")
        self.config = read_json(self.directory / "config.json")
        self.file_of = self._weight_map()
        self._shapes: dict[str, dict[str, tuple[int, ...]]] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFCheckpointError(f"{index} has no 'weight_map'")
            missing = sorted({f for f in weight_map.values()
                              if not (self.directory / f).is_file()})
            if missing:
                raise HFCheckpointError(f"{index} references missing shard file(s) {missing}")
            return dict(weight_map)
        single = self.directory / SAFETENSORS_FILE
        if not single.is_file():
            raise HFCheckpointError(
                f"{self.directory} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX} "
                "(only safetensors checkpoints are supported)")
        with safe_open(str(single), framework="pt") as f:
            return {name: SAFETENSORS_FILE for name in f.keys()}

    def _open(self, file_name: str):
        path = self.directory / file_name
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise HFCheckpointError(f"cannot open {path}: {exc}") from exc

    def names(self) -> list[str]:
        return list(self.file_of)

    def _checked_file(self, name: str) -> str:
        if name not in self.file_of:
            raise HFCheckpointError(f"tensor {name!r} is missing from {self.directory}")
        return self.file_of[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the safetensors header, without reading the data."""
        file_name = self._checked_file(name)
        if file_name not in self._shapes:
            with self._open(file_name) as f:
                self._shapes[file_name] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if name not in self._shapes[file_name]:
            raise HFCheckpointError(f"tensor {name!r} is listed for {file_name} but not in it")
        return self._shapes[file_name][name]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor. The file is mapped only for this read: a mapping kept open would
        keep every page read so far resident (and counted in RSS)."""
        file_name = self._checked_file(name)
        try:
            with self._open(file_name) as f:
                return f.get_tensor(name)
        except HFCheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise HFCheckpointError(f"tensor {name!r} not readable in {file_name}: {exc}") from exc

    def largest_file_bytes(self) -> int:
        return max((self.directory / f).stat().st_size for f in set(self.file_of.values()))

    def close(self) -> None:
        self._shapes.clear()


class SafetensorsShardWriter:
    """Write ``(name, tensor)`` pairs into safetensors shards as they arrive.

    At most one shard (``max_shard_bytes``, or one tensor if larger) is held in memory.
    ``finish()`` names the files ``model-0000k-of-0000n.safetensors`` and writes the index
    (a single shard is named ``model.safetensors`` and needs no index).
    """

    def __init__(self, directory: str | os.PathLike, max_shard_bytes: int = 2 << 30):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0
        self.largest_shard_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in shard for shard in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # An own, compact storage: safetensors refuses views into a larger/shared storage.
        self._pending[name] = tensor.detach().clone(memory_format=torch.contiguous_format)
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f"shard-{len(self._shards):05d}.safetensors.tmp"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self.total_bytes += self._pending_bytes
        self.largest_shard_bytes = max(self.largest_shard_bytes, self._pending_bytes)
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Flush, give the shards their final names, write the index; returns file names."""
        if self._pending:
            self._flush()
        count = len(self._shards)
        names = ([SAFETENSORS_FILE] if count == 1 else
                 [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)])
        umask = os.umask(0)
        os.umask(umask)
        for k, final in enumerate(names):
            os.replace(self.directory / f"shard-{k:05d}.safetensors.tmp", self.directory / final)
            os.chmod(self.directory / final, 0o666 & ~umask)  # safetensors writes them 0600
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {t: names[k] for k, shard in enumerate(self._shards)
                                    for t in shard}}
            with open(self.directory / SAFETENSORS_INDEX, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        return names


def copy_tokenizer_files(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copy the tokenizer (and generation config) files present in ``source``."""
    source, target = Path(source), Path(target)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
            copied.append(name)
    return copied


def write_json(path: Path, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")


def parse_size(text: Optional[str]) -> int:
    """``"2GB"``/``"500MB"``/``"1GiB"``/plain bytes -> bytes."""
    if text is None:
        return 2 << 30
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10 ** 3, "mb": 10 ** 6,
             "gb": 10 ** 9, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(lowered)
