"""The unbiased pass@k estimator (Chen et al., 2021) and its aggregation over a benchmark.

For a problem with ``n`` samples of which ``c`` are correct,
``pass@k = 1 - C(n-c, k) / C(n, k)``  (probability that k samples drawn without
replacement contain a correct one). Binomials overflow floats for large n, so the
ratio is computed in product form: ``C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)``,
which is 0 exactly when ``n - c < k`` (every k-subset holds a correct sample).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

DEFAULT_KS = (1, 2, 4, 8, 16)
HARD_LEVELS = (4, 5)


def _as_count(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem: ``n`` samples, ``c`` correct, budget ``k``.

    Raises ``ValueError`` for negative counts, ``k < 1``, ``k > n`` or ``c > n``.
    """
    n, c, k = _as_count(n, "n"), _as_count(c, "c"), _as_count(k, "k")
    if n < 0 or c < 0:
        raise ValueError(f"n and c must be non-negative, got n={n}, c={c}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of samples n={n}")
    if c > n:
        raise ValueError(f"c={c} correct exceeds the number of samples n={n}")
    if n - c < k:
        return 1.0
    all_wrong_ratio = 1.0  # C(n-c, k) / C(n, k)
    for i in range(n - c + 1, n + 1):
        all_wrong_ratio *= 1.0 - k / i
    return 1.0 - all_wrong_ratio


def _as_int_array(values: Any, name: str) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.dtype == bool or not (
        np.issubdtype(array.dtype, np.integer)
        or (np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0))
    ):
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def pass_at_k_batched(num_samples: Any, num_correct: Any, k: int) -> np.ndarray:
    """pass@k for many problems at once (float64 array shaped like ``num_correct``).

    ``num_samples`` is a scalar or an array broadcastable to ``num_correct``; arrays may
    be numpy arrays, lists or torch tensors. The products are evaluated as sums of
    ``log1p(-k/i)`` via a prefix sum over ``i = k+1 .. max n`` (one pass, O(max n)
    memory), which agrees with :func:`pass_at_k` to ~1e-13.
    """
    k = _as_count(k, "k")
    correct = _as_int_array(num_correct, "num_correct")
    samples = np.broadcast_to(_as_int_array(num_samples, "num_samples"), correct.shape)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if correct.size == 0:
        return np.zeros(correct.shape, dtype=np.float64)
    if samples.min() < 0 or correct.min() < 0:
        raise ValueError("num_samples and num_correct must be non-negative")
    if k > samples.min():
        raise ValueError(
            f"k={k} exceeds the number of samples of some problem (min n={samples.min()})"
        )
    if np.any(correct > samples):
        raise ValueError("num_correct exceeds num_samples for some problem")
    # log_prefix[j] = sum_{i=k+1}^{j} log(1 - k/i) for j >= k (0 for j <= k).
    i = np.arange(k + 1, int(samples.max()) + 1, dtype=np.float64)
    log_prefix = np.zeros(int(samples.max()) + 1, dtype=np.float64)
    log_prefix[k + 1 :] = np.cumsum(np.log1p(-k / i))
    all_wrong_possible = samples - correct >= k
    lower = np.where(all_wrong_possible, samples - correct, 0)
    log_ratio = log_prefix[samples] - log_prefix[lower]
    return np.where(all_wrong_possible, -np.expm1(log_ratio), 1.0)


def count_correct_per_problem(rewards: Any, group_size: int) -> np.ndarray:
    """Correct samples per problem from contiguous per-sample 0/1 rewards (length B*G)."""
    if hasattr(rewards, "detach"):
        rewards = rewards.detach().cpu().numpy()
    flat = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if group_size < 1 or flat.size % group_size:
        raise ValueError(f"{flat.size} rewards do not split into groups of {group_size}")
    return (flat.reshape(-1, group_size) > 0.5).sum(axis=1).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class SubsetMetrics:
    """pass@k and sample accuracy of one subset of problems."""

    num_problems: int
    num_samples: int
    mean_accuracy: float
    pass_at_k: dict[int, float]

    def as_flat_dict(self, prefix: str) -> dict[str, float]:
        """Logging-friendly ``{prefix/pass@k: ..., prefix/mean_accuracy: ..., ...}``."""
        flat = {f"{prefix}/pass@{k}": value for k, value in self.pass_at_k.items()}
        flat[f"{prefix}/mean_accuracy"] = self.mean_accuracy
        flat[f"{prefix}/num_problems"] = float(self.num_problems)
        return flat


def subset_metrics(
    num_samples: np.ndarray, num_correct: np.ndarray, ks: Iterable[int]
) -> SubsetMetrics:
    """pass@k (averaged over problems, for each k <= every problem's n) and the accuracy
    over all samples (total correct / total samples)."""
    valid_ks = [k for k in ks if k <= num_samples.min()]
    return SubsetMetrics(
        num_problems=int(num_correct.size),
        num_samples=int(num_samples.sum()),
        mean_accuracy=float(num_correct.sum() / num_samples.sum()),
        pass_at_k={
            k: float(pass_at_k_batched(num_samples, num_correct, k).mean()) for k in valid_ks
        },
    )


def summarize_pass_at_k(
    num_correct: Any,
    num_samples: Any,
    levels: Sequence[int | None] | None = None,
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, SubsetMetrics]:
    """Benchmark summary: ``"all"``, plus ``"level_4_5"`` and ``"level_<L>"`` when
    ``levels`` (one per problem; None = unknown) is given. Empty subsets are omitted.

    ``num_samples`` is n per problem (scalar or array); only k <= n are reported.
    """
    correct = _as_int_array(num_correct, "num_correct").reshape(-1)
    samples = np.broadcast_to(_as_int_array(num_samples, "num_samples"), correct.shape).reshape(-1)
    if correct.size == 0:
        raise ValueError("no problems to summarise")
    if samples.min() < 1:
        raise ValueError("every problem needs at least one sample")
    ks = sorted(set(ks))
    summary = {"all": subset_metrics(samples, correct, ks)}
    if levels is None:
        return summary
    if len(levels) != correct.size:
        raise ValueError(f"{len(levels)} levels for {correct.size} problems")
    level_array = np.array([-1 if level is None else int(level) for level in levels])
    hard = np.isin(level_array, HARD_LEVELS)
    if hard.any():
        summary["level_4_5"] = subset_metrics(samples[hard], correct[hard], ks)
    for level in sorted(set(level_array.tolist()) - {-1}):
        chosen = level_array == level
        summary[f"level_{level}"] = subset_metrics(samples[chosen], correct[chosen], ks)
    return summary
