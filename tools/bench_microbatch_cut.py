#!/usr/bin/env python
"""Time the actor's old-log-prob pass and training step on ragged responses, with rows grouped
by length and micro-batches cut to the columns they need ("cut", the default) against every
micro-batch at the full padded width in the original row order ("full", what the actor did
before), on the same batch in the same process, interleaved A B A B.

    .venv/bin/python tools/bench_microbatch_cut.py [--rows 64] [--micro-batch-size 8]
        [--prompt-len 16] [--max-response 240] [--repeats 5] [--json out.json] [key=value ...]

Response lengths are uniform in 1..max-response (RL responses are this ragged or worse);
the model is the tiny default unless overridden (``model.arch.*=...``). Reports the median
seconds per variant and the full/cut ratio per pair.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-response", type=int, default=240)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def ragged_batch(rows: int, prompt_len: int, max_response: int, vocab: int):
    from lens_megatron.actor import TokenBatch

    gen = torch.Generator().manual_seed(0)
    width = prompt_len + max_response
    ids = torch.randint(3, vocab, (rows, width), generator=gen)
    lengths = torch.randint(1, max_response + 1, (rows,), generator=gen)
    response = torch.zeros(rows, width, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):
        response[row, prompt_len:prompt_len + length] = True
        ids[row, prompt_len + length:] = 0
    return TokenBatch.from_rollout(ids, response), lengths


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lens_megatron.actor import LensActor
    from lens_megatron.config import load_config
    from lens_megatron.demo import TINY_DEFAULT
    from lens_megatron.parallel.initialize import destroy_parallel, initialize_from_config

    width = args.prompt_len + args.max_response
    cfg = load_config(TINY_DEFAULT, [
        f"model.micro_batch_size={args.micro_batch_size}",
        f"model.arch.max_position_embeddings={max(width, 128)}",
        f"rollout.prompts_per_step={args.rows // 8}", "rollout.group_size=8",
        "trainer.progress_bar=false", *args.overrides])
    initialize_from_config(cfg)
    actor = LensActor(cfg, total_optimizer_steps=10 * args.repeats + 10)
    tokens, lengths = ragged_batch(args.rows, args.prompt_len, args.max_response,
                                   cfg.model.arch.vocab_size)
    cut_lengths = actor._needed_lengths
    full_lengths = lambda mask: torch.full((mask.shape[0],), mask.shape[1])  # noqa: E731
    advantages = torch.linspace(-1.0, 1.0, args.rows)
    normalizer = torch.tensor(float(args.rows))

    def step(variant: str) -> float:
        actor._needed_lengths = cut_lengths if variant == "cut" else full_lengths
        start = time.perf_counter()
        old = actor.compute_logprobs(tokens)["token_logprobs"]
        actor.train_step(tokens, old, advantages, normalizer)
        return time.perf_counter() - start

    for variant in ("cut", "full"):  # warm-up
        step(variant)
    times = {"cut": [], "full": []}
    for _ in range(args.repeats):
        for variant in ("cut", "full"):
            times[variant].append(step(variant))
    destroy_parallel()
    ratios = [f / c for f, c in zip(times["full"], times["cut"])]
    result = {
        "rows": args.rows, "micro_batch_size": args.micro_batch_size,
        "prompt_len": args.prompt_len, "max_response": args.max_response,
        "mean_response": float(lengths.float().mean()), "threads": torch.get_num_threads(),
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "full_over_cut": {"median": statistics.median(ratios), "min": min(ratios),
                          "max": max(ratios)},
        "times_s": times,
    }
    print(f"{args.rows} rows × (prompt {args.prompt_len} + response 1..{args.max_response}, "
          f"mean {result['mean_response']:.0f}), micro-batch {args.micro_batch_size}, "
          f"{result['threads']} threads; old log-probs + one training step:")
    for variant in ("cut", "full"):
        print(f"  {variant:>4}: median {result['median_s'][variant]:.3f} s")
    r = result["full_over_cut"]
    print(f"  full/cut: {r['median']:.2f}× [{r['min']:.2f}–{r['max']:.2f}] over {args.repeats} pairs")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
