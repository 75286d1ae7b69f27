"""Assemble full (unsharded) tensors from this rank's Megatron shards.

``iter_full_parameters`` walks this pipeline stage's parameters in a fixed order and
all-gathers each across the tensor-parallel group, yielding one full tensor at a time —
peak extra memory is one full tensor, never the model. Used by the HF export and by the
weight sync to the rollout engine. ``gather_full_state_dict`` collects every stage's
tensors on every rank (tests and small models only).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from .sharding import full_from_shards, iter_canonical_parameters, shard_of, shard_spec


def _tp_group_and_size():
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_world_size())


def iter_full_parameters(
    chunks: list, tied_output: bool, dtype: Optional[torch.dtype] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(canonical_name, full_tensor)`` for each parameter of this PP stage.

    Every rank of the TP group must iterate in lock-step (it is a collective).
    """
    group, tp_size = _tp_group_and_size()
    for name, spec, param in _stage_parameters(chunks, tied_output):
        shard = param.detach()
        if dtype is not None:
            shard = shard.to(dtype)
        if spec.layout == "replicated" or tp_size == 1:
            yield name, shard
            continue
        parts = [torch.empty_like(shard) for _ in range(tp_size)]
        dist.all_gather(parts, shard.contiguous(), group=group)
        yield name, full_from_shards(parts, spec)


def _stage_parameters(chunks: list, tied_output: bool):
    """(canonical name, TP layout, local shard) of each parameter this stage owns, once each.

    The shared copy of a tied embedding on the last stage is skipped (the first stage owns it).
    """
    seen: set[str] = set()
    for local_name, name, param in iter_canonical_parameters(chunks, tied_output):
        if name in seen or (tied_output and local_name.endswith("output_layer.weight")):
            continue
        seen.add(name)
        yield name, shard_spec(name), param


def gather_full_state_dict(chunks: list, tied_output: bool) -> dict[str, torch.Tensor]:
    """Every parameter of the whole model, full and on CPU, on every rank (small models)."""
    from megatron.core import parallel_state

    local = {name: t.float().cpu().clone() for name, t in iter_full_parameters(chunks, tied_output)}
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        return local
    gathered: list = [None] * pp_size
    dist.all_gather_object(gathered, local, group=pp_group)
    merged: dict[str, torch.Tensor] = {}
    for part in gathered:
        merged.update(part)
    return merged


def iter_full_parameters_all_stages(
    chunks: list, tied_output: bool, dtype: Optional[torch.dtype] = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter of the whole model, one full tensor at a time, on every rank.

    Each stage gathers its tensors over TP (``iter_full_parameters``); with pipeline
    parallelism every tensor is then broadcast from the stage that owns it. Collective over
    the TP and PP groups; peak extra memory is one full tensor. For the weight sync to a
    rollout engine whose replicas span pipeline stages.
    """
    from megatron.core import parallel_state

    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        yield from iter_full_parameters(chunks, tied_output, dtype)
        return
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(pp_group)
    local = iter_full_parameters(chunks, tied_output, dtype)
    plan = list(_describe(chunks, tied_output, dtype))
    plans: list = [None] * pp_size
    dist.all_gather_object(plans, plan, group=pp_group)
    me = parallel_state.get_pipeline_model_parallel_rank()
    for stage, stage_plan in enumerate(plans):
        for name, shape, tensor_dtype in stage_plan:
            if stage == me:
                local_name, tensor = next(local)
                assert local_name == name
                tensor = tensor.contiguous()
            else:
                tensor = torch.empty(shape, dtype=tensor_dtype,
                                     device=next(chunks[0].parameters()).device)
            dist.broadcast(tensor, src=pp_ranks[stage], group=pp_group)
            yield name, tensor


def full_parameter_manifest(chunks: list, tied_output: bool,
                            dtype: Optional[torch.dtype] = None) -> list[tuple[str, tuple, torch.dtype]]:
    """``(name, full shape, dtype)`` of every tensor ``iter_full_parameters_all_stages`` yields,
    in its order, without gathering any (collective over the PP group)."""
    from megatron.core import parallel_state

    plan = list(_describe(chunks, tied_output, dtype))
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    if pp_size == 1:
        return plan
    plans: list = [None] * pp_size
    dist.all_gather_object(plans, plan, group=parallel_state.get_pipeline_model_parallel_group())
    return [entry for stage_plan in plans for entry in stage_plan]


def _describe(chunks, tied_output, dtype):
    """(name, full shape, dtype) of this stage's parameters, without gathering them."""
    from megatron.core import parallel_state

    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    for name, spec, param in _stage_parameters(chunks, tied_output):
        shape = list(param.shape)
        if spec.layout != "replicated":
            shape[spec.partition_dim] *= tp_size
        yield name, tuple(shape), dtype or param.dtype


def load_full_parameters(chunks: list, named_full: Iterable[tuple[str, torch.Tensor]],
                         tied_output: bool, arch) -> int:
    """Copy full (unsharded, canonical-name) tensors into this rank's shards — the inverse of
    ``iter_full_parameters`` at *this* model's TP, which may differ from the sender's. Vocab rows
    follow this model's padding (rows past ``arch.vocab_size`` are padding either way: zeros).
    Returns the number of parameters written; every parameter must be written exactly once."""
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    targets: dict[str, list] = {}
    for local_name, name, param in iter_canonical_parameters(chunks, tied_output):
        targets.setdefault(name, []).append(param)
    written = set()
    with torch.no_grad():
        for name, full in named_full:
            if name not in targets:
                raise KeyError(f"received weight {name!r}, which this model does not have")
            spec = shard_spec(name)
            for param in targets[name]:
                source = full
                if name in _VOCAB_ROWS:
                    rows = param.shape[0] * (tp_size if spec.layout != "replicated" else 1)
                    source = full.new_zeros((rows, *full.shape[1:]))
                    keep = min(rows, arch.vocab_size)
                    source[:keep] = full[:keep]
                param.copy_(shard_of(source, spec, tp_rank, tp_size))
            written.add(name)
    missing = sorted(set(targets) - written)
    if missing:
        raise KeyError(f"the weight stream had no tensor for {missing[:5]}")
    return len(written)


_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
