"""Versioned weight broadcast from trainer rank 0 to the rollout ranks over the ``weights`` group
(``parallel/roles.py``; NCCL on GPU, gloo on CPU). Never through files.

One message per optimizer version:

1. a header ``[version, stop, num_tensors | exit code]`` (int64);
2. with the first version only, the manifest — the ``(name, shape, dtype)`` of every tensor in
   stream order, pickled into a uint8 tensor;
3. the tensors in manifest order, in buckets: consecutive tensors of one dtype up to
   ``bucket_bytes`` flattened into one buffer, one broadcast per bucket.

``stop`` ends the rollout side's loop (no tensors follow). The receiver allocates a fresh buffer
per bucket and yields views of it, so a consumer that keeps references until the end of the sync
(vLLM's layerwise reload does) sees the right data. Applying the tensors is the consumer's job
(the native sampler's shards here, vLLM's refit in ``weight_sync.py``).
"""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

NamedTensors = Iterable[tuple[str, torch.Tensor]]
DEFAULT_BUCKET_BYTES = 256 << 20


def _broadcast(group, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


def _buckets(manifest: list, bucket_bytes: int) -> list[list[int]]:
    """Indices into ``manifest`` grouped into buckets (one dtype per bucket)."""
    buckets, current, size = [], [], 0
    for i, (_, shape, dtype) in enumerate(manifest):
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if current and (size + nbytes > bucket_bytes or manifest[current[0]][2] != dtype):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


@dataclass
class WeightStats:
    version: int
    seconds: float
    bytes: int


class WeightBroadcaster:
    """Trainer rank 0's side (channel rank 0). ``manifest``: the ``(name, shape, dtype)`` of
    every tensor the stream will yield, in order (``models.gather.full_parameter_manifest``)."""

    def __init__(self, group, device: torch.device, manifest: list,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.group, self.device, self.bucket_bytes = group, device, bucket_bytes
        self.manifest = [(n, tuple(shape), dtype) for n, shape, dtype in manifest]
        self._sent_manifest = False

    def send(self, version: int, named_tensors: NamedTensors) -> WeightStats:
        start = time.perf_counter()
        items = iter(named_tensors)
        header = torch.tensor([version, 0, len(self.manifest)], dtype=torch.int64)
        _broadcast(self.group, header.to(self.device))
        if not self._sent_manifest:
            payload = torch.frombuffer(bytearray(pickle.dumps(self.manifest)), dtype=torch.uint8)
            _broadcast(self.group, torch.tensor([payload.numel()], device=self.device))
            _broadcast(self.group, payload.to(self.device))
            self._sent_manifest = True
        sent = 0
        for bucket in _buckets(self.manifest, self.bucket_bytes):
            parts = []
            for i in bucket:
                name, tensor = next(items)
                expected = self.manifest[i]
                if name != expected[0] or tuple(tensor.shape) != expected[1]:
                    raise RuntimeError(f"weight stream changed: got {name} {tuple(tensor.shape)}, "
                                       f"expected {expected[0]} {expected[1]}")
                parts.append(tensor.detach().reshape(-1).to(self.device, expected[2]))
            flat = torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
            _broadcast(self.group, flat)
            sent += flat.numel() * flat.element_size()
        return WeightStats(version, time.perf_counter() - start, sent)

    def stop(self, version: int, exit_code: int = 0) -> None:
        """End the rollout side's loop; it exits with ``exit_code`` (the trainer's own)."""
        header = torch.tensor([version, 1, exit_code], dtype=torch.int64)
        _broadcast(self.group, header.to(self.device))


@dataclass
class WeightMessage:
    version: int
    stop: bool
    exit_code: int = 0


class WeightReceiver:
    """A rollout rank's side: ``receive(apply)`` takes one message; ``apply`` consumes the
    ``(name, tensor)`` stream (lazily; whatever it leaves is drained, keeping the collectives in
    step)."""

    def __init__(self, group, device: torch.device, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.group, self.device, self.bucket_bytes = group, device, bucket_bytes  # = the sender's
        self.manifest: Optional[list] = None

    def receive(self, apply: Callable[[Iterator[tuple[str, torch.Tensor]]], None]) -> WeightMessage:
        header = torch.zeros(3, dtype=torch.int64, device=self.device)
        _broadcast(self.group, header)
        version, stop, extra = (int(v) for v in header.tolist())
        if stop:
            return WeightMessage(version, True, extra)
        if self.manifest is None:
            length = torch.zeros(1, dtype=torch.int64, device=self.device)
            _broadcast(self.group, length)
            payload = torch.empty(int(length), dtype=torch.uint8, device=self.device)
            _broadcast(self.group, payload)
            self.manifest = pickle.loads(payload.cpu().numpy().tobytes())
        stream = self._stream()
        try:
            apply(stream)
        except BaseException:
            # Finish this version's broadcasts before failing: the trainer is inside them and
            # would otherwise wait there instead of reading the failure we report next.
            try:
                for _ in stream:
                    pass
            except Exception:  # noqa: BLE001 - the group itself broke: report the first error
                pass
            raise
        for _ in stream:  # whatever the consumer did not take
            pass
        return WeightMessage(version, False)

    def _stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        # The broadcasts happen as the stream is consumed; WeightBroadcaster buckets identically.
        for bucket in _buckets(self.manifest, self.bucket_bytes):
            dtype = self.manifest[bucket[0]][2]
            total = sum(_numel(self.manifest[i][1]) for i in bucket)
            flat = torch.empty(total, dtype=dtype, device=self.device)
            _broadcast(self.group, flat)
            offset = 0
            for i in bucket:
                name, shape, _ = self.manifest[i]
                n = _numel(shape)
                yield name, flat[offset:offset + n].view(shape)
                offset += n
