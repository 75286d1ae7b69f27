"""Fused log-prob / confidence kernels for LENS (import name ``lens_kernels``).

Public API::

    from lens_kernels import logprobs_and_confidence
    out = logprobs_and_confidence(logits, targets, mask, tp_group=None)

Modules: ``logprob`` (entry point), ``autograd`` (the torch.autograd.Function),
``linear_logprob`` (fused LM-head variant that never materialises the full logits),
``triton_logprob`` (raw Triton kernels), ``torch_logprob`` (chunked CPU twin), ``tp``
(single-collective vocab-parallel merge), ``reference`` (float64 references), ``aot``
(ahead-of-time sm_90a compile helper).
"""
from .linear_logprob import linear_logprobs_and_confidence
from .logprob import LogprobOutput, logprobs_and_confidence, sequence_reduction

__all__ = ["LogprobOutput", "linear_logprobs_and_confidence", "logprobs_and_confidence",
           "sequence_reduction"]
