"""Native sampler on the Megatron actor: temperature / top-k / top-p, EOS, batched, any
TP/PP/VPP layout, with or without a KV cache.

KV-cache mode at TP = PP = 1: the lean decoder (``lean_decoder.py``) over the actor's own
parameters, one left-padded batch with per-row positions. At TP or PP > 1: megatron's
``StaticInferenceContext`` holds keys/values per layer; its RoPE positions are cache slots
shared by the whole batch, so sequences in one cached batch must have equal prompt lengths
(otherwise a left-padded prompt would be generated at shifted positions, and the sampler's
log-probs would disagree with the trainer's). We therefore bucket the batch by prompt length —
exact, and free for the G samples of one prompt.
Recompute mode (``kv_cache=False``, and always under sequence parallelism, where a single
decode token cannot be split over TP ranks) re-runs the right-padded sequences each step.

Every rank of a model-parallel group returns the same batch: tokens are drawn on the last
pipeline stage, TP rank 0, and broadcast over the model-parallel group.
"""
from __future__ import annotations

import contextlib
import time
from typing import Optional

import torch
import torch.distributed as dist

from ..algorithms.rollout_correction import sampling_distribution
from ..parallel import cpu_mode
from ..parallel.device import module_device
from .base import RolloutBatch, SamplingConfig, assemble_batch
from .lean_decoder import LeanDecoder
from .pipeline_forward import forward_logits


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class MegatronSampler:
    """``RolloutEngine`` over the actor's own model chunks (weights are always in sync)."""

    def __init__(self, chunks: list, arch, eos_id: int, pad_id: int,
                 dtype: torch.dtype = torch.float32, kv_cache: bool = True,
                 sequence_parallel: bool = False, tp_size: int = 1, decode=None,
                 lean: bool = True) -> None:
        """``lean=False`` keeps megatron's modules even where the lean decoder applies."""
        from megatron.core import parallel_state

        self.chunks = chunks
        # Tokens, masks, log-prob buffers, the KV cache and the sampling noise live on the
        # model's device; the prompt lists are moved once per bucket (parallel/device.py).
        self.device = module_device(chunks)
        self.vocab_size, self.hidden_size = arch.vocab_size, arch.hidden_size
        self.eos_id, self.pad_id = eos_id, pad_id
        self.dtype = dtype
        self.kv_cache = kv_cache and not sequence_parallel
        self.pad_multiple = tp_size if sequence_parallel else 1
        self.decode = decode  # optional ids -> text, for RolloutBatch.response_texts
        single = tp_size == 1 and parallel_state.get_pipeline_model_parallel_world_size() == 1
        self.lean = None
        if lean and self.kv_cache and single:
            self.lean = LeanDecoder(chunks, arch, eps=arch.rms_norm_eps)

    # The actor's weights are the sampler's weights: nothing to sync or offload.
    def sync_weights(self) -> dict[str, float]:
        return {}

    def sleep(self) -> None:
        return None

    def wake(self) -> None:
        return None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: SamplingConfig) -> RolloutBatch:
        start = time.perf_counter()
        sequences = [list(p) for p in prompts for _ in range(sampling.group_size)]
        responses: list[list[int]] = [[] for _ in sequences]
        logprobs: list[list[float]] = [[] for _ in sequences]
        for chunk in self.chunks:
            chunk.eval()
        try:
            for index in self._buckets(sequences):
                bucket = [sequences[i] for i in index]
                row_ids = torch.tensor(index, device=self.device) + sampling.row_offset
                toks, lps = self._generate_bucket(bucket, row_ids, sampling)
                for j, i in enumerate(index):
                    responses[i], logprobs[i] = toks[j], lps[j]
        finally:
            for chunk in self.chunks:
                chunk.train()
        finished = [bool(r) and r[-1] == self.eos_id and not sampling.ignore_eos
                    for r in responses]
        texts = [self.decode(r) for r in responses] if self.decode else None
        batch = assemble_batch(sequences, responses, logprobs, finished, sampling.group_size,
                               self.pad_id, texts)
        batch.timings["generate_s"] = time.perf_counter() - start
        return batch

    def _buckets(self, sequences: list[list[int]]) -> list[list[int]]:
        if not self.kv_cache or self.lean is not None:  # one (left- or right-padded) batch
            return [list(range(len(sequences)))]
        by_length: dict[int, list[int]] = {}
        for i, seq in enumerate(sequences):
            by_length.setdefault(len(seq), []).append(i)
        return [by_length[k] for k in sorted(by_length)]

    def _generate_bucket(self, prompts, row_ids: torch.Tensor, sampling: SamplingConfig):
        batch = len(prompts)
        next_logits = (self._lean_logits if self.lean is not None else self._megatron_logits)(
            prompts, sampling.max_new_tokens)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        out_tokens = torch.full((batch, sampling.max_new_tokens), self.pad_id, dtype=torch.long,
                                device=self.device)
        out_logprobs = torch.zeros((batch, sampling.max_new_tokens), device=self.device)
        new = None
        for step in range(sampling.max_new_tokens):
            logits = next_logits(step, new)
            new, new_lp = self._sample_and_share(logits, sampling, row_ids, step)
            new = torch.where(done, torch.full_like(new, self.pad_id), new)
            out_tokens[:, step] = new
            out_logprobs[:, step] = torch.where(done, 0.0, new_lp)
            if not sampling.ignore_eos:
                done |= new == self.eos_id
            if bool(done.all()):
                break
        return self._trim(out_tokens, out_logprobs, sampling.ignore_eos)

    def _lean_logits(self, prompts, max_new_tokens: int):
        """Left-padded batch on the lean decoder (TP = PP = 1)."""
        width = max(len(p) for p in prompts)
        padded = [[self.pad_id] * (width - len(p)) + list(p) for p in prompts]
        ids = torch.tensor(padded, dtype=torch.long, device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)

        def next_logits(step: int, new):
            if step == 0:
                return self.lean.prefill(ids, lengths, max_new_tokens)
            return self.lean.step(new)

        return next_logits

    def _megatron_logits(self, prompts, max_new_tokens: int):
        """Right-padded batch through megatron's modules (any TP/PP/VPP layout)."""
        batch = len(prompts)
        width = max(len(p) for p in prompts) + max_new_tokens
        padded = [list(p) + [self.pad_id] * (width - len(p)) for p in prompts]
        tokens = torch.tensor(padded, dtype=torch.long, device=self.device)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        context = self._new_context(batch, width) if self.kv_cache else None
        rows = torch.arange(batch, device=self.device)

        def next_logits(step: int, new):
            if step > 0:
                tokens[rows, lengths + step - 1] = new
            return self._next_token_logits(tokens, lengths + step, step, context)

        return next_logits

    def _trim(self, out_tokens, out_logprobs, ignore_eos: bool = False):
        toks, lps = [], []
        for row_t, row_l in zip(out_tokens.tolist(), out_logprobs.tolist()):
            stop = not ignore_eos and self.eos_id in row_t
            end = row_t.index(self.eos_id) + 1 if stop else len(row_t)
            toks.append(row_t[:end])
            lps.append(row_l[:end])
        return toks, lps

    def _new_context(self, batch: int, width: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        return StaticInferenceContext(batch, _round_up(width, 8))

    def _next_token_logits(self, tokens, positions, step: int, context) -> Optional[torch.Tensor]:
        """Logits ``[b, V]`` for the token after ``positions - 1`` (last stage only)."""
        if context is not None:
            if step == 0:
                ids = tokens[:, : int(positions[0])]
            else:
                context.sequence_len_offset = int(positions[0]) - 1
                ids = tokens[:, int(positions[0]) - 1: int(positions[0])]
            # The prefill allocates the KV cache and moves RoPE tables (megatron writes
            # device="cuda" there); decode steps allocate nothing and run outside the
            # cuda->cpu mapping, which costs ~1.3x on a one-token forward (DESIGN §7a).
            with cpu_mode.cuda_to_cpu() if step == 0 else contextlib.nullcontext():
                logits = forward_logits(self.chunks, ids, context, self.hidden_size, self.dtype)
            if step == 0:
                context.sequence_len_offset = ids.shape[1]
            return None if logits is None else logits[:, -1, : self.vocab_size].float()
        width = _round_up(int(positions.max()), self.pad_multiple)
        with cpu_mode.cuda_to_cpu():
            logits = forward_logits(self.chunks, tokens[:, :width].contiguous(), None,
                                    self.hidden_size, self.dtype)
        if logits is None:
            return None
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return logits[rows, positions - 1, : self.vocab_size].float()

    def _sample_and_share(self, logits, sampling: SamplingConfig, row_ids, step: int):
        """Sample on the last stage's TP rank 0; broadcast over the model-parallel group."""
        from megatron.core import parallel_state as ps

        packed = torch.zeros((2, len(row_ids)), dtype=torch.float64, device=self.device)
        if logits is not None:
            logp = sampling_distribution(logits, sampling.temperature,
                                         max(sampling.top_k, 0), sampling.top_p)
            new = gumbel_max(logp, sampling.seed, row_ids, step)  # a draw from exp(logp)
            packed[0] = new.double()
            packed[1] = logp.gather(1, new.unsqueeze(1)).squeeze(1).double()
        group = ps.get_model_parallel_group()
        if dist.get_world_size(group) > 1:
            # TP ranks are contiguous in megatron's rank order: the last stage's TP rank 0.
            src = ps.get_pipeline_model_parallel_last_rank() - ps.get_tensor_model_parallel_rank()
            dist.broadcast(packed, src=src, group=group)
        return packed[0].long(), packed[1].float()


_MASK32 = 0xFFFFFFFF


def _mix32(x):
    """A 32-bit integer hash (murmur3 finaliser) on int64 tensors holding 32-bit values, or on
    one Python int (the per-step key: no tensor ops for it on the hot path)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def gumbel_noise(seed: int, row_ids: torch.Tensor, step: int, vocab: int,
                 start: int = 0) -> torch.Tensor:
    """Counter-based Gumbel noise ``[len(row_ids), vocab]`` for token ids ``start ..
    start + vocab - 1``: a pure function of (seed, sequence index, decode step, token id),
    computed on ``row_ids``' device.

    The draw for a sequence therefore does not depend on how the batch was bucketed,
    split over data-parallel ranks or laid out over TP/PP — a KV-cached run, a recomputing
    run and any parallel layout sample the same tokens from the same logits.
    """
    device = row_ids.device
    key = _mix32(_mix32(int(seed) & _MASK32) ^ ((int(step) * 0x9E3779B1) & _MASK32))
    rows = _mix32(key ^ (row_ids.to(torch.int64).unsqueeze(1) * 0x27D4EB2F & _MASK32))
    cols = torch.arange(start, start + vocab, dtype=torch.int64, device=device).unsqueeze(0)
    bits = _mix32(_mix32(rows ^ cols) + 0x165667B1 & _MASK32)
    uniform = bits.to(torch.float64).add_(0.5).mul_(2.0 ** -32)  # in (0, 1); exact scaling
    return uniform.log_().neg_().log_().neg_().to(torch.float32)  # -log(-log(u))


# Vocabulary columns of noise made at once: bounds the int64 hash temporaries to
# rows × GUMBEL_CHUNK × 8 bytes (8 MiB per 32 rows), whatever the vocabulary (150k for Qwen2.5).
GUMBEL_CHUNK = 32768


def gumbel_max(logp: torch.Tensor, seed: int, row_ids: torch.Tensor, step: int,
               chunk: int = GUMBEL_CHUNK) -> torch.Tensor:
    """``argmax(logp + gumbel_noise(...))`` per row (a draw from ``exp(logp)``), with the
    noise made ``chunk`` vocabulary columns at a time on ``logp``'s device. Equal to the
    one-shot argmax: ties keep the lowest token id, as ``torch.argmax`` does."""
    best_value = best_token = None
    for start in range(0, logp.shape[-1], chunk):
        scores = logp[:, start:start + chunk] + gumbel_noise(
            seed, row_ids, step, min(chunk, logp.shape[-1] - start), start)
        value, token = scores.max(dim=-1)
        token = token + start
        if best_value is None:
            best_value, best_token = value, token
        else:
            better = value > best_value  # strictly: an earlier (lower-id) chunk wins a tie
            best_value = torch.where(better, value, best_value)
            best_token = torch.where(better, token, best_token)
    return best_token
