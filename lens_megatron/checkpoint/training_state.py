"""Training checkpoints: model + optimizer + LR schedule (megatron ``dist_checkpointing``,
torch_dist format; the model reshards to any TP/PP/DP layout, the optimizer state as far as
its format allows — see ``optimizer_state``) and the trainer's own state (step, data
position, stall-guard and counters) — written atomically.

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
from . import optimizer_state
from .model_io import chunks_sharded_state_dict

TRAINER_STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"


def checkpoint_root(exp_dir: str, name: str) -> str:
    return os.path.join(exp_dir, name, "checkpoints")


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:06d}")


def _sharded_state_dict(training, is_loading: bool, fmt: str) -> dict:
    if is_loading:
        optimizer_state.materialize_empty_state(training.optimizer)
    model_sd = chunks_sharded_state_dict(training.chunks)
    return {
        "model": model_sd,
        "optimizer": training.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=optimizer_state.sharding_metadata(fmt)),
    }


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    return {"tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline_model_parallel_size":
                ps.get_virtual_pipeline_model_parallel_world_size() or 1,
            "data_parallel_size": ps.get_data_parallel_world_size()}


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_training_checkpoint(root: str, step: int, training, trainer_state: dict[str, Any],
                             keep: int = 2, arch=None, params_dtype: str = "fp32",
                             optimizer_format: str = "dp_reshardable",
                             objects: Optional[dict[str, Any]] = None) -> str:
    """Collective: every rank calls it. Returns the final checkpoint directory.

    ``optimizer_format`` (exp_manager.optimizer_checkpoint_format) applies to the distributed
    optimizer; see ``optimizer_state`` for what each format can be resumed at.

    With ``arch`` the checkpoint also gets ``lens_checkpoint.json``, so it can be exported
    to HF (``tools/convert_megatron_to_hf.py``) or used as ``model.load`` directly.
    ``objects``: extra picklable objects (``torch.save``d by rank 0 under their file names,
    inside the same atomic rename; read back with ``load_checkpoint_object``).
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
    fmt = optimizer_state.current_format(training, optimizer_format)
    with cpu_mode.cuda_to_cpu():
        dist_checkpointing.save(_sharded_state_dict(training, is_loading=False, fmt=fmt), tmp)
    if _rank0():
        optimizer_meta = {
            "format": fmt, "layout": _layout(), "adam_step": optimizer_state.adam_step(training.optimizer),
            "main_param_prefix": optimizer_state.main_param_prefix(training, params_dtype)}
        state = dict(trainer_state, step=step, scheduler=training.scheduler.state_dict(),
                     optimizer=optimizer_meta)
        with open(os.path.join(tmp, TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
            json.dump(state, f)
        if arch is not None:
            from .model_io import write_checkpoint_info

            write_checkpoint_info(tmp, arch, params_dtype, {"step": step, "kind": "training"})
        for name, obj in (objects or {}).items():
            torch.save(obj, os.path.join(tmp, name))
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


def _saved_optimizer_meta(trainer_state: dict[str, Any], training) -> dict[str, Any]:
    """The optimizer section of a trainer state (also from checkpoints written before it had one)."""
    meta = trainer_state.pop("optimizer", None)
    legacy = trainer_state.pop("optimizer_format", None)
    if meta is None:
        fmt = optimizer_state.LEGACY_FORMATS.get(legacy, legacy) or optimizer_state.current_format(
            training, "dp_reshardable")
        meta = {"format": fmt, "layout": None, "adam_step": None, "main_param_prefix": None}
    return meta


def load_checkpoint_object(path: str, name: str, default: Any = None) -> Any:
    """An object saved with ``save_training_checkpoint(objects=...)``, or ``default``."""
    file = os.path.join(path, name)
    if not os.path.exists(file):
        return default
    return torch.load(file, weights_only=False)


def load_training_checkpoint(path: str, training, params_dtype: str = "fp32",
                             optimizer_format: str = "dp_reshardable") -> dict[str, Any]:
    """Collective: restore model, optimizer and schedule; return the trainer state.

    Resumable at another layout as far as the saved optimizer format allows (see
    ``optimizer_state``); otherwise refused before anything is read.
    """
    from megatron.core import dist_checkpointing

    with open(os.path.join(path, TRAINER_STATE_FILE), encoding="utf-8") as f:
        trainer_state = json.load(f)
    saved = _saved_optimizer_meta(trainer_state, training)
    fmt_now = optimizer_state.current_format(training, optimizer_format)
    optimizer_state.check_resumable(saved, fmt_now, _layout(), path)
    same_kind = (saved["format"] == optimizer_state.PLAIN) == (fmt_now == optimizer_state.PLAIN)
    optimizer_state.allow_stepless_fully_reshardable_load(training.optimizer)
    with cpu_mode.cuda_to_cpu(), torch.no_grad():
        if same_kind:
            # megatron's own loader, in the format the checkpoint was written in
            state = dist_checkpointing.load(
                _sharded_state_dict(training, is_loading=True, fmt=saved["format"]), path)
        else:
            optimizer_state.materialize_empty_state(training.optimizer)
            model_sd = chunks_sharded_state_dict(training.chunks)
            structure, leaves = optimizer_state.request_across_kinds(
                training, model_sd, optimizer_state.main_param_prefix(training, params_dtype),
                saved["main_param_prefix"])
            state = dist_checkpointing.load({"model": model_sd, "optimizer": leaves}, path)
        for index, chunk in enumerate(training.chunks):
            unwrap_model(chunk).load_state_dict(state["model"][f"chunk{index}"])
        if not same_kind:  # after the model: master weights may come from its parameters
            state["optimizer"] = optimizer_state.fill_across_kinds(
                training, structure, state["optimizer"], model_sd, int(saved["adam_step"]))
        training.optimizer.load_state_dict(state["optimizer"])
        optimizer_state.unshare_adam_step_counters(training.optimizer)
    training.scheduler.load_state_dict(trainer_state.pop("scheduler"))
    return trainer_state
