"""Clipped policy loss (paper Eq. 3): gradient invariance under micro-batching, hand-computed
gradients for every clipping branch, dual clip, KL estimators, masking of garbage, signal metrics."""
import math

import pytest
import torch

from lens_megatron.algorithms.loss import ClippedPolicyLoss, LossConfig, compute_global_normalizer
from lens_megatron.algorithms.signal import learning_signal
from lens_megatron.parallel.spawn import run_in_processes

LN = math.log


def _random_batch(seed=0, b=8, s=6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, s, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.3 * torch.randn(b, s, generator=g, dtype=torch.float64)).clamp(max=0)
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    lengths[3] = 0  # an all-padding row
    mask = torch.arange(s)[None, :] < lengths[:, None]
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    ref = old - 0.1 * torch.rand(b, s, generator=g, dtype=torch.float64)
    weights = torch.rand(b, s, generator=g, dtype=torch.float64) * 2
    return logp, old, adv, mask, ref, weights


def _grad(loss_fn, logp, *args, **kwargs):
    x = logp.clone().requires_grad_(True)
    loss, metrics = loss_fn(x, *args, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, metrics


@pytest.mark.parametrize("normalization", ["sequence", "token"])
@pytest.mark.parametrize("with_weights", [False, True])
@pytest.mark.parametrize("kl_coef", [0.0, 0.05])
def test_micro_batches_give_the_full_batch_gradient(normalization, with_weights, kl_coef):
    logp, old, adv, mask, ref, weights = _random_batch()
    loss_fn = ClippedPolicyLoss(LossConfig(normalization=normalization, kl_coef=kl_coef, dual_clip_c=3.0))
    w = weights if with_weights else None
    n_full = compute_global_normalizer([mask], normalization)
    full_loss, full_grad, _ = _grad(loss_fn, logp, old, adv, mask, n_full, ref_logprobs=ref, rollout_weights=w)

    chunks = [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    n_micro = compute_global_normalizer([mask[c] for c in chunks], normalization)
    assert n_micro.item() == n_full.item()
    x = logp.clone().requires_grad_(True)
    total = 0.0
    for c in chunks:
        loss, _ = loss_fn(x[c], old[c], adv[c], mask[c], n_micro, ref_logprobs=ref[c],
                          rollout_weights=None if w is None else w[c])
        loss.backward()
        total = total + loss.detach()
    torch.testing.assert_close(x.grad, full_grad, atol=1e-6, rtol=0)
    torch.testing.assert_close(total, full_loss, atol=1e-6, rtol=0)


def test_global_normalizer_counts():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    assert compute_global_normalizer([mask], "sequence").item() == 2  # the all-padding row does not count
    assert compute_global_normalizer([mask, mask[:1]], "token").item() == 5
    with pytest.raises(ValueError, match="normalization"):
        compute_global_normalizer([mask], "batch")


def _dp_normalizer(rank_masks):
    import torch.distributed as dist

    rank = dist.get_rank()
    return compute_global_normalizer(rank_masks[rank], "token", dp_group=dist.group.WORLD).item()


@pytest.mark.slow
def test_global_normalizer_all_reduces_over_dp_group():
    rank_masks = [[torch.ones(2, 3), torch.ones(1, 3)], [torch.tensor([[1, 0, 0]])]]
    assert run_in_processes(_dp_normalizer, 2, args=(rank_masks,), timeout=120) == [10, 10]


def test_gradient_is_minus_advantage_over_length_and_count():
    # At rho = 1 (logp = old) every token is unclipped: d loss / d logp_it = -A_i (1/n_i) / N
    logp, _, adv, mask, _, _ = _random_batch(seed=1)
    n = compute_global_normalizer([mask], "sequence")
    _, grad, _ = _grad(ClippedPolicyLoss(), logp, logp, adv, mask, n)
    lengths = mask.sum(1).clamp(min=1).double()
    expected = torch.where(mask, (-adv / lengths / n.double())[:, None].expand_as(logp), 0.0)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)
    # token mode: -A_i / N_tok
    n_tok = compute_global_normalizer([mask], "token")
    _, grad, _ = _grad(ClippedPolicyLoss(LossConfig(normalization="token")), logp, logp, adv, mask, n_tok)
    expected = torch.where(mask, (-adv / n_tok.double())[:, None].expand_as(logp), 0.0)
    torch.testing.assert_close(grad, expected, atol=1e-12, rtol=0)


def test_clipping_branches():
    # One token per sequence, N = 4 sequences, eps = 0.2. rho = [1.5, 0.5, 0.5, 1.5], A = [1, -1, 1, -1]
    # seq 0: A > 0, rho > 1.2: objective clip(rho) A = 1.2, grad 0
    # seq 1: A < 0, rho < 0.8: objective 0.8 * -1 = -0.8, grad 0
    # seq 2: A > 0, rho < 0.8: min(0.5, 0.8) = 0.5 -> unclipped, d loss/d logp = -A rho / N = -0.125
    # seq 3: A < 0, rho > 1.2: min(-1.5, -1.2) = -1.5 -> unclipped, grad = -A rho / N = +0.375
    # loss = -(1.2 - 0.8 + 0.5 - 1.5)/4 = 0.15
    rho = torch.tensor([1.5, 0.5, 0.5, 1.5], dtype=torch.float64)
    old = torch.full((4, 1), LN(0.5), dtype=torch.float64)
    logp = old + torch.log(rho)[:, None]
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(4, 1, dtype=torch.bool)
    loss, grad, m = _grad(ClippedPolicyLoss(), logp, old, adv, mask, 4)
    assert loss.item() == pytest.approx(0.15)
    torch.testing.assert_close(grad.flatten(), torch.tensor([0.0, 0.0, -0.125, 0.375], dtype=torch.float64))
    assert m["clip_fraction"].item() == pytest.approx(0.5)
    assert m["ratio_max"].item() == pytest.approx(1.5)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    # approx_kl (k3 of old vs new) = mean(rho - 1 - log rho) = (2 (0.5 - ln 1.5) + 2 (-0.5 - ln 0.5)) / 4
    assert m["approx_kl"].item() == pytest.approx((0.5 - LN(1.5) - 0.5 - LN(0.5)) / 2)


def test_asymmetric_clip_range():
    # eps_low = 0.2, eps_high = 0.28: A > 0, rho = 1.25 is inside (1.25 < 1.28): grad -A rho / N
    old = torch.zeros(1, 1, dtype=torch.float64)
    logp = torch.full((1, 1), LN(1.25), dtype=torch.float64)
    _, grad, _ = _grad(ClippedPolicyLoss(LossConfig(clip_eps_high=0.28)), logp, old, torch.ones(1, dtype=torch.float64),
                       torch.ones(1, 1, dtype=torch.bool), 1)
    assert grad.item() == pytest.approx(-1.25)


def test_dual_clip():
    # A = -1, rho = 4, c = 3: PPO objective min(-4, -1.2) = -4 is bounded below by c A = -3 -> grad 0,
    # loss = 3. rho = 2 < c: unchanged, objective -2, grad -A rho = 2. Dual clip off: grad 4.
    old = torch.zeros(2, 1, dtype=torch.float64)
    logp = torch.log(torch.tensor([[4.0], [2.0]], dtype=torch.float64))
    adv = -torch.ones(2, dtype=torch.float64)
    mask = torch.ones(2, 1, dtype=torch.bool)
    loss, grad, m = _grad(ClippedPolicyLoss(LossConfig(dual_clip_c=3.0)), logp, old, adv, mask, 1)
    assert loss.item() == pytest.approx(3.0 + 2.0)
    torch.testing.assert_close(grad.flatten(), torch.tensor([0.0, 2.0], dtype=torch.float64))
    assert m["dual_clip_fraction"].item() == pytest.approx(0.5)
    _, grad, m = _grad(ClippedPolicyLoss(), logp, old, adv, mask, 1)
    torch.testing.assert_close(grad.flatten(), torch.tensor([4.0, 2.0], dtype=torch.float64))
    assert m["dual_clip_fraction"].item() == 0.0


@pytest.mark.parametrize("estimator, kl", [("k1", LN(2.0)), ("k3", 0.5 + LN(2.0) - 1.0)])
def test_kl_penalty_values(estimator, kl):
    # pi = 0.5, pi_ref = 0.25, A = 0, rho = 1: objective = -beta KL
    # k1 = log(pi/pi_ref) = ln 2 = 0.693147; k3 = pi_ref/pi - log(pi_ref/pi) - 1 = 0.5 + ln 2 - 1 = 0.193147
    beta = 0.1
    logp = torch.full((1, 1), LN(0.5), dtype=torch.float64)
    ref = torch.full((1, 1), LN(0.25), dtype=torch.float64)
    cfg = LossConfig(kl_coef=beta, kl_estimator=estimator)
    loss, grad, m = _grad(ClippedPolicyLoss(cfg), logp, logp, torch.zeros(1, dtype=torch.float64),
                          torch.ones(1, 1, dtype=torch.bool), 1, ref_logprobs=ref)
    assert m["kl_ref"].item() == pytest.approx(kl)
    assert loss.item() == pytest.approx(beta * kl)
    # d/dlogp: k1 -> beta; k3 -> beta (1 - pi_ref/pi) = beta * 0.5
    assert grad.item() == pytest.approx(beta if estimator == "k1" else beta * 0.5)
    with pytest.raises(ValueError, match="ref_logprobs is required"):
        ClippedPolicyLoss(cfg)(logp, logp, torch.zeros(1), torch.ones(1, 1), 1)


def test_masked_garbage_contributes_nothing():
    logp, old, adv, mask, ref, weights = _random_batch(seed=2)
    ent = torch.rand_like(logp)
    cfg = LossConfig(kl_coef=0.1, dual_clip_c=3.0)
    n = compute_global_normalizer([mask], "sequence")
    clean = _grad(ClippedPolicyLoss(cfg), logp, old, adv, mask, n, ref_logprobs=ref, rollout_weights=weights, entropy=ent)
    bad = lambda t, v: torch.where(mask, t, torch.full_like(t, v))  # noqa: E731
    dirty = _grad(ClippedPolicyLoss(cfg), bad(logp, float("nan")), bad(old, float("inf")), adv, mask, n,
                  ref_logprobs=bad(ref, -float("inf")), rollout_weights=bad(weights, float("nan")),
                  entropy=bad(ent, float("inf")))
    assert torch.isfinite(dirty[1]).all()
    torch.testing.assert_close(dirty[0], clean[0])
    torch.testing.assert_close(dirty[1], clean[1])
    for k in clean[2]:
        torch.testing.assert_close(dirty[2][k], clean[2][k])
    assert dirty[2]["entropy_mean"].item() == pytest.approx(ent[mask].mean().item())


def test_zero_normalizer_gives_zero_loss_and_shape_errors():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = ClippedPolicyLoss()(logp, logp.detach(), torch.ones(2), torch.zeros(2, 3), 0)
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="advantages has shape"):
        ClippedPolicyLoss()(logp, logp, torch.ones(3), torch.ones(2, 3), 1)
    with pytest.raises(ValueError, match="mask has shape"):
        ClippedPolicyLoss()(logp, logp, torch.ones(2), torch.ones(2, 2), 1)
    with pytest.raises(ValueError, match="global_normalizer must be >= 0"):
        ClippedPolicyLoss()(logp, logp, torch.ones(2), torch.ones(2, 3), -1)


def test_log_ratio_is_clamped_before_exp():
    # Seq 0: one token with logp - old = +100, A = -1, no dual clip. exp(100) overflows float32:
    # unclamped, rho A = -inf and the loss is +inf. Clamped at c = 20: objective -e^20, and the
    # token gets no gradient (the clamp is flat there). Seq 1 (2 tokens): logp - old = -30 on
    # token 0 (clamped to -20, rho = e^-20, A = +1 -> objective e^-20 / 2) and 0 on token 1
    # (rho = 1 -> objective 1 / 2, gradient -A (1/n) / N = -1/2 / 2 = -0.25).
    old = torch.tensor([[-100.0, 0.0], [-1.0, -2.0]])
    logp = torch.tensor([[0.0, 0.0], [-31.0, -2.0]])
    mask = torch.tensor([[True, False], [True, True]])
    adv = torch.tensor([-1.0, 1.0])
    loss, grad, m = _grad(ClippedPolicyLoss(), logp, old, adv, mask, 2)
    assert math.isfinite(loss.item()) and bool(torch.isfinite(grad).all())
    expected = -(-math.exp(20.0) + (math.exp(-20.0) + 1.0) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [0.0, -0.25]]))
    assert m["num_log_ratio_clamped"].item() == 2
    assert m["num_log_ratio_clamped"].dtype == torch.int64
    assert m["ratio_max"].item() == pytest.approx(math.exp(20.0), rel=1e-6)
    # a count: the micro-batches' counts sum to the full batch's
    parts = [ClippedPolicyLoss()(logp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1], 2)[1]
             for i in range(2)]
    assert sum(p["num_log_ratio_clamped"].item() for p in parts) == 2
    # a tighter clamp from the config; the masked position (logp - old = 0) never counts
    _, _, m = _grad(ClippedPolicyLoss(LossConfig(log_ratio_clamp=0.5)), logp, old, adv, mask, 2)
    assert m["num_log_ratio_clamped"].item() == 2


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"clip_eps_low": 1.0}, "clip_eps_low"),
        ({"clip_eps_high": -0.1}, "clip_eps_high"),
        ({"dual_clip_c": 1.0}, "dual_clip_c"),
        ({"normalization": "batch"}, "normalization"),
        ({"kl_coef": -1.0}, "kl_coef"),
        ({"kl_estimator": "k2"}, "kl_estimator"),
        ({"log_ratio_clamp": 0.0}, "log_ratio_clamp"),
        ({"log_ratio_clamp": 81.0}, "log_ratio_clamp"),
        ({"log_ratio_clamp": float("inf")}, "log_ratio_clamp"),
    ],
)
def test_loss_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"LossConfig.{field}"):
        LossConfig(**kwargs)


# ------------------------------------------------------------------ learning-signal metrics

def test_learning_signal_by_group_kind():
    # groups (G = 2): positive; negative with gradient; negative without; mixed; flat 0.5 (other, silent)
    rewards = torch.tensor([1, 1, 0, 0, 0, 0, 1, 0, 0.5, 0.5])
    adv = torch.tensor([0, 0, -0.1, 0.1, 0, 0, 0.7, -0.7, 0, 0])
    lengths = torch.tensor([5, 5, 5, 5, 5, 5, 5, 0, 5, 5])  # the mixed group's mistake is empty
    sig = learning_signal(rewards, adv, 2, lengths)
    assert sig.num_groups == 5
    assert sig.zero_advantage_positive_fraction == pytest.approx(0.2)
    assert sig.zero_advantage_negative_fraction == pytest.approx(0.2)
    assert sig.zero_advantage_other_fraction == pytest.approx(0.2)
    assert sig.effective_sequences == 3
    assert sig.negative_groups_with_gradient == 1
    assert sig.has_signal and sig.as_dict()["signal/effective_sequences"] == 3.0
    assert not learning_signal(rewards, torch.zeros(10), 2).has_signal
    with pytest.raises(ValueError, match="not divisible"):
        learning_signal(rewards, adv, 3)


@pytest.mark.parametrize("normalization", ["sequence", "token"])
@pytest.mark.parametrize("kl", [None, "k1", "k3"])
@pytest.mark.parametrize("cp_counts", [False, True])
def test_per_token_form_equals_the_loss(normalization, kl, cp_counts):
    """token_loss over chunks of flat tokens (what the fused LM head differentiates) sums to
    the loss and gives its gradient: both normalisations, dual clip, KL k1/k3, rollout
    weights, and tokens_per_sequence (context parallelism: counts of the whole sequences)."""
    logp, old, adv, mask, ref, weights = _random_batch(seed=4)
    logp = logp.clone()
    logp[0, :2] = old[0, :2] + 1.0                        # clipped tokens (no gradient)
    cfg = LossConfig(normalization=normalization, dual_clip_c=3.0,
                     kl_coef=0.05 if kl else 0.0, kl_estimator=kl or "k3")
    loss_fn = ClippedPolicyLoss(cfg)
    counts = (mask.sum(1) + 2) if cp_counts else None    # as if 2 more tokens lived elsewhere
    n = compute_global_normalizer([mask], normalization)
    loss, grad, _ = _grad(loss_fn, logp, old, adv, mask, n, ref_logprobs=ref,
                          rollout_weights=weights, tokens_per_sequence=counts)
    b, s = mask.shape
    sequence = torch.arange(b).repeat_interleave(s)
    valid = mask.reshape(-1)
    token_weights = loss_fn.token_weights(valid, sequence, b, n, counts)
    token_loss = loss_fn.token_loss(old.reshape(-1), adv[sequence], valid, token_weights,
                                    ref_logprobs=ref.reshape(-1),
                                    rollout_weights=weights.reshape(-1))
    flat = logp.reshape(-1).clone().requires_grad_(True)
    rows = valid.nonzero().squeeze(1)
    total = sum(token_loss(chunk, flat.index_select(0, chunk)) for chunk in rows.split(5))
    total.backward()
    torch.testing.assert_close(total.detach(), loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat.grad.view(b, s), grad, rtol=1e-12, atol=1e-12)
