"""The LM head without its logits (``model.fused_linear_logprobs``).

Inside :func:`hidden_states_out`, every last-stage chunk's ``output_layer`` returns the input
its GEMM would have multiplied — prepared exactly as megatron's ``ColumnParallelLinear``
prepares it: all-gathered over the sequence shards under sequence parallelism (reduce-scatter of
the gradient in backward), else marked for an all-reduce of the gradient over TP — so
``GPTModel`` hands back hidden states ``[b, s, H]`` instead of logits ``[b, s, V/TP]``, and the
fused kernel (``lens_kernels.linear_logprobs_and_confidence``) multiplies them by
:func:`head_weight` a few token chunks at a time. The gradient that reaches the hidden states is
then this rank's partial sum over its vocab shard, which the prepared input's backward reduces
over TP as the unfused head does.

Only the actor's own passes enter it; the samplers see ordinary logits.
"""
from __future__ import annotations

import contextlib

import torch

from .sharding import unwrap_model


def head_weight(model) -> torch.Tensor:
    """This rank's LM-head weight ``[V/TP, H]`` (the embedding itself when tied)."""
    gpt = unwrap_model(model)
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient. megatron's TP reductions
    all-reduce ``grad.contiguous()`` and return ``grad`` — a no-op when the gradient arrives
    transposed, as it does here from ``GPTModel``'s ``transpose(0, 1)``."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _prepared_input(layer, hidden: torch.Tensor) -> torch.Tensor:
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    if layer.sequence_parallel:
        prepared = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True,
                                                        group=layer.tp_group)
    elif layer.tp_group is not None and layer.tp_group.size() > 1:
        prepared = copy_to_tensor_model_parallel_region(hidden, group=layer.tp_group)
    else:
        return hidden
    return _ContiguousGrad.apply(prepared)


@contextlib.contextmanager
def hidden_states_out(chunks: list):
    """While inside, the last stage's ``output_layer`` returns its prepared input."""
    swapped = []
    for chunk in chunks:
        gpt = unwrap_model(chunk)
        layer = getattr(gpt, "output_layer", None) if getattr(gpt, "post_process", False) else None
        if layer is None:
            continue

        def passthrough(hidden, weight=None, runtime_gather_output=None, _layer=layer):
            return _prepared_input(_layer, hidden), None

        swapped.append((layer, layer.forward))
        layer.forward = passthrough
    try:
        yield
    finally:
        for layer, forward in swapped:
            layer.forward = forward
