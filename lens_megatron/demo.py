"""``make demo``: GRPO vs LENS on the embedded tiny default, on a CPU, in a few minutes.

The real stack runs: a megatron-core GPTModel, the fused log-prob kernel, the LENS advantage
stage, the clipped loss, Megatron's optimizer, the native sampler and math-verify. The task is
generated integer arithmetic (``12+35=`` → ``\\boxed{47}``) with a character tokenizer.

A supervised warm start at a constant learning rate runs until the policy's sampled accuracy
on a fixed probe of *training* problems reaches ``--sft-target`` (so the start is the same
kind of policy on any machine: it solves some groups, fails others entirely — negative groups
— and is mixed on the rest). GRPO and LENS then train from that same start with the same
budget, for each seed. Printed and saved: held-out pass@k (every problem of the held-out
split, never trained on) with its standard error, each estimator's mean ± spread over seeds
and whether its gain over the warm start exceeds that spread, the share of groups that gave
gradient, the negative-group ratio and the confidence of wrong answers in negative groups over
time, the direct effect of each update, and a PNG of the curves. Every number is measured in
this run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .config import load_config, replace
from .data.arithmetic import solution_text
from .metrics_log import read_metrics

TINY_DEFAULT = os.path.join(os.path.dirname(__file__), "configs", "tiny_cpu.yaml")
ESTIMATORS = ("grpo", "lens")
EVAL_SEED = 12345
PROBE_PROBLEMS = 64  # training problems the warm start's stopping rule samples
PROBE_SAMPLES = 4
PROBE_SEED = 99


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lens-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out", help="output directory")
    p.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")],
                   default=[1, 2, 3], help="comma-separated RL seeds per estimator (default 1,2,3)")
    p.add_argument("--rl-steps", type=int, default=None, help="override trainer.max_steps")
    p.add_argument("--sft-max-steps", type=int, default=1000,
                   help="warm start: stop here if the probe target was not reached")
    p.add_argument("--sft-target", type=float, default=0.2,
                   help="warm start: stop once the sampled accuracy on the training probe "
                        "reaches this (0 = run --sft-max-steps steps)")
    p.add_argument("--sft-probe-every", type=int, default=25)
    p.add_argument("--sft-probe-from", type=int, default=150, help="first step probed")
    p.add_argument("--sft-lr", type=float, default=2e-3)
    p.add_argument("--sft-warmup", type=int, default=100)
    p.add_argument("--sft-batch", type=int, default=64)
    p.add_argument("--eval-problems", type=int, default=None,
                   help="held-out problems evaluated (default: the whole held-out split)")
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    return p.parse_args(argv)


@dataclass
class WarmStart:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    probes: list[tuple[int, float]] = field(default_factory=list)  # (step, sampled accuracy)
    reached_target: bool = False


def _sft_batch(trainer, records, picks):
    from .actor import TokenBatch
    from .rollout.base import assemble_batch

    tok = trainer.tokenizer
    prompts = [trainer.prompts.tokenize(records[i]).token_ids for i in picks]
    answers = [tok.encode(solution_text(records[i]), add_bos=False) + [tok.eos_id] for i in picks]
    rb = assemble_batch(prompts, answers, [[0.0] * len(a) for a in answers],
                        [True] * len(picks), 1, tok.pad_id)
    return TokenBatch.from_rollout(rb.input_ids, rb.response_mask, trainer.actor.pad_multiple)


def warm_start(trainer, args, log) -> WarmStart:
    """Supervised steps on problem → ``\\boxed{answer}<eos>`` pairs from the train split,
    until the sampled accuracy on a fixed probe of training problems reaches the target."""
    records = trainer.prompts.train_records
    probe = records[:PROBE_PROBLEMS]
    generator = torch.Generator().manual_seed(0)
    state = WarmStart()
    for step in range(1, args.sft_max_steps + 1):
        picks = torch.randint(len(records), (args.sft_batch,), generator=generator).tolist()
        state.losses.append(trainer.actor.sft_step(_sft_batch(trainer, records, picks))["loss"])
        state.steps = step
        if args.sft_target > 0 and step >= args.sft_probe_from and \
                (step - args.sft_probe_from) % args.sft_probe_every == 0:
            acc = trainer.evaluate(probe, PROBE_SAMPLES, seed=PROBE_SEED).summary["all"].mean_accuracy
            state.probes.append((step, acc))
            log(f"  warm start {step}: nll/token {statistics.mean(state.losses[-25:]):.3f}, "
                f"training-probe accuracy {acc:.3f} (target {args.sft_target})")
            if acc >= args.sft_target:
                state.reached_target = True
                break
        elif step % 100 == 0:
            log(f"  warm start {step}: nll/token {statistics.mean(state.losses[-50:]):.3f}")
    return state


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


def _evaluation(result) -> dict:
    """The flat pass@k dict plus the per-problem correct counts (for standard errors)."""
    return {"eval": result.flat("eval"), "num_correct": list(result.num_correct),
            "samples": result.samples_per_problem}


def _sft_config(base, args):
    return replace(base, exp_manager={"name": "warm_start"},
                   trainer={"max_steps": args.sft_max_steps},  # horizon of the LR schedule
                   optim={"lr": args.sft_lr, "warmup_steps": args.sft_warmup,
                          "lr_decay_style": "constant", "min_lr": 0.0})


def base_config(out: str, overrides: Sequence[str], rl_steps: Optional[int] = None):
    """The demo's config: the tiny default writing under ``out``, never resuming."""
    base = load_config(TINY_DEFAULT, [f"exp_manager.exp_dir={out}", "exp_manager.resume=never",
                                      *overrides])
    return replace(base, trainer={"max_steps": rl_steps}) if rl_steps is not None else base


def rl_config(base, estimator: str, seed: int, name: str):
    """One RL run's config from the demo's base."""
    return replace(base, lens={"estimator": estimator},
                   trainer={"seed": seed, "progress_bar": False}, exp_manager={"name": name})


def warm_start_and_evaluate(base, args, log):
    """The supervised warm start and its held-out evaluation, on an initialized job.
    Returns (the warm start's record, the held-out records, their evaluation, the weights)."""
    from .trainer import LensTrainer

    sft = LensTrainer(_sft_config(base, args))
    ws = warm_start(sft, args, log)
    eval_records = sft.prompts.eval_records[: args.eval_problems]
    start_eval = sft.evaluate(eval_records, args.eval_samples, seed=EVAL_SEED)
    weights = snapshot(sft.actor)
    sft.close()
    return ws, eval_records, start_eval, weights


def run(args) -> dict:
    from .parallel.initialize import destroy_parallel, initialize_from_config

    os.makedirs(args.out, exist_ok=True)
    base = base_config(args.out, args.overrides, args.rl_steps)
    initialize_from_config(base)
    log = lambda text: print(text, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    log(f"[1/3] supervised warm start (constant lr {args.sft_lr}, until the training-probe "
        f"accuracy reaches {args.sft_target}, at most {args.sft_max_steps} steps)")
    ws, eval_records, start_eval, weights = warm_start_and_evaluate(base, args, log)
    log(f"      {ws.steps} steps; held-out after warm start: {_pass_line(start_eval)}")
    results = {"warm_start": start_eval.flat("eval"),
               "warm_start_detail": {"steps": ws.steps, "probes": ws.probes,
                                     "reached_target": ws.reached_target,
                                     "target": args.sft_target, "lr": args.sft_lr,
                                     "num_correct": list(start_eval.num_correct),
                                     "samples": start_eval.samples_per_problem},
               "runs": {}}
    phase = {"warm_start": time.perf_counter() - t0}
    for seed in args.seeds:
        for estimator in ESTIMATORS:
            name = f"{estimator}_seed{seed}"
            log(f"[2/3] RL {name}: {base.trainer.max_steps} steps")
            results["runs"][name] = _rl_run(base, weights, estimator, seed, eval_records, args)
            log(f"      {name}: {_pass_from_flat(results['runs'][name]['eval'])}")
    phase["rl"] = time.perf_counter() - t0 - phase["warm_start"]
    results["seconds"] = time.perf_counter() - t0
    results["seconds_by_phase"] = phase
    destroy_parallel()
    return results


def _rl_run(base, weights, estimator: str, seed: int, eval_records, args) -> dict:
    from .trainer import LensTrainer

    name = f"{estimator}_seed{seed}"
    trainer = LensTrainer(rl_config(base, estimator, seed, name))
    restore(trainer.actor, weights)
    trainer.run()
    final = trainer.evaluate(eval_records, args.eval_samples, seed=EVAL_SEED)
    trainer.close()
    curve = read_metrics(os.path.join(args.out, name, "metrics.jsonl"))
    return {"estimator": estimator, "seed": seed, **_evaluation(final), "curve": curve}


def _pass_from_flat(flat: dict) -> str:
    ks = sorted(int(k.rsplit("@", 1)[1]) for k in flat if k.startswith("eval/all/pass@"))
    return "  ".join(f"pass@{k} {flat[f'eval/all/pass@{k}']:.3f}" for k in ks)


def _pass_line(result) -> str:
    return _pass_from_flat(result.flat("eval"))


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
