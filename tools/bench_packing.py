#!/usr/bin/env python
"""Packed sequences with a token budget against padded micro-batches: the actor's old-log-prob
pass plus one training step on the same long-tailed batch, one process per measurement,
interleaved A B A B, at equal peak memory.

    .venv/bin/python tools/bench_packing.py [--rows 64] [--cap 1024] [--mean-response 128]
        [--budget 4096] [--rounds 3] [--repeats 3] [--json out.json] [key=value ...]

Workload: ``--rows`` responses with log-normal lengths (mean ``--mean-response``, clipped to
1..``--cap``; the longest row is set to the cap, as in a reasoning batch with a few responses at
the limit), prompts of ``--prompt-len`` tokens, the tiny default model (``model.arch.*=...``
overrides change it), fp32, one process.

1. ``packed``: ``model.sequence_packing=true``, ``model.max_tokens_per_microbatch=--budget``.
   Its peak RSS during the timed steps is the memory bar.
2. ``padded``: today's path (rows grouped by length, micro-batches cut to the columns they
   need) at each ``model.micro_batch_size`` in ``--micro-batch-sizes``; the largest whose peak
   RSS stays within the packed run's is the one compared (equal peak memory).
3. Packed against that padded size, ``--rounds`` rounds of one process each, alternating.
4. Peak memory set by the budget: the packed run again on the batch whose longest response is
   doubled (``--cap`` x 2): its peak RSS against the first.

Peak RSS: ``VmHWM`` after writing ``5`` to ``/proc/self/clear_refs`` once the model, optimizer
and batch exist and one warm-up step has run, so it is the peak of the timed steps. Each
process prints one ``RESULT {json}`` line; the driver reports medians and per-round ratios.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--cap", type=int, default=1024, help="longest response (tokens)")
    p.add_argument("--mean-response", type=int, default=128)
    p.add_argument("--budget", type=int, default=4096, help="model.max_tokens_per_microbatch")
    p.add_argument("--micro-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--rounds", type=int, default=3, help="processes per compared variant")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # child: packed | padded
    p.add_argument("--micro-batch-size", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def long_tailed_batch(rows: int, prompt_len: int, cap: int, mean: int, vocab: int,
                      pad_multiple: int = 1):
    """Log-normal response lengths (sigma 1, mean ``mean``), clipped, the longest at ``cap``."""
    from lens_megatron.actor import TokenBatch

    gen = torch.Generator().manual_seed(0)
    sigma = 1.0
    mu = torch.log(torch.tensor(float(mean))) - sigma ** 2 / 2
    lengths = torch.exp(mu + sigma * torch.randn(rows, generator=gen)).round().clamp(1, cap).long()
    lengths[int(lengths.argmax())] = cap
    width = prompt_len + cap
    ids = torch.randint(3, vocab, (rows, width), generator=gen)
    response = torch.zeros(rows, width, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        response[row, prompt_len:prompt_len + length] = True
        ids[row, prompt_len + length:] = 0
    return TokenBatch.from_rollout(ids, response, pad_multiple), lengths


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def run_child(args) -> dict:
    torch.set_num_threads(args.threads)
    from lens_megatron.actor import LensActor
    from lens_megatron.config import load_config
    from lens_megatron.demo import TINY_DEFAULT
    from lens_megatron.parallel.initialize import destroy_parallel, initialize_from_config

    packed = args.variant == "packed"
    width = args.prompt_len + args.cap
    cfg = load_config(TINY_DEFAULT, [
        f"model.sequence_packing={str(packed).lower()}",
        f"model.max_tokens_per_microbatch={args.budget}",
        f"model.micro_batch_size={args.micro_batch_size}",
        f"model.arch.max_position_embeddings={width + 16}",
        f"rollout.prompts_per_step={max(1, args.rows // 8)}", "rollout.group_size=8",
        "trainer.progress_bar=false", *args.overrides])
    initialize_from_config(cfg)
    actor = LensActor(cfg, total_optimizer_steps=args.repeats + 2)
    tokens, lengths = long_tailed_batch(args.rows, args.prompt_len, args.cap,
                                        args.mean_response, cfg.model.arch.vocab_size,
                                        actor.pad_multiple)
    advantages = torch.linspace(-1.0, 1.0, args.rows)
    normalizer = torch.tensor(float(args.rows))
    plan = actor._plan(tokens)
    rss_built = _status_kib("VmRSS")  # model, optimizer and batch, before any step

    def step() -> float:
        start = time.perf_counter()
        old = actor.compute_logprobs(tokens, entropy=True)["token_logprobs"]
        actor.train_step(tokens, old, advantages, normalizer)
        return time.perf_counter() - start

    step()  # warm-up: allocator, thread pools, optimizer state
    rss_before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
        f.write("5")
    times = [step() for _ in range(args.repeats)]
    peak = _status_kib("VmHWM")
    destroy_parallel()
    return {"variant": args.variant, "micro_batch_size": args.micro_batch_size,
            "budget": args.budget, "cap": args.cap, "seconds": times,
            "median_s": statistics.median(times), "peak_rss_mib": peak / 1024,
            "rss_before_mib": rss_before / 1024, "rss_built_mib": rss_built / 1024,
            "peak_extra_mib": (peak - rss_built) / 1024, "mode": plan.mode,
            "micro_batches": plan.num_micro_batches,
            "tokens": int(tokens.target_mask.sum()), "longest": int(lengths.max()),
            "mean_response": float(lengths.float().mean()), "threads": torch.get_num_threads()}


def spawn(args, variant: str, micro_batch_size: int = 8, cap: int | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--variant", variant,
           "--micro-batch-size", str(micro_batch_size), "--rows", str(args.rows),
           "--prompt-len", str(args.prompt_len), "--cap", str(cap or args.cap),
           "--mean-response", str(args.mean_response), "--budget", str(args.budget),
           "--repeats", str(args.repeats), "--threads", str(args.threads), *args.overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=REPO)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} (micro_batch_size {micro_batch_size}) failed "
                           f"(rc={res.returncode}):\n{res.stderr[-3000:]}")
    out = json.loads(lines[-1][len("RESULT "):])
    print(f"  {variant:>6} mbs={micro_batch_size:<3} cap={out['cap']:<5} {out['mode']:>6} "
          f"{out['micro_batches']:>3} micro-batches  median {out['median_s']:.3f} s  "
          f"peak RSS {out['peak_rss_mib']:.0f} MiB (+{out['peak_extra_mib']:.0f} over the built "
          f"model)", flush=True)
    return out


def drive(args) -> dict:
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"{args.rows} rows, prompt {args.prompt_len}, responses log-normal mean "
          f"{args.mean_response} capped at {args.cap}, budget {args.budget} tokens, "
          f"{args.threads} threads; old log-probs + one training step per timed step")
    print("1. packed, its peak RSS the bar:")
    bar = spawn(args, "packed")
    print("2. padded micro-batch sizes, peak RSS:")
    sweep = {}
    for mbs in args.micro_batch_sizes:
        sweep[mbs] = spawn(args, "padded", mbs)
    fitting = [m for m, r in sweep.items() if r["peak_rss_mib"] <= bar["peak_rss_mib"]]
    if not fitting:
        raise SystemExit("no padded micro_batch_size fits within the packed run's peak RSS; "
                         "add smaller sizes with --micro-batch-sizes")
    chosen = max(fitting)
    print(f"3. packed vs padded micro_batch_size={chosen} (the largest within the packed peak), "
          f"alternating, one process each:")
    rounds = []
    for i in range(args.rounds):
        order = ("packed", "padded") if i % 2 == 0 else ("padded", "packed")
        pair = {v: spawn(args, v, chosen) for v in order}
        rounds.append(pair)
    ratios = [r["padded"]["median_s"] / r["packed"]["median_s"] for r in rounds]
    print("4. the packed run with the longest response doubled:")
    doubled = [spawn(args, "packed", cap=2 * args.cap) for _ in range(2)]
    base_peaks = [bar["peak_rss_mib"]] + [r["packed"]["peak_rss_mib"] for r in rounds]
    peak_packed = statistics.median(base_peaks)
    peak_doubled = statistics.median(d["peak_rss_mib"] for d in doubled)
    result = {
        "date_utc": started.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or
        platform.machine(), "cpus": os.cpu_count(), "loadavg_end": os.getloadavg(),
        "args": {k: v for k, v in vars(args).items() if k not in ("variant",)},
        "sweep": {str(k): v for k, v in sweep.items()}, "chosen_micro_batch_size": chosen,
        "rounds": rounds, "padded_over_packed": {"median": statistics.median(ratios),
                                                  "min": min(ratios), "max": max(ratios)},
        "peak_rss_mib": {"packed": peak_packed,
                         "padded": statistics.median(r["padded"]["peak_rss_mib"] for r in rounds),
                         "packed_longest_doubled": peak_doubled},
        "doubled_over_packed_peak": peak_doubled / peak_packed,
    }
    r = result["padded_over_packed"]
    print(f"speed packed/padded (padded s / packed s): median {r['median']:.2f}x "
          f"[{r['min']:.2f}-{r['max']:.2f}] over {args.rounds} rounds; peak RSS packed "
          f"{peak_packed:.0f} MiB, padded(mbs={chosen}) {result['peak_rss_mib']['padded']:.0f} MiB")
    print(f"longest response doubled ({args.cap} -> {2 * args.cap}): packed peak RSS "
          f"{peak_doubled:.0f} MiB, {100 * (result['doubled_over_packed_peak'] - 1):+.1f}% ; "
          f"load average at the end {result['loadavg_end']}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.variant:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return 0
    drive(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
