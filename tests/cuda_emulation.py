"""An emulated CUDA machine on a CPU-only torch, for device-placement tests (issue: the GPU path).

On a GPU the model lives in device memory and every tensor a model, kernel or collective touches
must be there too; on a CPU-only machine everything is host memory, so code that builds model
inputs on the host looks correct until its first GPU run. This module makes that class of bug
fail here, for the reason a GPU run would:

* ``torch.cuda.is_available()`` is True and ``current_device()`` is 0, so the code under test
  takes its GPU branches (megatron's allocations ask for the current device, the model builder
  moves the model to it, ``parallel/cpu_mode.py`` stays off as it would on a GPU);
* a ``TorchFunctionMode`` runs every tensor op on the CPU but keeps, per tensor, where the
  program *thinks* it lives: created with ``device="cuda"``/``cuda:0``/an int, moved with
  ``.to(cuda)``/``.cuda()``, or computed from such tensors -> on the device; created without a
  device (or on the CPU), or brought back with ``.cpu()`` -> on the host. ``tensor.device`` and
  ``tensor.is_cuda`` report that, so ``torch.empty(..., device=x.device)`` follows ``x``;
* an op that mixes device tensors with (non-scalar) host tensors raises
  :class:`DevicePlacementError` — CUDA's "Expected all tensors to be on the same device" — and
  so does a ``torch.distributed`` collective or p2p call that is handed a host tensor (NCCL
  accepts device tensors only), and ``.numpy()`` of a device tensor.

What CUDA allows, this allows: host 0-dim tensors and Python scalars next to device tensors,
host index tensors into a device tensor, and ``copy_`` across devices. It is stricter in one
place, on purpose: ``__setitem__`` of a non-scalar host value into a device tensor (or the other
way) raises, because building a device tensor element by element from the host is exactly the
hidden host-to-device traffic the device policy forbids. Tensors made where no Python op is
visible (autograd's gradients, C++ internals) are "unknown" and never raise.

Usage::

    with emulated_cuda() as device_mode:
        ...  # build the model, run the step; DevicePlacementError on a host/device mix
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

DEVICE = torch.device("cuda", 0)
HOST = torch.device("cpu")
_ON_DEVICE, _ON_HOST = "device", "host"


class DevicePlacementError(RuntimeError):
    """An op mixed device and host tensors, or a collective got a host tensor."""


_FACTORIES = {
    torch.empty, torch.zeros, torch.ones, torch.full, torch.tensor, torch.arange, torch.rand,
    torch.randn, torch.randint, torch.randperm, torch.as_tensor, torch.linspace, torch.logspace,
    torch.empty_strided, torch.eye, torch.scalar_tensor, torch.from_numpy, torch.frombuffer,
    torch.tril_indices, torch.triu_indices,
}
_LIKE_FACTORIES = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like,
                   torch.rand_like, torch.randn_like, torch.randint_like}
_NEW_METHODS = {torch.Tensor.new_empty, torch.Tensor.new_zeros, torch.Tensor.new_ones,
                torch.Tensor.new_full, torch.Tensor.new_tensor}
_MIXING_ALLOWED = {torch.Tensor.copy_}
# Property accessors arrive as fresh method-wrappers: compare their descriptor, not identity.
_DEVICE_PROPERTY, _IS_CUDA_PROPERTY = torch.Tensor.device, torch.Tensor.is_cuda
_DATA_PROPERTY = torch.Tensor.data


def _is_device_arg(value: Any) -> bool:
    return isinstance(value, (torch.device, str, int)) and not isinstance(value, bool)


def _kind_of_device(value: Any) -> str:
    device = torch.device(value) if not isinstance(value, int) else torch.device("cuda", value)
    return _ON_DEVICE if device.type == "cuda" else _ON_HOST


def _describe(tensors) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in tensors[:4])


class DeviceTrackingMode(TorchFunctionMode):
    """Runs ops on the CPU, tracks device vs host per tensor, raises on a mix (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds = WeakIdKeyDictionary()
        self.checked_ops = 0

    # ------------------------------------------------------------------ bookkeeping
    def kind(self, tensor: torch.Tensor):
        return self.kinds.get(tensor)

    def mark(self, tensor: torch.Tensor, kind: str) -> None:
        self.kinds[tensor] = kind

    def mark_module(self, module: torch.nn.Module) -> None:
        for t in list(module.parameters()) + list(module.buffers()):
            self.mark(t, _ON_DEVICE)

    def on_device(self, tensor: torch.Tensor) -> bool:
        return self.kind(tensor) == _ON_DEVICE

    def _tag_outputs(self, result, kind) -> None:
        if kind is None:
            return
        for out in tree_flatten(result)[0]:
            if isinstance(out, torch.Tensor):
                self.kinds[out] = kind

    @staticmethod
    def _alias(tensor: torch.Tensor) -> torch.Tensor:
        """A new tensor object for a move that is a no-op on the CPU (a real move copies)."""
        return tensor.view_as(tensor)

    # ------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        descriptor = getattr(func, "__self__", None)
        if descriptor is _DEVICE_PROPERTY and func.__name__ == "__get__":
            return DEVICE if self.on_device(args[0]) else HOST
        if descriptor is _IS_CUDA_PROPERTY and func.__name__ == "__get__":
            return self.on_device(args[0])
        if func is torch.Tensor.get_device:
            return 0 if self.on_device(args[0]) else -1
        if func is torch.Tensor.numpy and self.on_device(args[0]):
            raise DevicePlacementError("numpy() of a device tensor (on a GPU: 'can't convert "
                                       "cuda:0 device type tensor to numpy'); call .cpu() first")
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu,
                    torch.Tensor.pin_memory):
            return self._move(func, args, kwargs)
        if descriptor is _DATA_PROPERTY and func.__name__ == "__set__":
            kind = self.kind(args[1])
            result = func(*args, **kwargs)
            if kind is not None:
                self.mark(args[0], kind)
            return result
        created = self._creation_kind(func, args, kwargs)
        if created is None:
            kind = self._check_mix(func, args, kwargs)
        else:
            kind = created
        result = func(*args, **kwargs)
        self._tag_outputs(result, kind)
        return result

    def _creation_kind(self, func, args, kwargs):
        """Device kind of a factory's result (and rewrite its device to the CPU), else None."""
        if func in _FACTORIES or func in _LIKE_FACTORIES or func in _NEW_METHODS:
            device = kwargs.get("device")
            if device is not None:
                kwargs["device"] = HOST
                return _kind_of_device(device)
            if func in _LIKE_FACTORIES or func in _NEW_METHODS:
                source = self.kind(args[0])
                return source if source is not None else _ON_HOST
            return _ON_HOST
        return None

    def _move(self, func, args, kwargs):
        tensor, rest = args[0], list(args[1:])
        target = None
        if func is torch.Tensor.cuda:
            target, rest = _ON_DEVICE, []
            kwargs.pop("device", None)
        elif func in (torch.Tensor.cpu, torch.Tensor.pin_memory):
            target = _ON_HOST
        else:  # Tensor.to(device?, dtype?, ...) / to(other) / to(device=..., dtype=...)
            if "device" in kwargs:
                target = _kind_of_device(kwargs["device"]) if kwargs["device"] is not None else None
                kwargs["device"] = HOST if kwargs["device"] is not None else None
            for i, value in enumerate(rest):
                if isinstance(value, torch.Tensor):
                    target = self.kind(value) or _ON_HOST
                    rest[i] = value.dtype
                elif _is_device_arg(value):
                    target = _kind_of_device(value)
                    rest[i] = HOST
        if func in (torch.Tensor.pin_memory, torch.Tensor.cuda):
            result = tensor
        else:
            result = func(tensor, *rest, **kwargs)
        if target is not None and target != self.kind(tensor):
            if result is tensor:
                result = self._alias(tensor)
            self.mark(result, target)
        elif result is not tensor:
            self._tag_outputs(result, self.kind(tensor))
        return result

    def _check_mix(self, func, args, kwargs):
        """Raise on a device/host mix; return the kind the op's outputs get."""
        self.checked_ops += 1
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not flat:
            return None
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        if func is torch.Tensor.__getitem__:
            indexed, indices = args[0], [t for t in flat[1:]]
            if self.kind(indexed) == _ON_HOST and any(self.on_device(i) for i in indices):
                raise DevicePlacementError(f"{name}: a host tensor indexed by device indices")
            return self.kind(indexed)
        if func is torch.Tensor.__setitem__:
            target, value = args[0], args[2] if len(args) > 2 else None
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                t_kind, v_kind = self.kind(target), self.kind(value)
                if {t_kind, v_kind} == {_ON_DEVICE, _ON_HOST}:
                    raise DevicePlacementError(
                        f"{name}: writes a {v_kind} tensor {_describe([value])} into a {t_kind} "
                        f"tensor {_describe([target])}; build it where it is used")
            return None
        device = [t for t in flat if self.kind(t) == _ON_DEVICE]
        host = [t for t in flat if self.kind(t) == _ON_HOST and t.dim() > 0]
        if device and host and func not in _MIXING_ALLOWED:
            raise DevicePlacementError(
                f"{name}: mixes device tensors ({_describe(device)}) with host tensors "
                f"({_describe(host)}) — on a GPU: 'Expected all tensors to be on the same "
                "device, but found at least two devices, cuda:0 and cpu'")
        if func in _MIXING_ALLOWED:
            return self.kind(args[0])
        if device:
            return _ON_DEVICE
        if any(self.kind(t) == _ON_HOST for t in flat):
            return _ON_HOST
        return None


# Collectives and point-to-point calls: the tensor arguments NCCL would receive.
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                "reduce_scatter", "broadcast", "reduce", "send", "recv", "isend", "irecv",
                "all_to_all_single", "gather", "scatter", "_all_gather_base",
                "_reduce_scatter_base")


def _checked_collective(mode: DeviceTrackingMode, name: str, original):
    def call(*args, **kwargs):
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if mode.kind(t) == _ON_HOST]
        if host:
            raise DevicePlacementError(
                f"torch.distributed.{name} got host tensors ({_describe(host)}); NCCL only "
                "takes tensors on the current CUDA device")
        return original(*args, **kwargs)

    call.__wrapped__ = original
    return call


def _checked_batch_p2p(mode: DeviceTrackingMode, original):
    def call(p2p_ops):
        for op in p2p_ops:
            if mode.kind(op.tensor) == _ON_HOST:
                raise DevicePlacementError("torch.distributed.batch_isend_irecv got a host "
                                           f"tensor {_describe([op.tensor])}")
        return original(p2p_ops)

    return call


@contextlib.contextmanager
def emulated_cuda(check_collectives: bool = True) -> Iterator[DeviceTrackingMode]:
    """A CUDA machine with one device, emulated on the CPU (see the module docstring)."""
    from lens_megatron.parallel import cpu_mode

    cpu_mode.enable()  # its other patches (type names, RNG tracker, no-op sync) stay on
    saved_cuda = {name: getattr(torch.cuda, name) for name in (
        "is_available", "current_device", "device_count", "set_device", "max_memory_allocated",
        "memory_allocated", "reset_peak_memory_stats", "memory_reserved")}
    saved_enabled = cpu_mode._ENABLED
    torch.cuda.is_available = lambda: True
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda device: None
    for name in ("max_memory_allocated", "memory_allocated", "memory_reserved"):
        setattr(torch.cuda, name, lambda device=None: 0)
    torch.cuda.reset_peak_memory_stats = lambda device=None: None
    cpu_mode._ENABLED = False  # as on a GPU: cuda_to_cpu() is a no-op, nothing is rewritten
    mode = DeviceTrackingMode()
    saved_dist = {}
    if check_collectives:
        for name in _COLLECTIVES:
            if hasattr(dist, name):
                saved_dist[name] = getattr(dist, name)
                setattr(dist, name, _checked_collective(mode, name, saved_dist[name]))
        saved_dist["batch_isend_irecv"] = dist.batch_isend_irecv
        dist.batch_isend_irecv = _checked_batch_p2p(mode, saved_dist["batch_isend_irecv"])
    try:
        with mode:
            yield mode
    finally:
        for name, value in saved_cuda.items():
            setattr(torch.cuda, name, value)
        for name, value in saved_dist.items():
            setattr(dist, name, value)
        cpu_mode._ENABLED = saved_enabled
