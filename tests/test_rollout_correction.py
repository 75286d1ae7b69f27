"""Rollout-mismatch correction: hand-computed weights per mode, zero mismatch == uncorrected loss,
long sequences, metrics, and the top-p/top-k convention for the engine's log-probs."""
import math

import pytest
import torch

from lens_megatron.algorithms.loss import ClippedPolicyLoss, compute_global_normalizer
from lens_megatron.algorithms.rollout_correction import (
    ROLLOUT_CORRECTIONS,
    RolloutCorrectionConfig,
    rollout_correction_weights,
    sampling_logprobs,
)

LN = math.log


def _weights(mode, old, rollout, mask=None, **kw):
    old = torch.tensor(old, dtype=torch.float64)
    rollout = torch.tensor(rollout, dtype=torch.float64)
    mask = torch.ones_like(old, dtype=torch.bool) if mask is None else torch.tensor(mask, dtype=torch.bool)
    return rollout_correction_weights(old, rollout, mask, RolloutCorrectionConfig(rollout_correction=mode, **kw))


def _close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-12, rtol=1e-12)


def test_tis_token():
    # ratio = pi_old / pi_rollout = exp(old - rollout): [1, 3, 0.5, -] (last token masked, garbage)
    # TIS cap 2: [1, min(3, 2) = 2, 0.5, 0]; 1 of 3 valid tokens truncated
    w, m = _weights("tis_token", [[0.0, 0.0, 0.0, float("nan")]], [[0.0, -LN(3), LN(2), 5.0]], [[1, 1, 1, 0]])
    _close(w, [[1.0, 2.0, 0.5, 0.0]])
    assert m["truncated_fraction"].item() == pytest.approx(1 / 3)
    assert m["weight_max"].item() == 2.0 and m["raw_ratio_max"].item() == pytest.approx(3.0)
    assert m["weight_mean"].item() == pytest.approx(3.5 / 3)


def test_tis_sequence_uses_mean_log_ratio():
    # seq 0: log-ratios [ln 4, 0] -> mean ln 2 -> w = 2 -> cap 1.5 -> both tokens 1.5
    # seq 1: log-ratios [ln 2, -ln 2, masked] -> mean 0 -> w = 1
    old = [[LN(4), 0.0, 0.0], [LN(2), -LN(2), 7.0]]
    rollout = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    w, m = _weights("tis_sequence", old, rollout, [[1, 1, 0], [1, 1, 0]], cap=1.5)
    _close(w, [[1.5, 1.5, 0.0], [1.0, 1.0, 0.0]])
    assert m["truncated_fraction"].item() == pytest.approx(0.5)


def test_mis_token_keeps_the_is_weight_inside_the_bounds():
    # ratios [1, 3, 0.25, 1.5], bounds [0.5, 2]: 3 and 0.25 masked (0), 1 and 1.5 kept as IS weights
    w, m = _weights("mis_token", [[0.0, LN(3), LN(0.25), LN(1.5)]], [[0.0] * 4])
    _close(w, [[1.0, 0.0, 0.0, 1.5]])
    assert m["masked_fraction"].item() == pytest.approx(0.5)
    assert m["truncated_fraction"].item() == 0.0


def test_mis_sequence():
    # seq 0: log-ratios [ln 9, 0] -> geometric mean 3 > 2 -> whole sequence masked
    # seq 1: log-ratios [ln 1.5, ln 1.5] -> 1.5 -> kept with weight 1.5
    w, m = _weights("mis_sequence", [[LN(9), 0.0], [LN(1.5), LN(1.5)]], [[0.0, 0.0], [0.0, 0.0]])
    _close(w, [[0.0, 0.0], [1.5, 1.5]])
    assert m["masked_fraction"].item() == pytest.approx(0.5)


def test_mismatch_metrics():
    # delta = old - rollout = [0.1, -0.2]: mean |delta| = 0.15; mean exp|delta| = (e^0.1 + e^0.2)/2;
    # KL(pi_rollout || pi_old) k3 = mean(e^delta - 1 - delta)
    _, m = _weights("none", [[0.1, -0.2]], [[0.0, 0.0]])
    assert m["mean_abs_log_ratio"].item() == pytest.approx(0.15)
    assert m["mean_exp_abs_log_ratio"].item() == pytest.approx((math.exp(0.1) + math.exp(0.2)) / 2)
    k3 = ((math.exp(0.1) - 1 - 0.1) + (math.exp(-0.2) - 1 + 0.2)) / 2
    assert m["kl_rollout_k3"].item() == pytest.approx(k3)
    assert m["weight_mean"].item() == 1.0  # mode none: weight 1, metrics still reported


def _loss_batch(seed=0, b=6, s=5):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, s, generator=g) * 2
    logp = old + 0.2 * torch.randn(b, s, generator=g)
    mask = torch.arange(s)[None, :] < torch.randint(1, s + 1, (b,), generator=g)[:, None]
    adv = torch.randn(b, generator=g)
    return logp, old, adv, mask


@pytest.mark.parametrize("mode", ROLLOUT_CORRECTIONS)
def test_zero_mismatch_is_exactly_the_uncorrected_loss(mode):
    logp, old, adv, mask = _loss_batch()
    w, m = rollout_correction_weights(old, old.clone(), mask, RolloutCorrectionConfig(rollout_correction=mode))
    assert torch.equal(w, mask.float())
    assert m["masked_fraction"].item() == 0.0 and m["truncated_fraction"].item() == 0.0
    assert m["kl_rollout_k3"].item() == 0.0
    n = compute_global_normalizer([mask], "sequence")
    x0 = logp.clone().requires_grad_(True)
    x1 = logp.clone().requires_grad_(True)
    plain, _ = ClippedPolicyLoss()(x0, old, adv, mask, n)
    corrected, _ = ClippedPolicyLoss()(x1, old, adv, mask, n, rollout_weights=w)
    plain.backward()
    corrected.backward()
    assert torch.equal(plain, corrected) and torch.equal(x0.grad, x1.grad)


@pytest.mark.parametrize(
    "mode, shift, expected",
    [
        ("tis_token", +2.0, math.exp(-2.0)),  # rollout more confident: w = e^-2, below cap -> kept
        ("tis_token", -2.0, 2.0),  # rollout less confident: w = e^2 = 7.39 -> truncated to 2
        ("mis_token", +2.0, 0.0),  # e^-2 = 0.135 < 0.5 -> masked
        ("mis_token", -2.0, 0.0),  # 7.39 > 2 -> masked
        ("mis_token", -0.5, math.exp(0.5)),  # 1.65 inside [0.5, 2] -> keeps its IS weight
    ],
)
def test_perturbed_rollout_logprob(mode, shift, expected):
    _, old, _, mask = _loss_batch(seed=3)
    rollout = old.clone()
    rollout[0, 0] += shift
    w, _ = rollout_correction_weights(old, rollout, mask, RolloutCorrectionConfig(rollout_correction=mode))
    assert w[0, 0].item() == pytest.approx(expected, rel=1e-6)
    others = mask.clone()
    others[0, 0] = False
    assert (w[others] == 1).all()


@pytest.mark.parametrize("mode", ["tis_sequence", "mis_sequence"])
def test_sequence_mode_long_response_does_not_underflow(mode):
    # 10,000 tokens, log-ratio -0.01 each: exp(sum) = exp(-100) ~ 4e-44 (float32 subnormal);
    # the geometric mean is exp(-0.01) = 0.99005, inside the MIS bounds.
    old = torch.full((1, 10_000), -1.01)
    rollout = torch.full((1, 10_000), -1.0)
    w, m = rollout_correction_weights(old, rollout, torch.ones_like(old, dtype=torch.bool),
                                      RolloutCorrectionConfig(rollout_correction=mode))
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.full_like(w, math.exp(-0.01)), atol=1e-6, rtol=1e-5)
    assert m["masked_fraction"].item() == 0.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rollout_correction": "tis"}, "rollout_correction"),
        ({"cap": 0.5}, "cap"),
        ({"mis_lower": 1.5}, "mis_lower"),
        ({"mis_upper": 0.9}, "mis_upper"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"RolloutCorrectionConfig.{field}"):
        RolloutCorrectionConfig(**kwargs)


# ------------------------------------------------------------------ top-p / top-k convention

PROBS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def test_sampling_logprobs_reference():
    logits = torch.log(PROBS)[None, :].expand(3, 3)
    tokens = torch.tensor([0, 1, 2])
    # no truncation: the full softmax
    torch.testing.assert_close(sampling_logprobs(logits, tokens), torch.log(PROBS).float())
    # top-p 0.7: mass above token 1 is 0.5 < 0.7 -> kept; above token 2 is 0.8 >= 0.7 -> dropped.
    # kept set {0.5, 0.3}, renormalized: [0.625, 0.375, 0]
    torch.testing.assert_close(sampling_logprobs(logits, tokens, top_p=0.7),
                               torch.tensor([LN(0.625), LN(0.375), -float("inf")]))
    # top-k 1: only the argmax, log-prob 0
    torch.testing.assert_close(sampling_logprobs(logits, tokens, top_k=1),
                               torch.tensor([0.0, -float("inf"), -float("inf")]))
    # temperature 2: softmax(log p / 2) = sqrt(p) / sum sqrt(p)
    sq = PROBS.sqrt() / PROBS.sqrt().sum()
    torch.testing.assert_close(sampling_logprobs(logits, tokens, temperature=2.0), torch.log(sq).float())


def test_convention_engine_returns_the_sampling_distribution_logprobs():
    """Pins the convention: rollout_logprobs are the truncated+renormalized sampling distribution's
    log-probs (vLLM processed_logprobs), old_logprobs the trainer's full distribution. A perfectly
    matched engine with top-p 0.7 then gives w = pi_old / pi_sample = kept mass Z = 0.8 (e.g.
    0.5 / 0.625 and 0.3 / 0.375), not 1; with top-p 1 the weight is exactly 1."""
    logits = torch.log(PROBS).float()[None, None, :].expand(1, 2, 3)
    tokens = torch.tensor([[0, 1]])
    old = torch.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = RolloutCorrectionConfig(rollout_correction="tis_token")
    w, _ = rollout_correction_weights(old, sampling_logprobs(logits, tokens, top_p=0.7), mask, cfg)
    torch.testing.assert_close(w, torch.full((1, 2), 0.8))
    w, _ = rollout_correction_weights(old, sampling_logprobs(logits, tokens), mask, cfg)
    torch.testing.assert_close(w, torch.ones(1, 2))
    # MIS with a lower bound above Z rejects such tokens (documented consequence)
    w, _ = rollout_correction_weights(old, sampling_logprobs(logits, tokens, top_p=0.7), mask,
                                      RolloutCorrectionConfig(rollout_correction="mis_token", mis_lower=0.9))
    assert (w == 0).all()
