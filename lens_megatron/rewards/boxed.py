"""Extract the final answer of a response: the content of its LAST ``\\boxed``/``\\fbox``.

Rules (what a rollout is judged on):
- The box that *starts* last decides. ``\\boxed{\\boxed{5}}`` therefore gives ``5`` and
  ``\\boxed{1} ... \\boxed{2}`` gives ``2``.
- Braced form ``\\boxed{...}`` (whitespace before ``{`` allowed): braces are balanced,
  escaped braces ``\\{``/``\\}`` do not count. An unclosed last box (a truncated
  response) is a parse failure; earlier boxes are *not* used as a fallback, so a
  response that was cut off mid-answer never scores from a draft answer.
- Brace-less form ``\\boxed 5``: the text after the space up to ``$`` or a newline,
  with a trailing period dropped.
- No box, or an empty one, gives ``None`` (a parse failure).
"""

from __future__ import annotations

import re

# ``\boxed`` / ``\fbox`` not followed by a letter (so ``\boxedfoo`` is no box).
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _balanced_group(text: str, open_index: int) -> str | None:
    """Content of the brace group opening at ``text[open_index] == '{'``; None if unclosed."""
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2  # an escaped character (``\{``, ``\}``, ``\\``) never opens or closes
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : index]
        index += 1
    return None


def _braceless_argument(text: str, start: int) -> str:
    """Argument of ``\\boxed 5``: up to ``$`` or end of line, trailing period dropped."""
    end = start
    while end < len(text) and text[end] not in "$\n":
        end += 1
    return text[start:end].strip().rstrip(".").strip()


def extract_last_boxed(response: str) -> str | None:
    """Return the stripped content of the last ``\\boxed``/``\\fbox`` in ``response``.

    Returns ``None`` when there is no box, the last box is unclosed, or it is empty.
    """
    matches = list(_BOX_COMMAND.finditer(response))
    if not matches:
        return None
    after = matches[-1].end()
    cursor = after
    while cursor < len(response) and response[cursor] in " \t":
        cursor += 1
    if cursor < len(response) and response[cursor] == "{":
        content = _balanced_group(response, cursor)
    elif cursor > after:
        content = _braceless_argument(response, cursor)
    else:
        content = None  # ``\boxed`` glued to something that is neither a brace nor a space
    if content is None:
        return None
    content = content.strip()
    return content or None
