"""metrics.jsonl holds one run's history: fresh runs set an old file aside, resumed runs drop
the steps they will redo, nothing is deleted."""
from __future__ import annotations

import json
import math

from lens_megatron.metrics_log import MetricsLogger, read_metrics


def _write(path, steps, tag):
    with open(path, "w", encoding="utf-8") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "run": tag}) + "\n")


def _logger(tmp_path, start_step):
    return MetricsLogger(str(tmp_path), enabled=True, start_step=start_step, progress_bar=False)


def test_fresh_run_sets_an_earlier_history_aside(tmp_path):
    _write(tmp_path / "metrics.jsonl", [1, 2, 3], "old")
    log = _logger(tmp_path, start_step=0)
    log.log(1, {"loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(log.path)] == [1]
    assert read_metrics(log.path)[0]["loss"] == 0.5
    assert log.set_aside and [r["run"] for r in read_metrics(log.set_aside)] == ["old"] * 3
    # a second fresh run in the same second does not overwrite the first one set aside
    again = _logger(tmp_path, start_step=0)
    assert again.set_aside != log.set_aside
    assert len(list(tmp_path.glob("metrics.*.jsonl"))) == 2


def test_resume_keeps_rows_up_to_the_checkpoint_and_sets_the_rest_aside(tmp_path):
    _write(tmp_path / "metrics.jsonl", [1, 2, 3, 4, 5], "before-crash")
    log = _logger(tmp_path, start_step=3)
    log.log(4, {"loss": float("nan")})
    log.close()
    rows = read_metrics(log.path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert math.isnan(rows[-1]["loss"])
    assert [r["step"] for r in read_metrics(log.set_aside)] == [1, 2, 3, 4, 5]


def test_clean_resume_appends_in_place(tmp_path):
    _write(tmp_path / "metrics.jsonl", [1, 2], "first")
    log = _logger(tmp_path, start_step=2)
    log.log(3, {"loss": 1.0})
    assert log.set_aside is None
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3]
    assert list(tmp_path.glob("metrics.*.jsonl")) == []


def test_disabled_ranks_touch_nothing(tmp_path):
    _write(tmp_path / "metrics.jsonl", [1, 2, 3], "old")
    log = MetricsLogger(str(tmp_path), enabled=False, start_step=0)
    log.log(1, {"loss": 0.0})
    assert log.set_aside is None
    assert [r["run"] for r in read_metrics(tmp_path / "metrics.jsonl")] == ["old"] * 3


def test_a_line_cut_short_by_a_crash_does_not_stop_the_resume(tmp_path):
    _write(tmp_path / "metrics.jsonl", [1, 2, 3], "before-crash")
    with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 4, "loss": 0.')                   # killed mid-write
    log = _logger(tmp_path, start_step=3)
    log.log(4, {"loss": 2.0})
    assert [(r["step"], r.get("loss")) for r in read_metrics(log.path)] == [
        (1, None), (2, None), (3, None), (4, 2.0)]
    assert open(log.set_aside, encoding="utf-8").read().endswith('"loss": 0.')
