"""The compiled CPU backend (``backend="cpu"``): :file:`cpu_kernels.cpp`, built on first use.

``torch.utils.cpp_extension.load`` compiles the C++ twins of the Triton kernels once per
machine (~40 s of CPU; cached under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``, and rebuilt only when the source or flags change). It needs a
C++ compiler and ``ninja``. With AVX2 (``torch.backends.cpu.get_cpu_capability()``) the
kernels use at::vec's 8-wide AVX2 code and Sleef's exp2/log2, exported by libtorch_cpu.

Why a compiled kernel: on the CPU the fused log-prob is bound by the exponential and by how
often the work stops to synchronise. The chunked torch path (:mod:`lens_kernels.torch_logprob`)
issues thousands of small ops per call; every op boundary is a GIL hand-off between its
worker threads, and on an oversubscribed machine (measured here at load averages of 10–30)
each hand-off may wait for a scheduler slot: its wall time reached 3–10x its CPU time while
Megatron's few large ops stayed near 1x. Each kernel here is one call that spreads rows over
its own short-lived threads (no OpenMP team: libgomp's idle threads spin after a region,
which on a loaded 2-core machine took the cores from the small ops that follow — measured:
ten ``[4096]``-row stat merges took ~400 ms after an OpenMP region, ~6 ms with
``OMP_WAIT_POLICY=PASSIVE``).

Opt-in: ``backend="cpu"`` selects it (and raises if it cannot be built); ``backend="auto"``
on CPU uses it only with ``LENS_KERNELS_CPU_EXT=1`` in the environment (then warning, with the
reason, and using the torch path if it cannot be built), else the chunked torch path. Not the
default because every process pays the extension's load (about a second when cached, ~40 s of
compilation on a fresh machine) and needs a compiler — a cost the many short-lived processes of
tests and tools should not pay silently; the training loop is where it pays off.
"""
from __future__ import annotations

import functools
import os
import shutil
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")


def _flags() -> list[str]:
    flags = ["-O3"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    return flags


def _ensure_ninja_on_path() -> None:
    """The venv's ``ninja`` (pip package) may not be on PATH when the venv is not activated."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.lru_cache(maxsize=1)
def _build():
    from torch.utils.cpp_extension import load

    _ensure_ninja_on_path()
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return load(name=f"lens_kernels_cpu_{cap}", sources=[str(SOURCE)], extra_cflags=_flags(),
                verbose=False)


def extension():
    """The compiled module (builds it on first use); raises RuntimeError if it cannot."""
    try:
        return _build()
    except Exception as err:  # noqa: BLE001 - compiler/ninja/linker errors of any kind
        raise RuntimeError(f"the lens_kernels CPU extension could not be built: {err}") from err


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the extension builds here; warns once (with the reason) when it does not."""
    if os.environ.get("LENS_KERNELS_CPU_EXT", "0") != "1":
        return False
    try:
        extension()
    except RuntimeError as err:
        warnings.warn(f"{err}; backend='auto' uses the slower chunked torch path on CPU. "
                      "Install a C++ compiler and ninja, or unset LENS_KERNELS_CPU_EXT to "
                      "select the torch path without this warning.", RuntimeWarning,
                      stacklevel=3)
        return False
    return True


def _rows(t: torch.Tensor) -> list[torch.Tensor]:
    """``[B, S, V]`` → 2-D row views (one, or one per batch element when B and S don't merge)."""
    try:
        return [t.view(-1, t.shape[-1])]
    except RuntimeError:
        return list(t.unbind(0))


def _per_view(views, *per_row):
    """Split per-row vectors to match ``views`` (their rows are consecutive)."""
    out, start = [], 0
    for v in views:
        rows = slice(start, start + v.shape[0])
        out.append([None if p is None else p[rows] for p in per_row])
        start += v.shape[0]
    return out


_EMPTY = torch.empty(0)


def row_stats(logits, targets, active, vocab_start, n_valid, inv_temperature, with_entropy,
              store=False):
    """Packed ``[B*S, 4]`` statistics; ``store=True`` leaves exp(x − m) in fp32 ``logits``."""
    ext = extension()
    views = _rows(logits)
    parts = [ext.row_stats(v, t, a, vocab_start, n_valid, inv_temperature, with_entropy, store)
             for v, (t, a) in zip(views, _per_view(views, targets, active))]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def row_grad(logits, grad, targets, lse, coef, ent_coef, mean, vocab_start, n_valid,
             inv_temperature):
    """Logits gradient into ``grad`` (may be ``logits``), recomputing the softmax."""
    ext = extension()
    views, gviews = _rows(logits), _rows(grad)
    if len(views) != len(gviews):
        views, gviews = list(logits.unbind(0)), list(grad.unbind(0))
    for v, g, (t, lv, a, b, mu) in zip(views, gviews,
                                      _per_view(views, targets, lse, coef, ent_coef, mean)):
        ext.row_grad(v, g, t, lv, a, _EMPTY if b is None else b, _EMPTY if mu is None else mu,
                     vocab_start, n_valid, inv_temperature)
    return grad


def row_grad_stored(stored, targets, scale, shift, coef, ent_coef, mean, vocab_start, n_valid,
                    inv_temperature):
    """Turn a buffer filled by ``row_stats(store=True)`` into the gradient, in place."""
    ext = extension()
    views = _rows(stored)
    for v, (t, c, m, a, b, mu) in zip(views, _per_view(views, targets, scale, shift, coef,
                                                        ent_coef, mean)):
        ext.row_grad_stored(v, t, c, m, a, _EMPTY if b is None else b,
                            _EMPTY if mu is None else mu, vocab_start, n_valid, inv_temperature)
    return stored
