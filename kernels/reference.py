"""Float64 plain-torch references for every kernel in this package (tests compare to these).

* :func:`reference_logprobs` — the public result (token log-probs, per-sequence sum,
  count, confidence, entropy) from full-vocab logits, differentiable with float64
  autograd; the end-to-end reference for forward and backward.
* :func:`reference_packed_logprobs` — the same for one packed row of several sequences
  (``segment_ids``), per-sequence sums by an explicit loop over the sequences.
* :func:`reference_row_stats` — the packed per-shard statistics ``(m, s, t, w)`` that
  ``row_stats_kernel`` / ``row_stats_torch`` produce.
* :func:`reference_row_grad` — the gradient that ``row_grad_kernel`` / ``row_grad_torch``
  write, from the same per-row coefficients.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class ReferenceOutput(NamedTuple):
    token_logprobs: torch.Tensor
    logprob_sum: torch.Tensor
    num_tokens: torch.Tensor
    confidence: torch.Tensor
    entropy: torch.Tensor


def _scaled(logits: torch.Tensor, temperature: float, valid_vocab: int | None) -> torch.Tensor:
    x = logits.double() / temperature
    if valid_vocab is not None and valid_vocab < x.shape[-1]:
        x = x[..., :valid_vocab]
    return x


def reference_logprobs(logits, targets, mask, temperature=1.0, valid_vocab=None):
    """Float64 reference on full-vocab ``logits [B, S, V]`` (padded columns ≥ valid_vocab dropped).

    Targets at masked positions may be anything (they are clamped before the gather).
    """
    x = _scaled(logits, temperature, valid_vocab)
    # masked rows contribute nothing; zero them so garbage there (all −inf) cannot make NaNs
    x = torch.where(mask.bool().unsqueeze(-1), x, torch.zeros_like(x))
    logp = torch.log_softmax(x, dim=-1)
    maskd = mask.to(torch.float64)
    idx = targets.clamp(0, x.shape[-1] - 1).unsqueeze(-1)
    token = logp.gather(-1, idx).squeeze(-1)
    token = torch.where(mask.bool(), token, torch.zeros_like(token))
    p = logp.exp()
    # finite stand-in on −inf columns keeps (−inf)·0 out of both the value and its gradient
    safe_logp = torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))
    ent = -(p * safe_logp).sum(-1) * maskd
    total = token.sum(-1)
    count = mask.bool().sum(-1)
    conf = torch.where(count > 0, torch.exp(total / count.clamp(min=1)), torch.zeros_like(total))
    return ReferenceOutput(token, total, count, conf, ent)


def reference_packed_logprobs(logits, targets, mask, segment_ids, num_segments, temperature=1.0,
                              valid_vocab=None):
    """Float64 reference for packed rows: ``logits [T, V]``, ``targets/mask/segment_ids [T]``.

    Per-token values as :func:`reference_logprobs`; sequence ``i`` sums the masked-in tokens
    whose segment id is ``i`` (ids −1 belong to no sequence). Differentiable.
    """
    per_token = reference_logprobs(logits.reshape(1, *logits.shape[-2:]), targets.reshape(1, -1),
                                   mask.reshape(1, -1), temperature, valid_vocab)
    token = per_token.token_logprobs[0]
    keep = mask.reshape(-1).bool()
    seg = segment_ids.reshape(-1)
    totals, counts = [], []
    for i in range(num_segments):
        mine = keep & (seg == i)
        totals.append(token[mine].sum())
        counts.append(int(mine.sum()))
    total = torch.stack(totals) if totals else token.new_zeros(0)
    count = torch.tensor(counts, dtype=torch.int64)
    conf = torch.where(count > 0, torch.exp(total / count.clamp(min=1)), torch.zeros_like(total))
    return ReferenceOutput(token, total, count, conf, per_token.entropy[0])


def reference_row_stats(logits, targets, active, vocab_start, n_valid, temperature=1.0):
    """Float64 ``[B*S, 4]`` shard statistics (m, Σexp(x−m), target x or 0, Σexp(x−m)(x−m)).

    Inactive rows and shards without valid columns give the neutral (−inf, 0, 0, 0).
    """
    rows = targets.numel()
    x = logits.double().reshape(rows, logits.shape[-1])[:, :n_valid] / temperature
    out = torch.zeros(rows, 4, dtype=torch.float64)
    out[:, 0] = float("-inf")
    if n_valid == 0:
        return out
    m = x.amax(1)
    shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    d = x - shift[:, None]
    e = d.exp()
    local = targets.reshape(-1) - vocab_start
    own = (local >= 0) & (local < n_valid)
    t = x.gather(1, local.clamp(0, n_valid - 1)[:, None]).squeeze(1)
    stats = torch.stack([m, e.sum(1), torch.where(own, t, torch.zeros_like(t)),
                         torch.where(e > 0, e * d, torch.zeros_like(e)).sum(1)], dim=1)
    act = active.reshape(-1).bool()
    out[act] = stats[act]
    return out


def reference_row_grad(logits, targets, lse, coef, ent_coef, mean, vocab_start, n_valid,
                       temperature=1.0):
    """Float64 ``(a·(onehot − p) + b·p·(μ − x)) / T`` on valid columns, 0 on padded ones."""
    flat = logits.double().reshape(-1, logits.shape[-1])
    x = flat[:, :n_valid] / temperature
    lse, a = lse.double()[:, None], coef.double()[:, None]
    p = torch.exp(x - lse)
    onehot = torch.zeros_like(x)
    local = targets.reshape(-1) - vocab_start
    own = (local >= 0) & (local < n_valid)
    onehot[own, local[own]] = 1.0
    g = a * (onehot - p)
    if ent_coef is not None:
        b, mu = ent_coef.double()[:, None], mean.double()[:, None]
        g = g + torch.where(p > 0, b * p * (mu - x), torch.zeros_like(p))
    out = torch.zeros_like(flat)
    out[:, :n_valid] = g / temperature
    return out.reshape(logits.shape)
