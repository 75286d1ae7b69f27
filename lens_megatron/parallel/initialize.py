"""Process groups: torch.distributed (NCCL on GPU, gloo on CPU) and Megatron's
tensor/pipeline/data-parallel groups; which host every rank runs on, so that a lost peer is
reported by node name (:func:`describe_peer_failure`)."""
from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from . import cpu_mode
from .env import PEER_LOST_EXIT_CODE, DistEnv, detect_dist_env

logger = logging.getLogger(__name__)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_process_group(backend: str = "auto", timeout_minutes: int = 30,
                       env: Optional[DistEnv] = None) -> DistEnv:
    """Initialise ``torch.distributed`` from the launcher's environment (idempotent)."""
    env = env or detect_dist_env()
    if backend == "auto":
        backend = default_backend()
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("backend nccl requested but no CUDA device is visible; use gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    else:
        cpu_mode.enable()
    if dist.is_initialized():
        return env
    if env.launcher == "single" and "MASTER_PORT" not in os.environ:
        from .spawn import find_free_port

        env = DistEnv(0, 1, 0, 1, env.master_addr, find_free_port(), "single")
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    record_rank_hosts()
    logger.info("process group up: rank %d/%d on %s via %s (%s), rendezvous %s:%d",
                env.rank, env.world_size, socket.gethostname(), env.launcher, backend,
                env.master_addr, env.master_port)
    return env


# -- where every rank runs, and what to say when one of them is lost ----------------------------
@dataclass(frozen=True)
class RankHost:
    rank: int
    host: str
    addresses: tuple[str, ...]  # this host's IPv4 addresses (what peers see in socket errors)


_rank_hosts: list[RankHost] = []


def _ipv4_addresses() -> tuple[str, ...]:
    import psutil

    return tuple(a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family == socket.AF_INET)


def record_rank_hosts() -> list[RankHost]:
    """Gather every rank's host name and addresses (one ``all_gather_object`` at start-up)."""
    mine = RankHost(dist.get_rank(), socket.gethostname(), _ipv4_addresses())
    table: list = [None] * dist.get_world_size()
    dist.all_gather_object(table, mine)
    _rank_hosts[:] = table
    return list(_rank_hosts)


# A communication failure: gloo's transport errors name the peer as "[address]:port".
_PEER_ADDRESS = re.compile(r"\[([0-9A-Fa-f.:]+)\]:\d+")
_COMM_FAILURE = re.compile(r"gloo/transport|Connection (?:reset|closed) by peer|Broken pipe|"
                           r"ProcessGroupNCCL|NCCL (?:error|communicator)", re.IGNORECASE)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _who(address: str) -> str:
    """``node2 (10.199.0.12, rank 1)`` for a peer address, from the table gathered at start."""
    me = dist.get_rank() if dist.is_initialized() else -1
    owners = [r for r in _rank_hosts if address in r.addresses and r.rank != me]
    if not owners:
        return address
    hosts = sorted({r.host for r in owners})
    ranks = ", ".join(str(r.rank) for r in owners)
    return f"{' or '.join(hosts)} ({address}, rank{'s' if len(owners) > 1 else ''} {ranks})"


def describe_peer_failure(exc: BaseException, timeout_minutes: Optional[int] = None,
                          ) -> Optional[str]:
    """A one-paragraph report when ``exc`` (or its cause) is a lost connection to another rank
    or a collective/rendezvous timeout; None for any other error (which should propagate)."""
    for error in _chain(exc):
        text = str(error)
        if not (isinstance(error, dist.DistError) or
                (isinstance(error, RuntimeError) and _COMM_FAILURE.search(text))):
            continue
        me = f"rank {dist.get_rank()}" if dist.is_initialized() else "this process"
        found = _PEER_ADDRESS.search(text)
        if found:
            who = _who(found.group(1))
        elif "timed out" in text.lower() and timeout_minutes is not None:
            who = f"a peer that did not answer within trainer.timeout_minutes={timeout_minutes}"
        else:
            who = "a peer"
        detail = " ".join(text.split()).split(" This is typically caused")[0][:400]
        return (f"{me} on {socket.gethostname()} lost contact with {who}: "
                f"{type(error).__name__}: {detail} -- a process of this job died or its node "
                f"went down; exiting with code {PEER_LOST_EXIT_CODE} (the SLURM batch script "
                "requeues the job, which resumes from its last checkpoint)")
    return None


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> None:
    """Megatron's TP/PP/DP groups plus its RNG tracker; requires an initialised process group."""
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError("call init_process_group() before initialize_model_parallel()")
    cpu_mode.enable()  # no-op with a GPU
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by TP×PP×CP = {tensor_model_parallel_size}×"
            f"{pipeline_model_parallel_size}×{context_parallel_size}"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    with cpu_mode.cuda_to_cpu():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_from_config(cfg):
    """The process groups for a ``LensTrainConfig``; returns the ``roles.RoleGroups`` of a
    separate rollout placement (None when colocated).

    Colocated: ``torch.distributed`` over the whole job (if not up yet) and megatron's groups
    for the training layout. Separate: each role gets its own default group (``roles.py``);
    megatron's training groups are built on the trainer ranks here, the rollout ranks build
    theirs for the sampler (``rollout/rollout_rank.py``).
    """
    groups = None
    if cfg.rollout.placement == "separate":
        from .roles import TRAINER, init_role_groups

        backend = cfg.trainer.backend if cfg.trainer.backend != "auto" else default_backend()
        if torch.cuda.is_available():
            local = detect_dist_env().local_rank
            torch.cuda.set_device(local % torch.cuda.device_count())
        else:
            cpu_mode.enable()
        groups = init_role_groups(cfg, detect_dist_env(), backend)
        if groups.roles.role != TRAINER:
            return groups
    else:
        init_process_group(cfg.trainer.backend, cfg.trainer.timeout_minutes)
    m = cfg.model
    initialize_model_parallel(m.tensor_model_parallel_size, m.pipeline_model_parallel_size,
                              m.virtual_pipeline_model_parallel_size, m.context_parallel_size,
                              seed=cfg.trainer.seed, timeout_minutes=cfg.trainer.timeout_minutes)
    return groups


def destroy_parallel() -> None:
    """Tear down Megatron's groups (and the default process group if we own it)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
