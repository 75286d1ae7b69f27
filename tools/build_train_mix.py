#!/usr/bin/env python
"""Build the paper's training set (App. D.1): the MATH training split (7,500 problems) plus a
random subset of 17,500 DAPO-Math-17k problems, from local files (nothing is downloaded).

    python tools/build_train_mix.py --math /data/math_train.jsonl \\
        --dapo /data/dapo-math-17k.parquet --out data/lens_train_mix.jsonl [--seed 0]

Inputs are JSON Lines, JSON or Parquet (read by ``lens_megatron.data.loaders``; field names are
dotted paths). MATH: ``problem`` and ``answer`` by default; copies of Hendrycks' MATH that have
no answer column take the last ``\\boxed{}`` of ``solution`` with ``--math-answer-from-solution``.
``level`` ("Level 5" -> 5) and ``subject`` (or Hendrycks' ``type``) are kept. DAPO-Math-17k:
the problem is ``prompt.0.content`` and the answer ``reward_model.ground_truth``; the problem
text is wrapped in DAPO's own answer-format instruction ("Solve the following math problem
step by step. The last line ... Answer: $Answer ..." / "Remember to put your answer on its own
line after "Answer:"."), which contradicts the trainer's ``\\boxed{}`` prompt template and
reward, so it is removed (``--keep-dapo-instructions`` keeps it); the count is reported.

Duplicates: public copies of DAPO-Math-17k repeat problems (the deduplicated derivatives hold
~17.4k-17.9k unique problems), so by default problems are deduplicated on their whitespace-
normalised text (MATH first; a DAPO problem equal to a kept one is dropped) before sampling,
and asking for more unique problems than exist is an error that says how many there are
(``--dedupe none`` samples rows as they are). Rows a loader cannot use are skipped and counted.

Deterministic under ``--seed``: the subsets are ``random.Random(seed).sample``s of the kept rows
in file order, and the written file is the union shuffled with the same generator. Output: one
JSON object per line with ``problem``, ``answer``, ``source`` (math | dapo), ``level`` (int or
null), ``subject`` (or null) and ``unique_id`` — the trainer's defaults (``data.problem_key:
problem``, ``data.answer_key: answer``) read it, and ``level`` feeds the Levels 4-5 metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # lens_megatron

DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response "
               "should be of the form Answer: $Answer (without quotes) where $Answer is the "
               "answer to the problem.")
DAPO_SUFFIX = 'Remember to put your answer on its own line after "Answer:".'
METADATA = ("level", "subject", "type", "unique_id", "extra_info.index")


class MixError(ValueError):
    """An input cannot give the requested mix; the message says what to change."""


@dataclass
class Source:
    """The usable rows of one input file, already in the output schema."""

    name: str
    path: str
    rows: list[dict]
    skipped: int = 0  # rows the loader or the answer extraction could not use
    duplicates: int = 0  # rows dropped by deduplication
    stripped: int = 0  # DAPO problems whose answer-format instruction was removed


def strip_dapo_instructions(problem: str) -> tuple[str, bool]:
    """``problem`` without DAPO's answer-format prefix and suffix (each removed when present)."""
    text, changed = problem.strip(), False
    if text.startswith(DAPO_PREFIX):
        text, changed = text[len(DAPO_PREFIX):].lstrip(), True
    if text.endswith(DAPO_SUFFIX):
        text, changed = text[: -len(DAPO_SUFFIX)].rstrip(), True
    return text, changed


def _records(path: str, problem_key: str, answer_key: str):
    from lens_megatron.data.loaders import EmptyPromptSetError, load_prompt_records

    if not os.path.isfile(path):
        raise MixError(f"input file not found: {path}")
    try:
        return load_prompt_records(path, problem_key, answer_key, metadata_keys=METADATA)
    except EmptyPromptSetError as exc:
        raise MixError(f"{exc}; set the field names with --*-problem-key / --*-answer-key") from exc


def _count_rows(path: str) -> int:
    """Rows in the file (non-blank lines for JSON Lines), for the skipped count."""
    if path.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if path.endswith(".json") and text.lstrip().startswith("["):
        return len(json.loads(text))
    return sum(1 for line in text.splitlines() if line.strip())


def load_math(path: str, problem_key: str = "problem", answer_key: str = "answer",
              answer_from_solution: bool = False) -> Source:
    from lens_megatron.rewards import extract_last_boxed

    key = "solution" if answer_from_solution else answer_key
    rows, unusable = [], 0
    for rec in _records(path, problem_key, key):
        answer = extract_last_boxed(rec.answer) if answer_from_solution else rec.answer
        if not answer:
            unusable += 1
            continue
        subject = rec.metadata.get("subject", rec.metadata.get("type"))
        rows.append({"problem": rec.problem.strip(), "answer": answer, "source": "math",
                     "level": rec.level, "subject": subject,
                     "unique_id": str(rec.metadata.get("unique_id", f"math/{rec.row}"))})
    skipped = _count_rows(path) - len(rows)
    return Source("math", path, rows, skipped=skipped)


def load_dapo(path: str, problem_key: str = "prompt.0.content",
              answer_key: str = "reward_model.ground_truth", keep_instructions: bool = False) -> Source:
    rows, stripped = [], 0
    for rec in _records(path, problem_key, answer_key):
        problem, changed = (rec.problem.strip(), False) if keep_instructions else strip_dapo_instructions(rec.problem)
        if not problem:
            continue
        stripped += changed
        index = rec.metadata.get("extra_info.index", rec.row)
        rows.append({"problem": problem, "answer": rec.answer, "source": "dapo", "level": None,
                     "subject": None, "unique_id": f"dapo/{index}"})
    return Source("dapo", path, rows, skipped=_count_rows(path) - len(rows), stripped=stripped)


def _normalised(problem: str) -> str:
    return " ".join(problem.split())


def dedupe(sources: Sequence[Source]) -> None:
    """Drop rows whose whitespace-normalised problem appeared earlier (in ``sources`` order)."""
    seen: set[str] = set()
    for source in sources:
        kept = []
        for row in source.rows:
            key = _normalised(row["problem"])
            if key in seen:
                source.duplicates += 1
                continue
            seen.add(key)
            kept.append(row)
        source.rows = kept


def sample(source: Source, count: int, rng: random.Random, option: str, deduped: bool) -> list[dict]:
    """``count`` rows of ``source`` drawn without replacement (all of them, in order, if equal)."""
    available = len(source.rows)
    if count > available:
        what = "unique problems" if deduped else "usable rows"
        hint = (f"; pass {option} {available}" + (", or --dedupe none to sample rows with their repeats"
                                                  if deduped and source.duplicates else ""))
        raise MixError(f"{source.path} has {available} {what} ({source.skipped} rows unusable, "
                       f"{source.duplicates} duplicates dropped), fewer than {option} {count}{hint}")
    if count == available:
        return list(source.rows)
    return [source.rows[i] for i in sorted(rng.sample(range(available), count))]


def build_mix(math: Source, dapo: Source, math_count: int, dapo_count: int, seed: int,
              deduplicate: bool = True) -> list[dict]:
    """The shuffled union of ``math_count`` MATH and ``dapo_count`` DAPO rows (deterministic)."""
    for option, count in (("--math-count", math_count), ("--dapo-count", dapo_count)):
        if count < 0:
            raise MixError(f"{option} must be >= 0, got {count}")
    if deduplicate:
        dedupe([math, dapo])
    rng = random.Random(seed)
    rows = sample(math, math_count, rng, "--math-count", deduplicate)
    rows += sample(dapo, dapo_count, rng, "--dapo-count", deduplicate)
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: Sequence[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--math", required=True, help="MATH training split (.jsonl/.json/.parquet)")
    p.add_argument("--dapo", required=True, help="DAPO-Math-17k (.parquet/.jsonl/.json)")
    p.add_argument("--out", default="data/lens_train_mix.jsonl", help="output JSON Lines file")
    p.add_argument("--math-count", type=int, default=7500, help="MATH problems (paper: all 7,500)")
    p.add_argument("--dapo-count", type=int, default=17500, help="DAPO problems (paper: 17,500)")
    p.add_argument("--seed", type=int, default=0, help="subset and order seed")
    p.add_argument("--math-problem-key", default="problem")
    p.add_argument("--math-answer-key", default="answer")
    p.add_argument("--math-answer-from-solution", action="store_true",
                   help="take MATH's answer from the last \\boxed{} of `solution`")
    p.add_argument("--dapo-problem-key", default="prompt.0.content")
    p.add_argument("--dapo-answer-key", default="reward_model.ground_truth")
    p.add_argument("--keep-dapo-instructions", action="store_true",
                   help="keep DAPO's 'Answer: $Answer' format instruction in the problem text")
    p.add_argument("--dedupe", choices=("problem", "none"), default="problem",
                   help="drop repeated problems before sampling (default) or not")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        math = load_math(args.math, args.math_problem_key, args.math_answer_key,
                         args.math_answer_from_solution)
        dapo = load_dapo(args.dapo, args.dapo_problem_key, args.dapo_answer_key,
                         args.keep_dapo_instructions)
        rows = build_mix(math, dapo, args.math_count, args.dapo_count, args.seed,
                         deduplicate=args.dedupe == "problem")
    except MixError as exc:
        print(f"build_train_mix: {exc}", file=sys.stderr)
        return 2
    write_jsonl(rows, args.out)
    for s in (math, dapo):
        print(f"{s.name}: {s.path}: {len(s.rows)} kept, {s.skipped} unusable, {s.duplicates} "
              f"duplicates dropped" + (f", instruction removed from {s.stripped}" if s.name == "dapo" else ""),
              file=sys.stderr)
    print(f"wrote {len(rows)} rows ({args.math_count} MATH + {args.dapo_count} DAPO, seed {args.seed}) "
          f"to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
