"""Run megatron-core on a machine without a GPU (gloo, CPU tensors).

megatron-core 0.16 assumes CUDA in a handful of places that have nothing to do with the
math. This module is the *only* place that papers over them, and it is enabled only when
``torch.cuda.is_available()`` is False (tests and ``make demo`` on a CPU machine). Each
patch is small, named, and has its own test in ``tests/test_cpu_mode.py`` so that a
megatron-core upgrade that changes one of these sites fails loudly instead of silently.

The patches:

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")`` (megatron passes it as the
   ``device=`` of allocations on hot paths: TP gathers, p2p buffers, KV cache) and
   ``torch.cuda.synchronize`` (and stream helpers) -> no-ops.
2. ``cuda_to_cpu()``: a ``TorchFunctionMode`` that rewrites ``device="cuda"``/``"cuda:N"``/
   ``torch.device("cuda")``/integer devices to CPU in tensor factory calls and in
   ``Tensor.to``/``Tensor.cuda``. It is entered only around megatron calls that allocate
   (model construction, optimizer and DDP setup, a KV-cache prefill) — never on a hot path
   (the decode loop, the forward-backward schedule: patch 6), where a global mode costs
   ~1.3x on a one-token forward (DESIGN.md §7a).
3. ``Tensor.type()`` with no argument reports ``torch.cuda.*Tensor`` names for CPU tensors
   (Megatron's optimizer wrappers assert ``param.type() == 'torch.cuda.FloatTensor'``).
4. The tensor-parallel RNG tracker: ``model_parallel_cuda_manual_seed`` needs CUDA RNG
   state. On CPU we install a tracker whose named states are CPU generator states, so
   ``get_cuda_rng_tracker().fork()`` works and stays deterministic.
5. RoPE under context parallelism: megatron's per-CP-rank slicing pins memory; replaced by
   the same slicing without it.
6. The forward-backward schedules allocate their token counter with a literal
   ``device="cuda"`` once per call: ``schedules.torch`` becomes a view of ``torch`` whose
   factory functions map CUDA devices to CPU, so the schedule (the training and log-prob hot
   path) runs *outside* the ``cuda_to_cpu`` mode, whose per-op Python dispatch cost ~7% of a
   forward-only pass at 4x the tiny model.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False

# Factory functions and tensor methods whose ``device`` argument we rewrite.
_FACTORY_FUNCTIONS = {
    torch.empty, torch.zeros, torch.ones, torch.full, torch.tensor, torch.arange,
    torch.rand, torch.randn, torch.randint, torch.randperm, torch.empty_like,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.rand_like, torch.randn_like,
    torch.as_tensor, torch.linspace, torch.empty_strided, torch.eye, torch.scalar_tensor,
}
_TENSOR_TO = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.new_empty,
              torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full,
              torch.Tensor.new_tensor}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int) as the device.
    return isinstance(device, int) and not isinstance(device, bool)


def _map_device(device: Any) -> Any:
    return torch.device("cpu") if _is_cuda_device(device) else device


def _map_device_kwarg(kwargs: dict) -> dict:
    """``kwargs`` with a CUDA ``device=`` mapped to CPU (in place; returned)."""
    if "device" in kwargs:
        kwargs["device"] = _map_device(kwargs["device"])
    return kwargs


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrite CUDA device arguments to CPU in factory calls and ``Tensor.to``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORY_FUNCTIONS or func in _TENSOR_TO:
            _map_device_kwarg(kwargs)
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
                args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


def cuda_to_cpu():
    """Context manager mapping CUDA allocations to CPU; a no-op when CPU mode is off."""
    if not _ENABLED:
        return contextlib.nullcontext()
    return _CudaToCpuMode()


def is_enabled() -> bool:
    return _ENABLED


_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor", torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor", torch.bool: "torch.cuda.BoolTensor",
}


def _patch_tensor_type() -> None:
    original = torch.Tensor.type

    @functools.wraps(original)
    def type_reporting_cuda(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return _CUDA_TYPE_NAMES.get(self.dtype, original(self))
        return original(self, dtype, non_blocking, **kwargs)

    type_reporting_cuda._lens_cpu_mode_original = original  # type: ignore[attr-defined]
    torch.Tensor.type = type_reporting_cuda


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream`` on CPU: every operation is already ordered."""

    def wait_stream(self, other) -> None:  # noqa: D401
        return None

    def synchronize(self) -> None:
        return None

    def record_event(self, event=None):
        return event


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # A device object, not the index 0: megatron passes it as ``device=`` in allocations on
    # hot paths (TP gathers, KV cache); an int would mean cuda:0.
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda device=None: None
    cuda.current_stream = lambda device=None: _CpuStream()
    cuda.default_stream = lambda device=None: _CpuStream()
    cuda.stream = lambda stream=None: contextlib.nullcontext()
    cuda.set_device = lambda device: None
    cuda.empty_cache = lambda: None


def _patch_rng_tracker() -> None:
    """Make megatron's tensor-parallel RNG tracker use CPU generator states."""
    from megatron.core.tensor_parallel import random as tp_random

    def _set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def _get_state(device="cuda"):
        return torch.get_rng_state()

    def _manual_seed(seed):
        # The CPU default generator stands in for the CUDA one (not torch.manual_seed,
        # which would call back into torch.cuda.manual_seed_all).
        torch.default_generator.manual_seed(int(seed))

    tp_random._set_cuda_rng_state = _set_state
    torch.cuda.get_rng_state = _get_state
    torch.cuda.random.get_rng_state = _get_state
    torch.cuda.manual_seed = _manual_seed
    torch.cuda.manual_seed_all = lambda seed: None


def _patch_rope_cp_slicing() -> None:
    """megatron 0.16's ``get_pos_emb_on_this_cp_rank`` allocates its index with
    ``pin_memory=True``, which raises without CUDA: the same rows, without pinned memory
    (``parallel.context.rope_for_rank``). ``rotary_pos_embedding`` imported the name from
    ``rope_utils``, so it is replaced there."""
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    from .context import rope_for_rank

    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = rope_for_rank


class _TorchWithCpuFactories:
    """``torch`` as one module sees it, with CUDA ``device=`` arguments of the factory
    functions mapped to CPU; every other attribute is ``torch``'s own."""

    def __init__(self, module) -> None:
        self._torch = module
        for func in _FACTORY_FUNCTIONS:
            setattr(self, func.__name__, self._mapped(func))

    @staticmethod
    def _mapped(func):
        @functools.wraps(func)
        def call(*args, **kwargs):
            if _ENABLED:  # off (as on a GPU): torch's own call
                _map_device_kwarg(kwargs)
            return func(*args, **kwargs)
        return call

    def __getattr__(self, name: str):
        return getattr(self._torch, name)


def _patch_schedule_allocations() -> None:
    from megatron.core.pipeline_parallel import schedules

    if not isinstance(schedules.torch, _TorchWithCpuFactories):
        schedules.torch = _TorchWithCpuFactories(torch)


def enable() -> bool:
    """Enable CPU mode if (and only if) no GPU is present. Idempotent.

    Returns True when CPU mode is active after the call.
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available():
        return False
    _patch_torch_cuda()
    _patch_tensor_type()
    _patch_rng_tracker()
    _patch_rope_cp_slicing()
    _patch_schedule_allocations()
    _ENABLED = True
    return True
