"""Host-side batch planning: which rows each data-parallel rank runs in which micro-batch
(``plan``), the partitions it is built from (``partition``), and the tensor layouts of one
micro-batch with their inverses (``layout``). No megatron or torch.distributed imports: the
plan is a pure function of the row lengths, computed identically on every rank."""
from .layout import (PackedMicroBatch, PaddedMicroBatch, build_micro_batches, needed_lengths,
                     pack_micro_batch, pad_micro_batch, scatter_rows)
from .partition import (balanced_partition, first_fit_decreasing, greedy_lpt, karmarkar_karp,
                        part_loads)
from .plan import (BatchPlan, MicroBatch, SequenceTooLongError, plan_batches, plan_packed,
                   plan_padded)

__all__ = [
    "BatchPlan", "MicroBatch", "PackedMicroBatch", "PaddedMicroBatch", "SequenceTooLongError",
    "balanced_partition", "build_micro_batches", "first_fit_decreasing", "greedy_lpt",
    "karmarkar_karp", "needed_lengths", "pack_micro_batch", "pad_micro_batch", "part_loads",
    "plan_batches", "plan_packed", "plan_padded", "scatter_rows",
]
