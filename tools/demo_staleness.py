"""Does one-step-off training learn as well as on-policy? The demo task at staleness 0 and 1.

The demo's supervised warm start runs once (one process, the demo's own stopping rule and
settings); then, for each seed and each ``rollout.max_staleness``, a LENS run of the demo's RL
budget starts from those weights as a two-process job — one training rank and one rollout rank
(``rollout.placement: separate``), one thread each — and is evaluated on the demo's held-out
split (every problem, 8 samples, the demo's evaluation seed). Printed and saved
(``staleness_summary.json``): held-out pass@1 per run, mean ± seed spread (sample std) per
staleness, the version lag each run trained at, and whether staleness 1 lies within the seed
spread of staleness 0.

    .venv/bin/python tools/demo_staleness.py --out /tmp/demo_staleness [--seeds 1,2,3]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory (warm start, runs, summary)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    p.add_argument("--staleness", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    p.add_argument("--estimator", default="lens", choices=("lens", "grpo"))
    p.add_argument("--rl-steps", type=int, default=None, help="override trainer.max_steps")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per two-process run")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value), every run")
    return p.parse_args(argv)


def warm_start_worker(out: str, overrides: list[str], rl_steps) -> dict:
    """The demo's warm start and its held-out evaluation; the weights go to a file."""
    import torch

    from lens_megatron import demo
    from lens_megatron.parallel.initialize import initialize_from_config

    args = demo.parse_args([])  # the demo's warm-start settings, unchanged
    base = demo.base_config(out, overrides, rl_steps)
    initialize_from_config(base)
    state, _, start, weights = demo.warm_start_and_evaluate(
        base, args, lambda text: print(text, flush=True))
    torch.save(weights, os.path.join(out, "warm_start.pt"))
    return {"steps": state.steps, "reached_target": state.reached_target,
            **demo._evaluation(start)}


def rl_worker(out: str, overrides: list[str], rl_steps, estimator: str, seed: int,
              staleness: int):
    """One rank of a two-process job: the rollout rank generates; the training rank trains
    from the warm start and evaluates."""
    import torch

    from lens_megatron import demo
    from lens_megatron.config import replace
    from lens_megatron.metrics_log import read_metrics
    from lens_megatron.parallel.initialize import initialize_from_config
    from lens_megatron.rollout.rollout_rank import build_rollout_worker
    from lens_megatron.trainer import LensTrainer

    name = f"{estimator}_seed{seed}_staleness{staleness}"
    cfg = replace(demo.rl_config(demo.base_config(out, overrides, rl_steps), estimator, seed,
                                 name),
                  trainer={"devices": 2},
                  rollout={"placement": "separate", "num_ranks": 1,
                           "max_staleness": staleness})
    groups = initialize_from_config(cfg)
    if groups.roles.role == "rollout":
        worker = build_rollout_worker(cfg, groups)
        code = worker.run()
        worker.close()
        return {"role": "rollout", "code": code}
    started = time.perf_counter()
    trainer = LensTrainer(cfg, groups)
    demo.restore(trainer.actor, torch.load(os.path.join(out, "warm_start.pt")))
    trainer.run()
    args = demo.parse_args([])
    final = trainer.evaluate(trainer.prompts.eval_records[: args.eval_problems],
                             args.eval_samples, seed=demo.EVAL_SEED)
    trainer.close()
    curve = read_metrics(os.path.join(out, name, "metrics.jsonl"))
    return {"role": "trainer", "name": name, "seed": seed, "staleness": staleness,
            **demo._evaluation(final), "seconds": time.perf_counter() - started,
            "version_lags": [row.get("rollout/version_lag") for row in curve]}


def _pass1(run: dict) -> float:
    return float(run["eval"]["eval/all/pass@1"])


def summarize(start: dict, runs: list[dict], staleness: list[int]) -> dict:
    by = {k: [r for r in runs if r["staleness"] == k] for k in staleness}
    stats = {}
    for k, rows in by.items():
        values = [_pass1(r) for r in rows]
        stats[k] = {"pass@1": values, "mean": statistics.mean(values),
                    "seed_sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
                    "max_lag": max(max(x for x in r["version_lags"] if x is not None)
                                   for r in rows)}
    out = {"warm_start_pass@1": _pass1(start), "by_staleness": stats}
    if 0 in stats and 1 in stats:
        diff = stats[1]["mean"] - stats[0]["mean"]
        out["staleness1_minus_0"] = diff
        sd = stats[0]["seed_sd"]  # nan with one seed: no spread to judge against
        out["within_seed_spread_of_staleness0"] = None if math.isnan(sd) else abs(diff) <= sd
    return out


def main(argv=None) -> int:
    from lens_megatron.parallel.spawn import run_in_processes

    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    print("[1/3] the demo's warm start (one process)", flush=True)
    start = run_in_processes(warm_start_worker, 1, (args.out, args.overrides, args.rl_steps),
                             timeout=args.timeout_s)[0]
    print(f"      {start['steps']} steps; held-out pass@1 {_pass1(start):.3f}", flush=True)
    runs = []
    for seed in args.seeds:
        for k in args.staleness:
            print(f"[2/3] {args.estimator} seed {seed}, staleness {k}: 1 training + 1 rollout "
                  "rank", flush=True)
            ranks = run_in_processes(
                rl_worker, 2, (args.out, args.overrides, args.rl_steps, args.estimator, seed, k),
                timeout=args.timeout_s, env={"LENS_SPAWN_INIT_GROUP": "0", **ONE_THREAD})
            run = next(r for r in ranks if r["role"] == "trainer")
            rollout = next(r for r in ranks if r["role"] == "rollout")
            if rollout["code"] != 0:
                raise SystemExit(f"{run['name']}: the rollout rank exited with {rollout['code']}")
            runs.append(run)
            print(f"      pass@1 {_pass1(run):.3f}, lags seen {sorted(set(run['version_lags']))}"
                  f", {run['seconds']:.0f} s", flush=True)
    summary = summarize(start, runs, args.staleness)
    summary["seconds"] = time.perf_counter() - t0
    with open(os.path.join(args.out, "staleness_summary.json"), "w", encoding="utf-8") as f:
        json.dump({"summary": summary, "warm_start": start, "runs": runs}, f, indent=1,
                  default=float)
    print("[3/3] held-out pass@1 (mean ± seed spread)")
    print(f"  warm start     {summary['warm_start_pass@1']:.3f}")
    for k, s in summary["by_staleness"].items():
        print(f"  staleness {k}    {s['mean']:.3f} ± {s['seed_sd']:.3f}  "
              f"({', '.join(f'{v:.3f}' for v in s['pass@1'])}; max lag {s['max_lag']:.0f})")
    if "staleness1_minus_0" in summary:
        within = summary["within_seed_spread_of_staleness0"]
        verdict = ("no seed spread to judge against (one seed)" if within is None else
                   f"{'within' if within else 'OUTSIDE'} the seed spread of staleness 0")
        print(f"  staleness 1 - 0: {summary['staleness1_minus_0']:+.3f}, {verdict}")
    print(f"wall time {summary['seconds']:.0f} s; {os.path.join(args.out, 'staleness_summary.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
