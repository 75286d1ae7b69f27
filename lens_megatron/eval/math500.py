"""MATH-500 (the PRM800K test split, 500 problems, Levels 1–5) as ``PromptRecord``s.

The file is not shipped with the package: pass its path, or set ``LENS_MATH500_PATH``.
Expected format: JSON Lines with ``problem``, ``answer``, ``level`` (1–5), ``subject``,
``unique_id`` (PRM800K's ``prm800k/math_splits/test.jsonl``).
"""

from __future__ import annotations

import os
from pathlib import Path

from lens_megatron.data.loaders import PromptRecord, load_prompt_records

MATH500_PATH_ENV = "LENS_MATH500_PATH"


def resolve_math500_path(path: str | os.PathLike | None = None) -> Path:
    """``path`` if given, else ``$LENS_MATH500_PATH``; a clear error if neither is set."""
    if path is None:
        path = os.environ.get(MATH500_PATH_ENV)
    if not path:
        raise FileNotFoundError(
            f"MATH-500 location unknown: pass a path or set {MATH500_PATH_ENV} to the "
            "PRM800K test.jsonl (problem/answer/level/subject/unique_id per line)"
        )
    return Path(path).expanduser()


def load_math500(path: str | os.PathLike | None = None) -> list[PromptRecord]:
    """Load MATH-500 (or any file in its format) via the prompt-set loader.

    Every record carries ``level`` (int) and ``metadata`` with ``subject``/``unique_id``.
    """
    return load_prompt_records(
        resolve_math500_path(path),
        problem_key="problem",
        answer_key="answer",
        metadata_keys=("level", "subject", "unique_id"),
    )
