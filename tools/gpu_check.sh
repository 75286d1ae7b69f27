#!/usr/bin/env bash
# One command for the GPU paths that CI (CPU only) cannot exercise:
#   make gpu-check            (or: bash tools/gpu_check.sh)
# Run it on a CUDA machine in an environment with a CUDA build of torch and
# `pip install -e '.[gpu,test]'` (e.g. an NGC PyTorch container); PYTHON selects the
# interpreter (not the CPU-only .venv of `make test`). On a bare CUDA-torch machine without
# network (a lent test GPU), carry the pure-Python dependencies as wheels made here with
# `bash tools/gpu_wheels.sh` (they land in .gpu_wheels/) and this script installs them into a
# private --target directory first.
#
# Every step has its own time limit; a failing step does not stop the others; a table of
# PASS / FAIL / SKIP (with the reason) and seconds prints at the end, and the exit status is
# non-zero when any step failed. All output goes under $OUT (default gpu_check_out/): one log
# per step and the benchmark JSON files. Budget: the limits add up to 8 minutes on one GPU.
#
# Steps: environment; GPU tests (Triton kernels compiled for the device vs the float64
# reference, fused linear, advantages on CUDA); the trainer on one GPU (tiny default, bf16,
# local spec or TE, NCCL, the Triton kernel, native sampler: 2 steps, then a resume for a
# third); with 2 GPUs TP=2+SP and DP=2 through torchrun; vLLM and FP8 where installed; the
# kernel, advantage and step benchmarks. Record what it prints in BENCHMARKS.md with the
# device and date.
set -uo pipefail

PY=${PYTHON:-python}
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"

if [ -d .gpu_wheels ] && ls .gpu_wheels/*.whl >/dev/null 2>&1; then
  SITE=${GPU_CHECK_SITE:-/tmp/lens_gpu_site}
  "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .gpu_wheels/*.whl \
    >"$OUT/wheels.log" 2>&1 || { echo "gpu-check: installing .gpu_wheels failed (see $OUT/wheels.log)"; exit 2; }
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)
if [ "$ngpu" -lt 1 ]; then
  echo "gpu-check: torch sees no CUDA device (python: $PY); run this on a GPU machine" >&2
  exit 2
fi

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
ROWS=()
FAILED=0
# run_step NAME LIMIT_S CMD... : run CMD with a time limit, log to $OUT/NAME.log, record a row.
run_step() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS status
  printf '\n== %s (limit %ss)\n' "$name" "$limit"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  status=$?
  tail -n 15 "$OUT/$name.log"
  local took=$((SECONDS - start))
  if [ $status -eq 0 ]; then
    ROWS+=("PASS|$name|${took}s|")
  elif [ $status -eq 124 ] || [ $status -eq 137 ]; then
    ROWS+=("FAIL|$name|${took}s|timed out after ${limit}s")
    FAILED=1
  else
    ROWS+=("FAIL|$name|${took}s|exit $status, see $OUT/$name.log")
    FAILED=1
  fi
}
skip_step() { ROWS+=("SKIP|$1|0s|$2"); printf '\n== %s: skipped (%s)\n' "$1" "$2"; }

TINY=(--config lens_megatron/configs/tiny_cpu.yaml model.precision=bf16 model.transformer_impl=auto
      reward.num_workers=2 trainer.progress_bar=false exp_manager.exp_dir="$OUT/runs"
      trainer.measure_update_effect=false)

run_step environment 30 "$PY" -c '
import torch, importlib.util as u
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for m in ("triton", "megatron.core", "transformer_engine", "vllm", "math_verify", "omegaconf"):
    print(m, "yes" if u.find_spec(m.split(".")[0]) else "NO")
import megatron.core, triton; print("megatron-core", megatron.core.__version__, "triton", triton.__version__)'

run_step gpu_tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
  tests/test_advantages.py::test_cuda_matches_cpu

run_step train_one_gpu 90 "$PY" -m lens_megatron.cli train "${TINY[@]}" exp_manager.name=one_gpu \
  trainer.max_steps=2
run_step resume_one_gpu 60 "$PY" -m lens_megatron.cli train "${TINY[@]}" exp_manager.name=one_gpu \
  trainer.max_steps=3 exp_manager.resume=must

if [ "$ngpu" -ge 2 ]; then
  run_step tp2_sp 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m lens_megatron.cli train "${TINY[@]}" exp_manager.name=tp2 trainer.devices=2 \
    trainer.max_steps=2 model.tensor_model_parallel_size=2 model.sequence_parallel=true
  run_step dp2 60 "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m lens_megatron.cli train "${TINY[@]}" exp_manager.name=dp2 trainer.devices=2 trainer.max_steps=2
else
  skip_step tp2_sp "needs 2 GPUs (this machine has $ngpu)"
  skip_step dp2 "needs 2 GPUs (this machine has $ngpu)"
fi
if have vllm; then
  run_step vllm_engine 90 "$PY" -m lens_megatron.cli train "${TINY[@]}" exp_manager.name=vllm \
    trainer.max_steps=2 rollout.engine=vllm
else
  skip_step vllm_engine "vllm is not installed (pip install -e '.[gpu]')"
fi
if have transformer_engine; then
  run_step fp8 60 "$PY" -m lens_megatron.cli train "${TINY[@]}" exp_manager.name=fp8 \
    trainer.max_steps=2 model.transformer_impl=transformer_engine model.fp8=hybrid
else
  skip_step fp8 "Transformer Engine is not installed (pip install -e '.[gpu]')"
fi

run_step bench_logprob 90 "$PY" tools/bench_logprob.py --gpu --json "$OUT/bench_logprob.json"
run_step bench_advantages 30 "$PY" tools/bench_advantages.py --device cuda \
  --json "$OUT/bench_advantages.json"
run_step bench_step 80 "$PY" -m lens_megatron.bench.throughput --config \
  lens_megatron/configs/tiny_cpu.yaml --steps 5 --warmup 2 --compare --fixed-length \
  --output "$OUT/bench_tiny.json" model.precision=bf16 model.transformer_impl=auto \
  trainer.measure_update_effect=false

printf '\n%-6s %-18s %-7s %s\n' result step time note
for row in "${ROWS[@]}"; do
  IFS='|' read -r result name took note <<<"$row"
  printf '%-6s %-18s %-7s %s\n' "$result" "$name" "$took" "$note"
done
printf 'gpu-check: %s; logs and results under %s\n' \
  "$([ $FAILED -eq 0 ] && echo 'no step failed' || echo 'SOME STEPS FAILED')" "$OUT"
exit $FAILED
