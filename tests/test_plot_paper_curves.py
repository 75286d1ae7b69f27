"""tools/plot_paper_curves.py on synthetic metrics files: aggregation over seeds (mean, bands,
step alignment), the PNGs, and the errors for missing keys."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tool_modules import TOOLS, load_tool

curves = load_tool("plot_paper_curves")
TOOL = os.path.join(TOOLS, "plot_paper_curves.py")


def _write_run(directory, ratios, evals=None, extra_lines=()):
    """metrics.jsonl like the trainer's: one row per step; eval keys on some steps."""
    os.makedirs(directory, exist_ok=True)
    lines = []
    for step, ratio in enumerate(ratios, start=1):
        row = {"step": step, "groups/negative_group_ratio": ratio, "loss": 0.1}
        if evals and step in evals:
            acc_all, acc_hard = evals[step]
            row.update({"eval/all/mean_accuracy": acc_all, "eval/all/pass@1": acc_all,
                        "eval/level_4_5/mean_accuracy": acc_hard})
        lines.append(json.dumps(row))
    lines.extend(extra_lines)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(directory)


def test_aggregate_mean_and_bands():
    seeds = [{1: 0.2, 2: 0.4, 3: 0.6}, {1: 0.4, 2: 0.8, 3: 0.6}, {1: 0.0, 2: 0.6, 3: 0.6, 4: 1.0}]
    steps, mean, lower, upper, dropped = curves.aggregate(seeds, "std")
    assert steps.tolist() == [1, 2, 3] and dropped == 1  # step 4: only seed 3
    np.testing.assert_allclose(mean, [0.2, 0.6, 0.6])
    # sample std (ddof 1): step 1 values 0.2, 0.4, 0.0 -> sqrt(((0)^2 + 0.2^2 + 0.2^2)/2) = 0.2
    np.testing.assert_allclose(upper - mean, [0.2, 0.2, 0.0], atol=1e-12)
    np.testing.assert_allclose(mean - lower, [0.2, 0.2, 0.0], atol=1e-12)
    _, mean, lower, upper, _ = curves.aggregate(seeds, "sem")
    np.testing.assert_allclose(upper - mean, [0.2 / math.sqrt(3), 0.2 / math.sqrt(3), 0.0], atol=1e-12)
    _, _, lower, upper, _ = curves.aggregate(seeds, "minmax")
    np.testing.assert_allclose(lower, [0.0, 0.4, 0.6])
    np.testing.assert_allclose(upper, [0.4, 0.8, 0.6])
    _, mean, lower, upper, _ = curves.aggregate(seeds[:1], "std")  # one seed: no band
    assert np.array_equal(lower, mean) and np.array_equal(upper, mean)


def test_smoothing_is_a_trailing_mean_per_seed():
    np.testing.assert_allclose(curves.smooth(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    _, mean, _, _, _ = curves.aggregate([{1: 1.0, 2: 3.0, 3: 5.0}, {1: 3.0, 2: 5.0, 3: 7.0}], "none", 3)
    np.testing.assert_allclose(mean, [2.0, 3.0, 4.0])  # seed means [1, 2, 3] and [3, 4, 5]


def test_render_writes_pngs_with_the_aggregated_values(tmp_path):
    evals = {2: (0.5, 0.25), 4: (0.6, 0.35)}
    a1 = _write_run(tmp_path / "grpo1", [0.5, 0.4, 0.3, 0.2], evals)
    a2 = _write_run(tmp_path / "grpo2", [0.7, 0.6, 0.5, 0.4], {2: (0.7, 0.45), 4: (0.8, 0.55)},
                    extra_lines=['{"step": 5, "groups/neg'])  # cut short by a crash: skipped
    b1 = _write_run(tmp_path / "lens1", [0.4, 0.3, 0.2, 0.1], evals)
    plotted = curves.render([("GRPO", [a1, a2]), ("LENS", [b1])], str(tmp_path / "plots"))
    ratio_png, acc_png = str(tmp_path / "plots" / "negative_group_ratio.png"), str(tmp_path / "plots" / "accuracy.png")
    assert set(plotted) == {ratio_png, acc_png}
    for png in plotted:
        with open(png, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 5000
    grpo_ratio, lens_ratio = plotted[ratio_png]
    np.testing.assert_allclose(grpo_ratio.mean, [0.6, 0.5, 0.4, 0.3])
    np.testing.assert_allclose(grpo_ratio.upper - grpo_ratio.mean, [math.sqrt(0.02)] * 4)  # std of (x, x+0.2)
    assert grpo_ratio.num_seeds == 2 and lens_ratio.num_seeds == 1
    by_key = {(c.label, c.key): c for c in plotted[acc_png]}
    hard = by_key[("GRPO", "eval/level_4_5/mean_accuracy")]
    assert hard.steps.tolist() == [2, 4]
    np.testing.assert_allclose(hard.mean, [0.35, 0.45])
    np.testing.assert_allclose(by_key[("LENS", "eval/all/mean_accuracy")].mean, [0.5, 0.6])


def test_cli_and_missing_eval_rows(tmp_path):
    run = _write_run(tmp_path / "r1", [0.5, 0.4, 0.3])  # no periodic evaluation
    proc = subprocess.run([sys.executable, TOOL, "--run", f"LENS={run}", "--out-dir", str(tmp_path / "p")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "eval/all/mean_accuracy" in proc.stderr
    assert "trainer.eval_every" in proc.stderr and "data.eval_path" in proc.stderr
    run = _write_run(tmp_path / "r2", [0.5, 0.4, 0.3], {1: (0.2, 0.1), 3: (0.3, 0.2)})
    proc = subprocess.run([sys.executable, TOOL, "--run", f"LENS={run},{run}", "--run", f"GRPO={run}",
                           "--out-dir", str(tmp_path / "p"), "--eval-metric", "pass@1"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "eval/level_4_5/pass@1" in proc.stderr  # logged for 'all' only
    proc = subprocess.run([sys.executable, TOOL, "--run", f"LENS={run}", "--out-dir", str(tmp_path / "p")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.path.getsize(tmp_path / "p" / "accuracy.png") > 5000


@pytest.mark.parametrize("arg, match", [("LENS", "expected LABEL=PATH"), ("=a", "expected LABEL=PATH"),
                                        ("LENS=", "expected LABEL=PATH")])
def test_bad_run_arguments(arg, match):
    with pytest.raises(curves.CurveError, match=match):
        curves.parse_run(arg)


def test_missing_metrics_file_and_key(tmp_path):
    with pytest.raises(curves.CurveError, match=f"no metrics file at {tmp_path / 'nope' / 'metrics.jsonl'}"):
        curves.build_curve("X", [str(tmp_path / "nope")], curves.NEGATIVE_RATIO, "std", 1)
    run = _write_run(tmp_path / "r", [0.1, 0.2])
    with pytest.raises(curves.CurveError, match="no row has a finite 'groups/other'"):
        curves.build_curve("X", [run], "groups/other", "std", 1)
