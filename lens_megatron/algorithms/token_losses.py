"""The actor's losses as sums of per-token terms, for the fused LM head's in-chunk gradients.

``lens_kernels.linear_logprobs_with_loss`` never holds the logits: it evaluates the loss of
each chunk of tokens while that chunk's logits are live and differentiates it there. These
builders give it that loss for one micro-batch — flat per-token tensors in the kernel's
layout (``targets`` flattened: ``[b·w]`` padded, ``[T]`` packed), indexed by the chunk's
rows:

* :func:`policy_token_loss` — the clipped surrogate of :class:`ClippedPolicyLoss`, each
  token weighted by its share of the aggregation (``1/(n_i N_seq)`` or ``1/N_tok``);
* :func:`nll_token_loss` — the warm start's ``-Σ log p / N_tok``.

Summed over the micro-batch's tokens each equals the unfused loss (up to float summation
order), so the gradients are the same (``tests/test_actor_fused_linear.py``).
"""
from __future__ import annotations

import torch

from .loss import ClippedPolicyLoss


def policy_token_loss(loss_fn: ClippedPolicyLoss, mb, global_normalizer):
    """``token_loss(rows, logp, entropy)`` of the clipped policy loss on micro-batch ``mb``."""
    flat = lambda t: None if t is None else t.reshape(-1)  # noqa: E731
    extras = mb.token_extras
    valid = flat(mb.mask).bool()
    sequence = mb.sequence_of_token()
    advantages = mb.sequence_extras["advantages"]
    weights = loss_fn.token_weights(valid, sequence, advantages.shape[0], global_normalizer,
                                    mb.sequence_extras.get("tokens_per_sequence"))
    return loss_fn.token_loss(
        flat(extras["old_logprobs"]), advantages.index_select(0, sequence.clamp(min=0)), valid,
        weights, ref_logprobs=flat(extras.get("ref_logprobs")),
        rollout_weights=flat(extras.get("rollout_weights")))


def nll_token_loss(total_tokens: torch.Tensor):
    """``token_loss(rows, logp, entropy)`` of ``-Σ log p / total_tokens``."""
    def loss_of(rows, logp, entropy=None):
        return -logp.sum() / total_tokens.to(logp.dtype)

    return loss_of
