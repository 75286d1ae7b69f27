"""``linear_logprobs_with_loss``: a per-token loss of hidden × LM-head log-probs differentiated
inside the chunks (three GEMMs, logits never held), against the float64 logits path."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lens_kernels import linear_logprobs_with_loss, logprobs_and_confidence
from lens_kernels.reference import reference_logprobs
from seeds import random_seed


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(random_seed())


def _inputs(gen, bsz=3, seq=7, hid=16, vocab=300, valid=290, extreme=False,
            dtype=torch.float32):
    """Random hidden/weight; ``extreme``: small integers whose logits (up to ±1,920) are exact
    in fp32, so the float64 reference sees the same logits and only the softmax can differ."""
    if extreme:
        hidden = torch.randint(-3, 4, (bsz, seq, hid), generator=gen).to(dtype)
        weight = torch.randint(-40, 41, (vocab, hid), generator=gen).to(dtype)
    else:
        hidden = torch.randn(bsz, seq, hid, generator=gen).to(dtype)
        weight = (torch.randn(vocab, hid, generator=gen) / hid ** 0.5 * 4).to(dtype)
    targets = torch.randint(0, valid, (bsz, seq), generator=gen)
    mask = torch.rand(bsz, seq, generator=gen) < 0.7
    mask[0] = False                                   # an empty row
    targets[~mask] = -100                             # garbage where masked
    return hidden, weight, targets, mask


def _terms(gen, shape):
    """Per-token constants of a loss that is not linear in the log-prob (a clipped ratio)."""
    return (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen) * 0.3,
            torch.randn(shape, generator=gen) - 4.0)


def _per_token(logp, entropy, a, e, old):
    ratio = torch.exp((logp - old).clamp(-3, 3))
    loss = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    return loss + (0.0 if entropy is None else e * entropy)


def _token_loss(a, e, old, with_entropy=True):
    flat = [t.reshape(-1) for t in (a, e, old)]

    def loss_of(rows, logp, entropy):
        a_r, e_r, old_r = (t.index_select(0, rows).to(logp.dtype) for t in flat)
        return _per_token(logp, entropy if with_entropy else None, a_r, e_r, old_r).sum()

    return loss_of


@pytest.mark.parametrize("chunk", [1, 4, 64])
@pytest.mark.parametrize("extreme", [False, True])
def test_loss_and_gradients_match_float64_reference(gen, chunk, extreme):
    hidden, weight, targets, mask = _inputs(gen, extreme=extreme)
    a, e, old = _terms(gen, targets.shape)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, out = linear_logprobs_with_loss(h, w, targets, mask, _token_loss(a, e, old),
                                          valid_vocab=290, temperature=0.8, return_entropy=True,
                                          chunk_tokens=chunk)
    (2.5 * loss).backward()                                # the upstream scalar scales both
    hr, wr = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = reference_logprobs(hr @ wr.t(), targets, mask, 0.8, 290)
    per = _per_token(ref.token_logprobs, ref.entropy, a.double(), e.double(), old.double())
    ref_loss = torch.where(mask, per, 0.0).sum()
    (2.5 * ref_loss).backward()
    assert float(loss.detach()) == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-5)
    torch.testing.assert_close(out.token_logprobs.double(), ref.token_logprobs.detach(),
                               atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref.entropy.detach(), atol=2e-5, rtol=1e-5)
    assert not out.token_logprobs.requires_grad            # detached: for metrics
    # extreme: fp32 spacing at |x| ≈ 2,400 is 2^-12 ≈ 2.4e-4, which bounds the error of
    # x − lse and so of p; the hidden gradient sums it times |W| ≤ 40 over the vocab
    tol = dict(atol=1e-2, rtol=1e-3) if extreme else dict(atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(h.grad.double(), hr.grad, **tol)
    torch.testing.assert_close(w.grad.double(), wr.grad, **tol)
    assert (h.grad[~mask] == 0).all()


def test_only_active_rows_reach_a_gemm_and_zero_coefficient_chunks_skip_the_gradient(
        gen, monkeypatch):
    import lens_kernels.linear_logprob as lin

    logits_rows, grad_rows = [], []
    real_logits, real_acc = lin._logits, lin._accumulate
    monkeypatch.setattr(lin, "_logits", lambda h, w, rows, out=None: (
        logits_rows.append(rows.clone()), real_logits(h, w, rows, out))[1])
    monkeypatch.setattr(lin, "_accumulate", lambda g, h, rows, *rest: (
        grad_rows.append(rows.clone()), real_acc(g, h, rows, *rest))[1])
    hidden, weight, targets, mask = _inputs(gen)
    h = hidden.clone().requires_grad_(True)
    coef = torch.zeros(targets.shape)
    coef[2] = 1.0                                          # only row 2 has a gradient
    flat = coef.reshape(-1)
    loss, _ = linear_logprobs_with_loss(h, weight, targets, mask,
                                        lambda rows, lp, ent: (flat[rows] * lp).sum(),
                                        chunk_tokens=3)
    loss.backward()
    active = mask.reshape(-1).nonzero().squeeze(1)
    assert torch.equal(torch.cat(logits_rows).sort().values, active)   # each once, no recompute
    needed = set((mask & (coef != 0)).reshape(-1).nonzero().squeeze(1).tolist())
    touched = set(torch.cat(grad_rows).tolist())
    assert needed <= touched and len(grad_rows) < len(logits_rows)
    assert (h.grad[:2] == 0).all() and (h.grad[2][mask[2]] != 0).any()


def test_without_grad_nothing_is_differentiated(gen, monkeypatch):
    import lens_kernels.linear_logprob as lin

    monkeypatch.setattr(lin, "_accumulate", lambda *a: pytest.fail("gradient GEMM under no_grad"))
    hidden, weight, targets, mask = _inputs(gen)
    with torch.no_grad():
        loss, out = linear_logprobs_with_loss(hidden, weight, targets, mask,
                                              lambda rows, lp, ent: -lp.sum(), chunk_tokens=4)
    ref = logprobs_and_confidence(hidden @ weight.t(), targets, mask)
    assert float(loss) == pytest.approx(-float(ref.token_logprobs.sum()), rel=1e-5)


def test_a_token_loss_that_is_not_a_scalar_is_refused(gen):
    hidden, weight, targets, mask = _inputs(gen)
    with pytest.raises(ValueError, match="0-d tensor"):
        linear_logprobs_with_loss(hidden.requires_grad_(True), weight, targets, mask,
                                  lambda rows, lp, ent: lp)


def test_bf16_equals_the_unfused_path(gen):
    hidden, weight, targets, mask = _inputs(gen, dtype=torch.bfloat16)
    flat = torch.randn(targets.numel(), generator=gen)
    h1, w1 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, _ = linear_logprobs_with_loss(h1, w1, targets, mask,
                                        lambda rows, lp, ent: (flat[rows] * lp).sum(),
                                        valid_vocab=290, chunk_tokens=5)
    loss.backward()
    h2, w2 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    plain = logprobs_and_confidence(h2 @ w2.t(), targets, mask, valid_vocab=290)
    (plain.token_logprobs.reshape(-1) * flat).sum().backward()
    assert w1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), atol=2e-2, rtol=2e-2)


def _tp_rank(seed, glue):
    """One TP rank with its vocab shard, Megatron's glue around the prepared input."""
    from megatron.core.tensor_parallel import mappings

    from lens_megatron.parallel import cpu_mode

    cpu_mode.enable()
    world, rank = dist.get_world_size(), dist.get_rank()
    gen = torch.Generator().manual_seed(seed)
    hidden, weight, targets, mask = _inputs(gen, bsz=2, seq=6, vocab=320)
    a, e, old = _terms(gen, targets.shape)
    v_local = 320 // world
    w_shard = weight[rank * v_local:(rank + 1) * v_local].clone().requires_grad_(True)
    flat_hidden = hidden.reshape(12, -1)
    if glue == "sp":
        h_leaf = flat_hidden[rank * 6:(rank + 1) * 6].clone().requires_grad_(True)
        h = mappings.gather_from_sequence_parallel_region(h_leaf, True, group=dist.group.WORLD)
    else:
        h_leaf = flat_hidden.clone().requires_grad_(True)
        h = mappings.copy_to_tensor_model_parallel_region(h_leaf, group=dist.group.WORLD)
    loss, out = linear_logprobs_with_loss(h.view(2, 6, -1), w_shard, targets, mask,
                                          _token_loss(a, e, old), dist.group.WORLD,
                                          valid_vocab=290, temperature=0.9, return_entropy=True,
                                          chunk_tokens=5)
    loss.backward()
    return float(loss), out.token_logprobs, h_leaf.grad, w_shard.grad


@pytest.mark.slow
@pytest.mark.parametrize("glue", ["copy", "sp"])
def test_tp2_equals_single_process(glue):
    """Vocab-parallel: per-chunk stats merged over TP, identical coefficients on each rank,
    d_hidden reduced by the glue (all-reduce, or reduce-scatter under SP)."""
    from lens_megatron.parallel.spawn import run_in_processes

    seed = random_seed()
    ranks = run_in_processes(_tp_rank, 2, args=(seed, glue), timeout=240.0)
    gen = torch.Generator().manual_seed(seed)
    hidden, weight, targets, mask = _inputs(gen, bsz=2, seq=6, vocab=320)
    a, e, old = _terms(gen, targets.shape)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    loss, out = linear_logprobs_with_loss(h, w, targets, mask, _token_loss(a, e, old),
                                          valid_vocab=290, temperature=0.9, return_entropy=True,
                                          chunk_tokens=5)
    loss.backward()
    tol = dict(atol=1e-4, rtol=1e-4)
    for value, token, _, _ in ranks:
        assert value == pytest.approx(float(loss), rel=1e-5, abs=1e-6)
        torch.testing.assert_close(token, out.token_logprobs, atol=2e-5, rtol=1e-5)
    d_hidden = h.grad.reshape(12, -1)
    if glue == "copy":
        for r in ranks:
            torch.testing.assert_close(r[2], d_hidden, **tol)
    else:
        torch.testing.assert_close(torch.cat([ranks[0][2], ranks[1][2]]), d_hidden, **tol)
    torch.testing.assert_close(torch.cat([r[3] for r in ranks]), w.grad, **tol)
