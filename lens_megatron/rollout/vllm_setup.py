"""Wiring the vLLM engine to the Megatron actor: the initial HF export vLLM starts from,
the streamed weight source for every sync, and token-id-only operation (our tokenizer
decodes, so the char tokenizer of the tiny default works too)."""
from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..models.gather import iter_full_parameters_all_stages
from .base import RolloutBatch, SamplingConfig

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json")


def actor_weight_stream(actor) -> Callable[[], Iterator[tuple[str, torch.Tensor]]]:
    """A zero-argument callable streaming the actor's weights as full, HF-named tensors
    (collective over TP and PP; one tensor in flight)."""
    from ..checkpoint.hf_mapping import megatron_to_hf_tensors

    arch = actor.cfg.model.arch

    def stream():
        full = iter_full_parameters_all_stages(actor.chunks, arch.tie_word_embeddings)
        return megatron_to_hf_tensors(full, arch)

    return stream


def export_actor_for_vllm(actor, out_dir: str) -> str:
    """Write the actor's current weights as an HF directory (rank 0 writes; collective)."""
    from ..checkpoint.hf_files import SafetensorsShardWriter
    from ..checkpoint.hf_mapping import hf_config_from_arch

    arch = actor.cfg.model.arch
    dtype = actor.precision.torch_dtype
    writer = None
    if dist.get_rank() == 0:
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config_from_arch(arch, dtype), f, indent=1)
        _copy_tokenizer(actor.cfg.model.tokenizer, out_dir)
        writer = SafetensorsShardWriter(out_dir)
    for name, tensor in actor_weight_stream(actor)():
        if writer is not None:
            writer.add(name, tensor.to(dtype).cpu())
    if writer is not None:
        writer.finish()
    dist.barrier()
    return out_dir


def _copy_tokenizer(tokenizer_cfg, out_dir: str) -> None:
    if tokenizer_cfg.type != "hf" or not tokenizer_cfg.path:
        return  # the engine runs on token ids; our tokenizer decodes
    for name in HF_TOKENIZER_FILES:
        source = os.path.join(tokenizer_cfg.path, name)
        if os.path.isfile(source):
            shutil.copy2(source, out_dir)


class DecodingEngine:
    """Adds our tokenizer's decoding to an engine run with ``detokenize=False``, and exposes
    the replica layout the trainer shards prompts by."""

    def __init__(self, engine, decode) -> None:
        self.engine, self.decode = engine, decode
        self.layout = engine.layout

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> RolloutBatch:
        batch = self.engine.generate(prompts, sampling)
        rows = batch.response_mask
        batch.response_texts = [self.decode(ids[mask].tolist())
                                for ids, mask in zip(batch.input_ids, rows)]
        return batch

    def sync_weights(self, named_tensors=None) -> dict[str, float]:
        """The engine's refit: from ``named_tensors`` (HF names), else its weight source."""
        return self.engine.sync_weights(named_tensors)

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        self.engine.close()


def _decoding_vllm(cfg, hf_dir: str, tokenizer, weight_source=None) -> DecodingEngine:
    """vLLM over ``hf_dir`` on token ids only; ``weight_source`` feeds ``sync_weights``."""
    from .vllm_engine import VLLMEngine, engine_config_from_rollout

    engine_cfg = engine_config_from_rollout(
        cfg.rollout, hf_dir, tokenizer.eos_id, tokenizer.pad_id, seed=cfg.trainer.seed,
        detokenize=False, extra_llm_kwargs={"skip_tokenizer_init": True})
    return DecodingEngine(VLLMEngine(engine_cfg, weight_source=weight_source), tokenizer.decode)


def build_vllm_engine(cfg, actor, tokenizer) -> DecodingEngine:
    """vLLM, colocated with the actor, starting from its current weights."""
    run_dir = os.path.join(cfg.exp_manager.exp_dir, cfg.exp_manager.name)
    hf_dir = export_actor_for_vllm(actor, os.path.join(run_dir, "vllm_initial_weights"))
    return _decoding_vllm(cfg, hf_dir, tokenizer, weight_source=actor_weight_stream(actor))


def build_vllm_engine_for_eval(cfg, hf_dir: str, tokenizer) -> DecodingEngine:
    """vLLM serving an HF directory, for lens-eval."""
    return _decoding_vllm(cfg, hf_dir, tokenizer)
