"""Rollout placement (``rollout.placement``): which ranks of the job train and which generate,
and the process groups between them.

``colocated`` (default): every rank trains and generates; ``torch.distributed``'s default group
is the whole job, as it always was.

``separate``: the last ``rollout.num_ranks`` ranks of the job only generate, the others only
train. One job (torchrun or srun) with no extra cluster manager:

* every process meets the others through one job-wide store (the launcher's rendezvous at
  ``MASTER_ADDR:MASTER_PORT``, torchrun's agent store when there is one);
* each role gets its *own* default process group (``init_process_group`` on a prefixed store),
  so megatron-core — whose groups always span the default group — builds TP/PP/DP over the
  trainer ranks on one side and the rollout sampler's TP over the rollout ranks on the other;
* two groups join the roles, built directly on the store (not registered with the default
  group, so they are used through their own methods): ``weights`` — trainer rank 0 and every
  rollout rank (NCCL on GPU, gloo on CPU), for the versioned weight broadcast; ``batches`` —
  trainer rank 0 and rollout rank 0 (gloo), for the scored batches and control messages.

Everything here is pure bookkeeping (:class:`JobRoles`) plus :func:`init_role_groups`.
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TRAINER, ROLLOUT = "trainer", "rollout"


@dataclass(frozen=True)
class JobRoles:
    """The job's ranks split into trainer ranks ``[0, T)`` and rollout ranks ``[T, W)``."""

    world_size: int
    num_rollout_ranks: int
    global_rank: int

    def __post_init__(self) -> None:
        if not 0 <= self.num_rollout_ranks < self.world_size:
            raise ValueError(f"rollout ranks ({self.num_rollout_ranks}) must leave at least one "
                             f"of the job's {self.world_size} ranks to train")
        if not 0 <= self.global_rank < self.world_size:
            raise ValueError(f"rank {self.global_rank} outside a world of {self.world_size}")

    @property
    def num_trainer_ranks(self) -> int:
        return self.world_size - self.num_rollout_ranks

    @property
    def separate(self) -> bool:
        return self.num_rollout_ranks > 0

    @property
    def role(self) -> str:
        return TRAINER if self.global_rank < self.num_trainer_ranks else ROLLOUT

    @property
    def role_rank(self) -> int:
        """This rank within its role's own world."""
        return self.global_rank - (0 if self.role == TRAINER else self.num_trainer_ranks)

    @property
    def role_size(self) -> int:
        return self.num_trainer_ranks if self.role == TRAINER else self.num_rollout_ranks

    @property
    def rollout_global_ranks(self) -> list[int]:
        return list(range(self.num_trainer_ranks, self.world_size))

    def weights_channel_rank(self) -> Optional[int]:
        """Rank in the ``weights`` group (trainer rank 0 is 0, rollout rank i is 1 + i)."""
        if self.role == ROLLOUT:
            return 1 + self.role_rank
        return 0 if self.role_rank == 0 else None

    def batches_channel_rank(self) -> Optional[int]:
        """Rank in the ``batches`` group (trainer rank 0 is 0, rollout rank 0 is 1)."""
        if self.role_rank != 0:
            return None
        return 0 if self.role == TRAINER else 1


@dataclass
class RoleGroups:
    """This process's role and the groups between the roles (None where it is not a member)."""

    roles: JobRoles
    weights: Optional[object]  # torch ProcessGroup (gloo or NCCL)
    batches: Optional[object]  # torch ProcessGroupGloo
    timeout: datetime.timedelta

    def describe_rollout_rank(self, role_rank: int) -> str:
        return (f"rollout rank {role_rank} (global rank "
                f"{self.roles.rollout_global_ranks[role_rank]})")


def job_roles(cfg, global_rank: int, world_size: int) -> JobRoles:
    separate = cfg.rollout.placement == "separate"
    return JobRoles(world_size, cfg.rollout.num_ranks if separate else 0, global_rank)


def _job_store(env, timeout: datetime.timedelta):
    """The job-wide store through the launcher's rendezvous (torchrun's agent store when there
    is one, else a TCP store hosted by global rank 0)."""
    url = (f"tcp://{env.master_addr}:{env.master_port}?rank={env.rank}"
           f"&world_size={env.world_size}")
    store, _, _ = next(dist.rendezvous(url, timeout=timeout))
    return store


def _new_group(store, prefix: str, rank: int, size: int, backend: str,
               timeout: datetime.timedelta):
    prefixed = dist.PrefixStore(prefix, store)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    return dist.ProcessGroupGloo(prefixed, rank, size, timeout)


def init_role_groups(cfg, env, backend: str) -> RoleGroups:
    """``separate`` placement: this role's default process group and the two channels."""
    timeout = datetime.timedelta(minutes=cfg.trainer.timeout_minutes)
    roles = job_roles(cfg, env.rank, env.world_size)
    store = _job_store(env, timeout)
    dist.init_process_group(backend=backend, store=dist.PrefixStore(f"lens/{roles.role}", store),
                            rank=roles.role_rank, world_size=roles.role_size, timeout=timeout)
    weights_rank, batches_rank = roles.weights_channel_rank(), roles.batches_channel_rank()
    weights = (None if weights_rank is None else
               _new_group(store, "lens/channel/weights", weights_rank,
                          1 + roles.num_rollout_ranks, backend, timeout))
    batches = (None if batches_rank is None else
               _new_group(store, "lens/channel/batches", batches_rank, 2, "gloo", timeout))
    logger.info("rank %d: %s rank %d of %d (%s)", env.rank, roles.role, roles.role_rank,
                roles.role_size, backend)
    return RoleGroups(roles, weights, batches, timeout)


def channel_device(backend: str) -> torch.device:
    """Where tensors sent over the ``weights`` group must be (NCCL: the current GPU)."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
