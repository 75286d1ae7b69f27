"""A separate rollout rank's process: its generator, scorer and prompt stream, then the loop
(``worker.RolloutWorker``). Entered from ``cli.run_training`` when this rank's role is rollout.

Generators (weights only ever from the trainer's broadcasts):

* :class:`NativeGenerator` — the native sampler over this rank's own megatron model, built at
  ``rollout.tensor_parallel_size`` (megatron's groups span the rollout ranks only), the full
  tensors received are cut into its shards (``models.gather.load_full_parameters``);
* :class:`VLLMGenerator` — vLLM at ``rollout.vllm.tensor_parallel_size``, started from random
  ("dummy") weights and a generated HF config (no weight file), refitted in memory from the
  broadcast stream mapped to HF names.
"""
from __future__ import annotations

import json
import logging
import os

import torch

from ..parallel.collectives import is_model_parallel_leader
from ..parallel.roles import channel_device
from .weight_broadcast import WeightReceiver

logger = logging.getLogger(__name__)


class NativeGenerator:
    def __init__(self, cfg, tokenizer) -> None:
        from megatron.core import parallel_state

        from ..models.arch import ParallelLayout
        from ..models.builder import build_model_chunks
        from .factory import native_sampler

        m = cfg.model
        self.cfg, self.arch = cfg, m.arch
        layout = ParallelLayout(tensor_model_parallel_size=cfg.rollout.tensor_parallel_size)
        self.chunks = build_model_chunks(m.arch, layout, m.precision_config(), m.transformer_impl,
                                         seed=m.init_seed)
        for chunk in self.chunks:
            chunk.requires_grad_(False)
        self.engine = native_sampler(cfg, self.chunks, tokenizer, tensor_parallel_size=layout.
                                     tensor_model_parallel_size, sequence_parallel=False)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.leader = is_model_parallel_leader()

    def apply_weights(self, stream) -> None:
        from ..models.gather import load_full_parameters

        load_full_parameters(self.chunks, stream, self.arch.tie_word_embeddings, self.arch)


class VLLMGenerator:
    def __init__(self, cfg, tokenizer) -> None:
        from ..checkpoint.hf_mapping import hf_config_from_arch
        from .vllm_setup import DecodingEngine
        from .vllm_engine import VLLMEngine, engine_config_from_rollout

        self.cfg, self.arch = cfg, cfg.model.arch
        role_rank = torch.distributed.get_rank()
        config_dir = os.path.join(cfg.exp_manager.exp_dir, cfg.exp_manager.name,
                                  f"vllm_config_rollout{role_rank}")
        os.makedirs(config_dir, exist_ok=True)
        with open(os.path.join(config_dir, "config.json"), "w", encoding="utf-8") as f:
            json.dump(hf_config_from_arch(self.arch, cfg.model.precision_config().torch_dtype), f)
        engine_cfg = engine_config_from_rollout(
            cfg.rollout, config_dir, tokenizer.eos_id, tokenizer.pad_id, seed=cfg.trainer.seed,
            detokenize=False, extra_llm_kwargs={"skip_tokenizer_init": True, "load_format": "dummy"})
        self.engine = DecodingEngine(VLLMEngine(engine_cfg), tokenizer.decode)
        layout = self.engine.layout
        self.dp_rank, self.dp_size, self.leader = layout.replica_index, layout.num_replicas, \
            layout.tp_rank == 0

    def apply_weights(self, stream) -> None:
        from ..checkpoint.hf_mapping import megatron_to_hf_tensors

        self.engine.sync_weights(megatron_to_hf_tensors(stream, self.arch))


def build_rollout_worker(cfg, groups):
    """This rollout rank's megatron groups (the sampler's TP), generator, scorer, prompt
    stream and weight receiver, wired into a ``RolloutWorker``."""
    from ..data.prompt_source import PromptSource
    from ..parallel.initialize import initialize_model_parallel
    from ..scoring import RolloutScorer
    from ..tokenizer import build_tokenizer
    from .worker import RolloutWorker

    tp = cfg.rollout.tensor_parallel_size if cfg.rollout.engine == "megatron" else 1
    initialize_model_parallel(tp, 1, None, 1, seed=cfg.trainer.seed,
                              timeout_minutes=cfg.trainer.timeout_minutes)
    tokenizer = build_tokenizer(cfg.model.tokenizer.type, cfg.model.tokenizer.path)
    generator = (VLLMGenerator if cfg.rollout.engine == "vllm" else NativeGenerator)(cfg, tokenizer)
    prompts = PromptSource(cfg.data, tokenizer, cfg.rollout.prompts_per_step,
                           cfg.rollout.max_prompt_length,
                           one_at_a_time=cfg.rollout.dynamic_sampling.enabled)
    scorer = RolloutScorer(cfg.reward) if generator.leader else None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    receiver = WeightReceiver(groups.weights, channel_device(backend))
    return RolloutWorker(cfg, groups, generator, scorer, prompts, receiver)


def run_rollout_rank(cfg, groups) -> int:
    """Build this rollout rank's worker and run its loop; returns the exit code."""
    worker = build_rollout_worker(cfg, groups)
    try:
        return worker.run()
    finally:
        worker.close()
