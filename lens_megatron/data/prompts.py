"""Turn a problem into the text the policy is prompted with.

Two modes:
- plain: ``template.format(problem=...)``; the default asks for step-by-step reasoning
  and a final ``\\boxed{}`` answer (what the reward extracts). Literal braces in a
  custom template must be doubled (``\\\\boxed{{}}``), as always with ``str.format``.
- chat: the formatted user message (plus an optional system message) rendered by a
  Hugging Face tokenizer's ``apply_chat_template(..., add_generation_prompt=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lens_megatron.data.loaders import PromptRecord

DEFAULT_PROMPT_TEMPLATE = (
    "{problem}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)


def validate_template(template: str) -> None:
    """Raise ``ValueError`` unless ``template`` formats with only a ``{problem}`` field."""
    if "{problem}" not in template:
        raise ValueError(f"prompt template must contain '{{problem}}': {template!r}")
    try:
        template.format(problem="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"prompt template {template!r} does not format with only {{problem}} "
            f"({type(exc).__name__}: {exc}); double literal braces, e.g. \\\\boxed{{{{}}}}"
        ) from exc


class PromptFormatter:
    """Formats problems as plain text or through a tokenizer's chat template.

    Args:
        template: ``str.format`` template with a ``{problem}`` field (the user message
            in chat mode).
        tokenizer: an object with ``apply_chat_template`` (e.g. a HF tokenizer); when
            given, chat mode is used.
        system_prompt: optional system message (chat mode only).
    """

    def __init__(
        self,
        template: str = DEFAULT_PROMPT_TEMPLATE,
        tokenizer: Any | None = None,
        system_prompt: str | None = None,
    ):
        validate_template(template)
        if tokenizer is not None and not hasattr(tokenizer, "apply_chat_template"):
            raise TypeError(f"{type(tokenizer).__name__} has no apply_chat_template")
        if system_prompt is not None and tokenizer is None:
            raise ValueError("system_prompt needs a chat-template tokenizer")
        self.template = template
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt

    def messages(self, problem: str) -> list[dict[str, str]]:
        """Chat messages for ``problem`` (system message first when configured)."""
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": self.template.format(problem=problem)})
        return messages

    def __call__(self, problem: str | PromptRecord) -> str:
        """The prompt text for one problem (or record)."""
        if isinstance(problem, PromptRecord):
            problem = problem.problem
        if self.tokenizer is None:
            return self.template.format(problem=problem)
        rendered = self.tokenizer.apply_chat_template(
            self.messages(problem), tokenize=False, add_generation_prompt=True
        )
        if not isinstance(rendered, str):
            raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
        return rendered

    def format_batch(self, problems: Sequence[str | PromptRecord]) -> list[str]:
        """Prompt texts for a batch of problems (or records)."""
        return [self(problem) for problem in problems]
