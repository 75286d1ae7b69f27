"""Fused log-prob / confidence kernels for LENS (import name ``lens_kernels``).

Public API::

    from lens_kernels import logprobs_and_confidence
    out = logprobs_and_confidence(logits, targets, mask, tp_group=None)
    # packed rows (THD) and context parallelism (optional, keyword-only):
    out = logprobs_and_confidence(logits_1TV, targets_T, mask_T, tp_group,
                                  segment_ids=seg_T, num_segments=N, cp_group=cp_group)

Modules: ``logprob`` (entry point), ``autograd`` (the torch.autograd.Function),
``sequences`` (per-sequence sums: rows, packed segments, the one CP all-reduce),
``linear_logprob`` (fused LM-head variant that never materialises the full logits),
``triton_logprob`` (raw Triton kernels), ``cpu_ext`` + ``cpu_kernels.cpp`` (the compiled
CPU kernels, built on first use; opt-in: ``backend="cpu"`` or ``LENS_KERNELS_CPU_EXT=1``), ``torch_logprob``
(chunked plain-torch twin, ``backend="torch"``),
``torch_stored`` (fp32 in-place CPU path that keeps exp(x − max) for a one-pass backward),
``tp`` (single-collective vocab-parallel merge), ``reference`` (float64 references),
``aot`` (ahead-of-time sm_90a compile helper).
"""
from .linear_logprob import linear_logprobs_and_confidence, linear_logprobs_with_loss
from .logprob import LogprobOutput, logprobs_and_confidence, sequence_reduction

__all__ = ["LogprobOutput", "linear_logprobs_and_confidence", "linear_logprobs_with_loss",
           "logprobs_and_confidence",
           "sequence_reduction"]
