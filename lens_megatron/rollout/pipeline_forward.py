"""A forward pass through this rank's Megatron model chunks for generation, at any TP/PP/VPP.

Megatron's training schedules are built for fixed micro-batches and backward passes; the
sampler only needs "run the whole network once on these ids", with an optional KV cache
(``StaticInferenceContext``). With pipeline parallelism the activations travel stage by
stage (chunk v on PP rank r hands to rank r+1, the last rank of chunk v to rank 0 of chunk
v+1), with plain blocking send/recv in that order — correct on gloo and NCCL alike.
The full-vocabulary logits exist on the last pipeline stage only.

Under sequence parallelism a stage's output is this TP rank's slice of the sequence,
``[seq/TP, b, h]``, and that is what the next stage receives (its first layer gathers the
sequence itself). The receive buffer must have exactly the sent shape: gloo accepts a
shorter message into a larger buffer, which would leave the rest uninitialised. Both sides
derive the shape from ``_activation_shape`` and the sender checks it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _pp_info():
    from megatron.core import parallel_state as ps

    return (ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_prev_rank(), ps.get_pipeline_model_parallel_next_rank())


def _activation_shape(chunk, seq: int, batch: int, hidden: int) -> tuple[int, int, int]:
    """Shape of the hidden states one pipeline stage hands to the next: ``[seq, b, h]``, or
    ``[seq/TP, b, h]`` when the chunk runs with sequence parallelism."""
    from megatron.core import parallel_state as ps
    from megatron.core.utils import get_attr_wrapped_model

    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1 and get_attr_wrapped_model(chunk, "config").sequence_parallel:
        if seq % tp:
            raise ValueError(f"sequence parallelism needs the sequence length ({seq}) to be a "
                             f"multiple of the tensor-parallel size ({tp}); pad the batch")
        return seq // tp, batch, hidden
    return seq, batch, hidden


def forward_logits(chunks: list, input_ids: torch.Tensor, inference_context=None,
                   hidden_size: Optional[int] = None,
                   dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """Full-vocab logits ``[b, s', V_padded]`` on the last stage (None elsewhere).

    With an inference context in its prefill/decode phase, ``s'`` is 1 (megatron keeps only
    the last position's logits); without one, ``s' = s``.
    """
    from megatron.core.utils import get_attr_wrapped_model

    pp_rank, pp_size, prev_rank, next_rank = _pp_info()
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand(batch, -1)
    output = None
    for v, chunk in enumerate(chunks):
        first = v == 0 and pp_rank == 0
        last = v == len(chunks) - 1 and pp_rank == pp_size - 1
        shape = _activation_shape(chunk, seq, batch, hidden_size)
        if not first:
            hidden = torch.empty(shape, dtype=dtype, device=input_ids.device)
            dist.recv(hidden, src=prev_rank)
            get_attr_wrapped_model(chunk, "set_input_tensor")(hidden)
        output = chunk(input_ids, position_ids, None, inference_context=inference_context,
                       runtime_gather_output=True)
        if not last:
            if tuple(output.shape) != shape:
                raise RuntimeError(f"pipeline stage output has shape {tuple(output.shape)}, the "
                                   f"next stage expects {shape}")
            dist.send(output.contiguous(), dst=next_rank)
    return output if pp_rank == pp_size - 1 else None
