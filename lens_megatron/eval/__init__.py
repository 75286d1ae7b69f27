"""Evaluation: the unbiased pass@k estimator, its benchmark aggregation, MATH-500 loading."""

from lens_megatron.eval.math500 import (
    MATH500_PATH_ENV,
    load_math500,
    resolve_math500_path,
)
from lens_megatron.eval.pass_at_k import (
    DEFAULT_KS,
    SubsetMetrics,
    count_correct_per_problem,
    pass_at_k,
    pass_at_k_batched,
    summarize_pass_at_k,
)

__all__ = [
    "DEFAULT_KS",
    "MATH500_PATH_ENV",
    "SubsetMetrics",
    "count_correct_per_problem",
    "load_math500",
    "pass_at_k",
    "pass_at_k_batched",
    "resolve_math500_path",
    "summarize_pass_at_k",
]
