"""Step time of lens-megatron's GRPO/LENS trainer vs Hugging Face TRL's ``GRPOTrainer``.

Both sides train the same tiny Qwen2-shaped model (hidden 128, ffn 512, 2 layers, 2 heads,
fp32) on arithmetic prompts, one optimizer step = P prompts x G samples x T new tokens,
KV-cached generation on both sides. Each run is its own subprocess with its own venv's
python; runs are interleaved (ours, TRL, ours, TRL, ...) because this machine is shared and
noisy. Per run, the first ``--warmup`` steps are dropped and the median of the remaining
``--steps`` is taken; the table shows the median over repeats, and the TRL/ours ratio as the
median [min-max] of the per-repeat ratios (ratio > 1 for a time: ours is faster).

    .venv/bin/python tools/bench_vs_trl.py --steps 8 --warmup 3 --repeats 3 \\
        --trl-python /work/venv-trl/bin/python

Ours is timed by the trainer itself (``metrics.jsonl``: ``time/step_s`` etc.); TRL by a
``TrainerCallback`` in ``tools/trl_grpo_baseline.py`` (on_step_begin -> on_step_end). With
``--eos ignore`` (default) both sides generate exactly T tokens per sequence
(ours: ``rollout.ignore_eos=true``; TRL: ``generation_kwargs={"min_new_tokens": T}``);
``--eos natural`` lets both stop at EOS (then compare tokens/s too).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL_SCRIPT = os.path.join(REPO, "tools", "trl_grpo_baseline.py")

OURS_STAGES = ("time/rollout_s", "time/reward_s", "time/old_logprobs_s", "time/lens_stage_s",
               "time/train_s", "time/fwd_bwd_s", "time/optimizer_s", "time/weight_sync_s")
TRL_STAGES = ("generate_s", "reward_s", "prepare_s", "train_s")


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


def ours_overrides(args, exp_dir: str, ignore_eos: bool) -> list[str]:
    """Our trainer's overrides; ``args.extra_overrides`` holds the version-dependent ones."""
    total = args.warmup + args.steps
    out = [f"trainer.max_steps={total}", f"rollout.prompts_per_step={args.prompts}",
           f"rollout.group_size={args.group_size}", f"rollout.max_new_tokens={args.max_new_tokens}",
           f"model.micro_batch_size={args.micro_batch}", f"exp_manager.exp_dir={exp_dir}",
           "exp_manager.name=bench", "exp_manager.resume=never", "trainer.save_every=0",
           "trainer.progress_bar=false", f"trainer.seed={args.seed}"]
    if ignore_eos:
        out.append("rollout.ignore_eos=true")
    return out + shape_overrides(args) + list(getattr(args, "extra_overrides", [])) \
        + list(args.ours_override)


# (our config key, TRL baseline flag) of the model shape; None = the config's / baseline's default.
SHAPE = (("hidden_size", "--hidden-size"), ("ffn_hidden_size", "--ffn-hidden-size"),
         ("num_layers", "--num-layers"), ("num_attention_heads", "--num-heads"),
         ("num_query_groups", "--num-kv-heads"), ("vocab_size", "--vocab-size"))


def shape_overrides(args) -> list[str]:
    out = [f"model.arch.{key}={getattr(args, key)}" for key, _ in SHAPE
           if getattr(args, key) is not None]
    if args.tie_word_embeddings:
        out.append("model.arch.tie_word_embeddings=true")
    return out


def trl_shape_args(args) -> list[str]:
    """The same shape for TRL's Qwen2 (its vocab is ours padded to 128, as megatron pads)."""
    out = []
    for key, flag in SHAPE:
        value = getattr(args, key)
        if value is not None:
            out += [flag, str(-(-value // 128) * 128 if key == "vocab_size" else value)]
    if args.tie_word_embeddings:
        out.append("--tie-word-embeddings")
    return out


def ours_supports(args, override: str) -> bool:
    """Does our trainer's config accept ``override`` (keys differ between versions)?"""
    cmd = [args.ours_python, "-m", "lens_megatron.cli", "train", "--config", args.config,
           "--print-config", override]
    res = subprocess.run(cmd, cwd=args.ours_repo, capture_output=True, text=True,
                         env=_env(args.threads))
    return res.returncode == 0


def ours_version(args) -> str:
    def git(*a):
        res = subprocess.run(["git", *a], cwd=args.ours_repo, capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return f"{args.ours_repo} (not a git checkout)"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "lens_megatron", "kernels")
    return f"{head}{' + uncommitted changes in lens_megatron/ or kernels/' if dirty else ''}"


def run_ours(args, workdir: str, ignore_eos: bool) -> dict:
    exp_dir = os.path.join(workdir, "ours")
    cmd = [args.ours_python, "-m", "lens_megatron.cli", "train", "--config", args.config,
           *ours_overrides(args, exp_dir, ignore_eos)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=args.ours_repo, capture_output=True, text=True,
                         env=_env(args.threads))
    wall = time.perf_counter() - t0
    path = os.path.join(exp_dir, "bench", "metrics.jsonl")
    if res.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"ours failed (rc={res.returncode}):\n{res.stderr[-4000:]}")
    steps = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    steps = [s for s in steps if "time/step_s" in s]
    kept = steps[args.warmup:]
    seqs = args.prompts * args.group_size
    out = {"wall_s": wall, "first_step_s": steps[0]["time/step_s"], "n_steps": len(kept),
           "step_s": _median([s["time/step_s"] for s in kept]),
           "gen_s": _median([s["time/rollout_s"] for s in kept]),
           "len_mean": _median([s["response/length_mean"] for s in kept]),
           "step_s_all": [s["time/step_s"] for s in steps]}
    out["tokens"] = out["len_mean"] * seqs
    for key in OURS_STAGES:
        out[key] = _median([s.get(key) for s in kept])
    return out


def run_trl(args, workdir: str, ignore_eos: bool) -> dict:
    out_path = os.path.join(workdir, "trl.jsonl")
    cmd = [args.trl_python, TRL_SCRIPT, "--steps", str(args.warmup + args.steps),
           "--prompts-per-step", str(args.prompts), "--group-size", str(args.group_size),
           "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads),
           "--micro-batch", str(args.trl_micro_batch), "--seed", str(args.seed),
           "--workdir", os.path.join(workdir, "trl"), "--out", out_path, *trl_shape_args(args)]
    if ignore_eos:
        cmd.append("--ignore-eos")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_env(args.threads))
    wall = time.perf_counter() - t0
    if res.returncode != 0 or not os.path.exists(out_path):
        raise RuntimeError(f"TRL failed (rc={res.returncode}):\n{res.stderr[-4000:]}")
    lines = [json.loads(line) for line in open(out_path, encoding="utf-8") if line.strip()]
    meta = next(line for line in lines if line.get("meta"))
    steps = [line for line in lines if not line.get("meta")]
    kept = steps[args.warmup:]
    out = {"wall_s": wall, "first_step_s": steps[0]["step_s"], "n_steps": len(kept),
           "step_s": _median([s["step_s"] for s in kept]),
           "step_wall_s": _median([s["step_wall_s"] for s in kept]),
           "gen_s": _median([s["generate_s"] for s in kept]),
           "len_mean": _median([s["completion_len_mean"] for s in kept]),
           "tokens": _median([s["completion_tokens"] for s in kept]),
           "kv_cache": all(s["generate_use_cache"] for s in steps),
           "one_token_forwards": f"{steps[-1]['generate_one_token_forwards']}/"
                                 f"{steps[-1]['generate_forwards']}",
           "step_s_all": [s["step_s"] for s in steps], "meta": meta}
    for key in TRL_STAGES:
        out[key] = _median([s.get(key) for s in kept])
    return out


# Run inside our venv (``python -c``): cProfile the measured steps of one training run and log
# the native sampler's prompt-length buckets (rows, prompt length, seconds) per step.
_PROFILE_OURS = r"""
import cProfile, io, json, pstats, sys, time
import lens_megatron.trainer as T
import lens_megatron.rollout.megatron_sampler as S
warmup, out_prefix, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
prof, buckets = cProfile.Profile(), []
train_step, gen_bucket = T.LensTrainer.train_step, S.MegatronSampler._generate_bucket
def timed_bucket(self, prompts, row_ids, sampling):
    t0 = time.perf_counter()
    out = gen_bucket(self, prompts, row_ids, sampling)
    buckets[-1].append([len(prompts), len(prompts[0]), time.perf_counter() - t0])
    return out
def profiled_step(self):
    buckets.append([])
    if self.step < warmup:
        return train_step(self)
    prof.enable()
    try:
        return train_step(self)
    finally:
        prof.disable()
S.MegatronSampler._generate_bucket = timed_bucket
T.LensTrainer.train_step = profiled_step
from lens_megatron.cli import main
rc = main(argv)
prof.dump_stats(out_prefix + ".prof")
text = io.StringIO()
stats = pstats.Stats(prof, stream=text)
stats.sort_stats("cumulative").print_stats(45)
stats.sort_stats("tottime").print_stats(25)
open(out_prefix + ".txt", "w").write(text.getvalue())
json.dump(buckets, open(out_prefix + "_buckets.json", "w"))
sys.exit(rc)
"""


def profile_ours(args, out_prefix: str, ignore_eos: bool) -> None:
    """cProfile our measured steps (after --warmup) and report the sampler's buckets."""
    work = tempfile.mkdtemp(prefix="bench_vs_trl_prof_")
    try:
        cmd = [args.ours_python, "-c", _PROFILE_OURS, str(args.warmup), out_prefix,
               "train", "--config", args.config,
               *ours_overrides(args, os.path.join(work, "ours"), ignore_eos)]
        res = subprocess.run(cmd, cwd=args.ours_repo, capture_output=True, text=True,
                             env=_env(args.threads))
        if res.returncode != 0:
            raise RuntimeError(f"profiled run failed (rc={res.returncode}):\n{res.stderr[-4000:]}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    buckets = json.load(open(out_prefix + "_buckets.json", encoding="utf-8"))
    print(f"cProfile of steps {args.warmup + 1}..{len(buckets)}: {out_prefix}.prof, "
          f"top functions: {out_prefix}.txt")
    print("native sampler buckets per step (rows, prompt length, seconds):")
    for i, step in enumerate(buckets):
        print(f"  step {i + 1}: {len(step)} bucket(s) "
              + ", ".join(f"({n}, {length}, {t:.3f})" for n, length, t in step))


def _fmt(x, nd=3):
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def report(args, ours: list[dict], trl: list[dict]) -> str:
    def col(runs, key):
        return _median([r[key] for r in runs])

    def ratio(key, invert=False):
        rs = []
        for o, t in zip(ours, trl):
            rs.append((o[key] / t[key]) if invert else (t[key] / o[key]))
        return f"{_median(rs):.2f} [{min(rs):.2f}-{max(rs):.2f}]"

    for runs in (ours, trl):
        for r in runs:
            r["steps_per_s"] = 1.0 / r["step_s"]
            r["tok_per_s"] = r["tokens"] / r["step_s"]
            r["gen_tok_per_s"] = r["tokens"] / r["gen_s"]
    rows = [
        ("median step time (s)", "step_s", False),
        ("median generation time (s)", "gen_s", False),
        ("tokens generated / step", "tokens", None),
        ("mean response length", "len_mean", None),
        ("steps / s", "steps_per_s", True),
        ("generated tokens / s (whole step)", "tok_per_s", True),
        ("generated tokens / s (generation only)", "gen_tok_per_s", True),
        ("first step (s, warm-up)", "first_step_s", False),
        ("process wall time (s)", "wall_s", False),
    ]
    lines = [f"| metric | lens-megatron | TRL GRPOTrainer | TRL/ours (median [min-max]) |",
             "| --- | ---: | ---: | ---: |"]
    for name, key, higher_better in rows:
        r = "-" if higher_better is None else ratio(key)
        lines.append(f"| {name} | {_fmt(col(ours, key))} | {_fmt(col(trl, key))} | {r} |")
    lines.append("")
    lines.append("For times, TRL/ours > 1 means lens-megatron is faster; for rates (steps/s, "
                 "tokens/s) the column is TRL/ours of the rate, so < 1 means lens-megatron is faster.")
    lines.append("")
    lines.append("lens-megatron per-stage medians (s): " + ", ".join(
        f"{k[5:-2]} {_fmt(col(ours, k))}" for k in OURS_STAGES))
    lines.append("TRL per-stage medians (s): " + ", ".join(
        f"{k[:-2]} {_fmt(col(trl, k))}" for k in TRL_STAGES)
        + f", step incl. HF logging {_fmt(col(trl, 'step_wall_s'))}")
    lines.append(f"TRL generate used the KV cache: {all(r['kv_cache'] for r in trl)} "
                 f"(one-token forwards inside generate, last run: {trl[-1]['one_token_forwards']})")
    lines.append("")
    lines.append("Per repeat (step-time medians, s; 1-min load average before each run): " + "; ".join(
        f"#{i + 1} ours {o['step_s']:.3f} / TRL {t['step_s']:.3f} "
        f"(load {o['loadavg_1m_before']:.1f}/{t['loadavg_1m_before']:.1f})"
        for i, (o, t) in enumerate(zip(ours, trl))))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="measured steps per run")
    p.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of a run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved (ours, TRL) pairs")
    p.add_argument("--trl-python", default="/work/venv-trl/bin/python")
    p.add_argument("--ours-python", default=os.path.join(REPO, ".venv", "bin", "python"))
    p.add_argument("--ours-repo", default=REPO,
                   help="lens-megatron checkout to run ours from (e.g. a frozen copy of the work "
                        "tree, so that edits during a long benchmark do not change what is timed)")
    p.add_argument("--config", default="lens_megatron/configs/tiny_cpu.yaml")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8,
                   help="sequences per training micro-batch, both sides (ours: "
                        "model.micro_batch_size; TRL: per_device_train_batch_size, with gradient "
                        "accumulation over the step's batch)")
    p.add_argument("--trl-micro-batch", type=int, default=None,
                   help="TRL's micro-batch when it should differ from --micro-batch (0: the "
                        "whole batch); the default is the same workload on both sides")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both sides")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--eos", choices=("ignore", "natural"), default="ignore",
                   help="ignore: both sides generate exactly --max-new-tokens")
    for key, _ in SHAPE:
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=int, default=None,
                       help=f"model shape, both sides (ours: model.arch.{key})")
    p.add_argument("--tie-word-embeddings", action="store_true", help="tied LM head, both sides")
    p.add_argument("--ours-override", action="append", default=[],
                   help="extra key=value override for our trainer (repeatable)")
    p.add_argument("--machine", default="2-core CPU sandbox, 24 GiB", help="label for the header")
    p.add_argument("--json", help="write the raw per-run results here")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.add_argument("--profile-ours", metavar="PREFIX",
                   help="instead of the comparison: one run of ours under cProfile "
                        "(PREFIX.prof, PREFIX.txt) with the sampler's buckets per step")
    args = p.parse_args(argv)

    if args.trl_micro_batch is None:
        args.trl_micro_batch = args.micro_batch
    if not args.profile_ours and not os.path.exists(args.trl_python):
        print(f"no TRL python at {args.trl_python}; see docs/bench/vs_trl.md for the venv setup",
              file=sys.stderr)
        return 2
    ignore_eos = args.eos == "ignore"
    # A diagnostic extra forward pass after the update (not part of a GRPO step): off.
    args.extra_overrides = [o for o in ("trainer.measure_update_effect=false",)
                            if ours_supports(args, o)]
    if ignore_eos and not ours_supports(args, "rollout.ignore_eos=true"):
        print("warning: this lens-megatron has no rollout.ignore_eos; ours stops at EOS "
              "(compare tokens/s)", file=sys.stderr)
        ours_ignore = False
    else:
        ours_ignore = ignore_eos

    if args.profile_ours:
        profile_ours(args, args.profile_ours, ours_ignore)
        return 0

    root = tempfile.mkdtemp(prefix="bench_vs_trl_")
    ours, trl = [], []
    try:
        for i in range(args.repeats):
            for side in ("ours", "trl"):
                work = os.path.join(root, f"{side}{i}")
                os.makedirs(work)
                print(f"[{time.strftime('%H:%M:%S')}] repeat {i + 1}/{args.repeats}: {side} ...",
                      file=sys.stderr, flush=True)
                load = os.getloadavg()[0]
                if side == "ours":
                    ours.append(run_ours(args, work, ours_ignore))
                    r = ours[-1]
                else:
                    trl.append(run_trl(args, work, ignore_eos))
                    r = trl[-1]
                r["loadavg_1m_before"] = load
                print(f"    median step {r['step_s']:.3f}s, generation {r['gen_s']:.3f}s, "
                      f"{r['tokens']:.0f} tokens/step, wall {r['wall_s']:.1f}s, "
                      f"load before {load:.1f}",
                      file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"run directories kept in {root}", file=sys.stderr)

    meta = trl[0]["meta"]
    print("command: " + " ".join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO)
                                  else sys.executable, os.path.relpath(__file__, REPO), *sys.argv[1:]]))
    print(f"# lens-megatron vs TRL GRPOTrainer — {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine: {args.machine} ({os.cpu_count()} CPUs seen), python {platform.python_version()}; "
          f"TRL side: torch {meta['torch']}, trl {meta['trl']}, transformers "
          f"{meta['transformers']}; threads {args.threads} both sides")
    print(f"lens-megatron: {ours_version(args)} (run from {args.ours_repo}); extra overrides: "
          f"{' '.join(args.extra_overrides + list(args.ours_override)) or 'none'}")
    print("model shape: " + (" ".join(shape_overrides(args)) or "the config's (tiny default)"))
    print(f"batch: {args.prompts} prompts x {args.group_size} samples x {args.max_new_tokens} "
          f"new tokens; eos={args.eos} (ours ignore_eos={ours_ignore}); ours micro-batch "
          f"{args.micro_batch}, TRL micro-batch {meta['micro_batch']} x grad-accum "
          f"{meta['gradient_accumulation_steps']}; {args.repeats} interleaved repeats, "
          f"{args.warmup} warm-up + {args.steps} measured steps each")
    print()
    print(report(args, ours, trl))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "ours": ours, "trl": trl}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
