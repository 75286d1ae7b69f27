#!/usr/bin/env python
"""Paper-style training curves from the ``metrics.jsonl`` of one or more runs.

    python tools/plot_paper_curves.py --run GRPO=runs/grpo_s1,runs/grpo_s2 \\
        --run LENS=runs/lens_s1,runs/lens_s2 --out-dir plots [--band std|sem|minmax|none]

Each ``--run LABEL=PATH[,PATH...]`` is one curve; its paths (run directories holding
``metrics.jsonl``, or the files themselves) are seeds, drawn as their mean with a band. Writes

* ``negative_group_ratio.png`` — Fig. 2: the share of all-incorrect groups per training step
  (``groups/negative_group_ratio``, logged every step by the trainer);
* ``accuracy.png`` — Figs. 5/6: accuracy over training on all evaluation problems and on
  MATH Levels 4-5 (``eval/all/<metric>``, ``eval/level_4_5/<metric>``, ``--eval-metric``
  default ``mean_accuracy``: the accuracy averaged over all samples, as in the paper). These
  rows exist only with periodic evaluation: ``trainer.eval_every > 0`` and ``data.eval_path``
  pointing at problems with a ``level`` (e.g. MATH-500).

Aggregation (``aggregate``): seeds are aligned on the steps every one of them logged (steps only
some seeds have are left out and counted on stderr, so a point is always a mean over the same
seeds); the band is ±1 sample standard deviation (``std``), ±1 standard error (``sem``), the
range over seeds (``minmax``) or nothing; one seed has no band. ``--smooth W`` first applies a
trailing moving average of W logged points to each seed. Non-finite values (logged as strings)
count as missing. A line of a metrics file that is not valid JSON (a run killed mid-write) is
skipped with a warning naming the file and line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NEGATIVE_RATIO = "groups/negative_group_ratio"
EVAL_SUBSETS = (("all", "all problems"), ("level_4_5", "Levels 4-5"))
BANDS = ("std", "sem", "minmax", "none")
EVAL_HINT = ("periodic evaluation logs these rows: set trainer.eval_every > 0 and data.eval_path "
             "(problems with a `level`, e.g. MATH-500, for the Levels 4-5 subset)")


class CurveError(ValueError):
    """The metrics cannot give the requested curve; the message says why and what to set."""


@dataclass
class Curve:
    label: str
    key: str
    steps: np.ndarray  # steps logged by every seed
    mean: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    num_seeds: int
    dropped_steps: int  # steps logged by only some seeds


def metrics_path(path: str) -> str:
    """``path`` itself when it is a file, else ``path/metrics.jsonl``; CurveError if absent."""
    candidate = path if os.path.isfile(path) else os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(candidate):
        raise CurveError(f"no metrics file at {candidate} (pass a run directory holding "
                         "metrics.jsonl, or the file)")
    return candidate


def read_rows(path: str) -> list[dict]:
    """The rows of a metrics.jsonl; an invalid line is skipped with a warning on stderr."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                print(f"warning: {path}:{number}: not valid JSON (cut short?), skipped", file=sys.stderr)
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def series(rows: Sequence[dict], key: str) -> dict[int, float]:
    """``{step: value}`` of ``key`` (finite numbers only; a repeated step keeps its last value)."""
    out: dict[int, float] = {}
    for row in rows:
        value = row.get(key)
        if "step" not in row:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[int(row["step"])] = float(value)
    return out


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (fewer at the start)."""
    if window <= 1:
        return values
    cumsum = np.cumsum(np.concatenate([[0.0], values]))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def aggregate(per_seed: Sequence[dict[int, float]], band: str = "std", window: int = 1
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """``(steps, mean, lower, upper, dropped_steps)`` over seeds, on the steps all seeds logged."""
    if band not in BANDS:
        raise CurveError(f"--band must be one of {BANDS}, got {band!r}")
    smoothed = []
    for s in per_seed:
        steps = sorted(s)
        smoothed.append(dict(zip(steps, smooth(np.array([s[k] for k in steps], dtype=float), window))))
    common = sorted(set.intersection(*(set(s) for s in smoothed)))
    union = set.union(*(set(s) for s in smoothed))
    values = np.array([[s[k] for k in common] for s in smoothed], dtype=float).reshape(len(smoothed), -1)
    mean = values.mean(axis=0)
    if band == "none" or len(smoothed) == 1:
        lower = upper = mean
    elif band == "minmax":
        lower, upper = values.min(axis=0), values.max(axis=0)
    else:
        spread = values.std(axis=0, ddof=1)
        if band == "sem":
            spread = spread / math.sqrt(len(smoothed))
        lower, upper = mean - spread, mean + spread
    return np.array(common), mean, lower, upper, len(union) - len(common)


def build_curve(label: str, paths: Sequence[str], key: str, band: str, window: int,
                hint: str = "") -> Curve:
    per_seed = []
    for path in paths:
        file = metrics_path(path)
        s = series(read_rows(file), key)
        if not s:
            raise CurveError(f"{file}: no row has a finite {key!r}" + (f"; {hint}" if hint else ""))
        per_seed.append(s)
    steps, mean, lower, upper, dropped = aggregate(per_seed, band, window)
    if len(steps) == 0:
        raise CurveError(f"{label}: the seeds {list(paths)} share no step with {key!r}")
    return Curve(label, key, steps, mean, lower, upper, len(per_seed), dropped)


def _draw(ax, curves: Sequence[Curve], title: str, ylabel: str) -> None:
    for i, c in enumerate(curves):
        color = f"C{i}"
        seeds = f" ({c.num_seeds} seeds)" if c.num_seeds > 1 else ""
        ax.plot(c.steps, c.mean, color=color, label=c.label + seeds, linewidth=1.5)
        if c.num_seeds > 1 and not np.array_equal(c.lower, c.upper):
            ax.fill_between(c.steps, c.lower, c.upper, color=color, alpha=0.2, linewidth=0)
    ax.set_title(title)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_panels(panels: Sequence[tuple[Sequence[Curve], str, str]], out: str):
    """One PNG with a panel per ``(curves, title, ylabel)``; returns the matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (curves, title, ylabel) in zip(axes[0], panels):
        _draw(ax, curves, title, ylabel)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return fig


def parse_run(text: str) -> tuple[str, list[str]]:
    label, sep, paths = text.partition("=")
    parts = [p for p in paths.split(",") if p]
    if not sep or not label or not parts:
        raise CurveError(f"--run {text!r}: expected LABEL=PATH[,PATH...], e.g. LENS=runs/s1,runs/s2")
    return label, parts


def render(runs: Sequence[tuple[str, list[str]]], out_dir: str, band: str = "std", window: int = 1,
           eval_metric: str = "mean_accuracy") -> dict[str, list[Curve]]:
    """Write both figures; returns ``{png path: curves}`` (what was plotted)."""
    ratio = [build_curve(label, paths, NEGATIVE_RATIO, band, window,
                         "the trainer logs it every step; is this a lens-train metrics file?")
             for label, paths in runs]
    ratio_png = os.path.join(out_dir, "negative_group_ratio.png")
    plot_panels([(ratio, "Negative-group ratio (Fig. 2)", "share of all-incorrect groups")], ratio_png)
    panels, plotted = [], {ratio_png: ratio}
    for subset, name in EVAL_SUBSETS:
        key = f"eval/{subset}/{eval_metric}"
        curves = [build_curve(label, paths, key, band, window, EVAL_HINT) for label, paths in runs]
        panels.append((curves, f"MATH eval, {name}", eval_metric.replace("_", " ")))
    acc_png = os.path.join(out_dir, "accuracy.png")
    plot_panels(panels, acc_png)
    plotted[acc_png] = [c for curves, _, _ in panels for c in curves]
    return plotted


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=PATH[,PATH...]",
                   help="one curve: its seeds' run directories (or metrics.jsonl files)")
    p.add_argument("--out-dir", default="plots")
    p.add_argument("--band", choices=BANDS, default="std")
    p.add_argument("--smooth", type=int, default=1, help="trailing moving average, in logged points")
    p.add_argument("--eval-metric", default="mean_accuracy",
                   help="mean_accuracy (paper) or pass@k, e.g. pass@16")
    args = p.parse_args(argv)
    try:
        runs = [parse_run(r) for r in args.run]
        plotted = render(runs, args.out_dir, args.band, args.smooth, args.eval_metric)
    except CurveError as exc:
        print(f"plot_paper_curves: {exc}", file=sys.stderr)
        return 2
    for png, curves in plotted.items():
        for c in curves:
            if c.dropped_steps:
                print(f"note: {c.label} {c.key}: {c.dropped_steps} steps logged by only some seeds "
                      "were left out", file=sys.stderr)
        print(f"wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
