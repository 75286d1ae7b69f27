"""LENS advantage stage: hand-computed groups for every branch, then properties (DESIGN §2)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_megatron.algorithms.advantages import (
    GROUP_MIXED,
    GROUP_NEGATIVE,
    GROUP_POSITIVE,
    AdvantageConfig,
    compute_advantages,
    compute_advantages_with_diagnostics,
)

LENS = AdvantageConfig()
GRPO = AdvantageConfig(estimator="grpo")
LN = math.log


def _inputs(rewards, confidences, lengths):
    """Tensors (r, S, n) with S_i = n_i log p_i, so that exp(S_i / n_i) = p_i (S = 0 when n = 0)."""
    s = [n * LN(p) if n > 0 else 0.0 for p, n in zip(confidences, lengths)]
    return (torch.tensor(rewards, dtype=torch.float64), torch.tensor(s, dtype=torch.float64),
            torch.tensor(lengths))


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# Mixed group, D_imp wins: r = [1, 0, 0, 0], p = [0.5, 0.4, 0.25, -] (last sample n = 0 -> p = 0).
# D_imp = 1 / ((1/4)(1/0.5)) = 2.0 > floor 2 * max p = 1.0 -> D = 2.
# q = p / (D - p): 0.4/1.6 = 1/4, 0.25/1.75 = 1/7, 0 -> penalty q/G = [1/16, 1/28, 0]
# r~ = [1, -1/16, -1/28, 0]; mean 0.2254464; unbiased std 0.5169...; A = (r~ - mean)/(std + 1e-6)
MIXED_DIMP = ([1, 0, 0, 0], [0.5, 0.4, 0.25, 1.0], [2, 3, 1, 0])
MIXED_DIMP_A = [1.4981567785686878, -0.5569516554333164, -0.5051421991139381, -0.43606292402143365]

# Mixed group, floor wins: r = [1, 0, 0, 0], p = [0.1, 0.8, 0.4, 0.2].
# D_imp = 4 * 0.1 = 0.4 < floor 2 * 0.8 = 1.6 -> D = 1.6.
# q = 0.8/0.8 = 1, 0.4/1.2 = 1/3, 0.2/1.4 = 1/7 -> r~ = [1, -1/4, -1/12, -1/28]
MIXED_FLOOR = ([1, 0, 0, 0], [0.1, 0.8, 0.4, 0.2], [1, 4, 2, 5])
MIXED_FLOOR_A = [1.480314060102879, -0.7166184672582842, -0.4236941302767957, -0.340001462567799]

# Negative group: p = [0.5, 0.25, 0.25, 0.125], D = 2 * 0.5 = 1.
# q = 0.5/0.5 = 1, 0.25/0.75 = 1/3, 1/3, 0.125/0.875 = 1/7 -> r~ = -[1/4, 1/12, 1/12, 1/28]
#   = -[21, 7, 7, 3]/84; mean = -38/336 = -19/168; r~ - mean = [-23, 5, 5, 13]/168
# A = 0.25 * (r~ - mean) = [-23, 5, 5, 13]/672
NEGATIVE = ([0, 0, 0, 0], [0.5, 0.25, 0.25, 0.125], [3, 1, 2, 7])
NEGATIVE_A = [-23 / 672, 5 / 672, 5 / 672, 13 / 672]

# GRPO on r = [1, 0, 0, 0]: mean 1/4, std = sqrt((9/16 + 3/16)/3) = 1/2 -> (r - 1/4)/(1/2 + 1e-6)
GRPO_1000_A = [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001]

POSITIVE = ([1, 1, 1, 1], [0.9, 0.1, 0.5, 0.3], [1, 2, 3, 4])


def _batch(*groups):
    r, p, n = ([], [], [])
    for gr, gp, gn in groups:
        r += gr
        p += gp
        n += gn
    return _inputs(r, p, n)


def test_mixed_group_d_imp_wins():
    adv, diag = compute_advantages_with_diagnostics(*_inputs(*MIXED_DIMP), 4, LENS)
    assert adv.dtype == torch.float32
    _close(adv, MIXED_DIMP_A)
    assert diag.group_kind.tolist() == [GROUP_MIXED]
    assert diag.d_imp_won_fraction.item() == 1.0
    assert diag.difficulty_D.item() == pytest.approx(2.0)
    _close(diag.calibrated_reward.flatten(), [1, -1 / 16, -1 / 28, 0])


def test_mixed_group_floor_wins():
    adv, diag = compute_advantages_with_diagnostics(*_inputs(*MIXED_FLOOR), 4, LENS)
    _close(adv, MIXED_FLOOR_A)
    assert diag.d_imp_won_fraction.item() == 0.0
    assert diag.difficulty_D.item() == pytest.approx(1.6)


def test_negative_group_de_mean_and_alpha():
    adv, diag = compute_advantages_with_diagnostics(*_inputs(*NEGATIVE), 4, LENS)
    _close(adv, NEGATIVE_A)
    assert diag.group_kind.tolist() == [GROUP_NEGATIVE]
    # alpha scales linearly: alpha = 1 -> 4x
    adv1 = compute_advantages(*_inputs(*NEGATIVE), 4, AdvantageConfig(negative_group_weight=1.0))
    _close(adv1, [4 * a for a in NEGATIVE_A])


def test_positive_group_is_zero():
    for cfg in (LENS, GRPO):
        adv, diag = compute_advantages_with_diagnostics(*_inputs(*POSITIVE), 4, cfg)
        assert adv.tolist() == [0.0] * 4
        assert diag.group_kind.tolist() == [GROUP_POSITIVE]


def test_ablations_all_mixed_negative():
    batch = _batch(MIXED_FLOOR, NEGATIVE, POSITIVE)
    zeros = [0.0] * 4
    adv = compute_advantages(*batch, 4, AdvantageConfig(lens_groups="all"))
    _close(adv, MIXED_FLOOR_A + NEGATIVE_A + zeros)
    # App. D.2 (i): calibrate incorrect samples in mixed groups only; negative groups stay 0
    adv = compute_advantages(*batch, 4, AdvantageConfig(lens_groups="mixed"))
    _close(adv, MIXED_FLOOR_A + zeros + zeros)
    # App. D.2 (ii): mixed groups plain GRPO, negative groups LENS
    adv = compute_advantages(*batch, 4, AdvantageConfig(lens_groups="negative"))
    _close(adv, GRPO_1000_A + NEGATIVE_A + zeros)
    adv = compute_advantages(*batch, 4, GRPO)
    _close(adv, GRPO_1000_A + zeros + zeros)


def test_diagnostics_ratios_and_means():
    _, diag = compute_advantages_with_diagnostics(*_batch(MIXED_DIMP, NEGATIVE, POSITIVE, NEGATIVE), 4, LENS)
    d = diag.as_dict()
    assert d["adv/mixed_group_ratio"] == pytest.approx(0.25)
    assert d["adv/negative_group_ratio"] == pytest.approx(0.5)
    assert d["adv/positive_group_ratio"] == pytest.approx(0.25)
    assert d["adv/mean_abs_advantage_mixed"] == pytest.approx(sum(map(abs, MIXED_DIMP_A)) / 4, abs=1e-6)
    assert d["adv/mean_abs_advantage_negative"] == pytest.approx(46 / 672 / 4, abs=1e-9)
    assert d["adv/mean_abs_advantage_positive"] == 0.0
    assert d["adv/negative_groups_with_signal"] == 2
    assert d["adv/d_imp_won_fraction"] == 1.0
    # incorrect samples: 3 in the mixed group (-1/16, -1/28, 0) + 2 x 4 negative (-38/84 each group)
    expected = (-1 / 16 - 1 / 28 + 0 - 2 * 38 / 84) / 11
    assert d["adv/mean_calibrated_reward_incorrect"] == pytest.approx(expected)


def test_length_preference_app_c_negative_group():
    # App. C, gamma = 1: penalty = (1/n) p / (gamma - p)
    # p = [0.5, 0.25], n = [2, 4]: (1/2)(0.5/0.5) = 1/2, (1/4)(0.25/0.75) = 1/12
    # r~ = [-1/2, -1/12]; mean -7/24; r~ - mean = [-5/24, 5/24]; A = 0.25 * that = [-5/96, 5/96]
    cfg = AdvantageConfig(length_preference_gamma=1.0)
    adv = compute_advantages(*_inputs([0, 0], [0.5, 0.25], [2, 4]), 2, cfg)
    _close(adv, [-5 / 96, 5 / 96])


def test_length_preference_app_c_mixed_group_and_gamma_check():
    # r = [1, 0], incorrect p = 0.5, n = 1, gamma = 1: penalty 1 * 0.5/0.5 = 1 -> r~ = [1, -1]
    # mean 0, std sqrt(2) -> A = [1, -1]/(sqrt(2) + 1e-6). The correct sample's p = 0.9 >= gamma
    # is allowed: only samples with r < 1 use gamma.
    cfg = AdvantageConfig(length_preference_gamma=1.0)
    adv = compute_advantages(*_inputs([1, 0], [1.0, 0.5], [1, 1]), 2, cfg)
    _close(adv, [1 / (math.sqrt(2) + 1e-6), -1 / (math.sqrt(2) + 1e-6)])
    adv = compute_advantages(*_inputs([1, 0], [0.9, 0.5], [1, 1]), 2, AdvantageConfig(length_preference_gamma=0.6))
    assert torch.isfinite(adv).all()
    with pytest.raises(ValueError, match="length_preference_gamma"):
        compute_advantages(*_inputs([1, 0], [0.9, 0.5], [1, 1]), 2, AdvantageConfig(length_preference_gamma=0.5))


# ------------------------------------------------------------------ Sec. 5.1 floor multiplier, App. C rho = mu / pi


def _zscore(x, eps=1e-6):
    """Reference mixed-group normalization in plain Python float64: (x - mean)/(unbiased std + eps)."""
    mean = sum(x) / len(x)
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / (len(x) - 1))
    return [(v - mean) / (std + eps) for v in x]


@pytest.mark.parametrize("m, r_tilde, D", [
    # MIXED_FLOOR, p = [0.1, 0.8, 0.4, 0.2], D_imp = 0.4.
    # m = 3: D = 3 * 0.8 = 2.4; q = 0.8/1.6, 0.4/2.0, 0.2/2.2 = 1/2, 1/5, 1/11; penalty q/4
    (3.0, [1, -1 / 8, -1 / 20, -1 / 44], 2.4),
    # m = 1.5: D = 1.2; q = 0.8/0.4, 0.4/0.8, 0.2/1.0 = 2, 1/2, 1/5 (m < 2: a penalty above 1/G)
    (1.5, [1, -1 / 2, -1 / 8, -1 / 20], 1.2),
])
def test_d_floor_multiplier(m, r_tilde, D):
    adv, diag = compute_advantages_with_diagnostics(*_inputs(*MIXED_FLOOR), 4, AdvantageConfig(d_floor_multiplier=m))
    _close(diag.calibrated_reward.flatten(), r_tilde, atol=1e-12)
    assert diag.difficulty_D.item() == pytest.approx(D)
    _close(adv, _zscore(r_tilde))
    # the default is the paper's 2 (MIXED_FLOOR_A is computed with D = 2 * 0.8)
    _close(compute_advantages(*_inputs(*MIXED_FLOOR), 4, AdvantageConfig(d_floor_multiplier=2.0)), MIXED_FLOOR_A)
    # D_imp beats a low floor: MIXED_DIMP has D_imp = 2 > 1.5 * 0.5
    _, diag = compute_advantages_with_diagnostics(*_inputs(*MIXED_DIMP), 4, AdvantageConfig(d_floor_multiplier=1.5))
    assert diag.difficulty_D.item() == pytest.approx(2.0) and diag.d_imp_won_fraction.item() == 1.0


POLICY = AdvantageConfig(preference="policy")


@pytest.mark.parametrize("r, r_tilde, D", [
    # k = 1 of 4: D = 4, penalty 1/(D - 1) = 1/3 for every mistake
    ([1, 0, 0, 0], [1, -1 / 3, -1 / 3, -1 / 3], 4.0),
    # k = 3 of 4: D = 4/3, penalty 3 (no floor: App. C's weight exactly)
    ([1, 1, 1, 0], [1, 1, 1, -3], 4 / 3),
    # soft labels, k = 1.5 of 3: D = 2, penalty 1 -> r~ = [1, 0.5 - 0.5 * 1, 0 - 1]
    ([1, 0.5, 0], [1, 0, -1], 2.0),
])
def test_policy_preference_uniform_weight(r, r_tilde, D):
    g = len(r)
    args = _inputs(r, [0.9, 0.3, 0.5, 0.1][:g], [3, 1, 4, 2][:g])  # confidences play no role
    adv, diag = compute_advantages_with_diagnostics(*args, g, POLICY)
    _close(diag.calibrated_reward.flatten(), r_tilde, atol=1e-12)
    assert diag.difficulty_D.item() == pytest.approx(D)
    _close(adv, _zscore(r_tilde))
    # r~ is an increasing affine function of r within the group: the z-score is GRPO's
    _close(adv, compute_advantages(*args, g, GRPO).tolist(), atol=1e-5)


def test_policy_and_sampling_negative_and_positive_groups():
    # No correct mass: D = G / 0 = inf, penalty 0 -> negative groups carry no signal; positive 0.
    batch = _batch(NEGATIVE, POSITIVE)
    s = batch[1]
    for cfg, extra in ((POLICY, {}), (AdvantageConfig(preference="sampling"), {"sampling_logprob_sums": s - 1.0})):
        adv, diag = compute_advantages_with_diagnostics(*batch, 4, cfg, **extra)
        assert adv.tolist() == [0.0] * 8
        assert math.isinf(diag.difficulty_D[0].item())
        # positive group: policy D = G / k = 1; sampling w = e for all: D = max(1, 2 e)
        assert diag.difficulty_D[1].item() == pytest.approx(1.0 if cfg is POLICY else 2.0 * math.e)
        assert all(math.isfinite(v) for v in diag.as_dict().values())


SAMPLING = AdvantageConfig(preference="sampling")


@pytest.mark.parametrize("w, m, r_tilde, D, won", [
    # r = [1, 0, 0, 0]: D_emp = G / k = 4. Penalty w / (D - w).
    # w = [1, 1.5, 0.5, 1], floor 2 * 1.5 = 3 < 4: D = 4; 1.5/2.5, 0.5/3.5, 1/3
    ([1, 1.5, 0.5, 1], 2.0, [1, -3 / 5, -1 / 7, -1 / 3], 4.0, True),
    # w = [1, 3, 0.5, 1]: floor 2 * 3 = 6 > 4: D = 6; 3/3, 0.5/5.5, 1/5
    ([1, 3, 0.5, 1], 2.0, [1, -1, -1 / 11, -1 / 5], 6.0, False),
    # m = 3, w = [1, 1.5, 0.5, 1]: floor 4.5 > 4: D = 4.5; 1.5/3, 0.5/4, 1/3.5
    ([1, 1.5, 0.5, 1], 3.0, [1, -1 / 2, -1 / 8, -2 / 7], 4.5, False),
])
def test_sampling_preference_importance_ratio(w, m, r_tilde, D, won):
    r, s, n = _inputs([1, 0, 0, 0], [0.5, 0.4, 0.25, 0.3], [2, 3, 1, 5])
    sampled = s - torch.log(torch.tensor(w, dtype=torch.float64))  # M = S - log w
    cfg = AdvantageConfig(preference="sampling", d_floor_multiplier=m)
    adv, diag = compute_advantages_with_diagnostics(r, s, n, 4, cfg, sampling_logprob_sums=sampled)
    _close(diag.calibrated_reward.flatten(), r_tilde, atol=1e-12)
    assert diag.difficulty_D.item() == pytest.approx(D)
    assert diag.d_imp_won.tolist() == [won]
    _close(adv, _zscore(r_tilde))
    # the whole group's sums shifted by a constant (the same w) or scaled (huge S, M) changes nothing
    shifted = compute_advantages(r, s - 1e4, n, 4, cfg, sampling_logprob_sums=sampled - 1e4)
    _close(shifted, _zscore(r_tilde))


def test_sampling_preference_extreme_ratios_and_errors():
    # log w = +-800 (exp overflows / underflows float64): u = w / max w stays exact.
    # r = [1, 0, 0]: w = [e^-800, e^800, 1] -> D = max(3, 2 e^800) -> penalty of the top mistake
    # u / (d - u) = 1 / (2 - 1) = 1, the other ~0 -> r~ = [1, -1, 0]
    r = torch.tensor([1.0, 0.0, 0.0])
    s = torch.tensor([-900.0, -100.0, -5.0], dtype=torch.float64)
    sampled = torch.tensor([-100.0, -900.0, -5.0], dtype=torch.float64)
    adv, diag = compute_advantages_with_diagnostics(r, s, torch.tensor([9, 9, 9]), 3, SAMPLING,
                                                    sampling_logprob_sums=sampled)
    _close(diag.calibrated_reward.flatten(), [1, -1, 0], atol=1e-12)
    _close(adv, _zscore([1, -1, 0]))
    # S = -inf: pi_theta gives the response zero probability, w = 0, penalty 0
    adv, diag = compute_advantages_with_diagnostics(
        torch.tensor([1.0, 0.0]), torch.tensor([-1.0, -float("inf")]), torch.tensor([1, 1]), 2, SAMPLING,
        sampling_logprob_sums=torch.tensor([-1.0, -2.0]))
    _close(diag.calibrated_reward.flatten(), [1, 0], atol=0)
    with pytest.raises(ValueError, match="needs sampling_logprob_sums"):
        compute_advantages(*_inputs(*MIXED_FLOOR), 4, SAMPLING)
    for bad in (-float("inf"), float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sampling_logprob_sums must be finite"):
            compute_advantages(*_inputs(*MIXED_FLOOR), 4, SAMPLING,
                               sampling_logprob_sums=torch.tensor([-1.0, -1.0, bad, -1.0]))
    with pytest.raises(ValueError, match="sampling_logprob_sums has length 3"):
        compute_advantages(*_inputs(*MIXED_FLOOR), 4, SAMPLING, sampling_logprob_sums=torch.zeros(3))


def test_group_size_one_is_zero():
    r, s, n = _inputs([1, 0, 0.5, 0], [0.5, 0.5, 0.5, 1.0], [1, 2, 3, 0])
    for cfg in (LENS, GRPO, AdvantageConfig(length_preference_gamma=2.0), POLICY, SAMPLING):
        assert compute_advantages(r, s, n, 1, cfg, sampling_logprob_sums=s - 1.0).tolist() == [0.0] * 4


def test_zero_length_responses():
    # all n = 0 -> every p = 0 -> q = 0: negative group all zeros; mixed group = plain GRPO on r
    r, s, n = _inputs([0, 0, 0, 0, 1, 0, 0, 0], [1.0] * 8, [0] * 8)
    adv = compute_advantages(r, s, n, 4, LENS)
    _close(adv, [0.0] * 4 + GRPO_1000_A)


def test_underflowing_confidences_are_exact():
    # S = -1e6 + n log p: exp(S/n) underflows to 0 in float64, but q only depends on p_i / max p:
    # the group equals the same group with S = n log p (up to the shift). Negative group of NEGATIVE.
    r, s, n = _inputs(*NEGATIVE)
    shifted = s - 1e6 * n.double()
    assert torch.exp(shifted / n).max() == 0.0
    _close(compute_advantages(r, shifted, n, 4, LENS), NEGATIVE_A)
    # Mixed group whose correct sample underflows: r = [1, 0], p = [~0, 0.5]
    # D_imp = 0 -> floor 2 * 0.5 = 1 -> q = 0.5/0.5 = 1, penalty 1/2 -> r~ = [1, -1/2]
    # std = 1.5/sqrt(2) -> A = +-0.75 / (1.5/sqrt(2) + 1e-6)
    adv = compute_advantages(torch.tensor([1.0, 0.0]), torch.tensor([-1e6, LN(0.5)]), torch.tensor([1, 1]), 2)
    a = 0.75 / (1.5 / math.sqrt(2) + 1e-6)
    _close(adv, [a, -a])
    # S = -inf is a zero confidence, not an error
    adv = compute_advantages(torch.tensor([0.0, 0.0]), torch.tensor([-float("inf"), -1.0]), torch.tensor([3, 1]), 2)
    assert torch.isfinite(adv).all() and adv[1] < 0 < adv[0]


def test_all_equal_confidences_negative_group_exact_zeros():
    # p all equal -> q = p/(2p - p) = 1 for all -> r~ all -1/G -> exact zeros (not rounding noise).
    # This is also the closest D - p can get to 0: the floor D >= 2 max p keeps D - p_i >= max p.
    r, s, n = _inputs([0] * 3, [0.3] * 3, [1, 2, 5])
    adv, diag = compute_advantages_with_diagnostics(r, s, n, 3, LENS)
    assert adv.tolist() == [0.0, 0.0, 0.0]
    assert diag.negative_groups_with_signal.item() == 0


def test_fractional_rewards():
    # Mixed (contrast): r = [1, 0.5, 0], p = [0.5, 0.5, 0.25], n = 1.
    # D_imp = 1/((1/3)(1/0.5 + 0.5/0.5 + 0)) = 1; floor = 1 -> D = 1.
    # q = [-, 0.5/0.5 = 1, 0.25/0.75 = 1/3]; penalty q/3 -> r~ = [1, 0.5 - 0.5/3, -1/9] = [1, 1/3, -1/9]
    # mean 11/27, unbiased std sqrt(456/1458) -> A = (r~ - mean)/(std + 1e-6)
    adv = compute_advantages(*_inputs([1, 0.5, 0], [0.5, 0.5, 0.25], [1, 1, 1]), 3, LENS)
    _close(adv, [1.059623990918581, -0.13245299886482262, -0.9271709920537583])
    # No contrast, all r = 0.5: negative-group treatment with penalty scaled by (1 - 0.5):
    # same q as NEGATIVE (D_imp = 4/9 < floor 1) -> A = 0.5 * NEGATIVE_A; GRPO gives 0.
    r, s, n = _inputs([0.5] * 4, *NEGATIVE[1:])
    adv, diag = compute_advantages_with_diagnostics(r, s, n, 4, LENS)
    _close(adv, [0.5 * a for a in NEGATIVE_A])
    assert diag.group_kind.tolist() == [GROUP_NEGATIVE]
    assert compute_advantages(r, s, n, 4, GRPO).tolist() == [0.0] * 4


@pytest.mark.parametrize(
    "args, match",
    [
        (([0.0, 1.0], [0.0, 0.0], [1, 1, 1], 2), "response_lengths has length 3"),
        (([0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1, 1, 1], 2), "not divisible by group_size=2"),
        (([0.0, float("nan")], [0.0, 0.0], [1, 1], 2), "rewards contains NaN"),
        (([0.0, 1.0], [0.0, float("nan")], [1, 1], 2), "logprob_sums contains NaN"),
        (([0.0, 1.0], [0.0, 0.0], [1, float("nan")], 2), "response_lengths contains NaN"),
        (([0.0, 2.0], [0.0, 0.0], [1, 1], 2), r"rewards must lie in \[0, 1\]"),
        (([0.0, -0.1], [0.0, 0.0], [1, 1], 2), r"rewards must lie in \[0, 1\]"),
        (([0.0, 1.0], [0.0, float("inf")], [1, 1], 2), r"logprob_sums contains \+inf"),
        (([0.0, 1.0], [0.0, 0.0], [1, -1], 2), "response_lengths must be"),
        (([0.0, 1.0], [0.0, 0.0], [1, 1], 0), "group_size must be a positive int"),
        (([[0.0, 1.0]], [0.0, 0.0], [1, 1], 2), "rewards must be a 1-D tensor"),
    ],
)
def test_input_errors_name_the_argument(args, match):
    r, s, n, g = args
    with pytest.raises(ValueError, match=match):
        compute_advantages(torch.tensor(r), torch.tensor(s), torch.tensor(n), g)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"estimator": "ppo"}, "estimator"),
        ({"lens_groups": "some"}, "lens_groups"),
        ({"negative_group_weight": -0.1}, "negative_group_weight"),
        ({"negative_group_weight": float("nan")}, "negative_group_weight"),
        ({"length_preference_gamma": 0.0}, "length_preference_gamma"),
        ({"length_preference_gamma": -1.0}, "length_preference_gamma"),
        ({"estimator": "grpo", "length_preference_gamma": 1.0}, "length_preference_gamma"),
        ({"std_eps": 0.0}, "std_eps"),
        ({"preference": "mu"}, "preference"),
        ({"preference": "length"}, "preference"),
        ({"preference": "policy", "length_preference_gamma": 1.0}, "length_preference_gamma"),
        ({"estimator": "grpo", "preference": "policy"}, "preference"),
        ({"d_floor_multiplier": 1.0}, "d_floor_multiplier"),
        ({"d_floor_multiplier": 0.5}, "d_floor_multiplier"),
        ({"d_floor_multiplier": float("inf")}, "d_floor_multiplier"),
        ({"d_floor_multiplier": float("nan")}, "d_floor_multiplier"),
        ({"preference": "policy", "d_floor_multiplier": 3.0}, "d_floor_multiplier"),
        ({"length_preference_gamma": 1.0, "d_floor_multiplier": 3.0}, "d_floor_multiplier"),
        ({"estimator": "grpo", "d_floor_multiplier": 3.0}, "d_floor_multiplier"),
    ],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"AdvantageConfig.{field}"):
        AdvantageConfig(**kwargs)


def test_preference_defaults_to_the_gamma_switch():
    assert AdvantageConfig().preference_function == "none"
    assert AdvantageConfig(length_preference_gamma=1.5).preference_function == "length"
    cfg = AdvantageConfig(preference="length", length_preference_gamma=1.5)
    r, s, n = _inputs([0, 0], [0.5, 0.25], [2, 4])
    assert compute_advantages(r, s, n, 2, cfg).tolist() == compute_advantages(
        r, s, n, 2, AdvantageConfig(length_preference_gamma=1.5)).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    r, s, n = _batch(MIXED_DIMP, MIXED_FLOOR, NEGATIVE, POSITIVE)
    sampled = s - torch.linspace(-2.0, 2.0, s.numel(), dtype=torch.float64)
    for cfg in (LENS, GRPO, AdvantageConfig(length_preference_gamma=1.0), AdvantageConfig(d_floor_multiplier=3.0),
                POLICY, SAMPLING):
        cpu = compute_advantages(r, s, n, 4, cfg, sampling_logprob_sums=sampled)
        cuda, diag = compute_advantages_with_diagnostics(r.cuda(), s.cuda(), n.cuda(), 4, cfg,
                                                         sampling_logprob_sums=sampled.cuda())
        assert cuda.device.type == "cuda"
        torch.testing.assert_close(cuda.cpu(), cpu, atol=1e-6, rtol=1e-6)
        assert all(math.isfinite(v) for v in diag.as_dict().values())


def test_group_size_may_be_any_integer_type():
    r, s, n = _inputs(*NEGATIVE)
    import numpy as np

    _close(compute_advantages(r, s, n, np.int64(4)), NEGATIVE_A)
    with pytest.raises(ValueError, match="group_size"):
        compute_advantages(r, s, n, 4.0)


def test_empty_batch():
    adv = compute_advantages(torch.zeros(0), torch.zeros(0), torch.zeros(0), 4)
    assert adv.shape == (0,) and adv.dtype == torch.float32


# ------------------------------------------------------------------ properties (hypothesis)

@st.composite
def batches(draw, min_g=1, max_g=8, binary=True, wide=False):
    """(rewards, logprob_sums, lengths, G): rewards binary (or fractional), log-confidences in
    [-20, 0] (wide: also -1e6 / -inf sums and n = 0)."""
    g = draw(st.integers(min_g, max_g))
    b = draw(st.integers(1, 4))
    size = b * g
    if binary:
        r = draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=size, max_size=size))
    else:
        r = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=size, max_size=size))
    n = draw(st.lists(st.integers(0 if wide else 1, 40), min_size=size, max_size=size))
    ell = st.floats(-20.0, 0.0)
    if wide:
        ell = st.one_of(ell, st.sampled_from([-1e6, -float("inf"), 0.0]))
    ls = draw(st.lists(ell, min_size=size, max_size=size))
    s = [x * k if math.isfinite(x) and x > -1e5 else x for x, k in zip(ls, n)]
    return torch.tensor(r), torch.tensor(s, dtype=torch.float64), torch.tensor(n), g


def _grpo_reference(r, g, eps=1e-6):
    out = []
    for grp in r.double().view(-1, g):
        if g == 1 or bool((grp == grp[0]).all()):
            out += [0.0] * g
        else:
            out += ((grp - grp.mean()) / (grp.std() + eps)).tolist()
    return torch.tensor(out, dtype=torch.float64)


@settings(max_examples=60, deadline=None)
@given(batches(binary=False))
def test_grpo_equals_per_group_loop(batch):
    r, s, n, g = batch
    adv = compute_advantages(r, s, n, g, GRPO)
    torch.testing.assert_close(adv.double(), _grpo_reference(r, g), atol=1e-5, rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(batches(min_g=2), st.sampled_from(["all", "mixed"]))
def test_sign_invariance_in_mixed_groups(batch, lens_groups):
    r, s, n, g = batch
    adv = compute_advantages(r, s, n, g, AdvantageConfig(lens_groups=lens_groups)).view(-1, g)
    rg = r.view(-1, g)
    mixed = (rg.sum(1) > 0) & (rg.sum(1) < g)
    assert (adv[mixed][rg[mixed] == 1] > 0).all()
    assert (adv[mixed][rg[mixed] == 0] < 0).all()


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.data())
def test_negative_groups_zero_mean_nonzero_unless_equal(g, data):
    ell = data.draw(st.lists(st.integers(-200, 0), min_size=g, max_size=g))  # l in steps of 0.05
    n = torch.tensor(data.draw(st.lists(st.integers(1, 30), min_size=g, max_size=g)))
    s = torch.tensor(ell, dtype=torch.float64) * 0.05 * n
    adv = compute_advantages(torch.zeros(g), s, n, g).double()
    assert abs(adv.sum().item()) < 1e-6
    if len(set(ell)) == 1:
        assert (adv == 0).all()
    else:
        assert (adv != 0).any()


@settings(max_examples=60, deadline=None)
@given(batches(min_g=2), st.sampled_from([None, 1.5]))
def test_more_confident_mistakes_more_negative(batch, gamma):
    r, s, n, g = batch
    adv = compute_advantages(r, s, n, g, AdvantageConfig(length_preference_gamma=gamma)).view(-1, g)
    ell = (s / n).view(-1, g)
    for grp in range(adv.shape[0]):
        wrong = (r.view(-1, g)[grp] == 0).nonzero().flatten().tolist()
        for i in wrong:
            for j in wrong:
                # App. C also divides by n: compare only equal lengths there
                same_n = gamma is None or n.view(-1, g)[grp, i] == n.view(-1, g)[grp, j]
                if ell[grp, i] > ell[grp, j] + 1e-9 and same_n:
                    assert adv[grp, i] <= adv[grp, j] + 1e-6


@settings(max_examples=40, deadline=None)
@given(batches(binary=False, wide=True), st.randoms(use_true_random=False))
def test_permutation_invariance_within_group(batch, rnd):
    r, s, n, g = batch
    perm = torch.cat([torch.tensor(rnd.sample(range(g), g)) + k * g for k in range(r.numel() // g)])
    adv = compute_advantages(r, s, n, g)
    adv_p = compute_advantages(r[perm], s[perm], n[perm], g)
    torch.testing.assert_close(adv_p, adv[perm], atol=1e-6, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(batches(binary=False))
def test_float32_and_float64_inputs_agree(batch):
    r, s, n, g = batch
    s32 = s.float()
    a32 = compute_advantages(r.float(), s32, n.int(), g)
    a64 = compute_advantages(r.double(), s32.double(), n.double(), g)
    torch.testing.assert_close(a32, a64, atol=1e-6, rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(batches(), st.floats(-50.0, 0.0))
def test_shifting_all_log_confidences_of_a_group_changes_nothing(batch, shift):
    r, s, n, g = batch  # q depends only on p_i / max_j p_j (module docstring)
    torch.testing.assert_close(compute_advantages(r, s + shift * n, n, g), compute_advantages(r, s, n, g),
                               atol=2e-5, rtol=1e-5)


@settings(max_examples=150, deadline=None)
@given(batches(binary=False, wide=True), st.sampled_from(["all", "mixed", "negative"]),
       st.sampled_from(["none", "length", "sampling", "policy"]), st.sampled_from([2.0, 1.001]),
       st.sampled_from(["lens", "grpo"]), st.data())
def test_never_nan_or_inf(batch, lens_groups, preference, m, estimator, data):
    r, s, n, g = batch
    if estimator == "grpo":
        preference, m = "none", 2.0
    if preference in ("length", "policy"):
        m = 2.0
    gamma = 1.01 if preference == "length" else None
    cfg = AdvantageConfig(estimator=estimator, lens_groups=lens_groups, preference=preference,
                          length_preference_gamma=gamma, d_floor_multiplier=m)
    sampled = torch.tensor(data.draw(st.lists(st.one_of(st.floats(-1e6, 0.0), st.sampled_from([0.0, -1e6])),
                                              min_size=r.numel(), max_size=r.numel())), dtype=torch.float64)
    adv, diag = compute_advantages_with_diagnostics(r, s, n, g, cfg, sampling_logprob_sums=sampled)
    assert torch.isfinite(adv).all()
    assert all(math.isfinite(v) for v in diag.as_dict().values())


@settings(max_examples=60, deadline=None)
@given(batches(min_g=2))
def test_uniform_weight_variants_reduce_to_grpo(batch):
    """rho = pi_theta, and rho = mu at mu = pi_theta (w = 1), give a constant penalty per group."""
    r, s, n, g = batch
    grpo = compute_advantages(r, s, n, g, GRPO)
    torch.testing.assert_close(compute_advantages(r, s, n, g, POLICY), grpo, atol=1e-5, rtol=0)
    torch.testing.assert_close(compute_advantages(r, s, n, g, SAMPLING, sampling_logprob_sums=s), grpo,
                               atol=1e-5, rtol=0)


@settings(max_examples=60, deadline=None)
@given(batches(min_g=2), st.data())
def test_sampling_larger_ratio_mistakes_more_negative(batch, data):
    r, s, n, g = batch  # S <= 0; the engine's sums M <= 0 too (a log-probability sum)
    sampled = torch.tensor(data.draw(st.lists(st.floats(-60.0, 0.0), min_size=r.numel(), max_size=r.numel())),
                           dtype=torch.float64)
    adv = compute_advantages(r, s, n, g, SAMPLING, sampling_logprob_sums=sampled).view(-1, g)
    lw = (s - sampled).view(-1, g)  # log w = log pi_theta - log mu
    for grp in range(adv.shape[0]):
        wrong = (r.view(-1, g)[grp] == 0).nonzero().flatten().tolist()
        for i in wrong:
            for j in wrong:
                if lw[grp, i] > lw[grp, j] + 1e-9:
                    assert adv[grp, i] <= adv[grp, j] + 1e-6
