"""A padded micro-batch as one context-parallel rank runs it (``model.context_parallel_size``).

The micro-batch's ``[b, W]`` tensors (ids, targets, mask, per-token extras) are cut into
megatron's load-balanced chunks for this CP rank (``context.split_for_rank``, W a multiple of
2·CP); the targets were shifted on the whole rows first, so a position whose next token lives
on another rank still has the right target. Position ids are the global positions this rank
holds. Two things the loss needs from the whole rows travel as per-sequence extras: each
sequence's response-token count (the per-sequence mean of Eq. 3 divides by it) and, on CP rank 0
only, the number of sequences (counted once over the CP group). Per-token results go back with
``gather_cp`` (one all-gather over CP) and then the unsplit layout's ``unpack_into``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching.layout import row_of_each_token
from .context import gather_from_ranks, local_positions, split_for_rank


@dataclass
class ContextParallelMicroBatch:
    whole: object  # the unsplit batching.layout.PaddedMicroBatch (on the device)
    input_ids: torch.Tensor  # [b, W/CP]
    position_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    token_extras: dict
    sequence_extras: dict
    global_width: int

    def gather_cp(self, values: torch.Tensor, cp_group) -> torch.Tensor:
        """``[b, W/CP, ...]`` of every CP rank -> ``[b, W, ...]`` in sequence order."""
        return gather_from_ranks(values.contiguous(), cp_group, seq_dim=1)

    def unpack_into(self, out: torch.Tensor, values: torch.Tensor) -> None:
        self.whole.unpack_into(out, values)

    def sequence_of_token(self) -> torch.Tensor:
        """Flat ``[b·W/CP]`` long: the row of each of this rank's tokens."""
        return row_of_each_token(self.targets)


def split_padded_for_cp(mb, cp_rank: int, cp_size: int) -> ContextParallelMicroBatch:
    """This CP rank's share of a padded micro-batch (see the module docstring)."""
    split = lambda t: split_for_rank(t, cp_rank, cp_size, seq_dim=1)  # noqa: E731
    b, width = mb.input_ids.shape
    counts = mb.mask.sum(1)
    sequences = (counts > 0).sum() if cp_rank == 0 else torch.zeros((), dtype=counts.dtype,
                                                                      device=counts.device)
    positions = local_positions(width, cp_rank, cp_size, device=mb.input_ids.device)
    return ContextParallelMicroBatch(
        whole=mb, input_ids=split(mb.input_ids), position_ids=positions.expand(b, -1),
        targets=split(mb.targets), mask=split(mb.mask),
        token_extras={k: split(v) for k, v in mb.token_extras.items()},
        sequence_extras=dict(mb.sequence_extras, tokens_per_sequence=counts,
                             num_sequences=sequences),
        global_width=width)
