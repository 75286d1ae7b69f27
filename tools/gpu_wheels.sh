#!/usr/bin/env bash
# Wheels of the pure-Python dependencies that a bare CUDA-torch machine lacks (megatron-core,
# omegaconf, math-verify, ...), downloaded here for CPython 3.12 on x86_64 into .gpu_wheels/
# (git-ignored), so that tools/gpu_check.sh can install them there without network access.
# torch, triton, numpy, transformers and safetensors are expected on the GPU machine.
# The versions are those `make install` puts in the CPU .venv (what CI tests).
# Usage: bash tools/gpu_wheels.sh [PYTHON_VERSION]   (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
ver=${1:-3.12}
dest=.gpu_wheels
rm -rf "$dest" && mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$ver" \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$dest" "megatron-core==0.16.1" "omegaconf==2.4.0" "math-verify==0.9.0" \
  "latex2sympy2_extended==1.11.0" "pytest-timeout" "hypothesis" "sortedcontainers" "psutil" \
  "tqdm" "pyyaml" "einops" "antlr4-python3-runtime==4.13.2"
du -sh "$dest"; ls "$dest"
