"""A built-in verifiable task for the tiny CPU default: integer arithmetic with ``\\boxed{}``
answers, generated deterministically from a seed (no downloads).

Problems mix easy and hard items (one- and two-digit sums, three-term sums, products) so a
briefly warm-started tiny model solves some groups, fails whole groups on others, and is
mixed on the rest — the regime LENS is about. The prompt is the bare problem followed by
``=``; the expected response is ``\\boxed{<answer>}`` then EOS.
"""
from __future__ import annotations

import random

from .loaders import PromptRecord

PROMPT_TEMPLATE = "{problem}="


def _problem(rng: random.Random) -> tuple[str, int, int]:
    """(problem text, answer, difficulty level 1..4)."""
    kind = rng.random()
    if kind < 0.3:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a}+{b}", a + b, 1
    if kind < 0.6:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a}+{b}", a + b, 2
    if kind < 0.85:
        a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 30)
        return f"{a}+{b}+{c}", a + b + c, 3
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    return f"{a}*{b}", a * b, 4


def arithmetic_records(count: int, seed: int) -> list[PromptRecord]:
    """``count`` distinct problems (by text), deterministic in ``seed``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[PromptRecord] = []
    attempts = 0
    while len(records) < count:
        attempts += 1
        if attempts > 100 * count:
            raise ValueError(f"could not draw {count} distinct arithmetic problems")
        text, answer, level = _problem(rng)
        if text in seen:
            continue
        seen.add(text)
        records.append(PromptRecord(problem=text, answer=str(answer), level=level,
                                    row=len(records) + 1))
    return records


def split_train_eval(records: list[PromptRecord], eval_count: int, seed: int = 0):
    """A random held-out subset of ``eval_count`` problems (never trained on), drawn so it
    has the training distribution (the generator's late draws are skewed to hard items)."""
    order = list(range(len(records)))
    random.Random(seed + 1).shuffle(order)
    held = set(order[:eval_count])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [records[i] for i in sorted(held)]


def solution_text(record: PromptRecord) -> str:
    """The target response used for the supervised warm start."""
    return f"\\boxed{{{record.answer}}}"
