"""Allocation of the large CPU gradient buffer with transparent huge pages.

A fresh ``[4096, 32000]`` fp32 gradient is 524 MB of never-touched memory; with 4 KiB
pages the first write takes ~128k page faults, which on the 2-core sandbox cost about as
much as the whole backward computation (~70-100 ms, measured). Linux can back the buffer
with 2 MiB pages instead when asked with ``madvise(MADV_HUGEPAGE)`` before the first
touch (``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise`` or ``always``), which
PyTorch itself offers process-wide through ``THP_MEM_ALLOC_ENABLE=1``. This module does
it for just the one buffer. Anywhere else (not Linux, GPU tensors, small tensors, THP
disabled, madvise failing, ``LENS_KERNELS_CPU_HUGEPAGES=0``) it is an ordinary
``torch.empty_like``.

Measured on the sandbox VM (allocate + first fill of 524 MB, 30 interleaved trials): median
99 ms with 4 KiB pages, 43 ms with huge pages, but 3 of the 30 huge-page trials took
300-700 ms (likely the hypervisor backing fresh 2 MiB regions; no reclaim or compaction
showed in /proc/vmstat).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch

_MADV_HUGEPAGE = 14
_HUGE_PAGE = 2 << 20
_MIN_BYTES = 16 * _HUGE_PAGE


@functools.lru_cache(maxsize=1)
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def empty_like_hugepages(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(t)``, asking the kernel for huge pages when it is a big CPU buffer."""
    out = torch.empty_like(t)
    storage = out.untyped_storage()
    madvise = _madvise()
    if (out.device.type != "cpu" or storage.nbytes() < _MIN_BYTES or madvise is None
            or os.environ.get("LENS_KERNELS_CPU_HUGEPAGES", "1") == "0"):
        return out
    start = storage.data_ptr()
    aligned = (start + _HUGE_PAGE - 1) // _HUGE_PAGE * _HUGE_PAGE
    length = (start + storage.nbytes() - aligned) // _HUGE_PAGE * _HUGE_PAGE
    if length > 0:
        madvise(aligned, length, _MADV_HUGEPAGE)   # advisory: a failure changes nothing
    return out
