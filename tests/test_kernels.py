"""Fused log-prob kernels (lens_kernels) vs float64 torch references, on CPU.

Fresh random inputs every run: the seed comes from the clock and is printed (pytest shows
it with the failure). The Triton kernels run under ``TRITON_INTERPRET=1`` in a subprocess
(triton 3.9 reads the variable when ``@triton.jit`` decorates, i.e. at import), which runs
the ``TestTritonInterpreted`` class of this file.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lens_kernels import logprobs_and_confidence
from lens_kernels import torch_logprob, triton_logprob
from lens_kernels.reference import reference_logprobs, reference_row_grad, reference_row_stats
from seeds import random_seed

INTERPRETED = triton_logprob.is_interpreted()
# the two CPU backends: the compiled kernels (what ``auto`` picks on CPU) and the torch twin
CPU_BACKENDS = ("cpu", "torch")


@pytest.fixture
def gen():
    seed = random_seed()
    return torch.Generator().manual_seed(seed)


def make_inputs(gen, bsz, seq, vocab, dtype=torch.float32, valid_vocab=None, scale=3.0):
    """Logits, in-vocab targets and a ragged mask (prompt prefix off, one empty sequence)."""
    logits = (torch.randn(bsz, seq, vocab, generator=gen) * scale).to(dtype)
    high = valid_vocab or vocab
    targets = torch.randint(0, high, (bsz, seq), generator=gen)
    start = torch.randint(0, seq, (bsz, 1), generator=gen)
    stop = start + torch.randint(1, seq + 1, (bsz, 1), generator=gen)
    pos = torch.arange(seq).unsqueeze(0)
    mask = (pos >= start) & (pos < stop)
    mask[0] = False                                   # an empty sequence
    targets[~mask] = -100                             # masked targets may be anything
    return logits, targets, mask


def weighted_loss(out, weights, entropy):
    """A scalar touching every differentiable output, each term with O(1) gradient."""
    loss = (out.token_logprobs * weights[0]).sum() + (out.logprob_sum * weights[1]).sum()
    loss = loss + (out.confidence * weights[2]).sum()
    if entropy:
        loss = loss + (out.entropy * weights[3]).sum()
    return loss


def loss_weights(gen, bsz, seq, ref_confidence):
    conf = ref_confidence.detach().double()
    return [torch.randn(bsz, seq, generator=gen).double(),
            torch.randn(bsz, generator=gen).double(),
            torch.randn(bsz, generator=gen).double() / torch.where(conf > 0, conf, 1.0),
            torch.randn(bsz, seq, generator=gen).double()]


def check_against_reference(gen, logits, targets, mask, atol, grad_atol, leaf=None, **opts):
    """Forward and backward of the public API vs float64 autograd on the same values.

    ``leaf(logits)`` makes the input leaf (default: a contiguous clone)."""
    valid = opts.get("valid_vocab")
    temp = opts.get("temperature", 1.0)
    ref_in = logits.detach().double().requires_grad_(True)
    ref = reference_logprobs(ref_in, targets, mask, temp, valid)
    x = (leaf or (lambda t: t.detach().clone()))(logits).requires_grad_(True)
    out = logprobs_and_confidence(x, targets, mask, **opts)
    assert out.token_logprobs.dtype == torch.float32 and out.confidence.dtype == torch.float32
    torch.testing.assert_close(out.token_logprobs.double(), ref.token_logprobs, atol=atol, rtol=1e-5)
    torch.testing.assert_close(out.logprob_sum.double(), ref.logprob_sum, atol=atol * 8, rtol=1e-5)
    torch.testing.assert_close(out.confidence.double(), ref.confidence, atol=1e-6, rtol=atol)
    assert torch.equal(out.num_tokens, ref.num_tokens)
    if opts.get("return_entropy"):
        torch.testing.assert_close(out.entropy.double(), ref.entropy, atol=atol, rtol=1e-5)
    weights = loss_weights(gen, *targets.shape, ref.confidence)
    with_entropy = bool(opts.get("return_entropy"))
    weighted_loss(out, weights, with_entropy).backward()
    weighted_loss(ref, weights, with_entropy).backward()
    assert x.grad.dtype == logits.dtype
    assert not torch.isnan(x.grad).any()
    scale = ref_in.grad.abs().max().clamp(min=1.0)
    torch.testing.assert_close(x.grad.double(), ref_in.grad, atol=grad_atol * scale, rtol=0)
    return out, x.grad


# inputs are exactly representable in every dtype, so the forward tolerance is the same;
# the gradient is rounded to the logits dtype (bf16: 8 mantissa bits, fp16: 11)
@pytest.mark.parametrize("dtype,atol,grad_atol", [(torch.float32, 2e-5, 1e-5),
                                                  (torch.bfloat16, 2e-5, 8e-3),
                                                  (torch.float16, 2e-5, 1e-3)])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_float64_reference(gen, dtype, atol, grad_atol, entropy, inplace, backend):
    # vocab 2500 is not a multiple of any block; columns ≥ 2437 are padding; wide enough
    # for the torch path's cheap shift (> 2 * SHIFT_SAMPLE columns)
    logits, targets, mask = make_inputs(gen, 4, 9, 2500, dtype, valid_vocab=2437)
    check_against_reference(gen, logits, targets, mask, atol, grad_atol, valid_vocab=2437,
                            return_entropy=entropy, inplace_backward=inplace, backend=backend)


@pytest.mark.parametrize("temperature", [0.6, 1.7])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_temperature(gen, temperature, backend):
    logits, targets, mask = make_inputs(gen, 3, 6, 700)
    check_against_reference(gen, logits, targets, mask, 2e-5, 1e-5, temperature=temperature,
                            return_entropy=True, backend=backend)


@pytest.mark.parametrize("backend,shift_sample,inplace", [
    ("torch", 8, False), ("torch", 4096, False), ("torch", 8, True), ("cpu", 0, False),
    ("cpu", 0, True)])
def test_extreme_logits_and_neginf_column(gen, backend, shift_sample, inplace, monkeypatch):
    monkeypatch.setattr(torch_logprob, "SHIFT_SAMPLE", shift_sample)
    logits, targets, mask = make_inputs(gen, 3, 8, 500, scale=1.0)
    big = torch.rand(logits.shape, generator=gen) < 0.05
    logits[big] = 1e4 * torch.sign(torch.randn(int(big.sum()), generator=gen))
    logits[..., 17] = float("-inf")                   # a column that can never be sampled
    logits[1, 2, :] = float("-inf")                    # an all −inf row, masked out
    mask[1, 2] = False
    targets[targets == 17] = 18
    # fp32 spacing at 1e4 is 2^-10 ≈ 1e-3: that bounds the error of x − lse and of p
    out, grad = check_against_reference(gen, logits, targets, mask, 4e-3, 1e-3,
                                        return_entropy=True, inplace_backward=inplace,
                                        backend=backend)
    assert torch.isfinite(out.token_logprobs).all() and torch.isfinite(out.entropy).all()
    assert (grad[..., 17] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padded_columns_get_no_probability_and_no_gradient(gen, backend):
    logits, targets, mask = make_inputs(gen, 2, 5, 256, valid_vocab=200)
    logits[..., 200:] = 50.0                          # would dominate the softmax if counted
    x = logits.clone().requires_grad_(True)
    out = logprobs_and_confidence(x, targets, mask, valid_vocab=200, return_entropy=True,
                                  backend=backend)
    ref = reference_logprobs(logits, targets, mask, valid_vocab=200)
    torch.testing.assert_close(out.token_logprobs.double(), ref.token_logprobs, atol=2e-5, rtol=0)
    (out.logprob_sum.sum() + out.entropy.sum()).backward()
    assert (x.grad[..., 200:] == 0).all() and x.grad[..., :200].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inplace_backward_equals_out_of_place(gen, dtype, backend):
    logits, targets, mask = make_inputs(gen, 3, 7, 600, dtype)
    grads = []
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_(True)
        x = leaf * 1                                   # non-leaf, like an LM-head output
        out = logprobs_and_confidence(x, targets, mask, inplace_backward=inplace,
                                      return_entropy=True, backend=backend)
        (out.confidence.sum() + out.token_logprobs.sum() + out.entropy.sum()).backward()
        grads.append(leaf.grad)
        if inplace:                                    # the gradient really went into x's buffer
            assert torch.equal(x.detach(), leaf.grad)
    if dtype == torch.bfloat16:                        # the same recompute kernel both ways
        assert torch.equal(grads[0], grads[1])
    else:                                              # fp32: the stored-exp path
        torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("entropy_grad", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stored_exp_path_matches_float64_reference(gen, entropy_grad, temperature, backend,
                                                   monkeypatch):
    """fp32 + inplace_backward: forward leaves exp(x − max) in the buffer, backward one pass."""
    monkeypatch.setattr(torch_logprob, "CHUNK_BYTES", 3 * 4 * 2437)   # 3-row chunks, ragged tail
    logits, targets, mask = make_inputs(gen, 4, 9, 2500, valid_vocab=2437)
    logits[2, 3, 7] = float("-inf")
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1
    out = logprobs_and_confidence(x, targets, mask, inplace_backward=True, valid_vocab=2437,
                                  return_entropy=True, temperature=temperature, backend=backend)
    # the buffer now holds exp(x/T − max) on valid columns of every chunk with an active row
    rows = mask.reshape(-1)
    scaled = logits.reshape(-1, 2500)[rows, :2437].double() / temperature
    want = torch.exp(scaled - scaled.amax(1, keepdim=True))
    torch.testing.assert_close(x.detach().reshape(-1, 2500)[rows, :2437].double(), want,
                               atol=1e-6, rtol=1e-5)
    ref_in = logits.double().requires_grad_(True)
    ref = reference_logprobs(ref_in, targets, mask, temperature, 2437)
    torch.testing.assert_close(out.token_logprobs.double(), ref.token_logprobs, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref.entropy, atol=2e-5, rtol=1e-5)
    weights = loss_weights(gen, 4, 9, ref.confidence)
    if not entropy_grad:
        weights[3] = None                              # entropy as a detached metric (the actor)
    for o, leaf_in in ((out, leaf), (ref, ref_in)):
        loss = weighted_loss(o, weights, False)
        if entropy_grad:
            loss = loss + (o.entropy * weights[3]).sum()
        loss.backward()
    scale = ref_in.grad.abs().max().clamp(min=1.0)
    torch.testing.assert_close(leaf.grad.double(), ref_in.grad, atol=1e-5 * scale, rtol=0)
    assert (leaf.grad[..., 2437:] == 0).all() and (leaf.grad[~mask] == 0).all()


def test_stored_exp_path_only_when_a_gradient_is_wanted(gen):
    """Under no_grad (the actor's old-log-prob pass) the logits are read, never overwritten."""
    logits, targets, mask = make_inputs(gen, 2, 4, 300)
    x = logits.clone().requires_grad_(True)
    with torch.no_grad():
        logprobs_and_confidence(x, targets, mask, inplace_backward=True, return_entropy=True)
    assert torch.equal(x.detach(), logits)
    plain = logits.clone()
    logprobs_and_confidence(plain, targets, mask, inplace_backward=True)   # no requires_grad
    assert torch.equal(plain, logits)


@pytest.mark.parametrize("backend,inplace", [("cpu", False), ("cpu", True), ("torch", False),
                                             ("torch", True)])
def test_empty_sequences_and_fully_masked_rows(gen, backend, inplace):
    logits, targets, mask = make_inputs(gen, 3, 5, 300)
    mask[2] = False
    logits[2] = float("-inf")                          # garbage in a fully masked sequence
    logits[1, ~mask[1]] = float("nan")                 # and in masked positions of another
    x = logits.clone().requires_grad_(True)
    out = logprobs_and_confidence(x * 1, targets, mask, return_entropy=True, backend=backend,
                                  inplace_backward=inplace)
    assert out.num_tokens[0] == 0 and out.num_tokens[2] == 0
    assert out.confidence[0] == 0 and out.confidence[2] == 0
    assert (out.token_logprobs[2] == 0).all() and (out.entropy[2] == 0).all()
    (out.confidence.sum() + out.logprob_sum.sum() + out.entropy.sum()).backward()
    assert not torch.isnan(x.grad).any()
    assert (x.grad[0] == 0).all() and (x.grad[2] == 0).all()
    assert (x.grad[~mask] == 0).all() and x.grad[mask].abs().sum() > 0


def _sbv_leaf(logits_bsv):
    """A leaf with Megatron's layout: [B, S, V] viewed from non-dense [S, B, V + 7] storage."""
    bsz, seq, vocab = logits_bsv.shape
    view = torch.empty(seq, bsz, vocab + 7)[..., :vocab].transpose(0, 1)
    return view.copy_(logits_bsv.detach())


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_logits(gen, inplace, backend):
    logits, targets, mask = make_inputs(gen, 3, 6, 400)
    x = _sbv_leaf(logits)
    # the kernel sees the strided view; the gradient buffer gets other strides than the logits
    assert not x.is_contiguous() and torch.empty_like(x).stride() != x.stride()
    check_against_reference(gen, logits, targets, mask, 2e-5, 1e-5, leaf=_sbv_leaf,
                            return_entropy=True, inplace_backward=inplace, backend=backend)


def test_chunking_covers_every_row(gen, monkeypatch):
    monkeypatch.setattr(torch_logprob, "CHUNK_BYTES", 3 * 4 * 350)   # 3-row chunks, ragged tail
    logits, targets, mask = make_inputs(gen, 4, 5, 350)
    check_against_reference(gen, logits, targets, mask, 2e-5, 1e-5, return_entropy=True,
                            backend="torch")


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("shift_sample", [8, 4096])
def test_row_stats_torch_matches_reference(gen, entropy, shift_sample, monkeypatch):
    monkeypatch.setattr(torch_logprob, "SHIFT_SAMPLE", shift_sample)
    monkeypatch.setattr(torch_logprob, "CHUNK_BYTES", 2 * 4 * 290)   # 2-row chunks
    logits, _, _ = make_inputs(gen, 2, 6, 300)
    logits[1, 4, 250] = 300.0          # far above any 8-column prefix: its chunk falls back
    mask = torch.rand(2, 6, generator=gen) < 0.7
    mask[0, :3] = True                                         # ordinary rows
    mask[1, 4] = True                                          # the outlier row
    targets = torch.randint(-50, 500, (2, 6), generator=gen)   # some outside this shard
    active = mask.reshape(-1).to(torch.int8)
    got = torch_logprob.row_stats_torch(logits, targets.reshape(-1), active, 100, 290, 1 / 0.8,
                                        entropy).double()
    want = reference_row_stats(logits, targets, active, 100, 290, 0.8)
    torch.testing.assert_close(got[:, 2], want[:, 2], atol=1e-5, rtol=1e-5)     # target x
    if entropy:                                   # entropy always uses the exact max shift
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return
    # the shift may be any m ≤ max (up to fp32 rounding) with the same log-sum-exp m + log s
    act = active.bool()
    m_got, m_max = got[act, 0], want[act, 0]
    assert (m_got <= m_max + 1e-5 * m_max.abs()).all() and (m_got > m_max - 88).all()
    torch.testing.assert_close(got[act, 0] + got[act, 1].log(), want[act, 0] + want[act, 1].log(),
                               atol=1e-5, rtol=1e-6)
    assert (got[~act] == want[~act]).all()
    if shift_sample == 8:                          # the cheap shift was used on ordinary rows
        assert (m_got < m_max - 1e-3).any()


@pytest.mark.parametrize("entropy", [False, True])
def test_row_grad_torch_matches_reference(gen, entropy):
    logits, _, mask = make_inputs(gen, 2, 6, 300)
    targets = torch.randint(-50, 500, (2, 6), generator=gen).reshape(-1)
    act = mask.reshape(-1)
    lse = torch.logsumexp(logits.reshape(-1, 300)[:, :290] / 0.8, -1)
    coef = torch.randn(12, generator=gen) * act
    ent = torch.randn(12, generator=gen) * act if entropy else None
    mean = torch.randn(12, generator=gen) if entropy else None
    grad = torch.empty_like(logits)
    torch_logprob.row_grad_torch(logits, grad, targets, lse, coef, ent, mean, 100, 290, 1 / 0.8)
    want = reference_row_grad(logits, targets, lse, coef, ent, mean, 100, 290, 0.8)
    torch.testing.assert_close(grad.double(), want, atol=1e-6, rtol=1e-5)


def test_auto_backend_on_cpu_and_bad_input(gen, monkeypatch):
    from lens_kernels import cpu_ext
    from lens_kernels.autograd import resolve_backend

    monkeypatch.delenv("LENS_KERNELS_CPU_EXT", raising=False)
    cpu_ext.available.cache_clear()
    try:
        if not INTERPRETED:              # the default on CPU: the chunked torch path
            assert resolve_backend("auto", torch.device("cpu")) == "torch"
        monkeypatch.setenv("LENS_KERNELS_CPU_EXT", "1")   # opt in: must build where CI runs
        cpu_ext.available.cache_clear()
        if not INTERPRETED:
            assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    finally:
        cpu_ext.available.cache_clear()
    logits, targets, mask = make_inputs(gen, 2, 3, 50)
    with pytest.raises(ValueError):
        logprobs_and_confidence(logits, targets, mask, backend="cuda")
    with pytest.raises(ValueError):
        logprobs_and_confidence(logits, targets, mask, temperature=0.0)
    with pytest.raises(ValueError):
        logprobs_and_confidence(logits[0], targets, mask)
    with pytest.raises(TypeError):
        logprobs_and_confidence(logits, targets.float(), mask)


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="this is the launcher of the interpreted suite")
def test_triton_kernels_under_interpreter():
    """Run ``TestTritonInterpreted`` in a subprocess with ``TRITON_INTERPRET=1``."""
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    node = f"{__file__}::TestTritonInterpreted"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "-W", "ignore::RuntimeWarning", node],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]


# Collected only when the kernels were built interpreted (the launcher above runs it).
if INTERPRETED:
    class TestTritonInterpreted:
        """The Triton kernels themselves (interpreted on CPU) vs float64 and vs the torch path."""

        @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
        @pytest.mark.parametrize("entropy", [False, True])
        def test_row_stats_kernel_multi_block(self, gen, dtype, entropy):
            logits, _, mask = make_inputs(gen, 2, 3, 1000, dtype)
            logits[0, 1, 5] = float("-inf")
            targets = torch.randint(-100, 1200, (2, 3), generator=gen)
            active = mask.reshape(-1).to(torch.int8)
            got = triton_logprob.launch_row_stats(logits, targets.reshape(-1), active, 150, 937,
                                                  1 / 0.7, entropy, block_v=128)
            want = reference_row_stats(logits, targets, active, 150, 937, 0.7)
            if not entropy:
                want[:, 3] = 0.0
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)

        @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
        @pytest.mark.parametrize("entropy", [False, True])
        def test_row_grad_kernel_multi_block_and_inplace(self, gen, dtype, entropy):
            logits, _, mask = make_inputs(gen, 2, 3, 1000, dtype)
            targets = torch.randint(-100, 1200, (6,), generator=gen)
            act = mask.reshape(-1)
            lse = torch.logsumexp(logits.float().reshape(6, -1)[:, :937] / 0.7, -1)
            coef = torch.randn(6, generator=gen) * act
            ent = torch.randn(6, generator=gen) * act if entropy else None
            mean = torch.randn(6, generator=gen) if entropy else None
            want = reference_row_grad(logits, targets, lse, coef, ent, mean, 150, 937, 0.7)
            tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-4, rtol=1e-2)
            for inplace in (False, True):
                grad = logits.clone() if inplace else torch.empty_like(logits)
                src = grad if inplace else logits
                triton_logprob.launch_row_grad(src, grad, targets, lse, coef, ent, mean, 150, 937,
                                               1 / 0.7, block_v=128)
                torch.testing.assert_close(grad.double(), want, **tol)

        @pytest.mark.parametrize("dtype,vocab", [(torch.float32, 5000), (torch.bfloat16, 9000)])
        def test_public_api_triton_equals_torch(self, gen, dtype, vocab):
            # default blocks (4096 fp32 / 8192 bf16): the vocab spans two blocks, the last partial
            logits, targets, mask = make_inputs(gen, 2, 3, vocab, dtype, valid_vocab=vocab - 77)
            opts = dict(valid_vocab=vocab - 77, temperature=0.9, return_entropy=True)
            results = []
            for backend in ("triton", "torch"):
                x = logits.clone().requires_grad_(True)
                out = logprobs_and_confidence(x, targets, mask, backend=backend, **opts)
                (out.token_logprobs.sum() + out.confidence.sum() + out.entropy.sum()).backward()
                results.append((out, x.grad))
            (a, ga), (b, gb) = results
            for name in ("token_logprobs", "logprob_sum", "confidence", "entropy"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=2e-5, rtol=1e-5)
            # the two paths round in a different order: allow ~1 ulp of the gradient dtype
            tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-4, rtol=1.6e-2)
            torch.testing.assert_close(ga.float(), gb.float(), **tol)

        def test_auto_selects_triton_and_matches_reference(self, gen):
            from lens_kernels.autograd import resolve_backend

            assert resolve_backend("auto", torch.device("cpu")) == "triton"
            logits, targets, mask = make_inputs(gen, 3, 4, 300, valid_vocab=290)
            for inplace in (False, True):                          # strided [B, S, V] view
                check_against_reference(gen, logits, targets, mask, 2e-5, 1e-5, leaf=_sbv_leaf,
                                        valid_vocab=290, return_entropy=True, temperature=1.3,
                                        inplace_backward=inplace)

        def test_linear_variant_triton_equals_torch(self, gen):
            from lens_kernels import linear_logprobs_and_confidence

            hidden = torch.randn(2, 4, 16, generator=gen)
            weight = torch.randn(300, 16, generator=gen)
            targets = torch.randint(0, 290, (2, 4), generator=gen)
            mask = torch.rand(2, 4, generator=gen) < 0.8
            grads = []
            for backend in ("triton", "torch"):
                h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
                out = linear_logprobs_and_confidence(h, w, targets, mask, valid_vocab=290,
                                                     chunk_tokens=3, backend=backend)
                out.logprob_sum.sum().backward()
                grads.append((out.token_logprobs, h.grad, w.grad))
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
