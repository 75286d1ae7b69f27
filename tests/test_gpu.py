"""GPU-only checks: the Triton kernels compiled for the device (not interpreted) against the
float64 reference, and the fused-linear variant. Skipped, with the reason, where no CUDA device
is visible (CI); `make gpu-check` runs them with the rest of the GPU paths on a GPU machine.

No GPU was lent to this project, so these have never run here.
"""
from __future__ import annotations

import pytest
import torch

from lens_kernels import (linear_logprobs_and_confidence, linear_logprobs_with_loss,
                          logprobs_and_confidence)
from lens_kernels.reference import reference_logprobs
from seeds import random_seed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (run `make gpu-check` on a GPU machine)"),
]


def _inputs(gen, bsz, seq, vocab, valid, dtype):
    logits = torch.randn(bsz, seq, vocab, generator=gen) * 3
    logits[..., 11] = float("-inf")                        # a column that is never sampled
    big = torch.rand(logits.shape, generator=gen) < 0.01
    logits[big] = 1e4 * torch.sign(torch.randn(int(big.sum()), generator=gen))
    targets = torch.randint(0, valid, (bsz, seq), generator=gen)
    targets[targets == 11] = 12
    lengths = torch.randint(0, seq + 1, (bsz,), generator=gen)
    lengths[0] = 0                                         # an empty sequence
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    return logits.to(dtype), targets, mask


@pytest.mark.parametrize("dtype,grad_atol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_triton_on_cuda_matches_float64_reference(dtype, grad_atol, entropy, inplace):
    gen = torch.Generator().manual_seed(random_seed())
    # vocab not a multiple of any block, padded columns past valid_vocab
    logits, targets, mask = _inputs(gen, 4, 37, 5003, 4990, dtype)
    ref_in = logits.detach().double().requires_grad_(True)
    ref = reference_logprobs(ref_in, targets, mask, 0.8, 4990)
    leaf = logits.cuda().requires_grad_(True)
    x = leaf * 1                                           # non-leaf, like an LM-head output
    out = logprobs_and_confidence(x, targets.cuda(), mask.cuda(), temperature=0.8,
                                  valid_vocab=4990, return_entropy=entropy,
                                  inplace_backward=inplace)
    # fp32 spacing at 1e4 is ~1e-3: that bounds x − lse
    torch.testing.assert_close(out.token_logprobs.double().cpu(), ref.token_logprobs,
                               atol=4e-3, rtol=1e-5)
    torch.testing.assert_close(out.confidence.double().cpu(), ref.confidence, atol=1e-5,
                               rtol=4e-3)
    assert torch.equal(out.num_tokens.cpu(), ref.num_tokens)
    if entropy:
        torch.testing.assert_close(out.entropy.double().cpu(), ref.entropy, atol=4e-3, rtol=1e-4)
    loss_ref = ref.token_logprobs.sum() + ref.confidence.sum()
    loss = out.token_logprobs.sum() + out.confidence.sum()
    if entropy:
        loss_ref = loss_ref + ref.entropy.sum()
        loss = loss + out.entropy.sum()
    loss_ref.backward()
    loss.backward()
    grad = leaf.grad.double().cpu()
    assert not torch.isnan(grad).any()
    assert (grad[..., 4990:] == 0).all()
    scale = ref_in.grad.abs().max().clamp(min=1.0)
    torch.testing.assert_close(grad, ref_in.grad, atol=grad_atol * scale, rtol=0)


def _linear_inputs(gen):
    """Hidden [3, 29, 64], LM head [1000, 64] (990 valid columns), targets, ragged mask."""
    hidden = torch.randn(3, 29, 64, generator=gen)
    weight = torch.randn(1000, 64, generator=gen) / 2
    targets = torch.randint(0, 990, (3, 29), generator=gen)
    mask = torch.rand(3, 29, generator=gen) < 0.7
    return hidden, weight, targets, mask


def test_fused_linear_on_cuda_matches_logits_path():
    gen = torch.Generator().manual_seed(random_seed())
    hidden, weight, targets, mask = _linear_inputs(gen)
    h1, w1 = hidden.cuda().requires_grad_(True), weight.cuda().requires_grad_(True)
    out = linear_logprobs_and_confidence(h1, w1, targets.cuda(), mask.cuda(), valid_vocab=990,
                                         return_entropy=True)
    (out.token_logprobs.sum() + out.confidence.sum() + out.entropy.sum()).backward()
    h2 = hidden.detach().double().requires_grad_(True)
    w2 = weight.detach().double().requires_grad_(True)
    ref = reference_logprobs(h2 @ w2.T, targets, mask, 1.0, 990)
    (ref.token_logprobs.sum() + ref.confidence.sum() + ref.entropy.sum()).backward()
    torch.testing.assert_close(out.token_logprobs.double().cpu(), ref.token_logprobs,
                               atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(h1.grad.double().cpu(), h2.grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(w1.grad.double().cpu(), w2.grad, atol=1e-3, rtol=1e-3)


def test_fused_linear_loss_on_cuda_matches_float64():
    """The training form (loss differentiated inside the chunks; Triton row kernels)."""
    gen = torch.Generator().manual_seed(random_seed())
    hidden, weight, targets, mask = _linear_inputs(gen)
    coef = torch.randn(3 * 29, generator=gen)
    coef_cuda = coef.cuda()
    h1, w1 = hidden.cuda().requires_grad_(True), weight.cuda().requires_grad_(True)
    loss, _ = linear_logprobs_with_loss(h1, w1, targets.cuda(), mask.cuda(),
                                        lambda rows, lp, ent: (coef_cuda[rows] * lp).sum()
                                        + ent.sum(), valid_vocab=990, return_entropy=True,
                                        chunk_tokens=16)
    loss.backward()
    h2 = hidden.detach().double().requires_grad_(True)
    w2 = weight.detach().double().requires_grad_(True)
    ref = reference_logprobs(h2 @ w2.T, targets, mask, 1.0, 990)
    ((ref.token_logprobs.reshape(-1) * coef.double()).sum()
     + torch.where(mask, ref.entropy, 0.0).sum()).backward()
    torch.testing.assert_close(h1.grad.double().cpu(), h2.grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(w1.grad.double().cpu(), w2.grad, atol=1e-3, rtol=1e-3)
