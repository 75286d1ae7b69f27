"""Small collectives shared by the trainer and the evaluator."""
from __future__ import annotations

import torch.distributed as dist


def share_from_model_parallel_leader(obj):
    """Give every rank of this model-parallel group (TP×PP) the object of its first rank
    (the rank that ran the verifier)."""
    from megatron.core import parallel_state

    group = parallel_state.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    return box[0]


def is_model_parallel_leader() -> bool:
    from megatron.core import parallel_state

    return dist.get_rank(parallel_state.get_model_parallel_group()) == 0
