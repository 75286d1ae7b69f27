"""pass@k: hand-computed values, brute force over k-subsets, edge cases, batched == scalar."""

import itertools
import math

import numpy as np
import pytest
import torch

from lens_megatron.eval import (
    count_correct_per_problem,
    load_math500,
    pass_at_k,
    pass_at_k_batched,
    summarize_pass_at_k,
)
from shared_data import shared_data_path

MATH500 = shared_data_path("math500.jsonl")


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (2, 1, 1, 0.5),  # 1 - C(1,1)/C(2,1) = 1 - 1/2
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 1, 0.3),  # pass@1 = c/n = 3/10
        (16, 4, 8, 1 - 495 / 12870),  # 1 - C(12,8)/C(16,8) = 1 - 495/12870
        (6, 1, 3, 0.5),  # 1 - C(5,3)/C(6,3) = 1 - 10/20
    ],
)
def test_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


def _brute_force(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_matches_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_edges_no_correct_all_correct_and_k_equals_n():
    assert pass_at_k(16, 0, 4) == 0.0
    assert pass_at_k(16, 16, 4) == 1.0
    assert pass_at_k(8, 1, 8) == 1.0  # k = n: the one subset is everything
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(1, 1, 1) == 1.0


def test_large_n_is_stable_where_binomials_overflow():
    n, c, k = 2000, 3, 1000  # C(2000, 1000) ~ 1e600 overflows a float
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)  # exact integers, then one division
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "n, c, k, error",
    [
        (4, 1, 5, ValueError),  # k > n
        (4, 5, 1, ValueError),  # c > n
        (-1, 0, 1, ValueError),
        (4, -1, 1, ValueError),
        (4, 1, 0, ValueError),
        (4, 1, -2, ValueError),
        (4.0, 1, 1, TypeError),
        (4, True, 1, TypeError),
    ],
)
def test_invalid_arguments_raise(n, c, k, error):
    with pytest.raises(error):
        pass_at_k(n, c, k)


def test_batched_equals_scalar_for_every_c_and_k():
    n = 16
    correct = np.arange(n + 1)
    for k in range(1, n + 1):
        batched = pass_at_k_batched(n, correct, k)
        scalar = [pass_at_k(n, int(c), k) for c in correct]
        np.testing.assert_allclose(batched, scalar, rtol=1e-12, atol=1e-13)


def test_batched_with_per_problem_n_and_torch_input():
    samples = torch.tensor([4, 8, 16, 64, 1024])
    correct = torch.tensor([1, 0, 16, 5, 17])
    batched = pass_at_k_batched(samples, correct, 4)
    expected = [pass_at_k(int(n), int(c), 4) for n, c in zip(samples, correct)]
    np.testing.assert_allclose(batched, expected, rtol=1e-12, atol=1e-13)


def test_batched_rejects_invalid_inputs():
    with pytest.raises(ValueError):
        pass_at_k_batched(4, [1, 5], 1)  # c > n
    with pytest.raises(ValueError):
        pass_at_k_batched([4, 2], [1, 1], 4)  # k > n of the second problem
    with pytest.raises(TypeError):
        pass_at_k_batched(4, [0.5, 1.0], 1)


def test_summary_by_level_and_only_k_up_to_n():
    # 4 problems, n = 4 samples each: correct counts 0, 1, 4, 2 at levels 1, 4, 5, 4.
    summary = summarize_pass_at_k([0, 1, 4, 2], 4, levels=[1, 4, 5, 4])
    overall = summary["all"]
    assert sorted(overall.pass_at_k) == [1, 2, 4]  # 8 and 16 exceed n = 4
    assert overall.mean_accuracy == pytest.approx(7 / 16)
    # pass@1 = mean c/n = (0 + 1/4 + 1 + 1/2) / 4 = 0.4375
    assert overall.pass_at_k[1] == pytest.approx(0.4375)
    # pass@2: c=0 -> 0; c=1 -> 1 - C(3,2)/C(4,2) = 1/2; c=4 -> 1; c=2 -> 1 - C(2,2)/C(4,2) = 5/6
    assert overall.pass_at_k[2] == pytest.approx((0 + 0.5 + 1 + 5 / 6) / 4)
    hard = summary["level_4_5"]
    assert hard.num_problems == 3 and hard.mean_accuracy == pytest.approx(7 / 12)
    assert hard.pass_at_k[4] == pytest.approx(1.0)
    assert summary["level_1"].pass_at_k[4] == 0.0
    assert set(summary) == {"all", "level_4_5", "level_1", "level_4", "level_5"}
    flat = summary["level_4"].as_flat_dict("math500/level_4")
    assert flat["math500/level_4/pass@2"] == pytest.approx((0.5 + 5 / 6) / 2)


def test_summary_on_math500_levels_and_rewards_grouping():
    records = load_math500(MATH500)
    group_size = 8
    rng = np.random.default_rng(0)
    rewards = torch.from_numpy((rng.random(len(records) * group_size) < 0.5).astype(np.float32))
    correct = count_correct_per_problem(rewards, group_size)
    assert correct.sum() == int(rewards.sum())
    summary = summarize_pass_at_k(correct, group_size, levels=[r.level for r in records])
    assert summary["level_4_5"].num_problems == 262  # per the data README
    assert sum(summary[f"level_{lv}"].num_problems for lv in range(1, 6)) == 500
    assert sorted(summary["all"].pass_at_k) == [1, 2, 4, 8]
    assert summary["all"].pass_at_k[1] == pytest.approx(summary["all"].mean_accuracy)
    with pytest.raises(ValueError):
        count_correct_per_problem(rewards[:-1], group_size)
