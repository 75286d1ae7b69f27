"""The loop on separate rollout ranks (``rollout.placement: separate``).

Each rollout rank holds a generator — the native sampler over its own megatron model at
``rollout.tensor_parallel_size``, or vLLM at ``rollout.vllm.tensor_parallel_size`` — whose weights
come only from the trainer's broadcasts (``weight_broadcast.py``). For step t it first takes the
weight broadcasts it needs so that its weights are at most ``rollout.max_staleness`` versions
behind (version >= t - k), then generates and scores that step's prompts
(``generation.collect_step``, the same stage the colocated trainer runs) and sends the scored
batch to trainer rank 0 without waiting for it to be taken. The trainer's ``Hello`` says where to
start (a resume continues exactly where the checkpoint's in-flight batches end); a stop message
ends the loop with the trainer's exit code. On an error, rollout rank 0 reports it to the trainer
(rank and message) before this process exits non-zero.
"""
from __future__ import annotations

import logging
import time
import traceback

import torch.distributed as dist

from .exchange import Failure, Hello, MessageChannel
from .generation import collect_step
from .source import engine_shard_fn
from .weight_broadcast import WeightReceiver

logger = logging.getLogger(__name__)


class RolloutStopped(Exception):
    """The trainer said stop; ``exit_code`` is its own."""

    def __init__(self, exit_code: int) -> None:
        super().__init__(exit_code)
        self.exit_code = exit_code


class RolloutWorker:
    def __init__(self, cfg, groups, generator, scorer, prompts, receiver: WeightReceiver):
        """``generator``: an object with ``engine`` (a RolloutEngine), ``apply_weights(stream)``,
        ``dp_rank``, ``dp_size`` and ``leader`` (does this rank score its replica's share)."""
        self.cfg, self.groups = cfg, groups
        self.generator, self.scorer, self.prompts = generator, scorer, prompts
        self.receiver = receiver
        self.channel = MessageChannel(groups.batches, peer=0) if groups.batches is not None else None
        self.version = -1
        self.shard_fn = engine_shard_fn(generator.engine, generator.dp_rank, generator.dp_size,
                                        generator.leader)

    def _hello(self) -> Hello:
        hello = self.channel.recv() if self.channel is not None else None
        if dist.get_world_size() > 1:
            box = [hello]
            dist.broadcast_object_list(box, src=0)
            hello = box[0]
        return hello

    def _take_weights(self) -> float:
        start = time.perf_counter()
        message = self.receiver.receive(self.generator.apply_weights)
        if message.stop:
            raise RolloutStopped(message.exit_code)
        self.version = message.version
        return time.perf_counter() - start

    def run(self) -> int:
        """Generate until the trainer stops us; returns the exit code to leave with."""
        try:
            return self._loop()
        except RolloutStopped as stop:
            return stop.exit_code
        except Exception as exc:  # tell the trainer who failed, then fail
            if self.channel is not None:
                me = self.groups.describe_rollout_rank(self.groups.roles.role_rank)
                try:
                    self.channel.send(Failure(me, f"{type(exc).__name__}: {exc}\n"
                                              f"{traceback.format_exc(limit=8)}"))
                except Exception:  # noqa: BLE001 - the trainer may be gone as well
                    pass
            raise

    def _loop(self) -> int:
        hello = self._hello()
        if hello.data_state is not None:
            self.prompts.load_state_dict(hello.data_state)
        waited = self._take_weights()
        k = self.cfg.rollout.max_staleness
        step = hello.start_step
        while step < hello.max_steps:
            while self.version < step - k:
                waited += self._take_weights()
            scored = collect_step(self.cfg, self.generator.engine, self.scorer, self.prompts,
                                  step, self.version, self.shard_fn)
            scored.timings["time/rollout_wait_for_weights_s"] = waited
            waited = 0.0
            if self.channel is not None:
                self.channel.send(scored, blocking=False)
            step += 1
        while True:  # every step generated: take the trainer's last broadcasts until stop
            self._take_weights()

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
        close = getattr(self.generator.engine, "close", None)
        if close is not None:
            close()
