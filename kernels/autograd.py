"""The autograd wrapper: raw kernels (Triton or chunked torch) + the single-collective merge.

:class:`TokenLogprobFunction` maps logits ``[B, S, V_local]`` to per-token log-probs (and
optionally entropies) ``[B*S]`` fp32. Forward: backend row statistics → one all-gather of
the packed stats (:mod:`lens_kernels.tp`) → local merge. It saves the logits *reference*
(no copy), the targets and three ``[N]`` fp32 vectors (lse, μ, active); backward
recomputes the softmax from them. No collective is needed in backward.

With ``spec.store_exp`` (fp32 logits on a CPU backend, ``inplace_backward=True``, a
gradient wanted) the forward instead leaves ``exp(x − m)`` in the logits buffer and saves
the per-row ``m`` and ``c = exp(m − lse)``; backward is then one pass without an
exponential (:mod:`lens_kernels.torch_stored`, :mod:`lens_kernels.cpu_ext`). The Triton
path always recomputes: on a GPU the exponential is free and the extra forward write would
cost a fourth pass over HBM.

Backends: ``triton`` (GPU, or CPU under ``TRITON_INTERPRET=1``), ``cpu`` (the compiled CPU
kernels, :mod:`lens_kernels.cpu_ext`), ``torch`` (the chunked plain-torch twin); ``auto``
picks Triton on GPU and ``cpu`` on CPU when it builds (else ``torch``, with a warning).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from . import cpu_ext, torch_logprob, torch_stored
from .cpu_memory import empty_like_hugepages
from .tp import gather_row_stats, merge_row_stats

BACKENDS = ("auto", "triton", "cpu", "torch")


@dataclass(frozen=True)
class KernelSpec:
    """Everything about one call that is not a tensor."""

    tp_group: Any
    vocab_start: int
    n_valid: int            # valid (unpadded) columns in this rank's shard
    inv_temperature: float
    with_entropy: bool
    inplace_backward: bool
    backend: str            # resolved: "triton", "cpu" or "torch"
    store_exp: bool = False  # forward leaves exp(x − m) in the (fp32) logits buffer


def _triton_module():
    try:
        from . import triton_logprob
    except ImportError as err:  # pragma: no cover - triton is a hard dependency of the package
        raise RuntimeError(f"backend='triton' needs triton: {err}") from err
    return triton_logprob


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` → Triton on GPU or when ``TRITON_INTERPRET=1`` built the kernels, else on CPU
    the chunked torch path (the compiled CPU kernels with ``LENS_KERNELS_CPU_EXT=1``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' runs on CPU tensors, got a {device.type} tensor")
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "triton"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and _triton_module().is_interpreted():
        return "triton"
    return "cpu" if device.type == "cpu" and cpu_ext.available() else "torch"


def backend_row_stats(logits, targets, active, spec: KernelSpec) -> torch.Tensor:
    """Packed ``[N, 4]`` shard statistics from the chosen backend (logits left untouched)."""
    launch = {"triton": lambda: _triton_module().launch_row_stats, "cpu": lambda: cpu_ext.row_stats,
              "torch": lambda: torch_logprob.row_stats_torch}[spec.backend]()
    return launch(logits, targets, active, spec.vocab_start, spec.n_valid,
                  spec.inv_temperature, spec.with_entropy)


def backend_row_grad(logits, grad, targets, lse, coef, ent_coef, mean, spec: KernelSpec):
    """Write the logits gradient into ``grad`` (may be ``logits``) with the chosen backend."""
    launch = {"triton": lambda: _triton_module().launch_row_grad, "cpu": lambda: cpu_ext.row_grad,
              "torch": lambda: torch_logprob.row_grad_torch}[spec.backend]()
    return launch(logits, grad, targets, lse, coef, ent_coef, mean, spec.vocab_start,
                  spec.n_valid, spec.inv_temperature)


def stored_row_stats(logits, targets, active, spec: KernelSpec) -> torch.Tensor:
    """Shard statistics that leave exp(x − m) in the fp32 ``logits`` (CPU backends)."""
    launch = cpu_ext.row_stats if spec.backend == "cpu" else torch_stored.row_stats_store_torch
    extra = {"store": True} if spec.backend == "cpu" else {}
    return launch(logits, targets, active, spec.vocab_start, spec.n_valid, spec.inv_temperature,
                  spec.with_entropy, **extra)


def stored_row_grad(stored, targets, scale, shift, coef, ent_coef, mean, spec: KernelSpec):
    """Turn a buffer filled by :func:`stored_row_stats` into the logits gradient, in place."""
    launch = cpu_ext.row_grad_stored if spec.backend == "cpu" else torch_stored.row_grad_stored_torch
    return launch(stored, targets, scale, shift, coef, ent_coef, mean, spec.vocab_start,
                  spec.n_valid, spec.inv_temperature)


def stored_saved(stats, lse):
    """(c = exp(m − lse), finite m) per row: what a stored-exp backward needs."""
    shift = stats[:, 0]
    scale = torch_stored.stored_scale(shift, lse)
    return scale, torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))


def finish_forward(ctx, stats, active, spec: KernelSpec):
    """Merge shard stats (one collective under TP) → (token log-prob, entropy, lse, μ, active).

    Shared by every autograd Function of the package. Masked rows get finite placeholders
    for lse/μ (never read: their backward coefficient is 0); ``entropy`` is an empty
    non-differentiable tensor unless ``spec.with_entropy``.
    """
    merged = merge_row_stats(gather_row_stats(stats, spec.tp_group))
    act = active.bool()
    zero = torch.zeros_like(merged.lse)
    token = torch.where(act, merged.target_logit - merged.lse, zero)
    lse = torch.where(act, merged.lse, zero)
    mean = torch.where(act, merged.mean_logit, zero)
    if spec.with_entropy:
        entropy = torch.where(act, merged.entropy, zero)
    else:
        entropy = zero.new_empty(0)
        ctx.mark_non_differentiable(entropy)
    ctx.set_materialize_grads(False)
    return token, entropy, lse, mean, act


def backward_coefficients(grad_token, grad_entropy, act, spec: KernelSpec):
    """Per-row fp32 upstream grads (a, b), zero on masked rows; b is None without entropy grad."""
    zero = torch.zeros(act.shape, dtype=torch.float32, device=act.device)
    coef = zero if grad_token is None else torch.where(act, grad_token.float(), zero)
    ent_coef = None
    if spec.with_entropy and grad_entropy is not None:
        ent_coef = torch.where(act, grad_entropy.float(), zero)
    return coef, ent_coef


class TokenLogprobFunction(torch.autograd.Function):
    """(logits [B,S,V_local], targets [N] int64, active [N] int8, spec) → (logprob [N], entropy).

    ``entropy`` is an empty non-differentiable tensor unless ``spec.with_entropy``.
    """

    @staticmethod
    def forward(ctx, logits, targets, active, spec: KernelSpec):
        stats = (stored_row_stats if spec.store_exp else backend_row_stats)(
            logits, targets, active, spec)
        token, entropy, lse, mean, act = finish_forward(ctx, stats, active, spec)
        if spec.store_exp:
            ctx.save_for_backward(logits, targets, *stored_saved(stats, lse), mean, act)
        else:
            ctx.save_for_backward(logits, targets, lse, mean, act)
        ctx.spec = spec
        return token, entropy

    @staticmethod
    def backward(ctx, grad_token, grad_entropy):
        spec: KernelSpec = ctx.spec
        if spec.store_exp:
            stored, targets, scale, shift, mean, act = ctx.saved_tensors
            coef, ent_coef = backward_coefficients(grad_token, grad_entropy, act, spec)
            grad = stored_row_grad(stored, targets, scale, shift, coef, ent_coef,
                                   mean if ent_coef is not None else None, spec)
            return grad, None, None, None
        logits, targets, lse, mean, act = ctx.saved_tensors
        coef, ent_coef = backward_coefficients(grad_token, grad_entropy, act, spec)
        grad = logits if spec.inplace_backward else empty_like_hugepages(logits)
        backend_row_grad(logits, grad, targets, lse, coef, ent_coef,
                         mean if ent_coef is not None else None, spec)
        return grad, None, None, None
