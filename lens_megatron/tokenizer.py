"""Tokenizers behind one small interface: the built-in character tokenizer (the tiny CPU
default, no downloads) and Hugging Face tokenizers loaded from a local directory."""
from __future__ import annotations

import string
from typing import Optional, Protocol


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class CharTokenizer:
    """Printable ASCII, one token per character, plus <pad>=0, <bos>=1, <eos>=2.

    Unknown characters raise (silently dropping them would change what is trained on).
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self) -> None:
        chars = string.printable  # digits, letters, punctuation, whitespace
        self._id_of = {c: i + len(self.SPECIALS) for i, c in enumerate(chars)}
        self._char_of = {i: c for c, i in self._id_of.items()}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = len(self.SPECIALS) + len(chars)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        try:
            ids = [self._id_of[c] for c in text]
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} is not in the character vocabulary") from exc
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self._char_of.get(int(i), "") for i in ids if int(i) >= len(self.SPECIALS))


class HFTokenizer:
    """A ``transformers`` tokenizer from a local directory (never downloads)."""

    def __init__(self, path: str, chat_template: bool = False) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer at {path!r} defines no EOS token")
        self.eos_id = int(self.hf.eos_token_id)
        self.pad_id = int(self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id)
        self.vocab_size = len(self.hf)
        self.chat_template = chat_template

    def encode(self, text: str) -> list[int]:
        return list(self.hf(text, add_special_tokens=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


def build_tokenizer(kind: str, path: Optional[str] = None):
    if kind == "char":
        return CharTokenizer()
    if kind == "hf":
        if not path:
            raise ValueError("model.tokenizer.path is required for an HF tokenizer")
        return HFTokenizer(path)
    raise ValueError(f"model.tokenizer.type must be char or hf, got {kind!r}")
