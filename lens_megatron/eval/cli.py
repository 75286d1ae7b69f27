"""``lens-eval``: pass@k on MATH-500 (or any problem/answer set) from a Megatron or HF
checkpoint, and side-by-side comparison of two evaluations.

    lens-eval --config CFG --checkpoint MEGATRON_DIR --data math500.jsonl --samples 16 \\
              --output eval.json [--plot eval.png] [--max-problems N] [key=value ...]
    lens-eval --config CFG --hf-dir HF_DIR ...            # converted on the fly (or vLLM)
    lens-eval --compare grpo.json lens.json --labels GRPO LENS [--plot compare.png]

Generation goes through the configured rollout engine (``rollout.engine``: the native
Megatron sampler, or vLLM on the HF weights), at ``rollout.temperature``/``top_p`` and
``rollout.max_new_tokens`` (the paper: 1.0 / 1.0, 4,096). math-verify judges. Reported:
pass@k for k in {1, 2, 4, 8, 16} (unbiased estimator, k ≤ samples), the mean accuracy over
all samples, on all problems, the Levels 4–5 subset and each level.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Optional, Sequence

from .math500 import load_math500


def parse_args(argv):
    p = argparse.ArgumentParser(prog="lens-eval", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="trainer YAML (model, tokenizer, rollout, data template)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="Megatron checkpoint (lens-convert output or a "
                                             "training checkpoint step directory)")
    source.add_argument("--hf-dir", help="Hugging Face model directory")
    p.add_argument("--data", help="problems (MATH-500 format); default $LENS_MATH500_PATH")
    p.add_argument("--samples", type=int, default=16, help="samples per problem (n)")
    p.add_argument("--max-problems", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", help="JSON results")
    p.add_argument("--plot", help="PNG bar chart (per level, or the comparison)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"))
    p.add_argument("--labels", nargs=2, default=["A", "B"])
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def results_table(result: dict) -> str:
    ks = sorted(int(k) for k in result["subsets"]["all"]["pass_at_k"])
    lines = [f"{'subset':>10} {'problems':>9} {'mean acc':>9} " + " ".join(f"{'pass@' + str(k):>8}" for k in ks)]
    for name, s in result["subsets"].items():
        lines.append(f"{name:>10} {s['num_problems']:>9} {s['mean_accuracy']:>9.4f} "
                     + " ".join(f"{s['pass_at_k'][str(k)]:>8.4f}" for k in ks))
    return "\n".join(lines)


def _as_json(eval_result, source: str, samples: int) -> dict:
    subsets = {name: {"num_problems": m.num_problems, "num_samples": m.num_samples,
                      "mean_accuracy": m.mean_accuracy,
                      "pass_at_k": {str(k): v for k, v in m.pass_at_k.items()}}
               for name, m in eval_result.summary.items()}
    return {"source": source, "samples_per_problem": samples, "subsets": subsets,
            "num_correct": eval_result.num_correct, "levels": eval_result.levels,
            "seconds": eval_result.seconds}


def evaluate(args) -> dict:
    from ..cli import load_and_check
    from ..parallel.initialize import destroy_parallel, initialize_from_config
    from .policy import EvalPolicy

    cfg, _ = load_and_check(args.config, [*args.overrides, "exp_manager.resume=never"])
    records = load_math500(args.data)[: args.max_problems]
    initialize_from_config(cfg)
    with tempfile.TemporaryDirectory(prefix="lens-eval-") as scratch:
        policy = EvalPolicy(cfg, checkpoint=args.checkpoint, hf_dir=args.hf_dir, scratch=scratch)
        try:
            result = policy.evaluate(records, args.samples, seed=args.seed)
        finally:
            policy.close()
            destroy_parallel()
    return _as_json(result, args.checkpoint or args.hf_dir or "initial weights", args.samples)


def compare(a: dict, b: dict, labels: Sequence[str]) -> str:
    ks = sorted(int(k) for k in a["subsets"]["all"]["pass_at_k"] if k in b["subsets"]["all"]["pass_at_k"])
    lines = [f"{'subset':>10} {'metric':>9} {labels[0]:>9} {labels[1]:>9} {'Δ':>8}"]
    for subset in a["subsets"]:
        if subset not in b["subsets"]:
            continue
        sa, sb = a["subsets"][subset], b["subsets"][subset]
        rows = [("mean acc", sa["mean_accuracy"], sb["mean_accuracy"])]
        rows += [(f"pass@{k}", sa["pass_at_k"][str(k)], sb["pass_at_k"][str(k)]) for k in ks]
        for metric, x, y in rows:
            lines.append(f"{subset:>10} {metric:>9} {x:>9.4f} {y:>9.4f} {y - x:>+8.4f}")
    return "\n".join(lines)


def plot(results: Sequence[dict], labels: Sequence[str], path: str) -> None:
    """Mean accuracy and pass@max-k per subset, one bar group per subset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subsets = [s for s in results[0]["subsets"] if all(s in r["subsets"] for r in results)]
    kmax = max(int(k) for k in results[0]["subsets"]["all"]["pass_at_k"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    width = 0.8 / len(results)
    for ax, (title, getter) in zip(axes, [
            ("mean accuracy", lambda s: s["mean_accuracy"]),
            (f"pass@{kmax}", lambda s: s["pass_at_k"][str(kmax)])]):
        for i, (result, label) in enumerate(zip(results, labels)):
            values = [getter(result["subsets"][s]) for s in subsets]
            ax.bar([x + i * width for x in range(len(subsets))], values, width, label=label)
        ax.set_xticks([x + width * (len(results) - 1) / 2 for x in range(len(subsets))])
        ax.set_xticklabels(subsets, rotation=30, fontsize=8)
        ax.set_title(title)
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..cli import _quiet_third_party
    from ..config import ConfigError

    args = parse_args(argv)
    _quiet_third_party()
    if args.compare:
        a, b = (json.load(open(path, encoding="utf-8")) for path in args.compare)
        print(compare(a, b, args.labels))
        if args.plot:
            plot([a, b], args.labels, args.plot)
        return 0
    if not args.output:
        print("lens-eval: --output is required (or use --compare)", file=sys.stderr)
        return 2
    try:
        result = evaluate(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"lens-eval: {exc}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        print(results_table(result))
        if args.plot:
            plot([result], [result["source"]], args.plot)
    return 0
