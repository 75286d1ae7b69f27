"""Where a run's prompts come from: the configured prompt set (or the built-in arithmetic
task), formatted and tokenized, sampled deterministically and resumably."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .arithmetic import PROMPT_TEMPLATE as ARITHMETIC_TEMPLATE
from .arithmetic import arithmetic_records, split_train_eval
from .loaders import PromptRecord, load_prompt_records
from .prompts import PromptFormatter
from .sampler import PromptSampler

logger = logging.getLogger(__name__)

ARITHMETIC_PROBLEMS = 4000
ARITHMETIC_HELD_OUT = 200


@dataclass
class TokenizedPrompt:
    record: PromptRecord
    token_ids: list[int]


def _records(data_cfg) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """(train, eval) records for the configured task."""
    if data_cfg.task == "arithmetic":
        records = arithmetic_records(ARITHMETIC_PROBLEMS + ARITHMETIC_HELD_OUT, data_cfg.shuffle_seed)
        return split_train_eval(records, ARITHMETIC_HELD_OUT, data_cfg.shuffle_seed)
    train = load_prompt_records(data_cfg.train_path, problem_key=data_cfg.problem_key,
                                answer_key=data_cfg.answer_key, max_records=data_cfg.max_samples)
    evaluation = []
    if data_cfg.eval_path:
        evaluation = load_prompt_records(data_cfg.eval_path, problem_key=data_cfg.problem_key,
                                         answer_key=data_cfg.answer_key)
    return train, evaluation


class PromptSource:
    """Tokenized prompt batches for the trainer (identical on every rank)."""

    def __init__(self, data_cfg, tokenizer, batch_size: int, max_prompt_length: int,
                 one_at_a_time: bool = False) -> None:
        """``one_at_a_time``: draw prompts singly (``take(n)`` for any n — DAPO dynamic
        sampling refills), instead of in batches of ``batch_size``."""
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_prompt_length = max_prompt_length
        self.train_records, self.eval_records = _records(data_cfg)
        template = ARITHMETIC_TEMPLATE if data_cfg.task == "arithmetic" else data_cfg.prompt_template
        chat = getattr(tokenizer, "hf", None) if data_cfg.use_chat_template else None
        self.formatter = PromptFormatter(template, tokenizer=chat)
        self.one_at_a_time = one_at_a_time
        self.sampler = PromptSampler(self.train_records, 1 if one_at_a_time else batch_size,
                                     seed=data_cfg.shuffle_seed)
        self.truncated_prompts = 0

    def tokenize(self, record: PromptRecord) -> TokenizedPrompt:
        ids = self.tokenizer.encode(self.formatter(record.problem))
        if len(ids) > self.max_prompt_length:
            # Keep the end (the question's tail and the answer cue); counted and logged.
            self.truncated_prompts += 1
            if self.truncated_prompts == 1:
                logger.warning("prompt of row %d has %d tokens > rollout.max_prompt_length=%d; "
                               "keeping its last tokens (counted in data/truncated_prompts)",
                               record.row, len(ids), self.max_prompt_length)
            ids = ids[-self.max_prompt_length:]
        return TokenizedPrompt(record, ids)

    def next_batch(self) -> list[TokenizedPrompt]:
        if self.one_at_a_time:
            return self.take(self.batch_size)
        return [self.tokenize(r) for r in next(self.sampler)]

    def take(self, n: int) -> list[TokenizedPrompt]:
        """The next ``n`` prompts (needs ``one_at_a_time``)."""
        if not self.one_at_a_time:
            raise RuntimeError("PromptSource.take needs one_at_a_time=True")
        return [self.tokenize(next(self.sampler)[0]) for _ in range(n)]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
