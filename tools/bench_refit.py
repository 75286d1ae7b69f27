"""Benchmark the vLLM weight sync ("refit") on this machine, per method.

Builds a random Qwen2 of a few hundred MB locally (no downloads), starts a ``VLLMEngine`` on it,
then per refit method: perturbs the transformers copy (the actor stand-in), streams its state
dict into vLLM ``--repeats`` times and reports seconds, GB/s and seconds per GB, and checks that
vLLM's log-probs of a fixed continuation then equal transformers' (max |Δ|). A method that
fails (``load_weights`` on the CPU backend) is reported with its error, not hidden.

    python tools/bench_refit.py                      # ~412 MB fp32 model, all methods
    python tools/bench_refit.py --hidden 512 --layers 2 --repeats 1   # quick check
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tiny_hf_models


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=64.0)
    p.add_argument("--methods", default="layerwise,load_weights,disk")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def build(args, directory: Path):
    from tiny_hf_models import build_tiny_model

    return build_tiny_model(directory, "qwen2", seed=0, hidden_size=args.hidden,
                            intermediate_size=args.intermediate, num_layers=args.layers,
                            num_heads=args.hidden // 64, num_kv_heads=args.hidden // 64)


@torch.no_grad()
def perturb(model: torch.nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen), alpha=1e-3)


def check(engine, model) -> float:
    from tiny_hf_models import continuation_logprobs

    prompt, cont = [5, 6, 7, 8], [9, 10, 11, 12, 13]
    got = engine.prompt_logprobs([prompt], [cont])[0]
    return float((got - continuation_logprobs(model, prompt, cont)).abs().max())


def bench_method(engine, model, method: str, args, step0: int) -> dict:
    from lens_megatron.rollout.vllm_engine import iter_state_dict

    engine.config.refit_method, engine.config.refit_bucket_mb = method, args.bucket_mb
    runs = []
    for r in range(args.repeats):
        perturb(model, step0 + r)
        try:
            runs.append(engine.sync_weights(iter_state_dict(model)))
        except Exception as error:  # noqa: BLE001 - a failing method is a result
            return {"method": method, "error": f"{type(error).__name__}: {error}".splitlines()[0]}
    seconds = [t["sync_seconds"] for t in runs]
    gb = runs[0]["sync_bytes"] / 1e9
    med = statistics.median(seconds)
    out = {"method": method, "bytes": runs[0]["sync_bytes"], "buckets": runs[0]["sync_buckets"],
           "seconds": seconds, "median_seconds": med, "gb_per_s": gb / med,
           "seconds_per_gb": med / gb, "max_abs_logprob_diff": check(engine, model)}
    for key in ("sync_write_seconds", "sync_reload_seconds"):
        if key in runs[-1]:
            out[key.removeprefix("sync_")] = runs[-1][key]
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    from lens_megatron.rollout.vllm_engine import VLLMEngine, VLLMEngineConfig

    with tempfile.TemporaryDirectory(prefix="bench-refit-") as tmp:
        start = time.perf_counter()
        tiny = build(args, Path(tmp) / "model")
        n_bytes = sum(t.numel() * t.element_size() for t in tiny.model.state_dict().values())
        print(f"model: {n_bytes / 1e6:.1f} MB fp32, built in {time.perf_counter() - start:.1f} s",
              flush=True)
        engine = VLLMEngine(VLLMEngineConfig(
            model_path=str(tiny.path), eos_id=tiny.eos_id, pad_id=tiny.pad_id, dtype="float32",
            enforce_eager=True, max_model_len=128, cpu_kv_cache_bytes=64 << 20,
            refit_work_dir=str(Path(tmp) / "refit")))
        results = [bench_method(engine, tiny.model, m, args, 100 * i)
                   for i, m in enumerate(args.methods.split(","))]
        engine.close()
    header = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "model_mb": n_bytes / 1e6, "bucket_mb": args.bucket_mb, "repeats": args.repeats}
    print(json.dumps(header))
    for row in results:
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
