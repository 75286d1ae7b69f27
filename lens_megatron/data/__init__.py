"""Prompt sets: loading (JSON Lines / JSON / Parquet), prompt formatting, resumable sampling."""

from lens_megatron.data.loaders import (
    DEFAULT_METADATA_KEYS,
    EmptyPromptSetError,
    PromptRecord,
    load_prompt_records,
    parse_level,
)
from lens_megatron.data.prompts import (
    DEFAULT_PROMPT_TEMPLATE,
    PromptFormatter,
    validate_template,
)
from lens_megatron.data.sampler import PromptSampler

__all__ = [
    "DEFAULT_METADATA_KEYS",
    "DEFAULT_PROMPT_TEMPLATE",
    "EmptyPromptSetError",
    "PromptFormatter",
    "PromptRecord",
    "PromptSampler",
    "load_prompt_records",
    "parse_level",
    "validate_template",
]
