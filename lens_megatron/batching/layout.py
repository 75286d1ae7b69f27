"""Tensor layouts of one planned micro-batch (``plan.MicroBatch``), each with its inverse.

Token coordinates are the actor's: ``targets[:, t]`` is the token predicted at position t
and ``target_mask[:, t]`` says whether it is trained on; a row needs columns ``[0, length)``
(``needed_lengths``). Everything is built on the CPU from the whole batch (indexed by the
original rows); ``.to(device)`` moves a micro-batch in one place.

padded: ``[b, width]`` cuts of the rows (zero-padded when ``width`` exceeds the batch
  width); per-token extras cut alike, per-sequence extras picked. Inverse: ``unpack`` puts
  ``[b, w]`` results back at the original rows of a ``[num_rows, width]`` tensor.

packed: the rows' first ``length`` columns back to back in one ``[1, T]`` row, then
  alignment padding. ``position_ids`` restart at 0 per document (padding continues the last
  document's positions, as RoPE sees it through ``cu_seqlens_padded``); targets and mask come
  from each row itself, so no document predicts another's tokens; ``segment_ids [T]`` are
  ``0..n-1`` and -1 on padding. THD boundaries: ``cu_seqlens [n+1]`` (int32, real tokens)
  and ``cu_seqlens_padded [n+1]`` (the last boundary moved to T, so the segments tile T as
  megatron's RoPE needs); an empty micro-batch has one segment of real length 0 covering
  the padding. ``max_seqlen`` is the longest *padded* segment (RoPE's table must cover each).
  Inverses: ``unpack`` (to ``[num_rows, width]`` at the original rows) and the
  differentiable ``rows_view`` (to ``[n, max_length]``, the layout the loss takes).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Mapping, Optional, Sequence

import torch

from .plan import MicroBatch

__all__ = ["needed_lengths", "row_of_each_token", "PaddedMicroBatch", "PackedMicroBatch", "pad_micro_batch",
           "pack_micro_batch", "build_micro_batches", "scatter_rows"]


def needed_lengths(target_mask: torch.Tensor) -> list[int]:
    """Per row, the columns it needs: through its last target position (0 if it has none)."""
    mask = target_mask.bool()
    positions = torch.arange(1, mask.shape[1] + 1).expand_as(mask)
    return torch.where(mask, positions, torch.zeros_like(positions)).amax(1).tolist()


def row_of_each_token(targets: torch.Tensor) -> torch.Tensor:
    """Flat ``[b·w]`` long for ``[b, w]`` rows: the row (0..b-1) of each token."""
    b, width = targets.shape
    return torch.arange(b, device=targets.device).repeat_interleave(width)


def _moved(obj, device):
    """A copy of dataclass ``obj`` with every tensor (also inside dicts) on ``device``."""
    changes = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.to(device)
        elif isinstance(value, dict):
            changes[f.name] = {k: v.to(device) for k, v in value.items()}
    return replace(obj, **changes)


@dataclass
class PaddedMicroBatch:
    """Rows ``rows [b]`` cut to ``[b, width]``; extras keyed by name."""

    rows: torch.Tensor
    input_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    token_extras: dict = field(default_factory=dict)
    sequence_extras: dict = field(default_factory=dict)

    def to(self, device) -> "PaddedMicroBatch":
        return _moved(self, device)

    @property
    def position_ids(self) -> torch.Tensor:
        b, width = self.input_ids.shape
        return torch.arange(width, device=self.input_ids.device).expand(b, width)

    def sequence_of_token(self) -> torch.Tensor:
        return row_of_each_token(self.targets)

    def _index(self, values: torch.Tensor, width: int):
        keep = min(values.shape[1], width)
        cols = torch.arange(keep, device=values.device)
        rows = self.rows.to(values.device)[:, None].expand(-1, keep)
        return (rows, cols.expand(len(self.rows), -1)), values[:, :keep]

    def unpack(self, values: torch.Tensor, num_rows: int, width: int) -> torch.Tensor:
        """``values [b, w, ...]`` -> ``[num_rows, width, ...]``: row i at ``rows[i]``, first
        ``min(w, width)`` columns; zeros elsewhere. Differentiable."""
        out = values.new_zeros((num_rows, width, *values.shape[2:]))
        index, source = self._index(values, width)
        return out.index_put(index, source)

    def unpack_into(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values [b, w, ...]`` at this micro-batch's rows of ``out [N, S, ...]`` (in
        place, no temporary of the batch's size)."""
        index, source = self._index(values, out.shape[1])
        out.index_put_(index, source.to(out.dtype))


def _cut(value: torch.Tensor, rows: torch.Tensor, width: int) -> torch.Tensor:
    picked = value[rows]
    if picked.shape[1] >= width:
        return picked[:, :width]
    return torch.nn.functional.pad(picked, (0, width - picked.shape[1]))


def pad_micro_batch(input_ids: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor,
                    micro_batch: MicroBatch,
                    token_extras: Optional[Mapping[str, torch.Tensor]] = None,
                    sequence_extras: Optional[Mapping[str, torch.Tensor]] = None,
                    ) -> PaddedMicroBatch:
    """The padded layout of ``micro_batch`` (whole-batch ``[N, S]`` inputs; per-token extras
    ``[N, S, ...]``, per-sequence extras ``[N, ...]``)."""
    rows = torch.tensor(micro_batch.rows, dtype=torch.long)
    width = micro_batch.width
    return PaddedMicroBatch(
        rows, _cut(input_ids, rows, width), _cut(targets, rows, width),
        _cut(target_mask.bool(), rows, width),
        {k: _cut(v, rows, width) for k, v in (token_extras or {}).items()},
        {k: v[rows] for k, v in (sequence_extras or {}).items()})


@dataclass
class PackedMicroBatch:
    """``n`` rows packed into one ``[1, T]`` row (see the module docstring)."""

    rows: torch.Tensor             # [n] long, original rows in pack order
    lengths: tuple                 # n document lengths
    input_ids: torch.Tensor        # [1, T]
    position_ids: torch.Tensor     # [1, T]
    targets: torch.Tensor          # [1, T]
    mask: torch.Tensor             # [1, T] bool
    segment_ids: torch.Tensor      # [T] long, -1 on padding
    cu_seqlens: torch.Tensor       # [max(n, 1) + 1] int32
    cu_seqlens_padded: torch.Tensor  # [max(n, 1) + 1] int32, last entry T
    max_seqlen: int
    token_extras: dict = field(default_factory=dict)     # [1, T, ...]
    sequence_extras: dict = field(default_factory=dict)  # [n, ...]

    def to(self, device) -> "PackedMicroBatch":
        return _moved(self, device)

    @property
    def starts(self) -> list[int]:
        return self.cu_seqlens[:-1].tolist()[:len(self.lengths)]

    def sequence_of_token(self) -> torch.Tensor:
        """Flat ``[T]`` long: the document (0..n-1) each token belongs to, -1 on padding."""
        return self.segment_ids

    def _row_index(self, device):
        """``[n, L]`` positions in T of each document's columns (L = longest document) and
        which of them are real."""
        longest = max(self.lengths, default=0)
        cols = torch.arange(longest, device=device)
        starts = self.cu_seqlens[:len(self.lengths)].to(device=device, dtype=torch.long)
        length = torch.tensor(self.lengths, dtype=torch.long, device=device)
        real = cols[None, :] < length[:, None]
        return torch.where(real, starts[:, None] + cols[None, :], 0), real

    def _flat(self, values: torch.Tensor) -> torch.Tensor:
        """``[1, T, ...]`` or ``[T]`` -> ``[T, ...]``."""
        total = self.input_ids.shape[1]
        if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == total:
            return values[0]
        if values.shape[0] != total:
            raise ValueError(f"expected packed values [1, {total}, ...] or [{total}], got "
                             f"{tuple(values.shape)}")
        return values

    def rows_view(self, values: torch.Tensor) -> torch.Tensor:
        """``values [1, T, ...]`` (or ``[T]``) -> ``[n, longest document, ...]``: document
        i's values in row i, zeros past its length. Differentiable (a gather)."""
        flat = self._flat(values)
        index, real = self._row_index(flat.device)
        gathered = flat[index]
        real = real.reshape(*real.shape, *([1] * (flat.dim() - 1)))
        return torch.where(real, gathered, torch.zeros((), dtype=flat.dtype, device=flat.device))

    def _scatter_index(self, values: torch.Tensor):
        flat = self._flat(values)
        index, real = self._row_index(flat.device)
        rows = self.rows.to(flat.device)[:, None].expand_as(index)
        cols = torch.arange(index.shape[1], device=flat.device).expand_as(index)
        return flat, (rows[real], cols[real]), flat[index[real]]

    def unpack(self, values: torch.Tensor, num_rows: int, width: int) -> torch.Tensor:
        """``values [1, T, ...]`` -> ``[num_rows, width, ...]``: each document at its original
        row, columns ``[0, length)``; zeros elsewhere (padding dropped). Differentiable."""
        flat, index, source = self._scatter_index(values)
        out = flat.new_zeros((num_rows, width, *flat.shape[1:]))
        return out.index_put(index, source)

    def unpack_into(self, out: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values [1, T, ...]`` at the documents' original rows of ``out`` (in place)."""
        _, index, source = self._scatter_index(values)
        out.index_put_(index, source.to(out.dtype))

    def expand(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """``[n]`` per-document values -> ``[1, T]`` per token (0 on padding)."""
        padded = torch.cat([per_sequence, per_sequence.new_zeros(1)])
        return padded[self.segment_ids.to(per_sequence.device)].unsqueeze(0)


def _pack_tokens(value: torch.Tensor, flat_index: torch.Tensor, total: int) -> torch.Tensor:
    """Rows' columns at ``flat_index`` (into ``value`` viewed ``[N*S, ...]``), zero-padded to T."""
    flat = value.reshape(value.shape[0] * value.shape[1], *value.shape[2:])[flat_index]
    pad = flat.new_zeros((total - flat.shape[0], *flat.shape[1:]))
    return torch.cat([flat, pad]).unsqueeze(0)


def pack_micro_batch(input_ids: torch.Tensor, targets: torch.Tensor, target_mask: torch.Tensor,
                     micro_batch: MicroBatch,
                     token_extras: Optional[Mapping[str, torch.Tensor]] = None,
                     sequence_extras: Optional[Mapping[str, torch.Tensor]] = None,
                     ) -> PackedMicroBatch:
    """The packed layout of ``micro_batch`` (``width`` = T) from whole-batch tensors."""
    n_cols = input_ids.shape[1]
    lengths = tuple(micro_batch.lengths)
    total = micro_batch.width
    if sum(lengths) > total or any(n > n_cols for n in lengths):
        raise ValueError(f"micro-batch of lengths {lengths} does not fit T={total} / "
                         f"the batch width {n_cols}")
    rows = torch.tensor(micro_batch.rows, dtype=torch.long)
    pieces = [r * n_cols + torch.arange(n) for r, n in zip(micro_batch.rows, lengths)]
    flat_index = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    bounds = torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)
    real_total = int(bounds[-1])
    padded = bounds.clone()
    padded[-1] = total
    if not lengths:  # one segment of real length 0 covering the padding
        bounds, padded = torch.tensor([0, 0]), torch.tensor([0, total])
    segment_lengths = (padded[1:] - padded[:-1]).tolist()
    positions = torch.cat([torch.arange(n) for n in segment_lengths])
    segment = torch.full((total,), -1, dtype=torch.long)
    segment[:real_total] = torch.repeat_interleave(torch.arange(len(lengths)),
                                                   torch.tensor(lengths, dtype=torch.long))
    pack = lambda value: _pack_tokens(value, flat_index, total)  # noqa: E731
    return PackedMicroBatch(
        rows=rows, lengths=lengths, input_ids=pack(input_ids), position_ids=positions[None],
        targets=pack(targets), mask=pack(target_mask.bool()), segment_ids=segment,
        cu_seqlens=bounds.to(torch.int32), cu_seqlens_padded=padded.to(torch.int32),
        max_seqlen=max(segment_lengths),
        token_extras={k: pack(v) for k, v in (token_extras or {}).items()},
        sequence_extras={k: v[rows] for k, v in (sequence_extras or {}).items()})


def build_micro_batches(plan, dp_rank: int, input_ids: torch.Tensor, targets: torch.Tensor,
                        target_mask: torch.Tensor,
                        token_extras: Optional[Mapping[str, torch.Tensor]] = None,
                        sequence_extras: Optional[Mapping[str, torch.Tensor]] = None,
                        device=None) -> list:
    """The layouts of one rank's micro-batches under ``plan`` (padded or packed by
    ``plan.mode``), in feed order, moved to ``device`` when given."""
    make = pack_micro_batch if plan.mode == "packed" else pad_micro_batch
    out = [make(input_ids, targets, target_mask, mb, token_extras, sequence_extras)
           for mb in plan.micro_batches(dp_rank)]
    return out if device is None else [mb.to(device) for mb in out]


def scatter_rows(micro_batches: Sequence, values: Sequence[torch.Tensor], num_rows: int,
                 width: int) -> torch.Tensor:
    """Per-micro-batch results (padded ``[b, w]`` or packed ``[1, T]``) -> one
    ``[num_rows, width]`` tensor at the original rows; zeros at rows no micro-batch holds
    (e.g. another DP rank's), so a sum over ranks completes it."""
    if len(micro_batches) != len(values):
        raise ValueError("one result per micro-batch")
    if not micro_batches:
        raise ValueError("no micro-batches to scatter")
    first = values[0]
    trailing = first.shape[2:] if isinstance(micro_batches[0], PaddedMicroBatch) else \
        micro_batches[0]._flat(first).shape[1:]
    out = first.new_zeros((num_rows, width, *trailing))
    for mb, value in zip(micro_batches, values):  # rows are disjoint: write in place
        mb.unpack_into(out, value)
    return out
