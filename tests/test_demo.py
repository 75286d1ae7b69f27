"""The demo: a shortened run end to end (summary keys and sane values), the warm start's
stopping rule, the report's verdicts on synthetic results, and the built-in task's mix.

The learning claim itself (held-out pass@1 up by >= 0.05 over three seeds) takes minutes and
is recorded with its command in BENCHMARKS.md §5, not asserted here."""
import collections
import json
import math
import os
from types import SimpleNamespace

import pytest

from lens_megatron import demo
from lens_megatron.data.arithmetic import arithmetic_records, split_train_eval
from lens_megatron.demo_report import difference_verdict, learning_verdict, print_report
from lens_megatron.parallel.spawn import run_in_processes

SHORT = ["--sft-max-steps", "30", "--sft-probe-from", "10", "--sft-probe-every", "10",
         "--sft-target", "0.99", "--rl-steps", "2", "--seeds", "1,2", "--eval-problems", "12",
         "--eval-samples", "4", "rollout.prompts_per_step=4", "model.micro_batch_size=16",
         "reward.num_workers=0"]


def demo_worker(out):
    import torch.distributed as dist

    dist.destroy_process_group()  # the demo initialises its own
    return demo.main(["--out", out, *SHORT])


@pytest.mark.slow
def test_short_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    assert run_in_processes(demo_worker, 1, (str(out),))[0] == 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary) >= {"warm_start", "warm_start_detail", "runs", "seconds"}
    assert summary["seconds"] > 0
    assert 0.0 <= summary["warm_start"]["eval/all/pass@1"] <= 1.0
    assert summary["warm_start"]["eval/all/num_problems"] == 12
    detail = summary["warm_start_detail"]
    # The target is out of reach in 30 steps: every probe ran and the cap stopped it.
    assert detail["steps"] == 30 and detail["reached_target"] is False
    assert [step for step, _ in detail["probes"]] == [10, 20, 30]
    assert len(detail["num_correct"]) == 12 and detail["samples"] == 4
    assert sorted(summary["runs"]) == ["grpo_seed1", "grpo_seed2", "lens_seed1", "lens_seed2"]
    for name, run in summary["runs"].items():
        assert run["estimator"] == name.split("_")[0] and run["seed"] == int(name[-1])
        for k in (1, 2, 4):
            assert 0.0 <= run["eval"][f"eval/all/pass@{k}"] <= 1.0
        assert all(0 <= c <= 4 for c in run["num_correct"]) and len(run["num_correct"]) == 12
        assert [row["step"] for row in run["curve"]] == [1, 2]
        assert all("groups/negative_group_ratio" in row for row in run["curve"])
    assert (out / "demo_curves.png").stat().st_size > 0


def _fake_warm_start_trainer(accuracies):
    """A stand-in trainer whose probe returns ``accuracies`` in turn."""
    from lens_megatron.data.loaders import PromptRecord

    probes = iter(accuracies)
    records = [PromptRecord(problem="1+1", answer="2", row=i) for i in range(100)]
    summary = lambda: {"all": SimpleNamespace(mean_accuracy=next(probes))}  # noqa: E731
    return SimpleNamespace(
        prompts=SimpleNamespace(train_records=records),
        actor=SimpleNamespace(sft_step=lambda tokens: {"loss": 1.0}),
        evaluate=lambda recs, samples, seed: SimpleNamespace(summary=summary()))


def test_warm_start_stops_at_the_first_probe_reaching_the_target(monkeypatch):
    monkeypatch.setattr(demo, "_sft_batch", lambda trainer, records, picks: None)
    args = SimpleNamespace(sft_max_steps=100, sft_batch=4, sft_target=0.2, sft_probe_from=20,
                           sft_probe_every=10)
    state = demo.warm_start(_fake_warm_start_trainer([0.0, 0.1, 0.25, 0.5]), args, lambda s: None)
    assert state.steps == 40 and state.reached_target
    assert state.probes == [(20, 0.0), (30, 0.1), (40, 0.25)]
    args.sft_target = 0.9
    state = demo.warm_start(_fake_warm_start_trainer([0.0] * 9), args, lambda s: None)
    assert state.steps == 100 and not state.reached_target and len(state.probes) == 9
    args.sft_target = 0.0  # no stopping rule: no probe, every step
    state = demo.warm_start(_fake_warm_start_trainer([]), args, lambda s: None)
    assert state.steps == 100 and state.probes == []


def _results(start_correct, runs, samples=4):
    """Synthetic demo results: ``runs`` maps (estimator, seed) to per-problem correct counts."""
    def flat(correct):
        return {"eval/all/pass@1": sum(correct) / (samples * len(correct))}

    return {"warm_start": flat(start_correct),
            "warm_start_detail": {"num_correct": start_correct, "samples": samples},
            "runs": {f"{e}_seed{s}": {"estimator": e, "seed": s, "eval": flat(c),
                                      "num_correct": c, "samples": samples}
                     for (e, s), c in runs.items()}}


START = [1, 0, 2, 1, 0, 1, 2, 1] * 10  # 80 problems, pass@1 0.25


def _shifted(counts, extra, every=1):
    return [min(4, c + (extra if i % every == 0 else 0)) for i, c in enumerate(counts)]


def test_learning_verdict_needs_the_gain_beyond_spread_and_eval_error():
    clear = _results(START, {("grpo", 1): _shifted(START, 1), ("grpo", 2): _shifted(START, 1, 2),
                             ("lens", 1): _shifted(START, 1), ("lens", 2): _shifted(START, 1)})
    v = learning_verdict(clear)
    assert v["grpo"]["learned"] and v["lens"]["learned"]
    assert v["grpo"]["gain"] == pytest.approx((0.25 + 0.125) / 2)
    assert v["lens"]["seed_sd"] == 0.0 and v["lens"]["eval_se_of_gain"] == 0.0
    # Seeds far apart: the mean gain is within 2x the seed spread.
    spread = _results(START, {("grpo", 1): _shifted(START, 3), ("grpo", 2): START})
    assert not learning_verdict(spread)["grpo"]["learned"]
    # A small gain on few problems is within the evaluation's standard error.
    tiny = _results(START, {("grpo", 1): _shifted(START, 1, 40), ("grpo", 2): _shifted(START, 1, 40)})
    assert not learning_verdict(tiny)["grpo"]["learned"]
    # A seed below the warm start is never "learned", even when the mean clears the spread.
    good = {("grpo", s): _shifted(START, 1, 4) for s in range(1, 11)}
    assert learning_verdict(_results(START, good))["grpo"]["learned"]
    below = dict(good)
    below[("grpo", 11)] = [max(0, c - 1) if i == 0 else c for i, c in enumerate(START)]
    v = learning_verdict(_results(START, below))["grpo"]
    assert v["gain"] > 2 * v["seed_sd"] and v["gain"] > 2 * v["eval_se_of_gain"]
    assert not v["learned"]


def test_difference_is_claimed_only_beyond_the_spread():
    same = _results(START, {("grpo", 1): _shifted(START, 1), ("grpo", 2): _shifted(START, 1, 2),
                            ("lens", 1): _shifted(START, 1, 2), ("lens", 2): _shifted(START, 1)})
    d = difference_verdict(same)
    assert d["difference"] == pytest.approx(0.0) and not d["claimed"]
    apart = _results(START, {("grpo", 1): START, ("grpo", 2): _shifted(START, 1, 10),
                             ("lens", 1): _shifted(START, 2), ("lens", 2): _shifted(START, 2, 1)})
    d = difference_verdict(apart)
    assert d["difference"] > 0.3 and d["claimed"]
    # Beyond 2x the standard error but with overlapping seed ranges: not claimed.
    runs = {("grpo", s): START for s in range(1, 11)}
    runs[("grpo", 11)] = _shifted(START, 2)
    runs.update({("lens", s): _shifted(START, 1) for s in range(1, 12)})
    d = difference_verdict(_results(START, runs))
    assert d["difference"] > 2 * max(d["seed_se"], d["eval_se"]) and not d["claimed"]
    assert difference_verdict(_results(START, {("grpo", 1): START})) is None
    one_seed = _results(START, {("grpo", 1): START, ("lens", 1): _shifted(START, 2)})
    assert math.isnan(difference_verdict(one_seed)["seed_se"])
    assert not difference_verdict(one_seed)["claimed"]


def test_report_states_the_verdict(capsys):
    results = _results(START, {("grpo", 1): _shifted(START, 1), ("grpo", 2): _shifted(START, 1, 2),
                               ("lens", 1): START, ("lens", 2): _shifted(START, 1, 40)})
    results["warm_start_detail"].update(steps=425, reached_target=True, target=0.2, lr=2e-3)
    for run in results["runs"].values():
        run["curve"] = [{"step": 1, "reward/mean": 0.3}]
    results["warm_start"]["eval/all/mean_accuracy"] = 0.25
    for run in results["runs"].values():
        run["eval"]["eval/all/mean_accuracy"] = run["eval"]["eval/all/pass@1"]
    results["seconds"] = 1.0
    print_report(results)
    text = capsys.readouterr().out
    assert "warm start            0.250" in text
    lines = text.splitlines()
    grpo = next(i for i, line in enumerate(lines) if line.strip().startswith("grpo   after RL"))
    lens = next(i for i, line in enumerate(lines) if line.strip().startswith("lens   after RL"))
    assert "LEARNED" in lines[grpo + 1] and "NOT shown" in lines[lens + 1]
    assert "CLAIMED" in next(line for line in lines if "LENS − GRPO" in line)


def test_arithmetic_mix_and_held_out_split():
    records = arithmetic_records(4200, 1234)
    assert len({r.problem for r in records}) == 4200
    levels = collections.Counter(r.level for r in records)
    # Levels 1 and 4 are exhausted (100 and 64 distinct problems); 2 and 3 fill the rest.
    assert levels[1] <= 100 and levels[4] <= 64 and levels[2] + levels[3] > 4000
    for r in records:
        assert str(eval(r.problem)) == r.answer  # noqa: S307 (generated digits and + or *)
    train, held = split_train_eval(records, 200, 1234)
    assert len(held) == 200 and not {r.problem for r in held} & {r.problem for r in train}
    assert os.path.basename(demo.TINY_DEFAULT) == "tiny_cpu.yaml"


def test_trl_baseline_tool_draws_the_same_problems():
    """tools/trl_grpo_baseline.py re-implements the task (it runs in TRL's own venv)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "tools", "trl_grpo_baseline.py")
    spec = importlib.util.spec_from_file_location("trl_grpo_baseline", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ours = arithmetic_records(600, 7)
    assert tool.arithmetic_problems(600, 7) == [(r.problem + "=", r.answer) for r in ours]
