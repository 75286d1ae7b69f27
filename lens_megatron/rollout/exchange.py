"""What trainer and rollout ranks say to each other over the ``batches`` channel
(``parallel/roles.py``): framed, pickled messages on a two-rank gloo group.

Messages: :class:`Hello` (trainer -> rollout, once: where to start), :class:`ScoredBatch`
(rollout -> trainer, one per step: the scored rollout of that step, the weight version that
generated it, the data position after it and the rollout side's timings) and
:class:`Failure` (rollout -> trainer: the rollout side raised; its rank and message).

Frames are ``[length int64]`` then ``[payload uint8]``. Sends from the rollout side are
non-blocking (``isend``): the rollout rank goes on to receive the next weights while the trainer
has not taken the batch yet — with blocking sends the one-step-off schedule would deadlock.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .base import RolloutBatch

_TAG_LENGTH, _TAG_PAYLOAD = 11, 12


@dataclass
class Hello:
    start_step: int  # the first step the rollout side generates
    data_state: Optional[dict]  # the prompt position to draw it from (None: the config's start)
    max_steps: int  # generate no step at or past this one


@dataclass
class ScoredBatch:
    """One step's scored rollout, as the trainer consumes it (colocated or remote)."""

    step: int
    weight_version: int  # optimizer version of the weights that generated it
    batch: RolloutBatch
    rewards: torch.Tensor  # [N] float32
    reward_counts: dict[str, float]
    data_state: Optional[dict] = None  # prompt position after this step's prompts
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. dynamic sampling counts


@dataclass
class Failure:
    rank: str
    message: str


class RolloutRankFailed(RuntimeError):
    """A rollout rank stopped (crashed, was killed, or reported an error)."""


def _encode(obj: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)),
                            dtype=torch.uint8)


class MessageChannel:
    """Framed pickled messages between the two ranks of a gloo group (``peer`` is the other)."""

    def __init__(self, group, peer: int) -> None:
        self.group, self.peer = group, peer
        self._pending: list = []  # (work, buffers) of sends still in flight

    def send(self, obj: Any, blocking: bool = True) -> None:
        payload = _encode(obj)
        length = torch.tensor([payload.numel()], dtype=torch.int64)
        works = [self.group.send([length], self.peer, _TAG_LENGTH),
                 self.group.send([payload], self.peer, _TAG_PAYLOAD)]
        if blocking:
            for work in works:
                work.wait()
        else:
            self._pending.append((works, (length, payload)))
            self._reap()

    def _reap(self) -> None:
        self._pending = [(w, b) for w, b in self._pending if not all(x.is_completed() for x in w)]

    def flush(self) -> None:
        for works, _ in self._pending:
            for work in works:
                work.wait()
        self._pending = []

    def recv(self) -> Any:
        length = torch.zeros(1, dtype=torch.int64)
        self.group.recv([length], self.peer, _TAG_LENGTH).wait()
        payload = torch.empty(int(length), dtype=torch.uint8)
        self.group.recv([payload], self.peer, _TAG_PAYLOAD).wait()
        return pickle.loads(payload.numpy().tobytes())
