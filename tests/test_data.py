"""Prompt-set loading, prompt formatting and resumable deterministic sampling."""

import json
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lens_megatron.data import (
    DEFAULT_PROMPT_TEMPLATE,
    EmptyPromptSetError,
    PromptFormatter,
    PromptRecord,
    PromptSampler,
    load_prompt_records,
)
from lens_megatron.eval import MATH500_PATH_ENV, load_math500
from shared_data import REPO_ROOT, require_shared_data


def _write_jsonl(path, lines):
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    return path


def test_jsonl_rows_and_metadata(tmp_path):
    path = _write_jsonl(
        tmp_path / "math.jsonl",
        [
            {
                "problem": "1+1?",
                "answer": "2",
                "level": "Level 3",
                "subject": "Algebra",
                "extra": 1,
            },
            {"problem": "2+2?", "answer": 4},  # numeric answers become strings
        ],
    )
    first, second = load_prompt_records(path)
    assert (first.problem, first.answer, first.level, first.row) == ("1+1?", "2", 3, 1)
    assert first.metadata == {"level": "Level 3", "subject": "Algebra"}
    assert (second.answer, second.level, second.metadata, second.row) == ("4", None, {}, 2)


def test_parquet_with_nested_dapo_style_keys(tmp_path):
    table = pa.Table.from_pylist(
        [
            {
                "prompt": [{"role": "user", "content": f"Solve {i}"}],
                "reward_model": {"ground_truth": str(i), "style": "rule"},
                "extra_info": {"index": i},
            }
            for i in range(5)
        ]
    )
    pq.write_table(table, tmp_path / "dapo.parquet")
    records = load_prompt_records(
        tmp_path / "dapo.parquet",
        problem_key="prompt.0.content",
        answer_key="reward_model.ground_truth",
        metadata_keys=("extra_info.index",),
    )
    assert [r.problem for r in records] == [f"Solve {i}" for i in range(5)]
    assert [r.answer for r in records] == [str(i) for i in range(5)]
    assert records[3].metadata == {"extra_info.index": 3}


def test_malformed_rows_are_skipped_counted_and_logged(tmp_path, caplog):
    path = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"problem": "good 1", "answer": "1"},  # row 1
            "{not json",  # row 2
            {"problem": "no answer"},  # row 3
            {"problem": "", "answer": "1"},  # row 4: empty problem
            {"problem": ["a list"], "answer": "1"},  # row 5: wrong type
            "[1, 2]",  # row 6: not an object
            {"problem": "bool answer", "answer": True},  # row 7: wrong type
            {"problem": "null answer", "answer": None},  # row 8
            {"problem": "good 2", "answer": "2"},  # row 9
        ],
    )
    with caplog.at_level(logging.WARNING, logger="lens_megatron.data.loaders"):
        records = load_prompt_records(path)
    assert [r.problem for r in records] == ["good 1", "good 2"]
    assert [r.row for r in records] == [1, 9]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "skipped 7 malformed rows" in message
    for row in (2, 3, 4, 5, 6):  # the first five are named
        assert f"row {row}:" in message
    assert "row 7:" not in message


def test_zero_valid_rows_is_a_clear_error(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"question": "x", "answer": "1"}])
    with pytest.raises(EmptyPromptSetError, match="no valid rows.*2 malformed"):
        load_prompt_records(path)
    with pytest.raises(ValueError, match="unsupported"):
        load_prompt_records(_write_jsonl(tmp_path / "prompts.csv", ["a,b"]))
    with pytest.raises(FileNotFoundError):
        load_prompt_records(tmp_path / "absent.jsonl")


def test_json_array_file_and_max_records(tmp_path):
    rows = [{"problem": f"p{i}", "answer": str(i)} for i in range(10)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    records = load_prompt_records(tmp_path / "rows.json", max_records=3)
    assert [r.problem for r in records] == ["p0", "p1", "p2"]


def test_math500_loader(monkeypatch):
    math500 = require_shared_data("math500.jsonl")
    records = load_math500(math500)
    assert len(records) == 500
    assert sum(r.level in (4, 5) for r in records) == 262
    assert all(r.metadata["subject"] and r.metadata["unique_id"] for r in records)
    monkeypatch.setenv(MATH500_PATH_ENV, math500)
    assert load_math500()[0] == records[0]
    monkeypatch.delenv(MATH500_PATH_ENV)
    with pytest.raises(FileNotFoundError, match=MATH500_PATH_ENV):
        load_math500()


def test_missing_shared_data_fails_naming_the_path():
    with pytest.raises(pytest.fail.Exception, match="shared/data/absent.jsonl"):
        require_shared_data("absent.jsonl")


def test_no_test_hard_codes_the_shared_data_location():
    """Tests find the data relative to the repository (``../shared/data``), never at an
    absolute path of one machine."""
    tests = os.path.join(REPO_ROOT, "tests")
    offenders = []
    for name in sorted(os.listdir(tests)):
        if name.endswith(".py") and name != os.path.basename(__file__):
            with open(os.path.join(tests, name), encoding="utf-8") as f:
                if "/work/shared" in f.read():
                    offenders.append(name)
    assert not offenders, f"absolute shared-data paths in {offenders}; use shared_data.py"


def test_plain_prompt_template():
    formatter = PromptFormatter()
    prompt = formatter(PromptRecord("What is $1+1$?", "2"))
    assert prompt == DEFAULT_PROMPT_TEMPLATE.format(problem="What is $1+1$?")
    assert prompt.startswith("What is $1+1$?") and prompt.endswith("within \\boxed{}.")
    custom = PromptFormatter("Q: {problem}\nA: answer in \\boxed{{}}")
    assert custom.format_batch(["x", "y"]) == [
        "Q: x\nA: answer in \\boxed{}",
        "Q: y\nA: answer in \\boxed{}",
    ]
    with pytest.raises(ValueError, match="problem"):
        PromptFormatter("no field here")
    with pytest.raises(ValueError, match="double literal braces"):
        PromptFormatter("{problem} \\boxed{}")


def _tiny_chat_tokenizer():
    """A local word-level HF tokenizer with a ChatML-like template (no downloads)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
        unk_token="[UNK]",
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tokenizer


def test_chat_template_prompt():
    formatter = PromptFormatter(
        "{problem} Box it.", tokenizer=_tiny_chat_tokenizer(), system_prompt="Be terse."
    )
    assert formatter("1+1?") == "<|system|>Be terse.<|end|><|user|>1+1? Box it.<|end|><|assistant|>"
    no_system = PromptFormatter("{problem}", tokenizer=_tiny_chat_tokenizer())
    assert no_system("x") == "<|user|>x<|end|><|assistant|>"
    with pytest.raises(TypeError):
        PromptFormatter(tokenizer=object())


def test_shuffling_is_deterministic_and_reshuffles_each_epoch():
    records = list(range(10))

    def two_epochs(seed):
        sampler = PromptSampler(records, batch_size=5, seed=seed)
        return [next(sampler) for _ in range(4)]

    batches = two_epochs(seed=3)
    assert batches == two_epochs(seed=3)
    assert batches != two_epochs(seed=4)
    epoch0, epoch1 = batches[0] + batches[1], batches[2] + batches[3]
    assert sorted(epoch0) == sorted(epoch1) == records  # each epoch is a permutation
    assert epoch0 != epoch1


def test_drop_last_and_partial_tail_and_max_epochs():
    dropping = PromptSampler(list(range(7)), batch_size=3, seed=0, shuffle=False)
    assert [next(dropping) for _ in range(3)] == [[0, 1, 2], [3, 4, 5], [0, 1, 2]]
    keeping = PromptSampler(
        list(range(7)), batch_size=3, shuffle=False, drop_last=False, max_epochs=1
    )
    assert list(keeping) == [[0, 1, 2], [3, 4, 5], [6]]
    assert keeping.batches_per_epoch() == 3
    with pytest.raises(ValueError):
        PromptSampler(list(range(2)), batch_size=3)


@pytest.mark.parametrize("consumed", [0, 1, 3, 4, 7])
def test_resume_yields_identical_next_batches(consumed):
    records = [f"p{i}" for i in range(11)]
    original = PromptSampler(records, batch_size=4, seed=17)
    for _ in range(consumed):
        next(original)
    state = json.loads(json.dumps(original.state_dict()))  # survives a checkpoint round trip
    resumed = PromptSampler(records, batch_size=4, seed=999)  # saved seed wins
    resumed.load_state_dict(state)
    assert [next(resumed) for _ in range(6)] == [next(original) for _ in range(6)]


def test_resume_rejects_a_different_dataset():
    state = PromptSampler(list(range(8)), batch_size=2).state_dict()
    with pytest.raises(ValueError, match="8 records"):
        PromptSampler(list(range(9)), batch_size=2).load_state_dict(state)
