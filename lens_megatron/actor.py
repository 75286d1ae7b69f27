"""The LENS actor: a megatron-core GPTModel (any TP/PP/VPP/DP/CP layout) with its optimizer,
computing sequence log-probs through the fused ``lens_kernels`` kernel and training with the
clipped policy loss.

Every rank holds the whole batch (``TokenBatch``, on the host). Which rows each data-parallel
rank runs, and in which micro-batches, is planned on the host (``batching/``): padded
micro-batches of ``model.micro_batch_size`` rows cut to the columns they need, or — with
``model.sequence_packing`` — packed ``[1, T]`` rows of whole sequences within
``model.max_tokens_per_microbatch`` tokens (per-document causal attention and RoPE positions),
balanced over the DP ranks by tokens, with the same number of micro-batches on every rank.
Each micro-batch is moved to the model's device once; per-token results go back to the
original rows and the batch width (zeros where masked) and are summed over the DP ranks, so
every rank gets the whole batch's results. The gradient does not depend on the plan: every
micro-batch's loss is divided by the global normalizer.

Token coordinates: position t of ``token_logprobs [N, S]`` is the log-prob of
``input_ids[:, t + 1]`` predicted at t, and ``target_mask[:, t] = response_mask[:, t + 1]``.

Context parallelism (padded micro-batches): each micro-batch's ``[b, W]`` tensors are split
into megatron's load-balanced chunks for this CP rank (``parallel/context.py``); per-token
results are gathered back over CP; each sequence's mean in the loss divides by its whole
token count.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .algorithms.loss import ClippedPolicyLoss
from .algorithms.token_losses import nll_token_loss, policy_token_loss
from .batching import PackedMicroBatch, build_micro_batches, needed_lengths, plan_batches
from .config import LensTrainConfig
from .metric_reduction import reduce_metrics
from .models.builder import build_model_chunks
from .models.fused_head import hidden_states_out
from .optimizer import TrainingModel, optimizer_step, setup_training, zero_grads
from .parallel.device import module_device


class NonFiniteLossError(RuntimeError):
    """The loss or the log-probs were NaN/inf; no weights were updated."""


@dataclass
class TokenBatch:
    """Model inputs of one batch in token coordinates (see module docstring)."""

    input_ids: torch.Tensor  # [N, S]
    targets: torch.Tensor  # [N, S]
    target_mask: torch.Tensor  # [N, S] bool

    @classmethod
    def from_rollout(cls, input_ids: torch.Tensor, response_mask: torch.Tensor,
                     pad_multiple: int = 1) -> "TokenBatch":
        n, s = input_ids.shape
        width = -(-s // pad_multiple) * pad_multiple
        ids = torch.zeros((n, width), dtype=torch.long)
        ids[:, :s] = input_ids
        targets = torch.zeros_like(ids)
        targets[:, : width - 1] = ids[:, 1:]
        mask = torch.zeros((n, width), dtype=torch.bool)
        mask[:, : s - 1] = response_mask[:, 1:].bool()
        return cls(ids, targets, mask)

    def slice(self, start: int, end: int) -> "TokenBatch":
        return TokenBatch(self.input_ids[start:end], self.targets[start:end],
                          self.target_mask[start:end])


def _ps():
    from megatron.core import parallel_state

    return parallel_state


class LensActor:
    """Owns the model chunks of this rank, the optimizer and the loss."""

    def __init__(self, cfg: LensTrainConfig, total_optimizer_steps: int) -> None:
        self.cfg = cfg
        m = cfg.model
        self.arch = m.arch
        self.precision = m.precision_config()
        chunks = build_model_chunks(m.arch, m.layout(), self.precision, m.transformer_impl,
                                    seed=m.init_seed)
        if m.load:
            from .checkpoint.model_io import load_model_checkpoint

            load_model_checkpoint(chunks, m.load)
        self.training: TrainingModel = setup_training(chunks, m, cfg.optim, total_optimizer_steps)
        # The model's device: every micro-batch, buffer and collective of the actor lives here
        # (parallel/device.py); row planning stays on the host.
        self.device = module_device(chunks)
        self.loss_fn = ClippedPolicyLoss(cfg.loss.loss_config())
        self.temperature = cfg.rollout.temperature
        self.pad_multiple = m.sequence_multiple()
        self.reference_chunks = None
        if cfg.loss.kl_coef > 0:  # a frozen copy of the initial policy, only when needed
            self.reference_chunks = build_model_chunks(
                m.arch, m.layout(), self.precision, m.transformer_impl, seed=m.init_seed)
            if m.load:
                load_model_checkpoint(self.reference_chunks, m.load)
            for chunk in self.reference_chunks:
                chunk.requires_grad_(False)

    # ------------------------------------------------------------------ plumbing
    @property
    def chunks(self) -> list:
        return self.training.chunks

    @property
    def dp_rank(self) -> int:
        return _ps().get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        return _ps().get_data_parallel_world_size()

    @property
    def cp_size(self) -> int:
        return _ps().get_context_parallel_world_size()

    def _kernel(self, output, mb, model, entropy: bool, token_loss=None):
        """Token log-probs (and entropy) of a micro-batch from the model's output: logits, or
        with ``model.fused_linear_logprobs`` the hidden states times the LM head, a few token
        chunks at a time (``models/fused_head.py``). Returns ``(loss, outputs)``: with
        ``token_loss`` (the loss as per-token terms, ``algorithms/token_losses.py``) and the
        fused head, the loss is differentiated inside the chunks (three GEMMs, no logits
        recomputed) and ``outputs`` are detached; otherwise ``loss`` is None."""
        from lens_kernels import (linear_logprobs_and_confidence, linear_logprobs_with_loss,
                                  logprobs_and_confidence)

        ps = _ps()
        group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
        options = dict(tp_group=group, temperature=self.temperature, return_entropy=entropy,
                       valid_vocab=self.arch.vocab_size)
        if not self.cfg.model.fused_linear_logprobs:
            return None, logprobs_and_confidence(output, mb.targets, mb.mask,
                                                 inplace_backward=True, **options)
        from .models.fused_head import head_weight

        if token_loss is None:
            return None, linear_logprobs_and_confidence(output, head_weight(model), mb.targets,
                                                        mb.mask, **options)
        return linear_logprobs_with_loss(output, head_weight(model), mb.targets, mb.mask,
                                         token_loss, **options)

    def _plan(self, tokens: TokenBatch):
        """Which rows this call's micro-batches hold, on every DP rank (host, deterministic)."""
        m = self.cfg.model
        return plan_batches(
            needed_lengths(tokens.target_mask), self.dp_size,
            micro_batch_size=None if m.sequence_packing else m.micro_batch_size,
            max_tokens=m.max_tokens_per_microbatch if m.sequence_packing else None,
            pad_multiple=self.pad_multiple,
            same_shape=_ps().get_pipeline_model_parallel_world_size() > 1,
            full_width=None if m.sequence_packing else tokens.input_ids.shape[1],
            context_parallel_hint=True,
            count_multiple=_ps().get_pipeline_model_parallel_world_size()
            if m.sequence_packing and m.virtual_pipeline_model_parallel_size else 1)

    def _micro_batches(self, tokens: TokenBatch, token_extras: dict, sequence_extras: dict):
        """This rank's micro-batches on the model's device (the one host -> device move of
        the actor's path), split for this CP rank under context parallelism."""
        layouts = build_micro_batches(self._plan(tokens), self.dp_rank, tokens.input_ids,
                                      tokens.targets, tokens.target_mask, token_extras,
                                      sequence_extras, device=self.device)
        if self.cp_size > 1:
            from .parallel.context_batches import split_padded_for_cp

            ps = _ps()
            layouts = [split_padded_for_cp(mb, ps.get_context_parallel_rank(), self.cp_size)
                       for mb in layouts]
        return layouts

    def _run_schedule(self, chunks, batches: list, loss_for_batch: Callable,
                      forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from .models.packed import packed_seq_params

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            extra = ({"packed_seq_params": packed_seq_params(mb)}
                     if isinstance(mb, PackedMicroBatch) else {})
            output = model(mb.input_ids, mb.position_ids, None, **extra)
            return output, lambda out: loss_for_batch(out, mb, model)

        iterators = [iter(batches) for _ in chunks]
        first = batches[0]
        fused = self.cfg.model.fused_linear_logprobs
        # No cuda_to_cpu() mode here: its per-op dispatch is the hot path's overhead, and the
        # one CUDA literal in the schedules is mapped by cpu_mode (patch 6).
        with hidden_states_out(chunks) if fused else nullcontext():
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators if len(chunks) > 1 else iterators[0],
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(batches),
                # the global width: megatron divides by CP (and by TP under SP) for p2p shapes
                seq_length=getattr(first, "global_width", first.input_ids.shape[1]),
                micro_batch_size=first.input_ids.shape[0],
                forward_only=forward_only,
            )

    @staticmethod
    def _rows(mb, values: torch.Tensor) -> torch.Tensor:
        """A micro-batch's per-token values in per-sequence rows (the loss's layout)."""
        return mb.rows_view(values) if isinstance(mb, PackedMicroBatch) else values

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def compute_logprobs(self, tokens: TokenBatch, reference: bool = False,
                         entropy: bool = False) -> dict[str, torch.Tensor]:
        """Token log-probs ``[N, S]`` (and entropy) of the whole batch, on every rank."""
        chunks = self.reference_chunks if reference else self.chunks

        def collect(output, mb, model):
            _, out = self._kernel(output, mb, model, entropy)
            kept = out.token_logprobs.detach()
            if entropy:
                kept = torch.stack([kept, out.entropy.detach()], dim=-1)
            return out.token_logprobs.sum() * 0.0, {"values": kept}

        batches = self._micro_batches(tokens, {}, {})
        results = self._run_schedule(chunks, batches, collect, True)
        n, width = tokens.input_ids.shape
        shape = (n, width, 2) if entropy else (n, width)
        merged = torch.zeros(shape, device=self.device)
        if results:  # the last pipeline stage: this rank's rows back in place, others zero
            for mb, result in zip(batches, results):
                values = result["values"]
                if self.cp_size > 1:
                    values = mb.gather_cp(values, _ps().get_context_parallel_group())
                mb.unpack_into(merged, values)
        merged = self._sum_over_dp(self._broadcast_from_last_stage(merged))
        out = {"token_logprobs": merged[..., 0] if entropy else merged}
        if entropy:
            out["entropy"] = merged[..., 1]
        return out

    def _broadcast_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        ps = _ps()
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return tensor
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        return tensor

    def _sum_over_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        """Each DP rank holds its rows (zeros elsewhere): one all-reduce completes the batch."""
        if self.dp_size > 1:
            dist.all_reduce(tensor, group=_ps().get_data_parallel_group())
        return tensor

    # ------------------------------------------------------------------ training
    def train_step(self, tokens: TokenBatch, old_logprobs: torch.Tensor,
                   advantages: torch.Tensor, global_normalizer: torch.Tensor,
                   rollout_weights: Optional[torch.Tensor] = None,
                   ref_logprobs: Optional[torch.Tensor] = None) -> dict[str, float]:
        """One optimizer step on ``tokens`` (this update's sequences, every rank holds all).

        The loss of each micro-batch is divided by ``global_normalizer`` (the sequence or
        token count of the whole update), so the gradient does not depend on how the
        sequences are split over micro-batches and data-parallel ranks.
        """
        token_extras = {"old_logprobs": old_logprobs}
        if rollout_weights is not None:
            token_extras["rollout_weights"] = rollout_weights
        if ref_logprobs is not None:
            token_extras["ref_logprobs"] = ref_logprobs
        sequence_extras = {"advantages": advantages.to(self.device)}
        batches = self._micro_batches(tokens, token_extras, sequence_extras)

        def policy_loss(output, mb, model):
            token_loss = (policy_token_loss(self.loss_fn, mb, global_normalizer)
                          if self.cfg.model.fused_linear_logprobs else None)
            fused_loss, out = self._kernel(output, mb, model, entropy=True, token_loss=token_loss)
            rows, extras = (lambda x: self._rows(mb, x)), mb.token_extras
            loss, metrics = self.loss_fn(
                rows(out.token_logprobs), rows(extras["old_logprobs"]),
                mb.sequence_extras["advantages"], rows(mb.mask), global_normalizer,
                ref_logprobs=rows(extras["ref_logprobs"]) if "ref_logprobs" in extras else None,
                rollout_weights=(rows(extras["rollout_weights"])
                                 if "rollout_weights" in extras else None),
                entropy=rows(out.entropy),
                tokens_per_sequence=mb.sequence_extras.get("tokens_per_sequence"),
            )
            if fused_loss is not None:  # the metrics' loss ran on detached log-probs
                loss = fused_loss
            metrics = {k: v.detach().float() for k, v in metrics.items()}
            metrics["loss"] = loss.detach().float()
            if "num_sequences" in mb.sequence_extras:  # CP: counted once, from the whole rows
                metrics["num_sequences"] = mb.sequence_extras["num_sequences"].float()
            return loss, torch.zeros((), dtype=torch.int), metrics

        zero_grads(self.training)
        start = time.perf_counter()
        results = self._run_schedule(self.chunks, batches, policy_loss, forward_only=False)
        metrics = self._reduce_metrics(results)
        metrics["time_fwd_bwd_s"] = time.perf_counter() - start
        if not math.isfinite(metrics["loss"]):
            zero_grads(self.training)
            raise NonFiniteLossError(
                f"non-finite loss ({metrics['loss']}) — the log-probs or advantages contain "
                "NaN/inf; this optimizer update was skipped and no weights changed")
        start = time.perf_counter()
        metrics.update(self._apply_update())
        metrics["time_optimizer_s"] = time.perf_counter() - start
        return metrics

    def _apply_update(self) -> dict[str, float]:
        """The optimizer step after a finite loss. An fp16 loss-scale overflow is a normal
        skipped update (counted, no weight changed); a non-finite gradient norm raises
        :class:`NonFiniteLossError` — refused before any weight changed either way."""
        outcome = optimizer_step(self.training)
        if outcome.skipped == "nonfinite_grad":
            zero_grads(self.training)
            raise NonFiniteLossError(f"non-finite gradient norm ({outcome.grad_norm}); this "
                                     "optimizer update was skipped and no weights changed")
        out = {"overflow_skipped_updates": float(outcome.skipped == "overflow"),
               "applied_updates": float(outcome.updated),
               "lr": float(self.training.optimizer.param_groups[0]["lr"])}
        if outcome.updated:
            out["grad_norm"] = outcome.grad_norm
        if self.precision.params == "fp16":
            out["loss_scale"] = outcome.loss_scale
        return out

    def sft_step(self, tokens: TokenBatch) -> dict[str, float]:
        """One supervised step: maximise the log-likelihood of the masked target tokens
        (normalised by their global count). Used for the demo's warm start."""
        total_tokens = tokens.target_mask.sum().clamp(min=1).to(self.device)
        batches = self._micro_batches(tokens, {}, {})

        def nll(output, mb, model):
            loss, out = self._kernel(output, mb, model, entropy=False,
                                     token_loss=nll_token_loss(total_tokens))
            if loss is None:
                loss = -out.token_logprobs.sum() / total_tokens
            return loss, torch.zeros((), dtype=torch.int), {"loss": loss.detach().float(),
                                                             "num_tokens": out.num_tokens.sum()}

        zero_grads(self.training)
        results = self._run_schedule(self.chunks, batches, nll, forward_only=False)
        metrics = self._reduce_metrics(results)
        metrics.update(self._apply_update())
        return metrics

    def _reduce_metrics(self, results: list) -> dict[str, float]:
        """Micro-batch metrics reduced by their own rules (``metric_reduction``: counts and the
        loss summed, maxima maxed, token means weighted) over micro-batches and the DP (×CP)
        ranks, on the last pipeline stage, then shared with the other stages."""
        ps = _ps()
        reduced = None
        if results:  # the last pipeline stage
            spread = self.dp_size * self.cp_size > 1
            group = ps.get_data_parallel_group(with_context_parallel=True) if spread else None
            reduced = reduce_metrics(results, sorted(results[0]), self.device, group=group)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            box = [reduced]
            dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
            reduced = box[0]
        return reduced
