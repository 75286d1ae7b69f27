"""Where this process sits in the job: rank, world size, local rank and rendezvous address,
read from torchrun (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT) or from SLURM
(SLURM_PROCID/SLURM_STEP_NUM_TASKS/SLURM_LOCALID/SLURM_STEP_NODELIST, only inside an srun
step), or a single process.

torchrun wins when both are present (``srun torchrun`` with one task per node sets both).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping, Optional

DEFAULT_MASTER_PORT = 29500

#: Exit status of a rank that lost contact with a peer mid-run (a process of the job died or its
#: node went down; ``lens_megatron.parallel.initialize.describe_peer_failure``). The generated
#: SLURM batch script requeues the job on it, so the run resumes from its last checkpoint.
PEER_LOST_EXIT_CODE = 76


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single

    @property
    def node_rank(self) -> int:
        return self.rank // max(1, self.local_world_size)


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist such as ``gpu[001-003,007],login1`` into host names."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}{suffix}")
    return hosts


def _int(env: Mapping[str, str], key: str, default: Optional[int] = None) -> int:
    value = env.get(key)
    if value is None or value == "":
        if default is None:
            raise KeyError(f"environment variable {key} is required but not set")
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {key}={value!r} is not an integer") from exc


def _slurm_tasks_per_node(env: Mapping[str, str], world_size: int) -> int:
    # SLURM_NTASKS_PER_NODE is set only with --ntasks-per-node; SLURM_STEP_TASKS_PER_NODE /
    # SLURM_TASKS_PER_NODE look like "4(x2)" or "4,3".
    # The step's own layout first: `srun -n1` inside a --ntasks-per-node=2 job still
    # inherits SLURM_NTASKS_PER_NODE=2.
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            return int(re.match(r"\d+", env[key]).group(0))
    return world_size


def slurm_master_port(env: Mapping[str, str]) -> int:
    """A port derived from the job id, so concurrent jobs on one node do not collide."""
    if env.get("MASTER_PORT"):
        return _int(env, "MASTER_PORT")
    job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
    return 20000 + job_id % 20000


def detect_dist_env(env: Optional[Mapping[str, str]] = None) -> DistEnv:
    """Read the launcher's environment. ``env`` defaults to ``os.environ``."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        return DistEnv(
            rank=_int(env, "RANK"),
            world_size=world,
            local_rank=_int(env, "LOCAL_RANK", 0),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", world),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
            launcher="torchrun",
        )
    # Only inside an srun step: the batch shell itself also has SLURM_PROCID=0 and
    # SLURM_NTASKS=<job tasks>, and would wait forever for ranks that are not there.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _int(env, "SLURM_STEP_NUM_TASKS")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        hosts = expand_slurm_nodelist(nodelist) if nodelist else []
        return DistEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", 0),
            local_world_size=_slurm_tasks_per_node(env, world),
            master_addr=env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
            master_port=slurm_master_port(env),
            launcher="slurm",
        )
    return DistEnv(0, 1, 0, 1, env.get("MASTER_ADDR", "127.0.0.1"),
                   _int(env, "MASTER_PORT", DEFAULT_MASTER_PORT), "single")
