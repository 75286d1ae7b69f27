"""The demo's table, verdict and plot (from measured results only)."""
from __future__ import annotations

import math
import statistics
from typing import Optional

# A gain (or a GRPO-vs-LENS difference) is called real only beyond this many spreads.
SPREADS = 2.0


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


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of ``values`` (sample std / sqrt(n)); nan below 2 values."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def _accuracies(num_correct: list[int], samples: int) -> list[float]:
    return [c / samples for c in num_correct]


def _mean_accuracy_per_problem(runs: list[dict]) -> list[float]:
    """Per held-out problem, the sample accuracy averaged over the runs (seeds)."""
    per_run = [_accuracies(r["num_correct"], r["samples"]) for r in runs]
    return [statistics.mean(column) for column in zip(*per_run)]


def learning_verdict(results: dict) -> dict[str, dict]:
    """Per estimator: held-out pass@1 over seeds, its gain over the warm start, the seed
    spread (sample std), the evaluation's standard error of the gain (paired over the same
    problems, seeds averaged) and whether the gain exceeds both by ``SPREADS``× with every
    seed above the warm start."""
    detail = results["warm_start_detail"]
    start_acc = _accuracies(detail["num_correct"], detail["samples"])
    start = results["warm_start"]["eval/all/pass@1"]
    out = {}
    for est, runs in _by_estimator(results).items():
        values = [r["eval"]["eval/all/pass@1"] for r in runs]
        gain = statistics.mean(values) - start
        spread = statistics.stdev(values) if len(values) > 1 else float("nan")
        diffs = [a - b for a, b in zip(_mean_accuracy_per_problem(runs), start_acc)]
        eval_se = standard_error(diffs)
        learned = all(v > start for v in values) and gain > SPREADS * eval_se and (
            math.isnan(spread) or gain > SPREADS * spread)
        out[est] = {"pass@1": values, "mean": statistics.mean(values), "gain": gain,
                    "seed_sd": spread, "eval_se_of_gain": eval_se, "learned": learned}
    return out


def difference_verdict(results: dict) -> Optional[dict]:
    """LENS minus GRPO held-out pass@1 (means over seeds), its spread (standard error of a
    difference of seed means, and the paired evaluation standard error), and whether it is
    claimed: beyond ``SPREADS``× both, with the two estimators' seed ranges not overlapping."""
    groups = _by_estimator(results)
    if not {"grpo", "lens"} <= set(groups):
        return None
    g = [r["eval"]["eval/all/pass@1"] for r in groups["grpo"]]
    lens = [r["eval"]["eval/all/pass@1"] for r in groups["lens"]]
    diff = statistics.mean(lens) - statistics.mean(g)
    seed_se = (math.sqrt(statistics.variance(g) / len(g) + statistics.variance(lens) / len(lens))
               if len(g) > 1 and len(lens) > 1 else float("nan"))
    per_problem = [a - b for a, b in zip(_mean_accuracy_per_problem(groups["lens"]),
                                         _mean_accuracy_per_problem(groups["grpo"]))]
    eval_se = standard_error(per_problem)
    separated = min(lens) > max(g) or min(g) > max(lens)
    claimed = (not math.isnan(seed_se)) and separated and abs(diff) > SPREADS * max(seed_se, eval_se)
    return {"difference": diff, "seed_se": seed_se, "eval_se": eval_se, "claimed": claimed}


def _print_verdict(results: dict) -> None:
    detail = results["warm_start_detail"]
    start = results["warm_start"]["eval/all/pass@1"]
    start_se = standard_error(_accuracies(detail["num_correct"], detail["samples"]))
    n_problems = len(detail["num_correct"])
    reached = ("reached" if detail["reached_target"] else "did NOT reach")
    print(f"\nWarm start: {detail['steps']} supervised steps (constant lr {detail['lr']}; "
          f"{reached} the training-probe accuracy target {detail['target']}).")
    print(f"Held-out pass@1 ({n_problems} problems never trained on × {detail['samples']} samples):")
    print(f"  warm start            {start:.3f}  (standard error over problems {start_se:.3f})")
    for est, v in learning_verdict(results).items():
        seeds = " ".join(f"{x:.3f}" for x in v["pass@1"])
        spread = "n/a (1 seed)" if math.isnan(v["seed_sd"]) else f"{v['seed_sd']:.3f}"
        verdict = ("LEARNED: the gain exceeds {0:g}× the seed spread and {0:g}× the eval standard "
                   "error, every seed above the warm start" if v["learned"] else
                   "NOT shown: the gain is within {0:g}× the seed spread or the eval standard "
                   "error, or a seed is not above the warm start").format(SPREADS)
        print(f"  {est:<6} after RL     {v['mean']:.3f} ± {spread} over {len(v['pass@1'])} "
              f"seed(s) [{seeds}]; gain {v['gain']:+.3f} (eval standard error of the gain "
              f"{v['eval_se_of_gain']:.3f})\n{'':24}{verdict}")
    d = difference_verdict(results)
    if d is not None:
        word = ("CLAIMED (beyond the spread, seed ranges apart)" if d["claimed"] else
                "no accuracy difference claimed: within the spread at this scale")
        print(f"  LENS − GRPO           {d['difference']:+.3f} (standard error over seeds "
              f"{d['seed_se']:.3f}, eval {d['eval_se']:.3f}): {word}")


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
    _print_verdict(results)
    print(f"\nwall time {results['seconds']:.0f} s. Differences in pass@k smaller than the spread "
          "over seeds are noise at this scale.")


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
