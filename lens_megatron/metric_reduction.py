"""Reducing per-micro-batch metrics over micro-batches, data-parallel ranks and updates, each
metric by its own rule (a mean of maxima is not a maximum; a mean of fractions is not the
fraction over all tokens).

The rule comes from the metric's name (:func:`reduction_rule`):

* ``sum`` — counts and the loss: ``loss``, ``num_*``, ``*_count``, ``*_tokens``,
  ``*_sequences``, ``*_updates`` (the loss of a micro-batch is already divided by the global
  normalizer, so the step's loss is the sum);
* ``max`` / ``min`` — ``*_max`` / ``*_min``;
* ``mean`` — everything else is a mean over the micro-batch's response tokens, so it is
  weighted by ``num_tokens``: the result is the mean over all tokens of the step.

One collective per call over the data-parallel group (an all-gather of one ``[K + 1]`` float64
vector); every rank gets the same floats.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

WEIGHT_KEY = "num_tokens"
_SUM_SUFFIXES = ("_count", "_tokens", "_sequences", "_updates")
# Across the optimizer updates of one rollout: these are per-update values, averaged; the
# learning rate is the last one's.
_PER_UPDATE_MEANS = ("loss", "grad_norm", "loss_scale")
_PER_UPDATE_LAST = ("lr",)


def reduction_rule(key: str) -> str:
    """``sum`` | ``max`` | ``min`` | ``mean`` (token-weighted) for a metric name."""
    if key == "loss" or key.startswith("num_") or key.endswith(_SUM_SUFFIXES):
        return "sum"
    if key.endswith("_max"):
        return "max"
    if key.endswith("_min"):
        return "min"
    return "mean"


def _partials(values: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
    """``values [M, K]`` (micro-batches × metrics) -> ``[K + 1]``: per-rule partial reductions
    (token-weighted sums for means) and the total weight last."""
    weight = values[:, keys.index(WEIGHT_KEY)]
    out = []
    for j, key in enumerate(keys):
        rule, column = reduction_rule(key), values[:, j]
        if rule == "sum":
            out.append(column.sum())
        elif rule == "max":
            out.append(column.amax())
        elif rule == "min":
            out.append(column.amin())
        else:
            out.append((column * weight).sum())
    out.append(weight.sum())
    return torch.stack(out)


def _merge(partials: torch.Tensor, keys: Sequence[str]) -> torch.Tensor:
    """``[R, K + 1]`` partials of R ranks -> one ``[K + 1]``."""
    out = []
    for j, key in enumerate(keys):
        rule = reduction_rule(key)
        column = partials[:, j]
        out.append(column.amax() if rule == "max" else column.amin() if rule == "min"
                   else column.sum())
    out.append(partials[:, -1].sum())
    return torch.stack(out)


def reduce_metrics(rows: Optional[list[dict[str, torch.Tensor]]], keys: Sequence[str],
                   device: torch.device, group=None) -> dict[str, float]:
    """Reduce this rank's micro-batch metric dicts (0-d tensors, every key in ``keys``, which
    must include ``num_tokens``) over micro-batches, then over ``group``; ``rows`` may be
    empty (no micro-batch on this rank) only when ``group`` has others."""
    keys = list(keys)
    if WEIGHT_KEY not in keys:
        raise ValueError(f"metrics must include {WEIGHT_KEY!r} (the weight of token means)")
    if rows:
        values = torch.stack([torch.stack([row[k].detach().to(device, torch.float64)
                                           for k in keys]) for row in rows])
        local = _partials(values, keys)
    else:
        local = torch.zeros(len(keys) + 1, dtype=torch.float64, device=device)
        for j, key in enumerate(keys):  # neutral elements
            local[j] = {"max": float("-inf"), "min": float("inf")}.get(reduction_rule(key), 0.0)
    if group is not None and dist.get_world_size(group) > 1:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        local = _merge(torch.stack(parts), keys)
    values = local.tolist()  # one device -> host transfer
    total_weight = values[-1]
    out = {}
    for key, value in zip(keys, values):
        if reduction_rule(key) == "mean":
            value = value / total_weight if total_weight > 0 else 0.0
        out[key] = float(value)
    return out


def combine_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """Metrics of several optimizer updates of one rollout -> one dict: counts summed, maxima
    maxed, token means weighted by each update's ``num_tokens``, the loss / gradient norm /
    loss scale averaged over the updates, other per-update values (the learning rate) last.
    Keys missing in some updates (a skipped update has no gradient norm) use those present."""
    if not updates:
        return {}
    keys = sorted({k for u in updates for k in u})
    out = {}
    for key in keys:
        present = [u for u in updates if key in u]
        values = [u[key] for u in present]
        rule = reduction_rule(key)
        if key in _PER_UPDATE_LAST:
            out[key] = values[-1]
        elif key in _PER_UPDATE_MEANS:
            out[key] = sum(values) / len(values)
        elif rule == "sum":
            out[key] = sum(values)
        elif rule == "max":
            out[key] = max(values)
        elif rule == "min":
            out[key] = min(values)
        elif all(WEIGHT_KEY in u for u in present):
            weights = [u[WEIGHT_KEY] for u in present]
            total = sum(weights)
            out[key] = (sum(v * w for v, w in zip(values, weights)) / total if total > 0
                        else sum(values) / len(values))
        else:
            out[key] = values[-1]
    return out
