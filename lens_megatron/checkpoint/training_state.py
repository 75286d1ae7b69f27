"""Training checkpoints: model + optimizer + LR schedule (megatron ``dist_checkpointing``,
torch_dist format, loadable at another TP/PP/DP layout) and the trainer's own state (step,
data position, stall-guard and counters) — written atomically.

Layout under ``<exp_dir>/<name>/checkpoints/``::

    step_000012/          one complete checkpoint (dist_checkpointing files + trainer_state.json)
    latest                text file naming the newest complete checkpoint directory

A save goes to ``step_N.tmp``, is completed on every rank, and only then renamed to
``step_N`` and published in ``latest`` (write-then-``os.replace``). A process killed during a
save leaves a stale ``*.tmp`` (removed by the next save) and the previous checkpoint loadable.
Sampling noise is a pure function of (seed, step), so no RNG state needs saving.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..models.sharding import unwrap_model
from ..parallel import cpu_mode

TRAINER_STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"


def checkpoint_root(exp_dir: str, name: str) -> str:
    return os.path.join(exp_dir, name, "checkpoints")


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:06d}")


def _materialize_empty_optimizer_state(optimizer) -> None:
    """A never-stepped torch Adam has no state, and megatron 0.16's DistributedOptimizer
    cannot describe an empty state for loading; give it zero-valued state first (the load
    then overwrites every value)."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if torch_opt is not None and not torch_opt.state and hasattr(
                inner, "_init_optimizer_states_with_dummy_values"):
            inner._init_optimizer_states_with_dummy_values()


def _unshare_adam_step_counters(optimizer) -> None:
    """megatron 0.16 restores torch Adam's per-parameter ``step`` as *one* tensor shared by
    every parameter; torch then increments it once per parameter per step, corrupting the
    bias correction after a resume. Give each parameter its own counter again."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        for state in getattr(torch_opt, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def _sharded_state_dict(training, is_loading: bool) -> dict:
    if is_loading:
        _materialize_empty_optimizer_state(training.optimizer)
    model_sd = {}
    for index, chunk in enumerate(training.chunks):
        model_sd[f"chunk{index}"] = unwrap_model(chunk).sharded_state_dict()
    # dp_reshardable: each rank writes its optimizer shard as is (fully parallel); a run can
    # resume at another data-parallel size but the same TP×PP. (megatron 0.16's
    # fully_reshardable loader breaks on torch Adam's per-parameter "step" state, and its
    # flattened formats are rejected.) Model weights in the checkpoint reshard freely.
    metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
    return {
        "model": model_sd,
        "optimizer": training.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                           metadata=metadata),
    }


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_training_checkpoint(root: str, step: int, training, trainer_state: dict[str, Any],
                             keep: int = 2, arch=None, params_dtype: str = "fp32") -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    With ``arch`` the checkpoint also gets ``lens_checkpoint.json``, so it can be exported
    to HF (``tools/convert_megatron_to_hf.py``) or used as ``model.load`` directly.
    """
    from megatron.core import dist_checkpointing

    final = _step_dir(root, step)
    tmp = final + ".tmp"
    if _rank0():
        os.makedirs(root, exist_ok=True)
        for stale in os.listdir(root):
            if stale.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    with cpu_mode.cuda_to_cpu():
        dist_checkpointing.save(_sharded_state_dict(training, is_loading=False), tmp)
    if _rank0():
        state = dict(trainer_state, step=step, scheduler=training.scheduler.state_dict(),
                     optimizer_format=_optimizer_format(training))
        with open(os.path.join(tmp, TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f)
        if arch is not None:
            from .model_io import write_checkpoint_info

            write_checkpoint_info(tmp, arch, params_dtype, {"step": step, "kind": "training"})
    _barrier()
    if _rank0():
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _publish_latest(root, os.path.basename(final))
        _prune(root, keep)
    _barrier()
    return final


def _publish_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, LATEST_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, LATEST_FILE))


def _prune(root: str, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    for old in steps[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def latest_checkpoint(root: str) -> Optional[str]:
    """The newest complete checkpoint directory, or None."""
    pointer = os.path.join(root, LATEST_FILE)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, TRAINER_STATE_FILE)):
        raise RuntimeError(f"{pointer} names {name!r}, which is not a complete checkpoint "
                           f"({TRAINER_STATE_FILE} missing)")
    return path


def _optimizer_format(training) -> str:
    return "distributed" if training.distributed_optimizer else "plain"


def load_training_checkpoint(path: str, training) -> dict[str, Any]:
    """Collective: restore model, optimizer and schedule; return the trainer state."""
    from megatron.core import dist_checkpointing

    with open(os.path.join(path, TRAINER_STATE_FILE), encoding="utf-8") as f:
        trainer_state = json.load(f)
    saved_format = trainer_state.pop("optimizer_format", _optimizer_format(training))
    if saved_format != _optimizer_format(training):
        raise RuntimeError(
            f"{path} holds {saved_format} optimizer state but this run uses the "
            f"{_optimizer_format(training)} optimizer (the distributed optimizer is active only "
            "with data-parallel size > 1): resume with the same kind of layout, or start "
            "the new layout from the model weights alone (model.load=<checkpoint>)")
    with cpu_mode.cuda_to_cpu(), torch.no_grad():
        state = dist_checkpointing.load(_sharded_state_dict(training, is_loading=True), path)
        for index, chunk in enumerate(training.chunks):
            unwrap_model(chunk).load_state_dict(state["model"][f"chunk{index}"])
        training.optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_step_counters(training.optimizer)
    training.scheduler.load_state_dict(trainer_state.pop("scheduler"))
    return trainer_state
