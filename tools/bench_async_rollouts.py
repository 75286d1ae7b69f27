#!/usr/bin/env python
"""Steps/s of the tiny default with rollouts on a separate rank (one-step-off, staleness 1)
against the synchronous loop, on the same cores.

Variants, each `lens-bench` in its own process group, run interleaved (A B C A B C ...):

* ``sync_1proc``   — synchronous, 1 process, ``--threads`` threads (default 2);
* ``sync_2proc``   — synchronous, colocated, 2 processes (DP=2), 1 thread each;
* ``async_1plus1`` — 1 training rank + 1 rollout rank, 1 thread each, ``rollout.max_staleness=1``.

Per run: the median ``time/step_s`` over ``--steps`` steps after ``--warmup`` (the trainer's
step time; with separate rollout ranks it includes the wait for the batch, so it is the
interval between steps). Prints steps/s per variant (median over ``--rounds``) and the ratio of
the async variant to the better synchronous one, and writes the raw results as JSON.

    python tools/bench_async_rollouts.py --rounds 3 --steps 20 --warmup 2 --json async.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "lens_megatron", "configs", "tiny_cpu.yaml")
COMMON = ["trainer.measure_update_effect=false", "reward.num_workers=0"]


def variants(threads: int) -> dict[str, tuple[int, int, list[str]]]:
    """name -> (processes, threads per process, overrides)."""
    return {
        "sync_1proc": (1, threads, []),
        "sync_2proc": (2, 1, ["trainer.devices=2"]),
        "async_1plus1": (2, 1, ["trainer.devices=2", "rollout.placement=separate",
                                "rollout.num_ranks=1", "rollout.max_staleness=1"]),
    }


def run_variant(name: str, procs: int, threads: int, overrides: list[str], steps: int,
                warmup: int, out_dir: str) -> dict:
    out = os.path.join(out_dir, f"{name}.json")
    bench = ["-m", "lens_megatron.bench.throughput", "--config", CONFIG, "--steps", str(steps),
             "--warmup", str(warmup), "--output", out, *COMMON, *overrides]
    cmd = ([sys.executable, *bench] if procs == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={procs}", *bench])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed ({result.returncode}):\n{result.stdout[-2000:]}\n"
                           f"{result.stderr[-4000:]}")
    with open(out, encoding="utf-8") as f:
        report = json.load(f)
    stages = report["results"][0]["stages"]
    return {"step_s": stages["step"]["median_s"],
            "rollout_s": stages["rollout"]["median_s"],
            "wait_for_rollout_s": stages["wait_for_rollout"]["median_s"],
            "rollout_wait_for_weights_s": stages["rollout_wait_for_weights"]["median_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads of the 1-process variant")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    table = variants(args.threads)
    runs: dict[str, list[dict]] = {name: [] for name in table}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (procs, threads, overrides) in table.items():
                result = run_variant(name, procs, threads, overrides, args.steps, args.warmup, tmp)
                runs[name].append(result)
                print(f"round {r + 1} {name}: {1 / result['step_s']:.3f} steps/s "
                      f"(step {result['step_s']:.3f} s, rollout {result['rollout_s']:.3f} s, "
                      f"waits {result['wait_for_rollout_s']:.3f} / "
                      f"{result['rollout_wait_for_weights_s']:.3f} s)", flush=True)
    speed = {name: statistics.median(1 / x["step_s"] for x in rs) for name, rs in runs.items()}
    best_sync = max(speed["sync_1proc"], speed["sync_2proc"])
    ratios = [1 / a["step_s"] / max(1 / s1["step_s"], 1 / s2["step_s"])
              for a, s1, s2 in zip(runs["async_1plus1"], runs["sync_1proc"], runs["sync_2proc"])]
    print("\nsteps/s (median over rounds): " + ", ".join(f"{k} {v:.3f}" for k, v in speed.items()))
    print(f"async / best synchronous: {speed['async_1plus1'] / best_sync:.2f}x "
          f"(per round: {', '.join(f'{x:.2f}' for x in ratios)})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"runs": runs, "steps_per_s": speed, "ratios": ratios,
                       "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
