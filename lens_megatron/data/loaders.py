"""Load prompt sets (problem + gold answer) from JSON Lines, JSON or Parquet files.

Field names are configurable and may be dotted paths into nested rows; a path component
that is an integer indexes a list. Examples:
- MATH / MATH-500: ``problem_key="problem"``, ``answer_key="answer"`` (the defaults);
- DAPO-Math-17k (Parquet): ``problem_key="prompt.0.content"``,
  ``answer_key="reward_model.ground_truth"``.

Malformed rows (invalid JSON, a missing/empty/mistyped problem or answer, a row that is
not an object) are skipped, never fatal: the count and the first few row numbers with
their reasons are logged at WARNING. Row numbers are 1-based (the line number for JSON
Lines). A file with no valid row raises :class:`EmptyPromptSetError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_METADATA_KEYS = ("level", "subject", "unique_id")
_MISSING = object()
_SKIP_LOG_LIMIT = 5


class EmptyPromptSetError(ValueError):
    """A prompt file contained no usable row."""


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """One problem of a prompt set: the text to solve, its gold answer, and metadata.

    ``level`` is an int (MATH's ``"Level 5"`` strings are normalised) or None.
    ``metadata`` holds the other configured keys present in the row (e.g. subject).
    ``row`` is the 1-based row number in the source file.
    """

    problem: str
    answer: str
    level: int | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    row: int = 0


@dataclasses.dataclass
class SkippedRows:
    """Bookkeeping of rows skipped while loading one file."""

    count: int = 0
    examples: list[tuple[int, str]] = dataclasses.field(default_factory=list)

    def add(self, row: int, reason: str) -> None:
        self.count += 1
        if len(self.examples) < _SKIP_LOG_LIMIT:
            self.examples.append((row, reason))


def lookup_dotted(row: Any, dotted_key: str) -> Any:
    """``row["a"]["b"][0]`` for ``"a.b.0"``; returns the ``_MISSING`` sentinel if absent."""
    value = row
    for part in dotted_key.split("."):
        if isinstance(value, dict):
            value = value.get(part, _MISSING)
        elif isinstance(value, (list, tuple)) and part.lstrip("-").isdigit():
            index = int(part)
            value = value[index] if -len(value) <= index < len(value) else _MISSING
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def parse_level(value: Any) -> int | None:
    """MATH difficulty as an int: ``5``, ``"5"`` and ``"Level 5"`` give 5; otherwise None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        digits = value.strip().removeprefix("Level").strip()
        return int(digits) if digits.isdigit() else None
    return None


def _answer_text(value: Any) -> str | None:
    """Gold answer as a non-empty string; numbers are accepted, other types are not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def row_to_record(
    row: Any,
    row_number: int,
    problem_key: str,
    answer_key: str,
    metadata_keys: Sequence[str],
) -> tuple[PromptRecord | None, str | None]:
    """Validate one decoded row; return ``(record, None)`` or ``(None, reason)``."""
    if not isinstance(row, dict):
        return None, f"row is a {type(row).__name__}, not an object"
    problem = lookup_dotted(row, problem_key)
    if problem is _MISSING:
        return None, f"missing {problem_key!r}"
    if not isinstance(problem, str) or not problem.strip():
        return None, f"{problem_key!r} is not a non-empty string"
    answer_value = lookup_dotted(row, answer_key)
    if answer_value is _MISSING:
        return None, f"missing {answer_key!r}"
    answer = _answer_text(answer_value)
    if answer is None:
        return None, f"{answer_key!r} is not a non-empty string or number"
    metadata = {}
    for key in metadata_keys:
        value = lookup_dotted(row, key)
        if value is not _MISSING and value is not None:
            metadata[key] = value
    level = parse_level(metadata.get("level"))
    return PromptRecord(problem, answer, level, metadata, row_number), None


def _json_lines_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Yield ``(line_number, decoded_row, error)``; blank lines are not rows."""
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line), None
            except json.JSONDecodeError as exc:
                yield line_number, None, f"invalid JSON ({exc.msg})"


def _json_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """A ``.json`` file: a JSON array of rows, or JSON Lines under a .json name."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.lstrip().startswith("["):
        yield from _json_lines_rows(path)
        return
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a valid JSON array ({exc})") from exc
    for index, row in enumerate(rows, start=1):
        yield index, row, None


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    row_number = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            row_number += 1
            yield row_number, row, None


def _rows_of(path: Path) -> Iterable[tuple[int, Any, str | None]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _json_lines_rows(path)
    if suffix == ".json":
        return _json_rows(path)
    if suffix in (".parquet", ".pq"):
        return _parquet_rows(path)
    raise ValueError(
        f"{path}: unsupported prompt file type {suffix!r} (use .jsonl, .json or .parquet)"
    )


def load_prompt_records(
    path: str | os.PathLike,
    problem_key: str = "problem",
    answer_key: str = "answer",
    metadata_keys: Sequence[str] = DEFAULT_METADATA_KEYS,
    max_records: int | None = None,
) -> list[PromptRecord]:
    """Read all valid rows of a prompt file (see the module docstring).

    ``max_records`` keeps only the first N valid rows (file order).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    records: list[PromptRecord] = []
    skipped = SkippedRows()
    for row_number, row, error in _rows_of(path):
        record, reason = (
            (None, error)
            if error
            else row_to_record(row, row_number, problem_key, answer_key, metadata_keys)
        )
        if record is None:
            skipped.add(row_number, reason or "invalid row")
            continue
        records.append(record)
        if max_records is not None and len(records) >= max_records:
            break
    if skipped.count:
        shown = "; ".join(f"row {row}: {reason}" for row, reason in skipped.examples)
        logger.warning("%s: skipped %d malformed rows (first: %s)", path, skipped.count, shown)
    if not records:
        raise EmptyPromptSetError(
            f"{path}: no valid rows with a {problem_key!r} string and a {answer_key!r} answer "
            f"({skipped.count} malformed rows skipped)"
        )
    return records
