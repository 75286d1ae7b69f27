"""Boxed-answer extraction, math-verify judging on MATH-500 gold answers, timeouts."""

import json
import os
import threading
import time

import pytest

from lens_megatron.rewards import (
    AnswerParseError,
    MathVerifyReward,
    extract_last_boxed,
    math_verify_judge,
    resolve_judge,
)
from shared_data import shared_data_path

MATH500 = shared_data_path("math500.jsonl")
HANG_TIMEOUT_S = 1.0


def judge_that_hangs(predicted_answer: str, gold_answer: str) -> bool:
    """Test-only judge: never returns on "hang", kills its process on "crash",
    raises on "raise", otherwise compares strings."""
    if predicted_answer == "hang":
        while True:
            time.sleep(60)
    if predicted_answer == "crash":
        os._exit(3)
    if predicted_answer == "raise":
        raise RuntimeError("verifier bug")
    if predicted_answer == "unparseable":
        raise AnswerParseError(predicted_answer)
    return predicted_answer == gold_answer


@pytest.mark.parametrize(
    "response, expected",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),  # an unmatched escaped brace
        ("first \\boxed{1}, then \\boxed{2}", "2"),  # last box wins
        ("\\boxed{\\boxed{5}}", "5"),  # the box that starts last
        ("$\\boxed 5$", "5"),
        ("hence \\boxed 12.\nDone", "12"),
        ("\\fbox{x+1}", "x+1"),
        ("\\boxed {7}", "7"),
        ("\\boxed{ 3 }", "3"),
        ("no box here", None),
        ("\\boxed{}", None),  # empty
        ("\\boxed{1} and truncated \\boxed{2", None),  # unclosed last box: no fallback
        ("\\boxedfoo{3}", None),
        ("", None),
    ],
)
def test_extract_last_boxed(response, expected):
    assert extract_last_boxed(response) == expected


def _math500_rows() -> list[dict]:
    with open(MATH500, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _math500_sample(count: int = 40) -> list[dict]:
    rows = _math500_rows()
    return rows[:: len(rows) // count][:count]


REQUIRED_GOLDS = ["\\frac{14}{3}", "\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\text{Evelyn}"]


def test_required_gold_forms_are_in_the_sample():
    all_golds = {row["answer"] for row in _math500_rows()}
    assert set(REQUIRED_GOLDS) <= all_golds


@pytest.fixture(scope="module")
def pool_reward():
    with MathVerifyReward(timeout_s=10.0, num_workers=2) as reward:
        yield reward


@pytest.mark.parametrize("num_workers", [0, 2])
def test_math500_gold_answers_score_one_and_wrong_answers_zero(num_workers, pool_reward):
    rows = _math500_sample() + [{"answer": gold} for gold in REQUIRED_GOLDS]
    golds = [row["answer"] for row in rows]
    wrong = golds[1:] + golds[:1]  # another problem's answer
    responses = [f"Reasoning...\nThe final answer is $\\boxed{{{g}}}$." for g in golds]
    responses += [f"I think it is \\boxed{{{w}}}." for w in wrong]
    reward = pool_reward if num_workers else MathVerifyReward(num_workers=num_workers)
    result = reward(responses, golds + golds)
    assert result.rewards[: len(golds)] == [1.0] * len(golds), [
        g for g, r in zip(golds, result.rewards) if r != 1.0
    ]
    assert result.rewards[len(golds) :] == [0.0] * len(golds), [
        (g, w) for g, w, r in zip(golds, wrong, result.rewards[len(golds) :]) if r != 0.0
    ]
    assert result.counters.correct == len(golds)
    assert result.counters.timeouts == result.counters.errors == result.counters.parse_failures == 0


@pytest.mark.parametrize(
    "predicted, gold, correct",
    [
        ("14/3", "\\frac{14}{3}", True),
        ("4\\frac{2}{3}", "\\frac{14}{3}", True),
        ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
        ("-q + p", "p - q", True),
        ("Evelyn", "\\text{Evelyn}", True),
        ("\\text{Bob}", "\\text{Evelyn}", False),
        ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}", True),
        ("32", "\\$32", True),  # MATH escapes dollar signs in money answers
        ("y^2+1", "x^2+1", False),
    ],
)
def test_math_verify_judge_equivalences(predicted, gold, correct):
    assert math_verify_judge(predicted, gold) is correct


def test_parse_failures_and_errors_are_counted_in_process():
    reward = MathVerifyReward(num_workers=0)
    result = reward(
        ["no box at all", "\\boxed{\\text{}}", "\\boxed{2}", "\\boxed{2}"],
        ["2", "2", "2", "$$"],  # the last gold cannot be parsed: a verifier error
    )
    assert result.rewards == [0.0, 0.0, 1.0, 0.0]
    assert result.statuses == ["parse_failure", "parse_failure", "ok", "error"]
    assert (result.counters.parse_failures, result.counters.errors, result.counters.correct) == (
        2,
        1,
        1,
    )
    import torch  # imported here: spawned judge workers re-import this module and stay light

    assert torch.equal(result.as_tensor(), torch.tensor([0.0, 0.0, 1.0, 0.0]))
    reward(["\\boxed{3}"], ["3"])
    assert (
        reward.totals.samples == 5
        and reward.totals.correct == 2
        and reward.totals.parse_failures == 2
    )


def test_hanging_verifier_is_killed_and_the_pool_keeps_working():
    with MathVerifyReward(
        timeout_s=HANG_TIMEOUT_S, num_workers=2, judge=judge_that_hangs
    ) as reward:
        reward(["\\boxed{warm}"], ["warm"])  # wait for the workers to be ready
        start = time.monotonic()
        result = reward(["\\boxed{hang}", "\\boxed{7}", "\\boxed{8}"], ["1", "7", "9"])
        elapsed = time.monotonic() - start
        assert result.statuses == ["timeout", "ok", "ok"]
        assert result.rewards == [0.0, 1.0, 0.0]
        assert result.counters.timeouts == 1
        assert HANG_TIMEOUT_S * 0.9 <= elapsed < HANG_TIMEOUT_S + 3.0
        assert reward.workers_replaced == 1
        after = reward(
            [
                "\\boxed{crash}",
                "\\boxed{raise}",
                "\\boxed{unparseable}",
                "\\boxed{5}",
                "\\boxed{6}",
            ],
            ["1", "1", "1", "5", "6"],
        )
        assert after.statuses == ["error", "error", "parse_failure", "ok", "ok"]
        assert after.rewards == [0.0, 0.0, 0.0, 1.0, 1.0]
        assert reward.totals.timeouts == 1 and reward.totals.errors == 2
        assert reward.workers_replaced == 2  # the crashed worker was replaced too


def test_judge_given_by_dotted_path_and_a_bad_path_fails_clearly():
    assert resolve_judge("lens_megatron.rewards.judge.math_verify_judge") is math_verify_judge
    assert resolve_judge(f"{__name__}:judge_that_hangs") is judge_that_hangs
    with MathVerifyReward(
        timeout_s=HANG_TIMEOUT_S, num_workers=1, judge=f"{__name__}:judge_that_hangs"
    ) as reward:
        assert reward(["\\boxed{a}", "\\boxed{b}"], ["a", "a"]).rewards == [1.0, 0.0]
    with pytest.raises(RuntimeError, match="failed to start"):
        MathVerifyReward(num_workers=1, judge="lens_megatron.no_such_module:judge")(
            ["\\boxed{1}"], ["1"]
        )


def test_in_process_timeout_in_main_thread():
    reward = MathVerifyReward(timeout_s=0.3, num_workers=0, judge=judge_that_hangs)
    assert threading.current_thread() is threading.main_thread()
    start = time.monotonic()
    result = reward(["\\boxed{hang}", "\\boxed{x}"], ["1", "x"])
    assert time.monotonic() - start < 2.0
    assert result.statuses == ["timeout", "ok"] and result.counters.timeouts == 1


def test_closed_reward_refuses_work():
    reward = MathVerifyReward(num_workers=1, judge=judge_that_hangs)
    reward.close()
    reward.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        reward(["\\boxed{1}"], ["1"])
    with pytest.raises(ValueError):
        MathVerifyReward(num_workers=0)(["a"], ["1", "2"])
