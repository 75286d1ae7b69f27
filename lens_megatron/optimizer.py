"""Megatron training wrappers: mixed-precision module, DDP (optionally with the distributed
optimizer), Adam (Transformer Engine / apex fused Adam when present, torch AdamW otherwise —
megatron-core picks), the LR schedule, and the gradient-finalisation hooks.

Loss normalisation contract: our loss functions already divide by the *global* number of
sequences (or tokens) of the optimizer step, so gradients must be summed — not averaged —
over micro-batches and data-parallel ranks. We therefore set
``calculate_per_token_loss=True`` (DDP sums instead of averaging over DP) and return
``num_tokens = 0`` from every loss function (megatron's schedule then neither divides the
loss by the micro-batch count nor ``finalize_model_grads`` by a token count).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .config import ModelConfig, OptimConfig
from .parallel import cpu_mode


@dataclass
class TrainingModel:
    chunks: list  # DDP-wrapped model chunks (one per virtual pipeline stage)
    optimizer: object  # megatron MegatronOptimizer / ChainedOptimizer
    scheduler: object  # megatron OptimizerParamScheduler
    config: object  # the TransformerConfig shared by every chunk
    distributed_optimizer: bool = False  # optimizer state sharded over data-parallel ranks


def use_distributed_optimizer(optim_cfg: OptimConfig) -> bool:
    """The distributed optimizer shards optimizer state over data-parallel ranks; with one
    DP rank there is nothing to shard and it would only add collectives (on CPU, gloo
    collectives run in gloo's threads and leave libgomp's thread team slow for the rest of
    the process: measured 5× on small ops). So it is used when DP > 1 only."""
    from megatron.core import parallel_state

    return optim_cfg.use_distributed_optimizer and parallel_state.get_data_parallel_world_size() > 1


def wrap_for_training(chunks: list, model_cfg: ModelConfig, optim_cfg: OptimConfig,
                      distributed: bool) -> list:
    """megatron DDP around each chunk.

    No ``Float16Module``: the chunks are already built in the training dtype (bf16/fp16
    parameters, fp32 master copies in the optimizer), and Float16Module would cast the
    last stage's logits to fp32 — a full fp32 copy of ``[tokens, vocab/TP]`` that the
    fused log-prob kernel exists to avoid (it reads bf16 logits and accumulates in fp32).
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    wrapped = []
    with cpu_mode.cuda_to_cpu():
        for index, chunk in enumerate(chunks):
            config = chunk.config
            config.calculate_per_token_loss = True
            module = chunk
            ddp_config = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                overlap_grad_reduce=False,
                use_distributed_optimizer=distributed,
                check_for_nan_in_grad=False,  # we check the loss ourselves, with a clear error
                bucket_size=None,
            )
            wrapped.append(
                DistributedDataParallel(
                    config=config, ddp_config=ddp_config, module=module,
                    # Only the first chunk buckets (megatron's convention for VPP).
                    disable_bucketing=index > 0,
                )
            )
    return wrapped


def build_optimizer(ddp_chunks: list, model_cfg: ModelConfig, optim_cfg: OptimConfig,
                    total_steps: int, distributed: bool):
    """The megatron optimizer and its LR/weight-decay scheduler."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    precision = model_cfg.precision
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        weight_decay=optim_cfg.weight_decay,
        adam_beta1=optim_cfg.adam_beta1,
        adam_beta2=optim_cfg.adam_beta2,
        adam_eps=optim_cfg.adam_eps,
        clip_grad=optim_cfg.clip_grad,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16,
                      "fp16": torch.float16}[precision],
        use_distributed_optimizer=distributed,
        initial_loss_scale=optim_cfg.initial_loss_scale,
    )
    with cpu_mode.cuda_to_cpu():
        optimizer = get_megatron_optimizer(opt_config, ddp_chunks)
    decay_steps = max(1, total_steps)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=optim_cfg.lr if optim_cfg.warmup_steps == 0 else 0.0,
        max_lr=optim_cfg.lr,
        min_lr=optim_cfg.min_lr,
        lr_warmup_steps=optim_cfg.warmup_steps,
        lr_decay_steps=max(decay_steps, optim_cfg.warmup_steps + 1),
        lr_decay_style=optim_cfg.lr_decay_style,
        start_wd=optim_cfg.weight_decay,
        end_wd=optim_cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def install_schedule_hooks(ddp_chunks: list, optimizer) -> None:
    """What megatron's pipeline schedules call: grad sync, loss scaling, no_sync."""
    from megatron.core.distributed import finalize_model_grads

    config = ddp_chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.grad_sync_func = None
    config.param_sync_func = None


def setup_training(chunks: list, model_cfg: ModelConfig, optim_cfg: OptimConfig,
                   total_steps: int) -> TrainingModel:
    distributed = use_distributed_optimizer(optim_cfg)
    ddp_chunks = wrap_for_training(chunks, model_cfg, optim_cfg, distributed)
    optimizer, scheduler = build_optimizer(ddp_chunks, model_cfg, optim_cfg, total_steps,
                                           distributed)
    install_schedule_hooks(ddp_chunks, optimizer)
    return TrainingModel(ddp_chunks, optimizer, scheduler, ddp_chunks[0].config, distributed)


@dataclass
class StepOutcome:
    """What one optimizer step did. ``updated`` False means no weight changed: ``skipped``
    says why — ``"overflow"`` (fp16: the loss scaler found inf/NaN gradients and lowered its
    scale, megatron's normal skipped step) or ``"nonfinite_grad"`` (the gradient norm was
    NaN/inf: the update was refused before it could write NaN weights)."""

    updated: bool
    grad_norm: float
    skipped: Optional[str] = None
    loss_scale: float = 1.0


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_step(training: TrainingModel) -> StepOutcome:
    """One optimizer step after the schedule's backward, megatron's ``step()`` split so that
    a non-finite gradient norm is seen *before* any weight changes: unscale and check for
    overflow (fp16), gradient norm over all parameters, clip, update; the LR schedule advances
    only when the weights did. (Megatron's own ``step`` would clip by an infinite norm — every
    gradient times 0, i.e. NaN for the infinite ones — and apply that in bf16/fp32.)"""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    optimizer = training.optimizer
    with cpu_mode.cuda_to_cpu(), torch.no_grad():
        scale = float(optimizer.get_loss_scale())
        if optimizer.prepare_grads():
            return StepOutcome(False, float("nan"), "overflow", scale)
        grad_norm = float(optimizer.get_grad_norm())
        if not math.isfinite(grad_norm):
            return StepOutcome(False, grad_norm, "nonfinite_grad", scale)
        for sub in _sub_optimizers(optimizer):  # each clips by its own config, as megatron's
            params = sub.get_parameters()
            if sub.config.clip_grad > 0 and params and not getattr(sub, "is_stub_optimizer", False):
                clip_grad_by_total_norm_fp32(
                    params, max_norm=sub.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=sub.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        updated = bool(optimizer.step_with_ready_grads())
    if updated:
        training.scheduler.step(increment=1)
    return StepOutcome(updated, grad_norm, None if updated else "nonfinite_grad", scale)


def zero_grads(training: TrainingModel) -> None:
    for chunk in training.chunks:
        chunk.zero_grad_buffer()
    training.optimizer.zero_grad()
