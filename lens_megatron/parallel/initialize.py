"""Process groups: torch.distributed (NCCL on GPU, gloo on CPU) and Megatron's
tensor/pipeline/data-parallel groups."""
from __future__ import annotations

import datetime
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

from . import cpu_mode
from .env import DistEnv, detect_dist_env

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
    logger.info("process group up: rank %d/%d via %s (%s)", env.rank, env.world_size,
                env.launcher, backend)
    return env


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
