"""``make demo``: GRPO vs LENS on the embedded tiny default, on a CPU, in a few minutes.

The real stack runs: a megatron-core GPTModel, the fused log-prob kernel, the LENS advantage
stage, the clipped loss, Megatron's optimizer, the native sampler and math-verify. The task is
generated integer arithmetic (``12+35=`` → ``\\boxed{47}``) with a character tokenizer. A short
supervised warm start gives a policy that solves some groups, fails others entirely (negative
groups) and is mixed on the rest; GRPO and LENS then train from that same start with the same
budget, for each seed. Printed and saved: held-out pass@k (mean and spread over seeds), the
share of groups that gave gradient, the negative-group ratio and the confidence of wrong answers
in negative groups over time, and a PNG of the curves. Every number is measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Optional, Sequence

import torch

from .config import load_config, replace
from .data.arithmetic import solution_text
from .metrics_log import read_metrics

TINY_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "tiny_cpu.yaml")
ESTIMATORS = ("grpo", "lens")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lens-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")],
                   default=[1, 2], help="comma-separated RL seeds per estimator (default 1,2)")
    p.add_argument("--rl-steps", type=int, default=None, help="override trainer.max_steps")
    p.add_argument("--sft-steps", type=int, default=1000)
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--eval-problems", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    return p.parse_args(argv)


def warm_start(trainer, steps: int, batch: int, log) -> list[float]:
    """Supervised steps on problem → ``\\boxed{answer}<eos>`` pairs from the train split."""
    from .actor import TokenBatch
    from .rollout.base import assemble_batch

    tok, records = trainer.tokenizer, trainer.prompts.train_records
    generator = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        picks = torch.randint(len(records), (batch,), generator=generator).tolist()
        prompts = [trainer.prompts.tokenize(records[i]).token_ids for i in picks]
        answers = [tok.encode(solution_text(records[i]), add_bos=False) + [tok.eos_id] for i in picks]
        rb = assemble_batch(prompts, answers, [[0.0] * len(a) for a in answers],
                            [True] * batch, 1, tok.pad_id)
        tokens = TokenBatch.from_rollout(rb.input_ids, rb.response_mask, trainer.actor.pad_multiple)
        losses.append(trainer.actor.sft_step(tokens)["loss"])
        if (step + 1) % 50 == 0:
            log(f"  warm start {step + 1}/{steps}: nll/token {statistics.mean(losses[-50:]):.3f}")
    return losses


def snapshot(actor) -> list[dict]:
    """Copies of every parameter of this rank's chunks (the warm-start weights)."""
    return [{k: v.detach().clone() for k, v in c.named_parameters()} for c in actor.chunks]


def restore(actor, weights: list[dict]) -> None:
    """Load a snapshot into a freshly built actor, main (fp32) optimizer copies included."""
    with torch.no_grad():
        for chunk, state in zip(actor.chunks, weights):
            for name, param in chunk.named_parameters():
                param.copy_(state[name])
    actor.training.optimizer.reload_model_params()


def run(args) -> dict:
    from .parallel.initialize import destroy_parallel, initialize_from_config
    from .trainer import LensTrainer

    os.makedirs(args.out, exist_ok=True)
    base = load_config(TINY_DEFAULT, [f"exp_manager.exp_dir={args.out}",
                                      "exp_manager.resume=never", *args.overrides])
    if args.rl_steps is not None:
        base = replace(base, trainer={"max_steps": args.rl_steps})
    initialize_from_config(base)
    log = lambda text: print(text, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    sft_cfg = replace(base, exp_manager={"name": "warm_start"},
                      trainer={"max_steps": args.sft_steps},  # horizon of the LR schedule
                      optim={"lr": args.sft_lr, "warmup_steps": args.sft_steps // 10,
                             "lr_decay_style": "cosine", "min_lr": args.sft_lr / 20})
    sft = LensTrainer(sft_cfg)
    log(f"[1/3] supervised warm start: {args.sft_steps} steps")
    warm_start(sft, args.sft_steps, 64, log)
    eval_records = sft.prompts.eval_records[: args.eval_problems]
    start_eval = sft.evaluate(eval_records, args.eval_samples, seed=12345)
    weights = snapshot(sft.actor)
    sft.close()
    log(f"      held-out after warm start: {_pass_line(start_eval)}")
    results = {"warm_start": start_eval.flat("eval"), "runs": {}}
    for seed in args.seeds:
        for estimator in ESTIMATORS:
            name = f"{estimator}_seed{seed}"
            log(f"[2/3] RL {name}: {base.trainer.max_steps} steps")
            cfg = replace(base, lens={"estimator": estimator},
                          trainer={"seed": seed, "progress_bar": False},
                          exp_manager={"name": name})
            trainer = LensTrainer(cfg)
            restore(trainer.actor, weights)
            trainer.run()
            final = trainer.evaluate(eval_records, args.eval_samples, seed=12345)
            trainer.close()
            curve = read_metrics(os.path.join(args.out, name, "metrics.jsonl"))
            results["runs"][name] = {"estimator": estimator, "seed": seed,
                                     "eval": final.flat("eval"), "curve": curve}
            log(f"      {name}: {_pass_line(final)}")
    results["seconds"] = time.perf_counter() - t0
    destroy_parallel()
    return results


def _pass_line(result) -> str:
    m = result.summary["all"]
    return "  ".join(f"pass@{k} {v:.3f}" for k, v in m.pass_at_k.items()) + \
        f"  (mean acc {m.mean_accuracy:.3f})"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .demo_report import print_report, write_plot

    args = parse_args(argv)
    results = run(args)
    with open(os.path.join(args.out, "demo_summary.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1, default=float)
    print("[3/3] results")
    print_report(results)
    path = write_plot(results, os.path.join(args.out, "demo_curves.png"))
    print(f"curves: {path}\nsummary: {os.path.join(args.out, 'demo_summary.json')}")
    return 0
