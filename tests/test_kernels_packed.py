"""Packed sequences (THD): one row of several sequences + segment_ids == the padded layout.

Random packings of ragged sequences with alignment padding (segment id −1) between them;
the packed call must give the padded call's per-token log-probs, per-sequence sums, counts
and confidence, and the same logits gradients; both against the float64 reference.
"""
from __future__ import annotations

import pytest
import torch

from lens_kernels import linear_logprobs_and_confidence, logprobs_and_confidence
from lens_kernels.reference import reference_packed_logprobs
from seeds import random_seed


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random_seed())


def random_packing(gen, n_seq, max_len, align=4):
    """Segment ids of ``n_seq`` ragged sequences back to back, each start aligned to ``align``
    (the gaps are padding, id −1), and the packed position of every (sequence, offset)."""
    lengths = torch.randint(1, max_len + 1, (n_seq,), generator=gen).tolist()
    seg, positions = [], []
    for i, length in enumerate(lengths):
        positions.append(list(range(len(seg), len(seg) + length)))
        seg += [i] * length
        seg += [-1] * int(torch.randint(0, align, (1,), generator=gen))
    return torch.tensor(seg), positions, lengths


def packed_case(gen, n_seq=5, max_len=7, vocab=333, valid=320, dtype=torch.float32):
    seg, positions, lengths = random_packing(gen, n_seq, max_len)
    tokens = seg.numel()
    logits = (torch.randn(tokens, vocab, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, valid, (tokens,), generator=gen)
    # each sequence: a prompt prefix masked out, then its response; padding masked out
    mask = torch.zeros(tokens, dtype=torch.bool)
    for pos in positions:
        start = int(torch.randint(0, len(pos), (1,), generator=gen))
        mask[pos[start:]] = True
    mask[positions[1]] = False                         # one sequence with no response token
    targets[~mask] = -100
    logits[seg == -1] = float("-inf")                  # garbage in the padding rows
    return logits, targets, mask, seg, positions, lengths


def padded_layout(packed, positions, lengths, fill):
    """``[T, …]`` packed tensor → ``[N, max_len, …]`` padded, positions past a length = fill."""
    out = packed.new_full((len(lengths), max(lengths)) + tuple(packed.shape[1:]), fill)
    for i, pos in enumerate(positions):
        out[i, :len(pos)] = packed[pos]
    return out


def _loss(out, weights, entropy):
    loss = (out.token_logprobs * weights[0]).sum() + (out.logprob_sum * weights[1]).sum()
    loss = loss + (out.confidence * weights[2]).sum()
    if entropy:
        loss = loss + (out.entropy * weights[3]).sum()
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inplace,entropy", [(False, False), (True, True), (False, True)])
@pytest.mark.parametrize("rank3", [False, True])
def test_packed_equals_unpacked_and_reference(gen, dtype, inplace, entropy, rank3):
    logits, targets, mask, seg, positions, lengths = packed_case(gen, dtype=dtype)
    opts = dict(valid_vocab=320, temperature=0.9, return_entropy=entropy,
                inplace_backward=inplace)
    n = len(lengths)
    x = logits.clone().requires_grad_(True)
    xin = x * 1                                        # non-leaf: in-place modes may consume it
    packed = logprobs_and_confidence(xin.unsqueeze(0) if rank3 else xin,
                                     targets.unsqueeze(0) if rank3 else targets,
                                     mask.unsqueeze(0) if rank3 else mask,
                                     segment_ids=seg, num_segments=n, **opts)
    assert packed.token_logprobs.shape == ((1, seg.numel()) if rank3 else (seg.numel(),))
    assert packed.logprob_sum.shape == (n,) and packed.num_tokens.dtype == torch.int64
    y = padded_layout(logits, positions, lengths, 0.0).requires_grad_(True)
    yin = y * 1
    padded = logprobs_and_confidence(yin, padded_layout(targets, positions, lengths, -100),
                                     padded_layout(mask, positions, lengths, False), **opts)
    flat = packed.token_logprobs.reshape(-1)
    torch.testing.assert_close(padded_layout(flat, positions, lengths, 0.0), padded.token_logprobs)
    for key in ("logprob_sum", "confidence"):
        torch.testing.assert_close(getattr(packed, key), getattr(padded, key), atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.num_tokens, padded.num_tokens)
    assert packed.num_tokens[1] == 0 and packed.confidence[1] == 0
    ref_in = logits.double().requires_grad_(True)
    ref = reference_packed_logprobs(ref_in, targets, mask, seg, n, 0.9, 320)
    torch.testing.assert_close(flat.double(), ref.token_logprobs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(packed.logprob_sum.double(), ref.logprob_sum, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(packed.confidence.double(), ref.confidence, atol=1e-6, rtol=1e-4)
    assert torch.equal(packed.num_tokens, ref.num_tokens)
    conf = ref.confidence.detach()
    w = [torch.randn(seg.numel(), generator=gen).double(), torch.randn(n, generator=gen).double(),
         torch.randn(n, generator=gen).double() / torch.where(conf > 0, conf, 1.0),
         torch.randn(seg.numel(), generator=gen).double()]
    _loss(packed, [w[0].view(packed.token_logprobs.shape), *w[1:3],
                   w[3].view(packed.token_logprobs.shape)], entropy).backward()
    _loss(padded, [padded_layout(w[0], positions, lengths, 0.0), *w[1:3],
                   padded_layout(w[3], positions, lengths, 0.0)], entropy).backward()
    _loss(ref, w, entropy).backward()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
    torch.testing.assert_close(padded_layout(x.grad, positions, lengths, 0.0).float(),
                               y.grad.float(), **tol)
    scale = ref_in.grad.abs().max().clamp(min=1.0)
    gtol = 1e-5 if dtype == torch.float32 else 8e-3
    torch.testing.assert_close(x.grad.double(), ref_in.grad, atol=gtol * scale, rtol=0)
    assert (x.grad[seg == -1] == 0).all() and (x.grad[~mask] == 0).all()


def test_linear_packed_equals_unpacked(gen):
    _, targets, mask, seg, positions, lengths = packed_case(gen, vocab=300, valid=290)
    hidden = torch.randn(seg.numel(), 16, generator=gen)
    weight = torch.randn(300, 16, generator=gen) / 4 * 4
    n = len(lengths)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    packed = linear_logprobs_and_confidence(h1, w1, targets, mask, segment_ids=seg, num_segments=n,
                                            valid_vocab=290, temperature=0.8, return_entropy=True,
                                            chunk_tokens=3)
    h2 = padded_layout(hidden, positions, lengths, 0.0).requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    padded = linear_logprobs_and_confidence(h2, w2, padded_layout(targets, positions, lengths, -100),
                                            padded_layout(mask, positions, lengths, False),
                                            valid_vocab=290, temperature=0.8, return_entropy=True,
                                            chunk_tokens=3)
    torch.testing.assert_close(padded_layout(packed.token_logprobs, positions, lengths, 0.0),
                               padded.token_logprobs)
    torch.testing.assert_close(packed.confidence, padded.confidence, atol=1e-6, rtol=1e-5)
    assert torch.equal(packed.num_tokens, padded.num_tokens)
    (packed.confidence.sum() + packed.logprob_sum.sum() + packed.entropy.sum()).backward()
    (padded.confidence.sum() + padded.logprob_sum.sum() + padded.entropy.sum()).backward()
    torch.testing.assert_close(padded_layout(h1.grad, positions, lengths, 0.0), h2.grad,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)


def test_empty_segments_and_default_count(gen):
    logits, targets, mask, seg, _, lengths = packed_case(gen)
    out = logprobs_and_confidence(logits, targets, mask, segment_ids=seg)   # N = max id + 1
    assert out.logprob_sum.shape == (len(lengths),)
    wide = logprobs_and_confidence(logits, targets, mask, segment_ids=seg,
                                   num_segments=len(lengths) + 3)
    assert wide.num_tokens[-3:].tolist() == [0, 0, 0] and (wide.confidence[-3:] == 0).all()
    torch.testing.assert_close(wide.confidence[:-3], out.confidence)


def test_segment_arguments_are_checked(gen):
    logits, targets, mask, seg, _, lengths = packed_case(gen)
    with pytest.raises(ValueError, match="num_segments"):
        logprobs_and_confidence(logits, targets, mask, segment_ids=seg, num_segments=len(lengths) - 1)
    with pytest.raises(ValueError, match=r"\[-1, num_segments"):
        logprobs_and_confidence(logits, targets, mask, segment_ids=seg - 2)
    with pytest.raises(TypeError, match="segment_ids"):
        logprobs_and_confidence(logits, targets, mask, segment_ids=seg.float())
    with pytest.raises(ValueError, match="one id per token"):
        logprobs_and_confidence(logits, targets, mask, segment_ids=seg[1:])
    with pytest.raises(ValueError, match="one packed row"):
        logprobs_and_confidence(logits.view(1, 1, *logits.shape).expand(2, -1, -1, -1)[0].expand(
            2, -1, -1), targets, mask, segment_ids=seg)
    with pytest.raises(ValueError, match="needs segment_ids"):
        logprobs_and_confidence(logits.unsqueeze(0), targets.unsqueeze(0), mask.unsqueeze(0),
                                num_segments=3)
