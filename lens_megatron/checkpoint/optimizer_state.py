"""Optimizer state in training checkpoints, and resuming it at another parallel layout.

Three on-disk formats, recorded in ``trainer_state.json`` under ``optimizer`` (with the layout,
the Adam step count and where the master weights are stored):

``plain``
    One data-parallel rank (the distributed optimizer is off, see ``optimizer.py``): megatron
    writes one tensor per parameter and state (``optimizer.state.exp_avg.<param key>``), sharded
    like the parameter itself — TP/PP-independent.
``distributed/dp_reshardable``
    Each rank writes its slice of the distributed optimizer's flat buffers as is: fully
    parallel, no gather; loadable at another DP size > 1 with the *same* TP×PP (and VPP) only.
``distributed/fully_reshardable``
    The distributed optimizer's slices are gathered over DP at save time into the same
    per-parameter tensors as ``plain`` (plus the fp32 main parameter): loadable at any layout.

A resume in the same format goes through megatron's own loader. A resume across the
plain ↔ distributed boundary (e.g. 1 GPU → 2 GPUs) needs a per-parameter format on disk and
goes through :func:`request_across_kinds` and :func:`fill_across_kinds`: the *current*
optimizer's own per-parameter tensors are requested under the names the saving one used, and
the filled state dict goes to megatron's loader. ``dp_reshardable`` at another TP/PP, or into a one-rank run, is refused before
anything is read, with the way out in the message.

Three megatron-core 0.16 defects are worked around here, on the optimizer instance only:
its ``fully_reshardable`` loader raises ``KeyError: 'step'`` with torch Adam (the per-parameter
step is restored from the param groups but still expected among the loaded tensors), a
restored torch Adam shares one ``step`` tensor between all parameters (then incremented once
per parameter per step), and its ``dp_reshardable`` loader leaves every parameter at Adam step 1
(:func:`restore_adam_step` sets the step recorded in ``trainer_state.json``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

PLAIN = "plain"
DP_RESHARDABLE = "distributed/dp_reshardable"
FULLY_RESHARDABLE = "distributed/fully_reshardable"
LEGACY_FORMATS = {"distributed": DP_RESHARDABLE}  # written before the format had a sub-type


# ----------------------------------------------------------------------------- helpers
def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(inner) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(inner, DistributedOptimizer)


def current_format(training, configured: str) -> str:
    """The format a save by this run writes (``configured``: exp_manager.optimizer_checkpoint_format)."""
    if not training.distributed_optimizer:
        return PLAIN
    return f"distributed/{configured}"


def sharding_metadata(fmt: str) -> dict:
    """The ``metadata`` argument of megatron's ``sharded_state_dict`` for ``fmt``."""
    if fmt == PLAIN:
        return {}
    return {"distrib_optim_sharding_type": fmt.split("/", 1)[1]}


def main_param_prefix(training, params_dtype: str) -> Optional[str]:
    """Where this optimizer keeps its fp32 master weights in a per-parameter checkpoint:
    ``optimizer.state.param`` (distributed), ``optimizer.state.fp32_param`` (plain, bf16/fp16
    parameters) or None (plain fp32: the master weights are the model's own parameters)."""
    if training.distributed_optimizer:
        return "optimizer.state.param"
    return None if params_dtype == "fp32" else "optimizer.state.fp32_param"


def adam_step(optimizer) -> int:
    """The number of Adam steps taken (the per-parameter ``step`` state; 0 before the first)."""
    steps = [float(state["step"]) for inner in _inner_optimizers(optimizer)
             for state in getattr(getattr(inner, "optimizer", None), "state", {}).values()
             if "step" in state]
    return int(max(steps, default=0.0))


def materialize_empty_state(optimizer) -> None:
    """A never-stepped torch Adam has no state, and megatron 0.16's DistributedOptimizer
    cannot describe an empty state for loading; give it zero-valued state first (the load
    then overwrites every value)."""
    for inner in _inner_optimizers(optimizer):
        torch_opt = getattr(inner, "optimizer", None)
        if torch_opt is not None and not torch_opt.state and hasattr(
                inner, "_init_optimizer_states_with_dummy_values"):
            inner._init_optimizer_states_with_dummy_values()


def unshare_adam_step_counters(optimizer) -> None:
    """Give each parameter its own Adam ``step`` tensor again after a megatron load."""
    for inner in _inner_optimizers(optimizer):
        torch_opt = getattr(inner, "optimizer", None)
        for state in getattr(torch_opt, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def restore_adam_step(optimizer, step: int) -> None:
    """Set every parameter's torch Adam ``step`` to the recorded ``step`` (each its own tensor).

    megatron 0.16's ``dp_reshardable`` loader copies each parameter's ``step`` from the bucket
    state, where it reads 1, over the step restored from the param groups: every update after
    such a resume then used the bias correction of Adam step 2, 3, ... again."""
    for inner in _inner_optimizers(optimizer):
        for state in getattr(getattr(inner, "optimizer", None), "state", {}).values():
            if "step" in state:
                state["step"] = torch.tensor(float(step))


def allow_stepless_fully_reshardable_load(optimizer) -> None:
    """megatron 0.16's fully-reshardable loader copies every key of torch Adam's state,
    ``step`` included, from the loaded tensors, which never carry ``step`` (it comes from the
    param groups). Keep the parameter's own ``step`` for that copy (a copy onto itself)."""
    for inner in _inner_optimizers(optimizer):
        if not _is_distributed(inner) or getattr(inner, "_lens_stepless_load", False):
            continue
        if inner.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue  # that branch sets only the keys it is given
        original = inner._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, _inner=inner, _original=original):
            group, order = _inner.model_param_group_index_map[model_param]
            main = _inner.optimizer.param_groups[group]["params"][order]
            state = _inner.optimizer.state[main]
            if "step" in state and "step" not in tensors:
                tensors = {**tensors, "step": state["step"]}
            return _original(model_param, tensors)

        inner._set_main_param_and_optimizer_states = set_states
        inner._lens_stepless_load = True


# ----------------------------------------------------------------------------- refusals
def check_resumable(saved: dict[str, Any], fmt_now: str, layout_now: dict[str, int],
                    path: str) -> None:
    """Raise before loading when the saved optimizer state cannot be resumed at this layout."""
    fmt_saved = saved["format"]
    layout_saved = saved.get("layout")
    if (fmt_saved == PLAIN) != (fmt_now == PLAIN) and saved.get("adam_step") is None:
        raise RuntimeError(
            f"{path} was written before optimizer state could cross between one and several "
            "data-parallel ranks (no recorded Adam step): resume with the layout kind it was "
            f"saved with, or start from the weights alone (model.load={path})")
    if fmt_saved != DP_RESHARDABLE:
        return
    if fmt_now == PLAIN:
        raise RuntimeError(
            f"{path} holds distributed-optimizer state in the dp_reshardable format, which "
            "cannot be loaded into a run with one data-parallel rank (plain optimizer). Resume "
            "with data-parallel size > 1 and the same TP/PP, or start this layout from the "
            f"weights alone (model.load={path}); save with "
            "exp_manager.optimizer_checkpoint_format=fully_reshardable to resume at any layout")
    keys = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
            "virtual_pipeline_model_parallel_size")
    if layout_saved is not None and any(layout_saved.get(k) != layout_now.get(k) for k in keys):
        saved_txt = ", ".join(f"{k}={layout_saved.get(k)}" for k in keys)
        now_txt = ", ".join(f"{k}={layout_now.get(k)}" for k in keys)
        raise RuntimeError(
            f"{path} holds distributed-optimizer state in the dp_reshardable format, saved at "
            f"{saved_txt}; this run has {now_txt}. That format reshards over data parallelism "
            "only: resume with the saved TP/PP, or start from the weights alone "
            f"(model.load={path}); save with "
            "exp_manager.optimizer_checkpoint_format=fully_reshardable to resume at any layout")


# ----------------------------------------------------------------------------- cross-kind load
class _Slot(int):
    """Placeholder for a sharded leaf taken out of an optimizer state dict."""


@dataclasses.dataclass(frozen=True)
class _FromModel:
    """Slot for master weights the checkpoint does not hold: a plain fp32 optimizer has no
    master copy (its master weights are the model's parameters), so the distributed
    optimizer's master shard is taken from the freshly loaded parameter it belongs to."""

    param: tuple


def _param_identity(leaf) -> tuple:
    """Which model parameter a sharded leaf describes. Layers share one key (a stacked
    layer axis tells them apart), so the key alone is not enough: tensors add their global
    offset, factories (fused fc1) their build function, which the optimizer's leaf inherits."""
    if hasattr(leaf, "global_offset"):
        return leaf.key, tuple(leaf.global_offset)
    return leaf.key, id(leaf.build_fn)


def _saved_leaf(leaf, prefix_now: Optional[str], prefix_saved: Optional[str]):
    """This optimizer's ``leaf`` under the name the saving optimizer wrote it with (only
    master weights are named differently), or a ``_FromModel`` slot."""
    if prefix_now is None or not leaf.key.startswith(prefix_now + "."):
        return leaf
    param_key = leaf.key[len(prefix_now) + 1:]
    if prefix_saved is None:
        return _FromModel(_param_identity(dataclasses.replace(leaf, key=param_key)))
    return dataclasses.replace(leaf, key=f"{prefix_saved}.{param_key}")


def request_across_kinds(training, model_sd: dict, prefix_now: Optional[str],
                         prefix_saved: Optional[str]) -> tuple[dict, dict]:
    """The current optimizer's per-parameter loading state dict with its sharded leaves taken
    out — returned separately, under the names the saving optimizer used — and slots left
    behind for :func:`fill_across_kinds`."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase

    fmt_now = FULLY_RESHARDABLE if training.distributed_optimizer else PLAIN
    structure = training.optimizer.sharded_state_dict(model_sd, is_loading=True,
                                                      metadata=sharding_metadata(fmt_now))
    leaves: dict[str, Any] = {}

    def take(value):
        if isinstance(value, LocalNonpersistentObject):
            return value.unwrap()
        if not isinstance(value, ShardedBase):
            return value
        saved = _saved_leaf(value, prefix_now, prefix_saved)
        if isinstance(saved, _FromModel):
            return saved
        slot = _Slot(len(leaves))
        leaves[f"leaf{int(slot)}"] = saved
        return slot

    dict_list_map_inplace(take, structure)
    return structure, leaves


def fill_across_kinds(training, structure: dict, loaded: dict, model_sd: dict,
                      step: int) -> dict:
    """Put the loaded tensors back into the slots (master weights missing from the checkpoint
    from the model's parameters, which must already hold the loaded weights) and set the Adam
    step the way this optimizer kind reads it (param groups when distributed, ``common_step``
    when plain)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    params = {_param_identity(leaf): leaf.data for leaf in nested_values(model_sd)
              if isinstance(leaf, ShardedBase)}

    def put(value):
        if isinstance(value, _Slot):
            return loaded[f"leaf{int(value)}"]
        if isinstance(value, _FromModel):
            return params[value.param].detach()
        return value

    dict_list_map_inplace(put, structure)
    if step > 0:
        _set_step(structure, step, training.distributed_optimizer)
    return structure


def _set_step(node, step: int, distributed: bool) -> None:
    if isinstance(node, dict):
        if "param_groups" in node and isinstance(node["param_groups"], list):
            if distributed:
                for group in node["param_groups"]:
                    group["step"] = float(step)
            elif isinstance(node.get("state"), dict):
                node["state"]["common_step"] = torch.tensor(float(step))
        for value in node.values():
            if isinstance(value, (dict, list)):
                _set_step(value, step, distributed)
    elif isinstance(node, list):
        for value in node:
            _set_step(value, step, distributed)
