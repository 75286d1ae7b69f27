"""tools/build_train_mix.py: the App. D.1 training mix from small synthetic MATH / DAPO files."""
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lens_megatron.data.loaders import load_prompt_records
from tool_modules import TOOLS, load_tool

TOOL = os.path.join(TOOLS, "build_train_mix.py")
mix = load_tool("build_train_mix")


def _math_file(tmp_path, n=10, with_answer=True):
    path = tmp_path / "math_train.jsonl"
    rows = []
    for i in range(n):
        row = {"problem": f"What is {i} + {i}?", "level": f"Level {i % 5 + 1}", "type": "Algebra",
               "solution": f"It is $\\boxed{{{2 * i}}}$."}
        if with_answer:
            row["answer"] = str(2 * i)
        rows.append(json.dumps(row))
    rows.insert(3, "{not json")  # a malformed row: skipped and counted
    path.write_text("\n".join(rows) + "\n")
    return path


def _dapo_file(tmp_path, n=20, repeats=3):
    """DAPO-Math-17k's layout: the problem wrapped in its answer-format instruction, each
    problem repeated ``repeats`` times (the public parquet repeats its problems)."""
    rows = []
    for i in range(n):
        content = f"{mix.DAPO_PREFIX}\n\nFind x if x - {i} = {i}.\n\n{mix.DAPO_SUFFIX}"
        for _ in range(repeats):
            rows.append({"data_source": "math_dapo", "prompt": [{"role": "user", "content": content}],
                         "ability": "MATH", "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
                         "extra_info": {"index": f"id-{i}"}})
    path = tmp_path / "dapo.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _run(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True)


def test_mix_counts_schema_and_loader(tmp_path):
    out = tmp_path / "out" / "mix.jsonl"
    proc = _run("--math", _math_file(tmp_path), "--dapo", _dapo_file(tmp_path), "--out", out,
                "--math-count", 10, "--dapo-count", 15, "--seed", 3)
    assert proc.returncode == 0, proc.stderr
    assert "1 unusable" in proc.stderr and "40 duplicates dropped" in proc.stderr
    assert "instruction removed from 60" in proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 25
    assert all(set(r) == {"problem", "answer", "source", "level", "subject", "unique_id"} for r in rows)
    math_rows = [r for r in rows if r["source"] == "math"]
    dapo_rows = [r for r in rows if r["source"] == "dapo"]
    assert len(math_rows) == 10 and len(dapo_rows) == 15
    assert len({r["problem"] for r in rows}) == 25  # deduplicated
    assert sorted(r["level"] for r in math_rows) == sorted(i % 5 + 1 for i in range(10))
    assert all(r["subject"] == "Algebra" for r in math_rows)
    for r in dapo_rows:  # the DAPO instruction is gone, the problem and its answer are kept
        i = int(r["problem"].split("= ")[1].rstrip("."))
        assert r["problem"] == f"Find x if x - {i} = {i}." and r["answer"] == str(2 * i)
        assert r["unique_id"] == f"dapo/id-{i}"
    # the trainer's loader reads it with its defaults, levels included
    records = load_prompt_records(out)
    assert len(records) == 25 and sum(r.level is not None for r in records) == 10


def test_deterministic_under_seed(tmp_path):
    math, dapo = _math_file(tmp_path), _dapo_file(tmp_path)
    texts = []
    for seed in (1, 1, 2):
        out = tmp_path / f"mix{len(texts)}.jsonl"
        assert _run("--math", math, "--dapo", dapo, "--out", out, "--math-count", 5,
                    "--dapo-count", 7, "--seed", seed).returncode == 0
        texts.append(out.read_text())
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_subset_sampling_function():
    rows = [{"problem": f"p{i}"} for i in range(10)]
    source = mix.Source("dapo", "x", rows)
    import random

    picked = mix.sample(source, 4, random.Random(0), "--dapo-count", True)
    expected = [rows[i] for i in sorted(random.Random(0).sample(range(10), 4))]
    assert picked == expected
    assert mix.sample(source, 10, random.Random(0), "--dapo-count", True) == rows


def test_errors_name_the_file_and_the_fix(tmp_path):
    math, dapo = _math_file(tmp_path), _dapo_file(tmp_path, n=20, repeats=3)
    proc = _run("--math", tmp_path / "absent.jsonl", "--dapo", dapo, "--out", tmp_path / "o.jsonl")
    assert proc.returncode == 2 and f"input file not found: {tmp_path / 'absent.jsonl'}" in proc.stderr
    # 20 unique DAPO problems (60 rows): asking for 30 fails, says how many and what to pass
    proc = _run("--math", math, "--dapo", dapo, "--out", tmp_path / "o.jsonl", "--math-count", 10,
                "--dapo-count", 30)
    assert proc.returncode == 2
    assert "has 20 unique problems" in proc.stderr and "--dapo-count 20" in proc.stderr
    assert "--dedupe none" in proc.stderr and not (tmp_path / "o.jsonl").exists()
    # ... which samples rows with their repeats
    proc = _run("--math", math, "--dapo", dapo, "--out", tmp_path / "o.jsonl", "--math-count", 10,
                "--dapo-count", 30, "--dedupe", "none")
    assert proc.returncode == 0, proc.stderr
    proc = _run("--math", math, "--dapo", dapo, "--out", tmp_path / "o.jsonl", "--math-count", 11)
    assert proc.returncode == 2 and "fewer than --math-count 11" in proc.stderr
    # a wrong field name: no usable row, the message points at the key options
    proc = _run("--math", math, "--dapo", dapo, "--out", tmp_path / "o.jsonl", "--math-answer-key", "final")
    assert proc.returncode == 2 and "'final'" in proc.stderr and "--*-answer-key" in proc.stderr


def test_math_answer_from_solution(tmp_path):
    math = _math_file(tmp_path, n=6, with_answer=False)
    out = tmp_path / "mix.jsonl"
    proc = _run("--math", math, "--dapo", _dapo_file(tmp_path, n=4, repeats=1), "--out", out,
                "--math-count", 6, "--dapo-count", 4)
    assert proc.returncode == 2 and "'answer'" in proc.stderr  # no answer column, no silent guess
    proc = _run("--math", math, "--dapo", _dapo_file(tmp_path, n=4, repeats=1), "--out", out,
                "--math-count", 6, "--dapo-count", 4, "--math-answer-from-solution")
    assert proc.returncode == 0, proc.stderr
    answers = {r["problem"]: r["answer"] for r in map(json.loads, out.read_text().splitlines())}
    assert all(answers[f"What is {i} + {i}?"] == str(2 * i) for i in range(6))


def test_strip_dapo_instructions_only_removes_the_wrapper():
    assert mix.strip_dapo_instructions(f"{mix.DAPO_PREFIX}\n\nSolve 1+1.\n\n{mix.DAPO_SUFFIX}") == ("Solve 1+1.", True)
    assert mix.strip_dapo_instructions("  Solve 1+1.  ") == ("Solve 1+1.", False)


def test_keep_dapo_instructions(tmp_path):
    out = tmp_path / "mix.jsonl"
    proc = _run("--math", _math_file(tmp_path, n=2), "--dapo", _dapo_file(tmp_path, n=3, repeats=1),
                "--out", out, "--math-count", 2, "--dapo-count", 3, "--keep-dapo-instructions")
    assert proc.returncode == 0, proc.stderr
    dapo = [r for r in map(json.loads, out.read_text().splitlines()) if r["source"] == "dapo"]
    assert all(r["problem"].startswith(mix.DAPO_PREFIX) for r in dapo)


@pytest.mark.parametrize("count", [-1])
def test_negative_counts_are_refused(tmp_path, count):
    proc = _run("--math", _math_file(tmp_path), "--dapo", _dapo_file(tmp_path), "--out", tmp_path / "o.jsonl",
                "--dapo-count", count)
    assert proc.returncode == 2 and "--dapo-count must be >= 0" in proc.stderr
