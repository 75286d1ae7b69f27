#!/usr/bin/env python
"""Time ``compute_advantages`` (estimator lens and grpo) at B x G = 512x16 and 8192x16.

CPU always; CUDA too when available (timed with CUDA events after ``torch.cuda.synchronize``).
Reports the median (and p10/p90) over ``--repeats`` timed calls after ``--warmup`` untimed ones.

    .venv/bin/python tools/bench_advantages.py [--repeats 50] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from lens_megatron.algorithms.advantages import AdvantageConfig, compute_advantages


def make_inputs(num_prompts: int, group_size: int, device: str, seed: int = 0):
    """Binary rewards with ~40% all-incorrect groups, lengths 1..4096, log-confidences in [-3, 0]."""
    g = torch.Generator().manual_seed(seed)
    n = num_prompts * group_size
    solve_rate = torch.rand(num_prompts, 1, generator=g) * (torch.rand(num_prompts, 1, generator=g) > 0.4)
    rewards = (torch.rand(num_prompts, group_size, generator=g) < solve_rate).float().reshape(-1)
    lengths = torch.randint(1, 4097, (n,), generator=g)
    logprob_sums = -torch.rand(n, generator=g) * 3 * lengths
    return rewards.to(device), logprob_sums.to(device), lengths.to(device)


def time_call(fn, device: str, warmup: int, repeats: int) -> list[float]:
    """Per-call wall times in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def run(sizes, devices, warmup: int, repeats: int) -> list[dict]:
    rows = []
    for device in devices:
        for num_prompts, group_size in sizes:
            inputs = make_inputs(num_prompts, group_size, device)
            for estimator in ("lens", "grpo"):
                cfg = AdvantageConfig(estimator=estimator)
                times = sorted(time_call(lambda: compute_advantages(*inputs, group_size, cfg), device, warmup, repeats))
                rows.append({
                    "device": device, "B": num_prompts, "G": group_size, "estimator": estimator,
                    "median_ms": statistics.median(times),
                    "p10_ms": times[len(times) // 10], "p90_ms": times[(9 * len(times)) // 10],
                    "repeats": repeats,
                })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512x16,8192x16", help="comma-separated BxG list")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cpu, plus cuda when available")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
               "cpu": ["cpu"], "cuda": ["cuda"]}[args.device]
    rows = run(sizes, devices, args.warmup, args.repeats)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(),
           "gpu": torch.cuda.get_device_name() if "cuda" in devices else None}
    print(f"torch {env['torch']}, {env['threads']} CPU threads" + (f", {env['gpu']}" if env["gpu"] else ""))
    print(f"{'device':<7}{'B x G':>12}{'estimator':>11}{'median ms':>12}{'p10 ms':>10}{'p90 ms':>10}")
    for r in rows:
        print(f"{r['device']:<7}{r['B']:>7} x {r['G']:<2}{r['estimator']:>11}"
              f"{r['median_ms']:>12.3f}{r['p10_ms']:>10.3f}{r['p90_ms']:>10.3f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"env": env, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
