"""A policy to evaluate: model weights (Megatron checkpoint, HF directory, or the config's
initialisation), a rollout engine, the prompt format and the verifier — no optimizer."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from ..config import replace
from ..data.prompts import PromptFormatter
from ..parallel.collectives import is_model_parallel_leader
from ..scoring import RolloutScorer
from ..tokenizer import build_tokenizer
from .rollout_eval import evaluate_pass_at_k


def _arch_of_source(checkpoint: Optional[str], hf_dir: Optional[str]):
    """The architecture recorded with the weights (None when they carry none)."""
    if hf_dir:
        from ..checkpoint.hf_files import read_json
        from ..checkpoint.hf_mapping import arch_from_hf_config

        return arch_from_hf_config(read_json(Path(hf_dir) / "config.json"))
    if checkpoint and (Path(checkpoint) / "lens_checkpoint.json").is_file():
        from ..checkpoint.model_io import read_checkpoint_arch

        return read_checkpoint_arch(checkpoint)
    return None


class EvalPolicy:
    """The weights' own architecture (HF config.json / lens_checkpoint.json) wins over
    ``model.arch`` in the config, so a config only needs tokenizer, rollout and data settings."""

    def __init__(self, cfg, checkpoint: Optional[str] = None, hf_dir: Optional[str] = None,
                 scratch: Optional[str] = None) -> None:
        arch = _arch_of_source(checkpoint, hf_dir)
        if arch is not None:
            cfg = replace(cfg, model={"arch": arch})
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
        from ..rollout.factory import native_sampler

        m = cfg.model
        if hf_dir:
            checkpoint = self._convert(hf_dir, scratch)
        chunks = build_model_chunks(m.arch, m.layout(), m.precision_config(), m.transformer_impl,
                                    seed=m.init_seed)
        if checkpoint or m.load:
            load_model_checkpoint(chunks, checkpoint or m.load)
        return native_sampler(cfg, chunks, self.tokenizer)

    @staticmethod
    def _convert(hf_dir: str, scratch: str) -> str:
        """HF → Megatron into ``scratch``: rank 0 runs the converter in a child process (it
        sets up its own one-process parallel state), everyone waits."""
        out = os.path.join(scratch, "megatron")
        if dist.get_rank() == 0:
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
            code = ("import sys; from lens_megatron.checkpoint.convert_cli import "
                    "hf_to_megatron_main as m; sys.exit(m(sys.argv[1:]))")
            result = subprocess.run([sys.executable, "-c", code, "--hf-dir", hf_dir, "--out", out],
                                    env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"converting {hf_dir} failed:\n{result.stderr[-2000:]}")
        dist.barrier()
        return out

    def tokenize(self, record) -> list[int]:
        return self.tokenizer.encode(self.formatter(record.problem))

    def evaluate(self, records, samples: int, seed: int = 0):
        return evaluate_pass_at_k(self.engine, self.scorer, self.tokenize, records, samples,
                                  self.cfg.rollout, seed=seed)

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
