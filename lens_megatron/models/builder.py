"""Build the megatron-core ``GPTModel`` chunks of this rank (one per virtual PP stage)."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..parallel import cpu_mode
from ..parallel.device import model_device, module_device
from .arch import ModelArch, ParallelLayout, Precision, rope_inv_freq, to_transformer_config
from .init import initialize_deterministically
from .layer_spec import LocalRMSNorm, layer_spec_for, resolve_transformer_impl
from .sharding import iter_canonical_parameters, shard_spec

logger = logging.getLogger(__name__)


def block_spec(layer_spec, config, impl: str, vp_stage: Optional[int]):
    """Wrap the layer spec in a block spec so the final norm is ours on the local path."""
    if impl != "local":
        return layer_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import (
        TransformerBlock,
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(
            layer_specs=[layer_spec] * num_layers, layer_norm=LocalRMSNorm
        ),
    )


def build_model_chunks(
    arch: ModelArch,
    layout: ParallelLayout,
    precision: Precision,
    transformer_impl: str = "auto",
    seed: int = 1234,
) -> list[torch.nn.Module]:
    """This rank's GPTModel chunks, initialised layout-independently from ``seed``.

    Requires ``initialize_model_parallel`` to have run with the same layout.
    Parameters are in ``precision.params`` dtype; the caller wraps them for training.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    impl = resolve_transformer_impl(transformer_impl)
    _warn_once_if_local_on_gpu(transformer_impl, impl)
    config = to_transformer_config(arch, layout, precision)
    spec = layer_spec_for(impl)
    vpp = layout.virtual_pipeline_model_parallel_size or 1
    device = model_device()
    chunks = []
    with cpu_mode.cuda_to_cpu():
        for stage in range(vpp):
            vp_stage = stage if layout.virtual_pipeline_model_parallel_size else None
            model = GPTModel(
                config=config,
                transformer_layer_spec=block_spec(spec, config, impl, vp_stage),
                vocab_size=arch.padded_vocab_size(layout.tensor_model_parallel_size),
                max_sequence_length=arch.max_position_embeddings,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=vp_stage),
                parallel_output=True,
                share_embeddings_and_output_weights=arch.tie_word_embeddings,
                position_embedding_type="rope",
                rotary_base=int(arch.rope_theta),
                vp_stage=vp_stage,
            )
            model.to(device)
            _set_rope_frequencies(model, arch)
            chunks.append(model)
    initialize_deterministically(
        chunks, arch, seed,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
    )
    mark_tensor_parallel_parameters(chunks, arch.tie_word_embeddings)
    return chunks


_warned_local_on_gpu = False


def _warn_once_if_local_on_gpu(requested: str, resolved: str) -> None:
    """``transformer_impl: auto`` on a GPU without Transformer Engine runs the local spec
    (SDPA attention, unfused norms and linears): correct, slower, and no FP8 — say so once.
    The trainer records the resolved choice in config.yaml and in every metrics row."""
    global _warned_local_on_gpu
    if requested == "auto" and resolved == "local" and torch.cuda.is_available() \
            and not _warned_local_on_gpu:
        _warned_local_on_gpu = True
        logger.warning("model.transformer_impl=auto: Transformer Engine is not installed, so "
                       "this GPU run uses the local layer spec (torch SDPA attention, unfused "
                       "layers, no FP8). `pip install -e .[gpu]` for TE layers, or set "
                       "model.transformer_impl: local to silence this.")


def mark_tensor_parallel_parameters(chunks, tied_output: bool) -> None:
    """Set megatron's ``tensor_model_parallel`` attributes on sharded weights.

    megatron-core sets them only inside its own weight initialisers, which we skip
    (``perform_initialization=False``); without them the gradient norm would count only
    TP rank 0's shard of every weight.
    """
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for _, name, param in iter_canonical_parameters(chunks, tied_output):
        spec = shard_spec(name)
        if spec.layout != "replicated" and not getattr(param, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(param, True, spec.partition_dim, 1)


def _set_rope_frequencies(model, arch: ModelArch) -> None:
    """Use our RoPE frequencies (non-integer theta, full Llama-3 scaling parameters).

    ``inv_freq`` is a plain attribute of megatron's RotaryEmbedding (not a buffer, so
    ``module.to`` does not move it): it goes to the model's device here."""
    rotary = getattr(model, "rotary_pos_emb", None)
    if rotary is None:
        return
    rotary.inv_freq = rope_inv_freq(arch).to(module_device(model))
