"""``lens-bench``: throughput of real training steps, per stage, at the configured layout.

    lens-bench --config CFG [--steps N] [--warmup N] --output FILE.json [key=value ...]

Each measured step is a real trainer step (rollout → reward → old log-probs → LENS → loss →
optimizer → weight sync). ``--fixed-length`` makes every response exactly
``rollout.max_new_tokens`` long (EOS ignored) so generation randomness does not move the
numbers. Warm-up steps are excluded; every figure is the median over measured steps.

FLOPs (dense decoder, per token; N = matmul parameters incl. the LM head, L layers, d = heads
× head_dim, S = context length of the token):
    forward  = 2·N + 4·L·d·S        training = 3 × forward
Generation counts one forward per generated token at its own context length; old log-probs
one forward per token; training 3×. MFU = achieved FLOP/s ÷ (peak per device × devices);
the peak is ``--peak-tflops`` (default: 989 TFLOP/s dense bf16 on an H100; none on a CPU,
where MFU is not reported).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
from typing import Optional, Sequence

import torch

H100_BF16_DENSE_TFLOPS = 989.0
STAGES = ("rollout", "reward", "old_logprobs", "lens_stage", "fwd_bwd", "optimizer",
          "weight_sync", "step",
          # separate rollout ranks: the trainer waiting for a batch, the rollout side for weights
          "wait_for_rollout", "rollout_wait_for_weights")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lens-bench", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=5, help="measured steps")
    p.add_argument("--warmup", type=int, default=2, help="steps excluded from the medians")
    p.add_argument("--output", required=True, help="JSON results file")
    p.add_argument("--fixed-length", action="store_true",
                   help="responses of exactly rollout.max_new_tokens tokens")
    p.add_argument("--compare", action="store_true",
                   help="run GRPO and LENS in this process; report the LENS stage's share")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s of one device for MFU")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def matmul_params(arch) -> int:
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f
    return arch.num_layers * per_layer + arch.vocab_size * h  # + LM head


def forward_flops(arch, context_lengths: torch.Tensor) -> float:
    """Σ over tokens of (2·N + 4·L·d·S_token)."""
    d = arch.num_attention_heads * arch.head_dim
    n_tokens = float(context_lengths.numel())
    return 2.0 * matmul_params(arch) * n_tokens + 4.0 * arch.num_layers * d * float(
        context_lengths.double().sum())


def step_flops(arch, prompt_lengths, response_lengths) -> dict[str, float]:
    """FLOPs of generation, the log-prob pass and training for one rollout batch."""
    gen_ctx, seq_ctx = [], []
    for p, r in zip(prompt_lengths.tolist(), response_lengths.tolist()):
        gen_ctx.append(torch.arange(p, p + r))  # each generated token attends to its prefix
        seq_ctx.append(torch.arange(1, p + r + 1))
    gen = forward_flops(arch, torch.cat(gen_ctx)) if gen_ctx else 0.0
    # Prefill of the prompts is part of generation too.
    gen += forward_flops(arch, torch.cat([torch.arange(1, p + 1) for p in prompt_lengths.tolist()]))
    fwd = forward_flops(arch, torch.cat(seq_ctx))
    return {"rollout": gen, "old_logprobs": fwd, "fwd_bwd": 3.0 * fwd}


def default_peak() -> Optional[float]:
    if torch.cuda.is_available() and "H100" in torch.cuda.get_device_name():
        return H100_BF16_DENSE_TFLOPS
    return None


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StepRecorder:
    """Wraps ``LensTrainer.train_step`` to keep per-step timings, token counts and FLOPs."""

    def __init__(self, trainer) -> None:
        self.trainer, self.rows = trainer, []
        original_next = trainer.rollouts.next

        def rollout_spy(step):
            scored = original_next(step)
            self.last_batch = scored.batch
            return scored

        trainer.rollouts.next = rollout_spy

    def step(self) -> None:
        metrics = self.trainer.train_step()
        self.trainer.step += 1
        b = self.last_batch
        self.rows.append({
            "times": {s: metrics.get(f"time/{s}_s", 0.0) for s in STAGES},
            "generated_tokens": int(b.response_lengths.sum()),
            "sequence_tokens": int((b.prompt_lengths + b.response_lengths).sum()),
            "flops": step_flops(self.trainer.cfg.model.arch, b.prompt_lengths, b.response_lengths),
            # groups generated per trained group (DAPO dynamic sampling's extra generation)
            "generation_ratio": metrics.get("dynamic_sampling/generation_ratio", 1.0),
        })


def summarize(rows: list[dict], world: int, peak_tflops: Optional[float]) -> dict:
    def med(values):
        return statistics.median(values)

    out = {}
    for stage in STAGES:
        seconds = med([r["times"][stage] for r in rows])
        entry = {"median_s": seconds}
        tokens_key = "generated_tokens" if stage == "rollout" else "sequence_tokens"
        if stage in ("rollout", "old_logprobs", "fwd_bwd", "step"):
            tokens = med([r[tokens_key] for r in rows])
            entry["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
            entry["tokens_per_s_per_device"] = entry["tokens_per_s"] / world
        if stage in ("rollout", "old_logprobs", "fwd_bwd"):
            flops = med([r["flops"][stage] for r in rows])
            entry["model_tflops_per_s"] = flops / seconds / 1e12 if seconds > 0 else 0.0
            entry["mfu"] = (entry["model_tflops_per_s"] / (peak_tflops * world)
                            if peak_tflops else None)
        out[stage] = entry
    out["generation_ratio"] = {"median": med([r["generation_ratio"] for r in rows])}
    return out


def run_one(cfg, steps: int, warmup: int, peak: Optional[float], groups=None) -> dict:
    import torch.distributed as dist

    from ..trainer import LensTrainer

    trainer = LensTrainer(cfg, groups)
    recorder = StepRecorder(trainer)
    try:
        for _ in range(warmup + steps):
            recorder.step()
    finally:
        trainer.rollouts.stop(trainer.step)
        trainer.close()
    world = dist.get_world_size()
    stages = summarize(recorder.rows[warmup:], world, peak)
    step = stages["step"]["median_s"]
    return {"estimator": cfg.lens.estimator, "stages": stages,
            "lens_stage_share_of_step": stages["lens_stage"]["median_s"] / step if step else None,
            "steps_measured": steps, "warmup_steps": warmup,
            "sequences_per_step": cfg.rollout.prompts_per_step * cfg.rollout.group_size}


def print_table(result: dict) -> None:
    print(f"\n{result['estimator']}: median over {result['steps_measured']} steps "
          f"({result['sequences_per_step']} sequences/step)")
    print(f"{'stage':>14} {'seconds':>10} {'tokens/s':>12} {'tok/s/dev':>11} {'TFLOP/s':>9} {'MFU':>7}")
    for stage, e in result["stages"].items():
        if stage == "generation_ratio":
            continue
        mfu = e.get("mfu")
        print(f"{stage:>14} {e['median_s']:>10.4f} {e.get('tokens_per_s', float('nan')):>12.1f} "
              f"{e.get('tokens_per_s_per_device', float('nan')):>11.1f} "
              f"{e.get('model_tflops_per_s', float('nan')):>9.4f} "
              f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%':>7}")
    share = result["lens_stage_share_of_step"]
    print(f"LENS stage share of step time: {100 * share:.3f}%")
    ratio = result["stages"]["generation_ratio"]["median"]
    if ratio != 1.0:
        print(f"dynamic sampling: {ratio:.2f} groups generated per trained group")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..cli import _quiet_third_party, load_and_check
    from ..config import ConfigError, replace
    from ..parallel.initialize import destroy_parallel, initialize_from_config

    args = parse_args(argv)
    _quiet_third_party()
    overrides = [*args.overrides, "exp_manager.resume=never", "trainer.progress_bar=false",
                 f"trainer.max_steps={args.steps + args.warmup}"]
    if args.fixed_length:
        overrides.append("rollout.ignore_eos=true")
    try:
        cfg, _ = load_and_check(args.config, overrides)
    except ConfigError as exc:
        print(f"lens-bench: configuration error: {exc}", file=sys.stderr)
        return 2
    groups = initialize_from_config(cfg)
    m = cfg.model
    peak = args.peak_tflops if args.peak_tflops is not None else default_peak()
    estimators = ("grpo", "lens") if args.compare else (cfg.lens.estimator,)
    if groups is not None and groups.roles.role == "rollout":  # separate rollout ranks
        from ..rollout.rollout_rank import run_rollout_rank

        for e in estimators:
            run_rollout_rank(replace(cfg, lens={"estimator": e}), groups)
        destroy_parallel()
        return 0
    results = [run_one(replace(cfg, lens={"estimator": e}), args.steps, args.warmup, peak, groups)
               for e in estimators]
    import torch.distributed as dist

    report = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "world_size": dist.get_world_size(),
        "layout": {"tp": m.tensor_model_parallel_size, "pp": m.pipeline_model_parallel_size,
                   "dp": cfg.data_parallel_size},
        "precision": m.precision, "peak_tflops_per_device": peak,
        "model_params": m.arch.num_parameters(), "peak_memory_bytes": peak_memory_bytes(),
        "flop_formula": "forward = 2*N_matmul + 4*L*d*S per token; training = 3*forward",
        "results": results,
    }
    if dist.get_rank() == 0:
        for result in results:
            print_table(result)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.output}")
    destroy_parallel()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
