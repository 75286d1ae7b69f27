"""Which rows each data-parallel rank runs, in which micro-batch, at which width.

A plan is a pure, deterministic function of the per-row lengths and the layout numbers;
every rank holds the whole batch and computes the same plan, so no collective is needed.

Row lengths are the columns a row needs (``layout.needed_lengths``: through its last target
position). A row with no target tokens needs 0; the plan feeds it 1 column anyway (its first
token, with an all-False mask), as the padded path always did, so every row appears once and
no packed document is empty.

Two modes (``plan_batches`` picks one):

padded (``micro_batch_size``) — today's behaviour, plus DP balance. Rows are sorted by
  length (ties by index) and cut into groups of ``micro_batch_size`` (when the rows per rank
  are not a multiple of it, each rank also gets one shorter group, taken from the shortest
  rows). A group's width is its longest row rounded up to ``pad_multiple`` (capped at
  ``full_width``). Groups go to ranks by their padded cost (rows x width): the full groups
  by ``balanced_partition`` (Karmarkar–Karp, or greedy LPT when that spreads less) with equal
  counts, then the short groups heaviest first to the lightest rank, one each — every rank
  the same number of groups and of rows. With ``same_shape``
  (pipeline parallelism) all micro-batches of a rank take that rank's widest width.

packed (``max_tokens``) — several rows per micro-batch, back to back. Rows go to ranks by
  ``balanced_partition`` of their lengths; each rank packs its rows into K micro-batches
  (K = the most that first-fit-decreasing needs on any rank), balanced by
  ``balanced_partition`` when that fits the budget, else first-fit-decreasing bins, the
  heaviest split in two until there are K. A micro-batch's
  packed length T is its token count rounded up to ``pad_multiple``; with ``same_shape`` every
  micro-batch of a rank takes the rank's largest T. The budget counts T:
  ``T <= max_tokens`` rounded down to ``pad_multiple``.

Invariants (``BatchPlan.validate`` checks them; the tests assert them on random inputs):
  1. every row appears exactly once over all ranks and micro-batches;
  2. every rank has the same number of micro-batches (PP schedules and DP collectives need it);
  3. widths / packed lengths are multiples of ``pad_multiple``; packed: ``T <= budget``;
     padded: ``width >= `` every row's length (and ``<= full_width``);
  4. with ``same_shape`` the micro-batches of a rank share one width;
  5. no micro-batch is empty unless there are fewer rows than ``dp_size * K``
     (e.g. fewer rows than ranks); an empty packed micro-batch is all alignment padding;
  6. balance: packed — ``max - min`` of the ranks' token loads ``<= max(lengths)`` (KK's
     bound) unless rows had to move to fill otherwise-empty micro-batches (5); on lognormal
     lengths max/min < 1.001 (tested). Padded — every rank has ``n / dp_size`` rows and,
     without ``same_shape``, ``max - min`` of the padded costs ``<=`` the largest group's cost
     (pairing ascending loads with descending short groups keeps the KK bound). The padded
     costs are less even than packed loads (the longest group dominates), but the busiest
     rank's cost is below that of today's contiguous slices on every lognormal case tried.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .partition import balanced_partition, first_fit_decreasing, karmarkar_karp, part_loads

__all__ = ["MicroBatch", "BatchPlan", "SequenceTooLongError", "plan_batches", "plan_padded",
           "plan_packed", "round_up"]

BUDGET_KEY = "model.max_tokens_per_microbatch"
CONTEXT_PARALLEL_KEY = "model.context_parallel_size"


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class SequenceTooLongError(ValueError):
    """A single row needs more tokens than one micro-batch may hold."""

    def __init__(self, row: int, length: int, budget: int, max_tokens: int,
                 context_parallel_hint: bool = False) -> None:
        self.row, self.length, self.budget = row, length, budget
        rounded = ""
        if budget != max_tokens:
            rounded = f" (rounded down to the alignment multiple: {budget})"
        fix = f"raise {BUDGET_KEY} to at least {length}"
        if context_parallel_hint:
            fix += f", or split long sequences over ranks with {CONTEXT_PARALLEL_KEY} > 1"
        super().__init__(f"row {row} needs {length} tokens, more than {BUDGET_KEY}="
                         f"{max_tokens}{rounded} allows in one micro-batch; {fix}")


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch: ``rows`` (original row indices, in feed order), the ``lengths`` they
    need (as fed: at least 1), and ``width`` — the cut width (padded) or packed length T."""

    rows: tuple[int, ...]
    lengths: tuple[int, ...]
    width: int

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def padded_cost(self) -> int:
        """Columns the model runs: rows x width (padded) — for packed use ``width``."""
        return len(self.rows) * self.width


@dataclass(frozen=True)
class BatchPlan:
    """Per DP rank, its micro-batches. ``mode`` is ``"padded"`` or ``"packed"``."""

    mode: str
    ranks: tuple[tuple[MicroBatch, ...], ...]
    num_rows: int
    pad_multiple: int = 1
    budget: Optional[int] = None  # packed: the largest allowed T
    same_shape: bool = False

    @property
    def dp_size(self) -> int:
        return len(self.ranks)

    @property
    def num_micro_batches(self) -> int:
        return len(self.ranks[0])

    def micro_batches(self, dp_rank: int) -> tuple[MicroBatch, ...]:
        return self.ranks[dp_rank]

    def rows(self, dp_rank: int) -> list[int]:
        """The rows of one rank, in feed order."""
        return [r for mb in self.ranks[dp_rank] for r in mb.rows]

    def rank_tokens(self) -> list[int]:
        """Per rank, the tokens its rows need (the packed load)."""
        return [sum(mb.tokens for mb in mbs) for mbs in self.ranks]

    def rank_costs(self) -> list[int]:
        """Per rank, the columns the model runs (padding included)."""
        if self.mode == "packed":
            return [sum(mb.width for mb in mbs) for mbs in self.ranks]
        return [sum(mb.padded_cost for mb in mbs) for mbs in self.ranks]

    def validate(self, lengths: Sequence[int], full_width: Optional[int] = None) -> None:
        """Raise AssertionError when an invariant of the module docstring does not hold."""
        seen = sorted(r for mbs in self.ranks for mb in mbs for r in mb.rows)
        assert seen == list(range(self.num_rows)) == list(range(len(lengths))), "rows"
        assert len({len(mbs) for mbs in self.ranks}) == 1, "equal micro-batch counts"
        for mbs in self.ranks:
            if self.same_shape:
                assert len({mb.width for mb in mbs}) == 1, "same shape"
            for mb in mbs:
                assert mb.lengths == tuple(max(1, int(lengths[r])) for r in mb.rows), "lengths"
                assert mb.width % self.pad_multiple == 0 and mb.width >= 1, "alignment"
                if self.mode == "packed":
                    assert mb.tokens <= mb.width <= self.budget, "budget"
                else:
                    assert all(n <= mb.width for n in mb.lengths) or mb.width == full_width
                    assert full_width is None or mb.width <= full_width, "full width"
        empties = sum(not mb.rows for mbs in self.ranks for mb in mbs)
        assert empties == 0 or self.num_rows < self.dp_size * self.num_micro_batches, "empty"


def _fed_lengths(lengths: Sequence[int]) -> list[int]:
    out = [max(1, int(n)) for n in lengths]
    if any(int(n) < 0 for n in lengths):
        raise ValueError("row lengths must be >= 0")
    return out


def _check_common(dp_size: int, pad_multiple: int) -> None:
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")


def plan_batches(lengths: Sequence[int], dp_size: int, *, micro_batch_size: Optional[int] = None,
                 max_tokens: Optional[int] = None, pad_multiple: int = 1,
                 same_shape: bool = False, full_width: Optional[int] = None,
                 context_parallel_hint: bool = False, count_multiple: int = 1) -> BatchPlan:
    """The plan of one call: exactly one of ``micro_batch_size`` (padded) or ``max_tokens``
    (packed). ``pad_multiple``: TP under sequence parallelism (later 2*CP*TP, 16 for FP8);
    ``same_shape``: pipeline parallelism; ``full_width``: the batch width (padded only);
    ``count_multiple`` (packed only): micro-batches per rank rounded up to a multiple of it —
    megatron's interleaved (virtual-pipeline) schedule needs a multiple of the PP size."""
    if (micro_batch_size is None) == (max_tokens is None):
        raise ValueError("give exactly one of micro_batch_size (padded) or max_tokens (packed)")
    if micro_batch_size is not None:
        return plan_padded(lengths, dp_size, micro_batch_size, pad_multiple, same_shape,
                           full_width)
    return plan_packed(lengths, dp_size, max_tokens, pad_multiple, same_shape,
                       context_parallel_hint, count_multiple)


# ---------------------------------------------------------------------------- padded
def _padded_groups(fed: list[int], dp_size: int, micro_batch_size: int) -> tuple[list, list]:
    """Length-sorted groups: ``dp_size`` short groups (maybe none) and the full ones."""
    order = sorted(range(len(fed)), key=lambda i: (fed[i], i))
    short = (len(fed) // dp_size) % micro_batch_size
    head = dp_size * short
    shorts = [order[s:s + short] for s in range(0, head, short)] if short else []
    fulls = [order[s:s + micro_batch_size] for s in range(head, len(order), micro_batch_size)]
    return shorts, fulls


def plan_padded(lengths: Sequence[int], dp_size: int, micro_batch_size: int,
                pad_multiple: int = 1, same_shape: bool = False,
                full_width: Optional[int] = None) -> BatchPlan:
    """Padded micro-batches of ``micro_batch_size`` rows (see the module docstring)."""
    _check_common(dp_size, pad_multiple)
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if full_width is not None and full_width % pad_multiple:
        raise ValueError(f"full_width {full_width} is not a multiple of pad_multiple "
                         f"{pad_multiple}")
    fed = _fed_lengths(lengths)
    n = len(fed)
    if n == 0 or n % dp_size:
        raise ValueError(f"the batch of {n} rows does not split evenly over {dp_size} "
                         "data-parallel ranks (each rank needs the same number of rows)")

    def width_of(rows):
        width = round_up(max(fed[r] for r in rows), pad_multiple)
        return width if full_width is None else min(width, full_width)

    shorts, fulls = _padded_groups(fed, dp_size, micro_batch_size)
    cost = [len(g) * width_of(g) for g in fulls]
    parts = balanced_partition(cost, dp_size, equal_size=True) if fulls else [[]] * dp_size
    assigned = [[fulls[i] for i in part] for part in parts]
    loads = part_loads(cost, parts)
    for group in sorted(shorts, key=lambda g: (-width_of(g), g[0])):  # heaviest to lightest
        r = min((r for r in range(dp_size) if len(assigned[r]) == len(parts[r])),
                key=lambda r: (loads[r], r))
        assigned[r].append(group)
        loads[r] += len(group) * width_of(group)
    ranks = []
    for groups in assigned:
        groups = sorted(groups, key=lambda g: (width_of(g), g[0]))
        widths = [width_of(g) for g in groups]
        if same_shape:
            widths = [max(widths)] * len(widths)
        ranks.append(tuple(MicroBatch(tuple(g), tuple(fed[r] for r in g), w)
                           for g, w in zip(groups, widths)))
    return BatchPlan("padded", tuple(ranks), n, pad_multiple, None, same_shape)


# ---------------------------------------------------------------------------- packed
def _split_to(bins: list[list[int]], count: int, fed: list[int]) -> list[list[int]]:
    """Split the heaviest multi-row bins in two (balanced) until there are ``count`` bins or
    none can be split; then add empty bins."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            bins.append([])
            continue
        heaviest = max(splittable, key=lambda b: (sum(fed[r] for r in b), -b[0]))
        bins.remove(heaviest)
        halves = karmarkar_karp([fed[r] for r in heaviest], 2)
        bins.extend([heaviest[i] for i in half] for half in halves)
    return bins


def _rank_bins(rows: list[int], count: int, fed: list[int], budget: int) -> list[list[int]]:
    """``count`` bins of ``rows`` within ``budget``: KK-balanced if that fits, else FFD."""
    weights = [fed[r] for r in rows]
    parts = balanced_partition(weights, count)
    if max(part_loads(weights, parts), default=0) > budget:
        parts = first_fit_decreasing(weights, budget)
    return _split_to([[rows[i] for i in p] for p in parts], count, fed)


def _fill_empty(bins: list[list[list[int]]], fed: list[int]) -> None:
    """Move single rows into empty bins from ranks that hold bins of several rows: the
    smallest such row (ties: lowest row) of the rank with the most rows (ties: lowest rank)."""
    for rank_bins in bins:
        for empty in [b for b in rank_bins if not b]:
            donors = [r for r, rb in enumerate(bins) if any(len(b) > 1 for b in rb)]
            if not donors:
                return
            donor = max(donors, key=lambda r: (sum(map(len, bins[r])), -r))
            _, row, source = min((fed[x], x, b) for b in bins[donor] if len(b) > 1 for x in b)
            source.remove(row)
            empty.append(row)


def plan_packed(lengths: Sequence[int], dp_size: int, max_tokens: int, pad_multiple: int = 1,
                same_shape: bool = False, context_parallel_hint: bool = False,
                count_multiple: int = 1) -> BatchPlan:
    """Packed micro-batches under a token budget (see the module docstring)."""
    _check_common(dp_size, pad_multiple)
    if count_multiple < 1:
        raise ValueError(f"count_multiple must be >= 1, got {count_multiple}")
    budget = (int(max_tokens) // pad_multiple) * pad_multiple
    if budget < 1:
        raise ValueError(f"{BUDGET_KEY}={max_tokens} is below the alignment multiple "
                         f"{pad_multiple} (TP under sequence parallelism); raise it")
    fed = _fed_lengths(lengths)
    for row, n in enumerate(fed):
        if n > budget:
            raise SequenceTooLongError(row, n, budget, int(max_tokens), context_parallel_hint)
    rank_rows = balanced_partition(fed, dp_size)
    count = round_up(max([1] + [len(first_fit_decreasing([fed[r] for r in rows], budget))
                                for rows in rank_rows]), count_multiple)
    bins = [_rank_bins(rows, count, fed, budget) for rows in rank_rows]
    _fill_empty(bins, fed)
    ranks = []
    for rank_bins in bins:
        rank_bins = sorted((sorted(b) for b in rank_bins),
                           key=lambda b: (-sum(fed[r] for r in b), b[:1]))
        widths = [max(pad_multiple, round_up(sum(fed[r] for r in b), pad_multiple))
                  for b in rank_bins]
        if same_shape:
            widths = [max(widths)] * len(widths)
        ranks.append(tuple(MicroBatch(tuple(b), tuple(fed[r] for r in b), w)
                           for b, w in zip(rank_bins, widths)))
    return BatchPlan("packed", tuple(ranks), len(fed), pad_multiple, budget, same_shape)
