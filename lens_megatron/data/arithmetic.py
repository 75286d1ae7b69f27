"""A built-in verifiable task for the tiny CPU default: integer arithmetic with ``\\boxed{}``
answers, generated deterministically from a seed (no downloads).

Problems are one- and two-digit sums and one-digit products, at four levels:

- level 1: one digit + one digit (``3+5``), 25 % of draws, 100 distinct problems;
- level 2: two digits + one digit, either order (``47+8``, ``8+47``), 35 %, 1 800;
- level 3: two digits + two digits (``47+38``), 30 %, 8 100;
- level 4: a one-digit product (``7*8``), 10 %, 64.

Problems are distinct, so levels 1 and 4 run out early and most of the set is levels 2 and 3.
The mix is sized to the tiny default (2 layers, hidden 128): a short warm start learns it
partially, so the policy solves some groups, fails whole groups on others (negative groups)
and is mixed on most — the regime LENS is about — and RL has room to improve on held-out
problems. (Three-term sums and two-digit products, in an earlier mix, were beyond this model
in a few minutes of CPU: held-out pass@1 stayed near 0.1 and RL could not move it.)
The prompt is the bare problem followed by ``=``; the expected response is
``\\boxed{<answer>}`` then EOS.
"""
from __future__ import annotations

import random

from .loaders import PromptRecord

PROMPT_TEMPLATE = "{problem}="


def _problem(rng: random.Random) -> tuple[str, int, int]:
    """(problem text, answer, difficulty level 1..4)."""
    kind = rng.random()
    if kind < 0.25:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a}+{b}", a + b, 1
    if kind < 0.60:
        a, b = rng.randint(10, 99), rng.randint(0, 9)
        if rng.random() < 0.5:
            a, b = b, a
        return f"{a}+{b}", a + b, 2
    if kind < 0.90:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a}+{b}", a + b, 3
    a, b = rng.randint(2, 9), rng.randint(2, 9)
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
