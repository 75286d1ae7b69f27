"""Deterministic, resumable batches of prompts.

Epoch ``e`` visits the records in the order of a permutation drawn from
``numpy.random.default_rng(SeedSequence([seed, e]))`` (the identity when
``shuffle=False``), so every epoch is reshuffled and a run is reproducible from its seed.
Batches never straddle an epoch boundary: with ``drop_last`` the incomplete tail of an
epoch is skipped (every batch has exactly ``batch_size`` prompts, which RL steps
expect), otherwise it is yielded as a smaller batch.

The position is ``(epoch, index)``: the index into that epoch's order of the next record.
``state_dict()`` / ``load_state_dict()`` save and restore it (with the seed), so a
resumed run yields exactly the batches the interrupted one would have.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

Item = TypeVar("Item")


class PromptSampler(Generic[Item]):
    """Iterator over batches of ``batch_size`` items of ``records``.

    Args:
        records: the prompt set (any sequence, typically ``PromptRecord``s).
        batch_size: prompts per batch (the number of groups B of a step).
        seed: base seed of the per-epoch shuffles.
        shuffle: reshuffle every epoch; if False, file order every epoch.
        drop_last: skip an epoch's tail shorter than ``batch_size``.
        max_epochs: stop after this many epochs; None iterates forever.
    """

    def __init__(
        self,
        records: Sequence[Item],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        max_epochs: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not records:
            raise ValueError("PromptSampler needs at least one record")
        if drop_last and batch_size > len(records):
            raise ValueError(
                f"batch_size {batch_size} exceeds the {len(records)} records and drop_last is set"
            )
        if max_epochs is not None and max_epochs < 1:
            raise ValueError(f"max_epochs must be >= 1 or None, got {max_epochs}")
        self.records = records
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.max_epochs = max_epochs
        self.epoch = 0
        self.index = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Record indices in the order epoch ``epoch`` visits them."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        if self.shuffle:
            generator = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            order = generator.permutation(len(self.records))
        else:
            order = np.arange(len(self.records))
        self._order_cache = (epoch, order)
        return order

    def _epoch_has_batch_left(self) -> bool:
        left = len(self.records) - self.index
        return left >= self.batch_size or (left > 0 and not self.drop_last)

    def next_batch(self) -> list[Item]:
        """The next batch; raises ``StopIteration`` after ``max_epochs`` epochs."""
        if not self._epoch_has_batch_left():
            self.epoch += 1
            self.index = 0
        if self.max_epochs is not None and self.epoch >= self.max_epochs:
            raise StopIteration
        order = self.epoch_order(self.epoch)
        selected = order[self.index : self.index + self.batch_size]
        self.index += len(selected)
        return [self.records[int(i)] for i in selected]

    def __iter__(self) -> Iterator[list[Item]]:
        return self

    def __next__(self) -> list[Item]:
        return self.next_batch()

    def batches_per_epoch(self) -> int:
        """Number of batches one epoch yields."""
        full, tail = divmod(len(self.records), self.batch_size)
        return full + (1 if tail and not self.drop_last else 0)

    def state_dict(self) -> dict[str, Any]:
        """The position and seed (plus the dataset size, checked on restore)."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_records": len(self.records),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a position saved by :meth:`state_dict` (its seed wins over ours)."""
        missing = {"epoch", "index", "seed"} - set(state)
        if missing:
            raise KeyError(f"sampler state lacks {sorted(missing)}")
        saved_size = state.get("num_records", len(self.records))
        if saved_size != len(self.records):
            raise ValueError(
                f"sampler state is for {saved_size} records but this prompt set has "
                f"{len(self.records)}"
            )
        if not 0 <= int(state["index"]) <= len(self.records) or int(state["epoch"]) < 0:
            raise ValueError(f"sampler state out of range: {state}")
        if int(state["seed"]) != self.seed:
            logger.info("sampler seed %d replaced by the saved seed %d", self.seed, state["seed"])
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._order_cache = None
