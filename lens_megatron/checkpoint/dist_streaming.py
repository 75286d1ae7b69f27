"""Megatron distributed checkpoints (torch_dist) written and read one tensor at a time.

The checkpoint is always the one megatron-core would write from a ``GPTModel``'s own
``sharded_state_dict()`` — same keys, global shapes, stacked-layer axis, TP-independent
SwiGLU ``fc1`` and QKV layouts — so it loads at any TP/PP/VPP. What differs is *when* the
data exists:

- ``write_checkpoint_from_source``: the sharded state dict comes from a TP=1/PP=1 model on
  the ``meta`` device (no memory), and a save planner materialises each tensor only when
  torch's ``FileSystemWriter`` asks for it (``resolve_data``), from ``source(canonical_name)``.
  Peak memory is a few full tensors, not the model.
- ``iter_checkpoint_tensors``: the reverse — load one layer's tensors at a time through
  ``dist_checkpointing.load`` and yield them as canonical full tensors.

``SynchronousTorchDistSaveStrategy`` is megatron's torch_dist format written synchronously
with torch's ``FileSystemWriter``: no background writer processes (the async writer's
multiprocessing manager is what needed a ``__main__`` guard, DESIGN.md §5b).
"""
from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.planner import WriteItemType

from ..models.arch import ModelArch, ParallelLayout, Precision, to_transformer_config
from ..models.sharding import canonical_name as normalize_canonical_name
from ..parallel import cpu_mode

TensorSource = Callable[[str], torch.Tensor]
_DTYPE_TO_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_STATE_DICT_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


@contextlib.contextmanager
def single_process_model_parallel():
    """Megatron's parallel state for one process (TP=PP=1), creating a gloo group if needed."""
    from ..parallel.initialize import destroy_parallel, initialize_model_parallel
    from ..parallel.spawn import find_free_port

    created = False
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{find_free_port()}",
                                rank=0, world_size=1)
        created = True
    if dist.get_world_size() != 1:
        raise RuntimeError("checkpoint conversion runs in one process; this one belongs to a "
                           f"group of {dist.get_world_size()} ranks")
    initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        destroy_parallel()
        if created:
            dist.destroy_process_group()


def build_meta_model(arch: ModelArch, dtype: torch.dtype):
    """A TP=1/PP=1 ``GPTModel`` (local layer spec) whose parameters live on ``meta``.

    Used only for its ``sharded_state_dict()``: the checkpoint layout megatron-core itself
    defines. Local-spec keys equal the Transformer Engine ones (megatron maps
    ``input_layernorm`` to ``linear_qkv.layer_norm_weight`` in checkpoints).
    """
    from megatron.core.models.gpt import GPTModel

    from ..models.builder import block_spec
    from ..models.layer_spec import layer_spec_for

    config = to_transformer_config(arch, ParallelLayout(), Precision(_DTYPE_TO_PRECISION[dtype]),
                                   use_cpu_initialization=True)
    with torch.device("meta"), cpu_mode.cuda_to_cpu():
        return GPTModel(
            config=config,
            transformer_layer_spec=block_spec(layer_spec_for("local"), config, "local", None),
            vocab_size=arch.padded_vocab_size(1),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=True, post_process=True, parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope", rotary_base=int(arch.rope_theta),
        )


def canonical_name_of_shard(sharded_tensor, tied_output: bool) -> str:
    """Canonical parameter name of a megatron ShardedTensor (stacked layers: axis 0 = layer)."""
    name = sharded_tensor.key
    if sharded_tensor.prepend_axis_num:
        prefix = "decoder.layers."
        if sharded_tensor.prepend_axis_num != 1 or not name.startswith(prefix):
            raise ValueError(f"unexpected stacked checkpoint key {name!r}")
        name = f"{prefix}{sharded_tensor.global_offset[0]}.{name[len(prefix):]}"
    return normalize_canonical_name(name, 0, tied_output)


def _lazy_sources(sharded_by_key: dict, tied_output: bool) -> dict:
    """``(key, global offset) -> (canonical name, slices into the full tensor, dtype)``.

    Valid for the sharded state dict of a TP=1/PP=1 model, whose global tensors (without the
    stacked-layer axis) are exactly the canonical full tensors.
    """
    lookup = {}
    for key, shards in sharded_by_key.items():
        for sh in shards:
            if not isinstance(sh, ShardedTensor):
                continue  # ShardedObject (``_extra_state``): written as bytes
            if sh.flattened_range is not None:
                raise ValueError(f"flattened shards ({key}) cannot be materialised lazily")
            p = sh.prepend_axis_num
            slices = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.local_shape))
            lookup[(key, tuple(sh.global_offset))] = (
                canonical_name_of_shard(sh, tied_output), slices, sh.dtype)
    return lookup


class LazySavePlanner(MCoreSavePlanner):
    """megatron's save planner; with a ``source``, tensor shards are built when written.

    ``lookup`` maps a write item's ``(key, global offset)`` to its canonical tensor and
    slice. The last canonical tensor is cached: a layer's ``fc1`` gate and up halves are
    consecutive write items and come from one tensor.
    """

    def __init__(self, lookup: Optional[dict] = None, source: Optional[TensorSource] = None,
                 progress=None):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self.lookup, self.source, self.progress = lookup, source, progress
        self._cached_name: Optional[str] = None
        self._cached_tensor: Optional[torch.Tensor] = None

    def resolve_data(self, write_item):
        if self.source is None or write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        name, slices, dtype = self.lookup[(write_item.index.fqn, tuple(write_item.index.offset))]
        if self._cached_name != name:
            self._cached_name, self._cached_tensor = None, None  # free before building the next
            self._cached_tensor, self._cached_name = self.source(name), name
        piece = self._cached_tensor[slices].to(dtype)
        if self.progress is not None:
            self.progress.update(1)
        return piece.reshape(tuple(write_item.tensor_data.chunk.sizes))


class SynchronousTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
    """megatron's torch_dist checkpoint format, written synchronously by torch's writer.

    With ``source`` set, the state dict may hold meta tensors: every shard's data is built
    on demand as ``source(canonical_name)[slices]`` (see module docstring).
    """

    def __init__(self, source: Optional[TensorSource] = None, tied_output: bool = False,
                 progress=None, thread_count: int = 1):
        super().__init__("torch_dist", 1, thread_count=thread_count)
        self.source, self.tied_output, self.progress = source, tied_output, progress
        self.largest_shard_bytes = 0

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        by_key, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True)
        lookup = _lazy_sources(by_key, self.tied_output) if self.source is not None else None
        self.largest_shard_bytes = max(
            (sh.data.numel() * sh.data.element_size() for shards in by_key.values()
             for sh in shards if isinstance(getattr(sh, "data", None), torch.Tensor)), default=0)
        if self.progress is not None:
            self.progress.total = len(lookup or {})
        pyt_state_dict = mcore_to_pyt_state_dict(by_key, False)
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True,
                                  thread_count=self.thread_count)
        try:
            dcp_save(pyt_state_dict, storage_writer=writer,
                     planner=LazySavePlanner(lookup, self.source, self.progress))
        except CheckpointException as wrapped:
            # torch wraps every rank's error into one BaseException; raise the first
            # rank's own error (e.g. "tensor X not readable in file Y") instead.
            failures = sorted(wrapped.failures.items())
            if failures and isinstance(failures[0][1][0], Exception):
                raise failures[0][1][0] from wrapped
            raise


def write_checkpoint_from_source(directory, arch: ModelArch, dtype: torch.dtype,
                                 source: TensorSource, progress=None) -> int:
    """Write a model-only checkpoint whose tensors come from ``source(canonical_name)``.

    ``source`` returns the full canonical tensor (vocab rows padded to
    ``arch.padded_vocab_size(1)``) in ``dtype``. Needs ``single_process_model_parallel``.
    Returns the size in bytes of the largest tensor shard written.
    """
    from megatron.core import dist_checkpointing

    Path(directory).mkdir(parents=True, exist_ok=True)
    model = build_meta_model(arch, dtype)
    strategy = SynchronousTorchDistSaveStrategy(source, arch.tie_word_embeddings, progress)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, str(directory),
                            sharded_strategy=strategy)
    return strategy.largest_shard_bytes


def _groups_by_layer(sharded_state_dict: dict, parameters: dict) -> list[list[str]]:
    """Parameter keys in model order, one group per transformer layer (others alone)."""
    groups: "OrderedDict[str, list[str]]" = OrderedDict()
    for key in sharded_state_dict:
        if key not in parameters:
            continue  # ``_extra_state`` objects; the tied output layer (it is the embedding)
        match = _STATE_DICT_LAYER_RE.match(key)
        groups.setdefault(match.group(0) if match else key, []).append(key)
    return list(groups.values())


def _full_tensor_request(checkpoint_key: str, stored, shape: tuple, layer: Optional[int]):
    """A ShardedTensor asking for one full TP=1 tensor (of one layer when stacked).

    Built without megatron's stacked-layer ``prepend_axis`` so that any subset of layers can
    be requested; the read spans however the tensor was split when saved (TP, fc1 halves).
    Vocab rows may differ from the saved padding (``allow_shape_mismatch``, as megatron does).
    """
    stored_shape = tuple(stored.global_shape)
    if len(stored_shape) == len(shape) + 1:  # stacked layers: axis 0 is the global layer
        data = torch.empty((1, *shape), dtype=stored.dtype)
        return ShardedTensor.from_rank_offsets(checkpoint_key, data, (0, layer, stored_shape[0]),
                                               replica_id=0)
    return ShardedTensor.from_rank_offsets(checkpoint_key, torch.empty(shape, dtype=stored.dtype),
                                           replica_id=0,
                                           allow_shape_mismatch=stored_shape != shape)


def iter_checkpoint_tensors(directory, arch: ModelArch) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(canonical_name, full_tensor)`` from a checkpoint, one layer in memory at a time.

    Tensors keep the dtype they were saved in; vocab rows are padded to
    ``arch.padded_vocab_size(1)``. Needs ``single_process_model_parallel``.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    stored = dist_checkpointing.load_tensors_metadata(str(directory))
    model = build_meta_model(arch, torch.float32)
    parameters = dict(model.named_parameters())
    sharded = model.sharded_state_dict()
    for keys in _groups_by_layer(sharded, parameters):
        request = {}
        for key in keys:
            checkpoint_key = sharded[key].key
            if checkpoint_key not in stored:
                raise KeyError(f"{directory}: checkpoint has no tensor {checkpoint_key!r} "
                               f"(parameter {key}); was it written for this architecture?")
            match = _STATE_DICT_LAYER_RE.match(key)
            request[key] = _full_tensor_request(checkpoint_key, stored[checkpoint_key],
                                                tuple(parameters[key].shape),
                                                int(match.group(1)) if match else None)
        loaded = dist_checkpointing.load({"model": request}, str(directory),
                                         validate_access_integrity=False,
                                         strict=StrictHandling.ASSUME_OK_UNEXPECTED)["model"]
        for key in keys:
            tensor = loaded[key]
            if tensor.dim() == parameters[key].dim() + 1:
                tensor = tensor[0]
            yield normalize_canonical_name(key, 0, arch.tie_word_embeddings), tensor
