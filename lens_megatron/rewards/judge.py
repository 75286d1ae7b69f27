"""Judges: decide whether an extracted answer equals the gold answer.

A judge is any picklable callable ``judge(predicted_answer: str, gold_answer: str) -> bool``
or the dotted path of one (``"package.module:function"`` or ``"package.module.function"``).
It may raise :class:`AnswerParseError` when the prediction cannot be read (counted as a
parse failure); any other exception is counted as a verifier error. Judges run inside the
verifier pool's worker processes, so they may block or loop forever: the pool's deadline
kills them.

The default judge is math-verify. Gold parsing configuration: a gold answer that already
carries its own delimiters (``\\boxed``, an unescaped ``$``) is parsed as is; a plain gold answer
(MATH's ``\\frac{14}{3}``, ``(3, \\frac{\\pi}{2})``, ``p - q``, ``\\text{Evelyn}``, DAPO's
``34``) is wrapped in ``$...$`` so math-verify's LaTeX extraction reads the whole string.
The prediction (the last box's content) is re-wrapped as ``\\boxed{...}`` and parsed with
boxed matches at top priority. Both use ``[LatexExtractionConfig, ExprExtractionConfig]``.
All 500 MATH-500 gold answers verify against themselves under this configuration.
"""

from __future__ import annotations

import functools
import importlib
import re
from collections.abc import Callable

Judge = Callable[[str, str], bool]
JudgeSpec = Judge | str

DEFAULT_JUDGE = "lens_megatron.rewards.judge:math_verify_judge"

# A ``$`` that is not the escaped dollar sign ``\$`` (as in MATH's ``\$18.90``).
_MATH_DELIMITER = re.compile(r"(?<!\\)\$")


class AnswerParseError(ValueError):
    """The predicted answer could not be parsed into anything comparable."""


@functools.lru_cache(maxsize=1)
def _extraction_config():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    return (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _gold_text(gold_answer: str) -> str:
    """Gold answer as math-verify input: wrapped in ``$...$`` unless already delimited."""
    gold_answer = gold_answer.strip()
    if "\\boxed" in gold_answer or _MATH_DELIMITER.search(gold_answer):
        return gold_answer
    return f"${gold_answer}$"


@functools.lru_cache(maxsize=4096)
def parse_gold_answer(gold_answer: str) -> tuple:
    """math-verify parse of a gold answer (cached: each gold is judged G times per step).

    Internal math-verify timeouts are off: the caller (worker deadline or in-process
    alarm) bounds the time. Raises :class:`ValueError` if the gold cannot be parsed.
    """
    from math_verify import parse

    parsed = parse(_gold_text(gold_answer), list(_extraction_config()), parsing_timeout=None)
    if not parsed:
        raise ValueError(f"math-verify could not parse the gold answer {gold_answer!r}")
    return tuple(parsed)


def math_verify_judge(predicted_answer: str, gold_answer: str) -> bool:
    """True when math-verify finds ``predicted_answer`` equivalent to ``gold_answer``."""
    from math_verify import parse, verify

    gold = list(parse_gold_answer(gold_answer))
    prediction = parse(
        "\\boxed{" + predicted_answer + "}", list(_extraction_config()), parsing_timeout=None
    )
    if not prediction:
        raise AnswerParseError(f"math-verify could not parse {predicted_answer[:200]!r}")
    return bool(verify(gold, prediction, timeout_seconds=None))


def resolve_judge(spec: JudgeSpec) -> Judge:
    """Turn a judge spec (callable or dotted path) into a callable."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"judge must be a callable or a dotted path string, got {spec!r}")
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
    else:
        module_name, _, attribute = spec.rpartition(".")
    if not module_name or not attribute:
        raise ValueError(f"judge path {spec!r} must look like 'package.module:function'")
    judge = getattr(importlib.import_module(module_name), attribute)
    if not callable(judge):
        raise TypeError(f"judge {spec!r} resolved to a non-callable {judge!r}")
    return judge


class _DisabledTimeoutWarningFilter:
    """Drops math-verify's "Timeout is disabled ..." warning and nothing else."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


def silence_math_verify_timeout_warnings() -> None:
    """math-verify warns once per process that its own timeouts are disabled; they are
    disabled on purpose here (the pool's deadline or the in-process alarm bounds time)."""
    import logging

    for name in ("math_verify.parser", "math_verify.grader"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DisabledTimeoutWarningFilter) for f in logger.filters):
            logger.addFilter(_DisabledTimeoutWarningFilter())
