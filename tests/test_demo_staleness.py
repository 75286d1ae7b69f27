"""tools/demo_staleness.py's verdict: staleness 1 vs the seed spread of staleness 0."""
import importlib.util
import math
import os

import pytest

SPEC = importlib.util.spec_from_file_location(
    "demo_staleness", os.path.join(os.path.dirname(__file__), "..", "tools", "demo_staleness.py"))
demo_staleness = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(demo_staleness)


def _run(k, pass1, lags):
    return {"staleness": k, "eval": {"eval/all/pass@1": pass1}, "version_lags": lags}


def test_summary_means_spreads_lags_and_verdict():
    start = {"eval": {"eval/all/pass@1": 0.24}}
    runs = [_run(0, 0.36, [0.0, 0.0]), _run(0, 0.34, [0.0]), _run(1, 0.35, [0.0, 1.0]),
            _run(1, 0.33, [None, 1.0])]
    s = demo_staleness.summarize(start, runs, [0, 1])
    assert s["warm_start_pass@1"] == 0.24
    assert s["by_staleness"][0]["mean"] == pytest.approx(0.35)
    assert s["by_staleness"][0]["seed_sd"] == pytest.approx(math.sqrt(2) * 0.01)
    assert s["by_staleness"][1]["max_lag"] == 1.0 and s["by_staleness"][0]["max_lag"] == 0.0
    assert s["staleness1_minus_0"] == pytest.approx(-0.01)
    assert s["within_seed_spread_of_staleness0"]
    far = demo_staleness.summarize(start, runs[:2] + [_run(1, 0.20, [1.0]), _run(1, 0.21, [1.0])],
                                   [0, 1])
    assert not far["within_seed_spread_of_staleness0"]


def test_one_seed_gives_no_verdict():
    start = {"eval": {"eval/all/pass@1": 0.24}}
    s = demo_staleness.summarize(start, [_run(0, 0.36, [0.0]), _run(1, 0.20, [1.0])], [0, 1])
    assert s["within_seed_spread_of_staleness0"] is None
