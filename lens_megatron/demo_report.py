"""The demo's table and plot (from measured results only)."""
from __future__ import annotations

import math
import statistics


def _series(curve: list[dict], key: str) -> list[float]:
    return [row.get(key, float("nan")) for row in curve]


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _by_estimator(results: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for run in results["runs"].values():
        out.setdefault(run["estimator"], []).append(run)
    return out


def _early_late(curve: list[dict], key: str) -> tuple[float, float]:
    values = [v for v in _series(curve, key) if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    quarter = max(1, len(values) // 4)
    return statistics.mean(values[:quarter]), statistics.mean(values[-quarter:])


def print_report(results: dict) -> None:
    groups = _by_estimator(results)
    ks = sorted({int(k.split("@")[1]) for run in results["runs"].values()
                 for k in run["eval"] if k.startswith("eval/all/pass@")})
    seeds = {e: len(r) for e, r in groups.items()}
    print(f"\nHeld-out pass@k (mean ± sample std over seeds; seeds per estimator: {seeds})")
    header = ["estimator"] + [f"pass@{k}" for k in ks] + ["mean acc"]
    print(" | ".join(f"{h:>16}" for h in header))
    start = results["warm_start"]
    print(" | ".join(f"{v:>16}" for v in ["warm start"] + [f"{start[f'eval/all/pass@{k}']:.3f}" for k in ks]
                     + [f"{start['eval/all/mean_accuracy']:.3f}"]))
    for est, runs in groups.items():
        cells = [_mean_sd([r["eval"][f"eval/all/pass@{k}"] for r in runs]) for k in ks]
        cells.append(_mean_sd([r["eval"]["eval/all/mean_accuracy"] for r in runs]))
        print(" | ".join(f"{v:>16}" for v in [est] + cells))
    print("\nOver training (first quarter of steps → last quarter, mean over seeds)")
    rows = [("negative-group ratio", "groups/negative_group_ratio"),
            ("share of groups with gradient", None),
            ("wrong-answer confidence, negative groups", "confidence/wrong_in_negative_groups"),
            ("max wrong-answer confidence per negative group", "confidence/max_wrong_in_negative_groups"),
            ("reward mean", "reward/mean")]
    for label, key in rows:
        cells = []
        for est, runs in groups.items():
            pairs = [_gradient_share(r["curve"]) if key is None else _early_late(r["curve"], key)
                     for r in runs]
            early = statistics.mean(p[0] for p in pairs)
            late = statistics.mean(p[1] for p in pairs)
            cells.append(f"{est}: {early:.3f} → {late:.3f}")
        print(f"  {label:<46} " + "   ".join(cells))
    print("\nDirect effect of each update on the step's own samples: mean Δ log p̄ "
          "(per-token log-prob), averaged over steps and seeds")
    for label, key in (
            ("most confident wrong answer, negative group", "update_effect/negative_groups_most_confident"),
            ("least confident wrong answer, negative group", "update_effect/negative_groups_least_confident"),
            ("wrong answers, mixed groups", "update_effect/mixed_groups_wrong"),
            ("right answers, mixed groups", "update_effect/mixed_groups_correct")):
        cells = []
        for est, runs in groups.items():
            values = [v for r in runs for v in _series(r["curve"], key) if not math.isnan(v)]
            cells.append(f"{est}: {statistics.mean(values):+.2e}" if values else f"{est}: n/a")
        print(f"  {label:<46} " + "   ".join(cells))
    cells = []
    for est, runs in groups.items():
        diffs = [a - b for r in runs for a, b in zip(
            _series(r["curve"], "update_effect/negative_groups_most_confident"),
            _series(r["curve"], "update_effect/negative_groups_least_confident"))
            if not (math.isnan(a) or math.isnan(b))]
        cells.append(f"{est}: {statistics.mean(diffs):+.2e}" if diffs else f"{est}: n/a")
    print(f"  {'most − least confident (negative groups)':<46} " + "   ".join(cells))
    cells = []
    for est, runs in groups.items():
        values = [v for r in runs for v in _series(r["curve"], "groups/mean_abs_advantage_negative")
                  if not math.isnan(v)]
        cells.append(f"{est}: {statistics.mean(values):.2e}" if values else f"{est}: n/a")
    print(f"  {'mean |advantage| in negative groups':<46} " + "   ".join(cells))
    print("  (LENS's negative-group advantages are α·(r̃ − mean r̃): when the wrong answers of a "
          "group have\n   similar confidence they are small, and a step's direct effect can be "
          "within noise; compare seeds)")
    print(f"\nwall time {results['seconds']:.0f} s. Differences in pass@k smaller than the spread "
          "over seeds are noise at this scale; the mechanism rows are what this demo can show.")


def _gradient_share_series(curve: list[dict]) -> list[float]:
    """Per step, the share of groups whose advantages are not all zero."""
    return [1.0 - sum(row.get(f"signal/zero_advantage_{k}_fraction", 0.0)
                      for k in ("positive", "negative", "other")) for row in curve]


def _gradient_share(curve: list[dict]) -> tuple[float, float]:
    shares = _gradient_share_series(curve)
    quarter = max(1, len(shares) // 4)
    return statistics.mean(shares[:quarter]), statistics.mean(shares[-quarter:])


def write_plot(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward/mean", "training reward"),
              ("groups/negative_group_ratio", "negative-group ratio"),
              ("confidence/wrong_in_negative_groups", "confidence of wrong answers\nin negative groups"),
              (None, "share of groups giving gradient")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    colors = {"grpo": "tab:blue", "lens": "tab:red"}
    for ax, (key, title) in zip(axes, panels):
        for run in results["runs"].values():
            curve = run["curve"]
            steps = [row["step"] for row in curve]
            values = _gradient_share_series(curve) if key is None else _series(curve, key)
            ax.plot(steps, values, color=colors.get(run["estimator"], "gray"), alpha=0.8,
                    label=f"{run['estimator']} s{run['seed']}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
