#!/usr/bin/env bash
# One command for the GPU paths that CI (CPU only) cannot exercise:
#   make gpu-check            (or: bash tools/gpu_check.sh)
# Run it on a CUDA machine in an environment where `pip install -e '.[gpu,test]'` was done
# over a CUDA build of torch (e.g. an NGC PyTorch container). It uses that environment's
# `python`, not the CPU-only .venv of `make test`. Everything it writes goes under $OUT.
#
# 1. GPU tests: the Triton kernels compiled for the device vs the float64 reference, the
#    fused-linear variant, the advantage stage on CUDA vs CPU.
# 2. The trainer on one GPU: tiny default in bf16, Transformer Engine layers when TE is
#    installed (local spec otherwise), NCCL, the Triton kernel, native sampler; 2 steps, then
#    a resume for a third (distributed checkpoint written and read on GPU).
# 3. With >= 2 GPUs: TP=2 (NCCL, sequence parallel) and DP=2 (distributed optimizer) through
#    torchrun; with vLLM installed, the vLLM engine (sleep/wake, in-memory refit) for 2 steps;
#    with TE, FP8 (hybrid) for 2 steps.
# 4. Benchmarks (JSON under $OUT): log-prob kernel (bf16 [32768 × 128256] and
#    [16384 × 151936] vs naive torch, megatron and Liger when installed), advantage stage, and
#    lens-bench on the tiny default. Record what they print in BENCHMARKS.md with the device
#    and date. Nothing here was run in this project: no GPU was lent to it.
set -euo pipefail

PY=${PYTHON:-python}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')
if [ "$ngpu" -lt 1 ]; then
  echo "gpu-check: torch sees no CUDA device (python: $PY); run this on a GPU machine" >&2
  exit 2
fi
have() { "$PY" -c "import $1" >/dev/null 2>&1; }
step() { printf '\n== %s\n' "$*"; }
TINY="--config lens_megatron/configs/tiny_cpu.yaml model.precision=bf16 model.transformer_impl=auto
      reward.num_workers=2 trainer.progress_bar=false exp_manager.exp_dir=$OUT/runs"

step "1/4 GPU tests ($ngpu GPU(s): $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))'))"
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_advantages.py::test_cuda_matches_cpu

step "2/4 trainer on one GPU: 2 steps, then resume for a third"
"$PY" -m lens_megatron.cli train $TINY exp_manager.name=one_gpu trainer.max_steps=2
"$PY" -m lens_megatron.cli train $TINY exp_manager.name=one_gpu trainer.max_steps=3 exp_manager.resume=must

step "3/4 multi-GPU, vLLM and FP8 (each only where available)"
if [ "$ngpu" -ge 2 ]; then
  torchrun --standalone --nproc_per_node=2 -m lens_megatron.cli train $TINY exp_manager.name=tp2 \
    trainer.devices=2 trainer.max_steps=2 model.tensor_model_parallel_size=2 model.sequence_parallel=true
  torchrun --standalone --nproc_per_node=2 -m lens_megatron.cli train $TINY exp_manager.name=dp2 \
    trainer.devices=2 trainer.max_steps=2
else
  echo "skipped: TP=2 and DP=2 need 2 GPUs (this machine has $ngpu)"
fi
if have vllm; then
  "$PY" -m lens_megatron.cli train $TINY exp_manager.name=vllm trainer.max_steps=2 rollout.engine=vllm
else
  echo "skipped: vLLM engine (vllm is not installed: pip install -e '.[gpu]')"
fi
if have transformer_engine; then
  "$PY" -m lens_megatron.cli train $TINY exp_manager.name=fp8 trainer.max_steps=2 \
    model.transformer_impl=transformer_engine model.fp8=hybrid
else
  echo "skipped: FP8 (Transformer Engine is not installed: pip install -e '.[gpu]')"
fi

step "4/4 benchmarks"
"$PY" tools/bench_logprob.py --gpu --json "$OUT/bench_logprob.json"
"$PY" tools/bench_advantages.py --device cuda --json "$OUT/bench_advantages.json"
"$PY" -m lens_megatron.bench.throughput --config lens_megatron/configs/tiny_cpu.yaml --steps 5 \
  --warmup 2 --compare --fixed-length --output "$OUT/bench_tiny.json" model.precision=bf16 \
  model.transformer_impl=auto trainer.measure_update_effect=false

printf '\ngpu-check: all steps passed; results under %s\n' "$OUT"
