"""The device policy (one place): where the model lives, and how a tensor gets there.

* The model lives on :func:`model_device` — this process's CUDA device when CUDA is
  available, otherwise the CPU (``parallel/cpu_mode.py``).
* Host-side planning stays on the CPU as plain lists or CPU tensors: lengths, micro-batch
  plans, row orders, rewards, pass@k.
* Everything the model, the fused kernel or a collective touches is created on the model's
  device, or moved there once with :func:`to_device` at the boundary of its path (the actor's
  micro-batches, the sampler's prompt batch, the trainer's per-step tensors). No collective
  receives a host tensor (NCCL takes device tensors only).

``tests/test_device_placement.py`` checks this on an emulated CUDA machine
(``tests/cuda_emulation.py``), where a host tensor in a device op raises as it would on a GPU.
"""
from __future__ import annotations

from typing import Any

import torch


def model_device() -> torch.device:
    """The device this process's model lives on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def module_device(module_or_chunks: Any) -> torch.device:
    """The device of a module's (or a list of modules') first parameter."""
    modules = module_or_chunks if isinstance(module_or_chunks, (list, tuple)) else [module_or_chunks]
    for module in modules:
        for param in module.parameters():
            return param.device
    return model_device()


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) on ``device``.

    ``non_blocking=True``: asynchronous from pinned host memory, an ordinary copy otherwise;
    tensors already on ``device`` are returned as they are."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value
