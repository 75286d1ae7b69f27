"""A policy to evaluate: model weights (Megatron checkpoint, HF directory, or the config's
initialisation), a rollout engine, the prompt format and the verifier — no optimizer."""
from __future__ import annotations

import os
from typing import Optional

import torch.distributed as dist

from ..data.prompts import PromptFormatter
from ..parallel.collectives import is_model_parallel_leader, share_from_model_parallel_leader
from ..scoring import RolloutScorer
from ..tokenizer import build_tokenizer
from .rollout_eval import evaluate_pass_at_k


class EvalPolicy:
    def __init__(self, cfg, checkpoint: Optional[str] = None, hf_dir: Optional[str] = None,
                 scratch: Optional[str] = None) -> None:
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.model.tokenizer.type, cfg.model.tokenizer.path)
        chat = getattr(self.tokenizer, "hf", None) if cfg.data.use_chat_template else None
        self.formatter = PromptFormatter(cfg.data.prompt_template, tokenizer=chat)
        self.engine = self._build_engine(checkpoint, hf_dir, scratch)
        self.scorer = RolloutScorer(cfg.reward) if is_model_parallel_leader() else None

    def _build_engine(self, checkpoint, hf_dir, scratch):
        cfg = self.cfg
        if cfg.rollout.engine == "vllm":
            from ..rollout.vllm_setup import build_vllm_engine_for_eval

            if not hf_dir:
                raise ValueError("rollout.engine=vllm evaluates an HF directory: pass --hf-dir "
                                 "(export a Megatron checkpoint with tools/convert_megatron_to_hf.py)")
            return build_vllm_engine_for_eval(cfg, hf_dir, self.tokenizer)
        from ..checkpoint.model_io import load_model_checkpoint
        from ..models.builder import build_model_chunks
        from ..rollout.megatron_sampler import MegatronSampler

        m = cfg.model
        if hf_dir:
            checkpoint = self._convert(hf_dir, scratch)
        chunks = build_model_chunks(m.arch, m.layout(), m.precision_config(), m.transformer_impl,
                                    seed=m.init_seed)
        if checkpoint or m.load:
            load_model_checkpoint(chunks, checkpoint or m.load)
        return MegatronSampler(
            chunks, vocab_size=m.arch.vocab_size, eos_id=self.tokenizer.eos_id,
            pad_id=self.tokenizer.pad_id, hidden_size=m.arch.hidden_size,
            dtype=m.precision_config().torch_dtype, kv_cache=cfg.rollout.kv_cache,
            sequence_parallel=m.sequence_parallel, tp_size=m.tensor_model_parallel_size,
            decode=self.tokenizer.decode, arch=m.arch)

    @staticmethod
    def _convert(hf_dir: str, scratch: str) -> str:
        """HF → Megatron into ``scratch`` (rank 0 converts, everyone waits)."""
        from ..checkpoint.conversion import convert_hf_to_megatron

        out = os.path.join(scratch, "megatron")
        if dist.get_rank() == 0:
            convert_hf_to_megatron(hf_dir, out, progress=False)
        dist.barrier()
        return out

    def tokenize(self, record) -> list[int]:
        return self.tokenizer.encode(self.formatter(record.problem))

    def evaluate(self, records, samples: int, seed: int = 0):
        r = self.cfg.rollout
        return evaluate_pass_at_k(self.engine, self.scorer, self.tokenize, records, samples,
                                  temperature=r.temperature, top_p=r.top_p,
                                  max_new_tokens=r.max_new_tokens, seed=seed,
                                  mp_broadcast=share_from_model_parallel_leader)

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
