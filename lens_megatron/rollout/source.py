"""Where the trainer's scored rollouts come from (``rollout.placement``).

The trainer asks a source for the batch of each step (``next(step)``) and tells it when the
weights changed (``weights_updated(version)``); the synchronous and the one-step-off loop are the
same loop over two sources:

* :class:`LocalRollouts` — colocated: every rank generates its share now, with the weights it
  has, and scores it (``generation.collect_step``); a weight update syncs the engine.
* :class:`RemoteRollouts` — separate rollout ranks (``worker.py``) generate ahead, at most
  ``rollout.max_staleness`` optimizer versions behind; a weight update broadcasts the new
  weights to them (``weight_broadcast.py``). Trainer rank 0 receives each batch and shares it
  with the other trainer ranks.

Both keep what a resume needs: the data position, and for the remote source the batches already
generated but not yet trained (``state_dict`` / ``buffered``), so a resumed run neither skips nor
repeats a prompt and trains on the same samples as an uninterrupted one.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

import torch.distributed as dist

from .exchange import Failure, Hello, MessageChannel, RolloutRankFailed, ScoredBatch
from .generation import balanced_shard, collect_step

logger = logging.getLogger(__name__)


def engine_shard_fn(engine, dp_rank: int, dp_size: int, leader: bool):
    """How a step's prompts are shared over the generating replicas of this role's world.
    ``leader``: does this rank score and publish its share (one rank per share: under context
    parallelism the CP ranks of a DP rank generate the same share, and only CP rank 0 may
    publish it)."""
    layout = getattr(engine, "layout", None)

    def shard(n: int):
        if layout is not None:  # vLLM: one share per replica, scored by its TP rank 0
            return layout.shard(n), layout.replica_index, layout.tp_rank == 0
        return balanced_shard(n, dp_rank, dp_size), dp_rank, leader

    return shard


class LocalRollouts:
    """Colocated: generate and score on this job's (trainer) ranks, with the current weights."""

    placement = "colocated"

    def __init__(self, cfg, engine, scorer, prompts, shard_fn) -> None:
        self.cfg, self.engine, self.scorer, self.prompts = cfg, engine, scorer, prompts
        self.shard_fn = shard_fn

    def next(self, step: int) -> ScoredBatch:
        return collect_step(self.cfg, self.engine, self.scorer, self.prompts, step, step,
                            self.shard_fn)

    def weights_updated(self, version: int) -> dict[str, float]:
        return self.engine.sync_weights()

    def state_dict(self, step: int) -> dict:
        return {"data": self.prompts.state_dict()}

    def buffered(self) -> list[ScoredBatch]:
        return []

    def load_state_dict(self, state: dict, buffered: list[ScoredBatch], step: int) -> None:
        self.prompts.load_state_dict(state["data"])
        if buffered:
            raise ValueError("this checkpoint holds rollouts generated ahead by separate rollout "
                             "ranks (rollout.placement: separate); resume it with that placement")
        self.engine.sync_weights()  # the engine was built from the initial weights

    def stop(self, version: int, exit_code: int = 0) -> None:
        return None


class RemoteRollouts:
    """Separate placement, trainer side. Collective over the trainer ranks."""

    placement = "separate"

    def __init__(self, cfg, groups, weight_stream, broadcaster) -> None:
        """``weight_stream()``: the actor's full weights (collective over the trainer ranks);
        ``broadcaster``: a ``WeightBroadcaster`` on trainer rank 0, None on the others."""
        self.cfg, self.groups = cfg, groups
        self.weight_stream, self.broadcaster = weight_stream, broadcaster
        self.channel = (MessageChannel(groups.batches, peer=1)
                        if groups.batches is not None else None)
        self.queue: dict[int, ScoredBatch] = {}  # received, not yet trained
        self.next_to_receive = 0
        self.data_state: Optional[dict] = None
        self.started = False
        self.waited_s = 0.0

    # ------------------------------------------------------------------ start and stop
    def start(self, step: int, version: int) -> None:
        """Tell the rollout side where to start and give it the weights of ``version``."""
        first = step + len(self.queue)
        self.next_to_receive = first
        if self.channel is not None:
            self._guard(lambda: self.channel.send(
                Hello(first, self.data_state, self.cfg.trainer.max_steps)))
        self._send_weights(version)
        self.started = True

    def stop(self, version: int, exit_code: int = 0) -> None:
        if self.broadcaster is not None and self.started:
            self._guard(lambda: self.broadcaster.stop(version, exit_code))
        self.started = False

    # ------------------------------------------------------------------ the loop
    def next(self, step: int) -> ScoredBatch:
        if not self.started:
            self.start(step, step)
        start = time.perf_counter()
        while step not in self.queue:
            self._receive_one()
        self.waited_s = time.perf_counter() - start
        scored = self.queue.pop(step)
        lag = step - scored.weight_version
        if lag > self.cfg.rollout.max_staleness or lag < 0:
            raise RuntimeError(f"step {step + 1}: rollout generated by weight version "
                               f"{scored.weight_version}, outside the staleness bound "
                               f"rollout.max_staleness={self.cfg.rollout.max_staleness}")
        scored.timings["time/wait_for_rollout_s"] = self.waited_s
        return scored

    def weights_updated(self, version: int) -> dict[str, float]:
        start = time.perf_counter()
        self._send_weights(version)
        return {"weight_broadcast_s": time.perf_counter() - start}

    def _send_weights(self, version: int) -> None:
        stream = self.weight_stream()
        if self.broadcaster is not None:
            self._guard(lambda: self.broadcaster.send(version, stream))
        else:
            for _ in stream:  # the other trainer ranks take part in the TP/PP gathers
                pass

    def _receive_one(self) -> None:
        """Trainer rank 0 receives the next batch; every trainer rank gets it."""
        message = self._guard(self.channel.recv) if self.channel is not None else None
        if dist.get_world_size() > 1:
            box = [message]
            dist.broadcast_object_list(box, src=0)
            message = box[0]
        if isinstance(message, Failure):
            raise RolloutRankFailed(f"{message.rank} failed: {message.message}")
        if not isinstance(message, ScoredBatch) or message.step != self.next_to_receive:
            raise RuntimeError(f"expected the rollout of step {self.next_to_receive + 1}, got "
                               f"{type(message).__name__} {getattr(message, 'step', '?')}")
        self.queue[message.step] = message
        self.data_state = message.data_state
        self.next_to_receive += 1

    def _guard(self, call):
        try:
            return call()
        except RolloutRankFailed:
            raise
        except RuntimeError as exc:  # gloo: "Connection closed by peer"; a timeout
            raise RolloutRankFailed(
                f"{self.groups.describe_rollout_rank(0)} stopped responding (killed, crashed or "
                f"hung past trainer.timeout_minutes={self.cfg.trainer.timeout_minutes}): "
                f"{exc}") from exc

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, step: int) -> dict:
        """Receive every batch generated with weights older than ``step`` (they cannot be
        regenerated from this checkpoint's weights), then the position after them."""
        last = step + self.cfg.rollout.max_staleness - 1
        while self.started and self.next_to_receive <= min(last, self.cfg.trainer.max_steps - 1):
            self._receive_one()
        return {"data": self.data_state}

    def buffered(self) -> list[ScoredBatch]:
        return [self.queue[s] for s in sorted(self.queue)]

    def load_state_dict(self, state: dict, buffered: list[ScoredBatch], step: int) -> None:
        self.data_state = state["data"]
        self.queue = {b.step: b for b in buffered}
