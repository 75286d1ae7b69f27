"""The LENS actor: a megatron-core GPTModel (any TP/PP/VPP/DP layout) with its optimizer,
computing sequence log-probs through the fused ``lens_kernels`` kernel and training with the
clipped policy loss.

Batch layout: sequences are *padded*, not packed, with as little padding as that allows. The
rows of a call are ordered by the columns they need (through their last response token;
causal attention means later positions cannot change earlier ones) so that short rows share
micro-batches, and each micro-batch is cut to its longest row, rounded up to a multiple of TP
under sequence parallelism. With pipeline parallelism the micro-batches of one call share the
widest cut, since stages exchange fixed-shape activations (megatron 0.16 ties variable p2p
shapes to MoE). Per-token results go back to the original row order and the batch width, with
zeros where positions are masked (what the kernel gives there anyway). The gradient does not
depend on the grouping: every micro-batch's loss is divided by the global normalizer. Packing
(THD attention) would remove the remaining padding; our SDPA/local layer spec has no packed
attention, and it is not implemented.

Token coordinates: position t of ``token_logprobs [N, S]`` is the log-prob of
``input_ids[:, t + 1]`` predicted at t, and ``target_mask[:, t] = response_mask[:, t + 1]``.

Every rank of the job holds the whole rollout batch; each data-parallel rank computes and
trains on its slice, and the per-token results are all-gathered back (they are small next
to the logits), so the LENS stage sees every group on every rank.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .algorithms.loss import ClippedPolicyLoss
from .config import LensTrainConfig
from .metric_reduction import reduce_metrics
from .models.builder import build_model_chunks
from .optimizer import TrainingModel, optimizer_step, setup_training, zero_grads
from .parallel import cpu_mode
from .parallel.device import module_device, to_device


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

    def _kernel(self, logits, targets, mask, entropy: bool):
        from lens_kernels import logprobs_and_confidence

        ps = _ps()
        group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
        return logprobs_and_confidence(
            logits, targets, mask, tp_group=group, temperature=self.temperature,
            return_entropy=entropy, valid_vocab=self.arch.vocab_size,
            inplace_backward=True,
        )

    def _run_schedule(self, chunks, batches: list[dict], loss_for_batch: Callable,
                      forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            ids = mb["input_ids"]
            positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
            logits = model(ids, positions, None)
            return logits, lambda out: loss_for_batch(out, mb)

        iterators = [iter(batches) for _ in chunks]
        with cpu_mode.cuda_to_cpu():
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators if len(chunks) > 1 else iterators[0],
                model=chunks if len(chunks) > 1 else chunks[0],
                num_microbatches=len(batches),
                seq_length=batches[0]["input_ids"].shape[1],
                micro_batch_size=batches[0]["input_ids"].shape[0],
                forward_only=forward_only,
            )

    @staticmethod
    def _needed_lengths(mask: torch.Tensor) -> torch.Tensor:
        """Per row, the columns it needs: through its last target position (0 if none)."""
        positions = torch.arange(1, mask.shape[1] + 1).expand_as(mask)
        return torch.where(mask.bool(), positions, torch.zeros_like(positions)).amax(1)

    def _micro_batches(self, tokens: TokenBatch,
                       extra: dict[str, torch.Tensor]) -> tuple[list[dict], torch.Tensor]:
        """Micro-batches of ``tokens`` (see module docstring): rows ordered by the columns they
        need, so short rows share micro-batches, each micro-batch cut to its longest row
        (rounded up to the sequence-parallel multiple). Per-token entries of ``extra``
        (``[N, S]``) are cut alike, per-sequence ones kept. Returns the micro-batches and the
        row order (``order[i]``: the original row of the i-th row fed to the model)."""
        mbs = self.cfg.model.micro_batch_size
        n, full = tokens.input_ids.shape
        lengths = self._needed_lengths(tokens.target_mask)
        order = torch.argsort(lengths, stable=True)
        groups = [order[s:s + mbs] for s in range(0, n, mbs)]
        widths = []
        for rows in groups:
            width = max(1, int(lengths[rows].max()))
            widths.append(min(full, -(-width // self.pad_multiple) * self.pad_multiple))
        if _ps().get_pipeline_model_parallel_world_size() > 1 and widths:
            widths = [max(widths)] * len(widths)
        out = []
        for rows, width in zip(groups, widths):
            mb = {"input_ids": tokens.input_ids[rows, :width],
                  "targets": tokens.targets[rows, :width],
                  "mask": tokens.target_mask[rows, :width]}
            for key, value in extra.items():
                picked = value[rows.to(value.device)]
                mb[key] = picked[:, :width] if picked.dim() >= 2 and picked.shape[1] == full else picked
            out.append(to_device(mb, self.device))  # the one host -> device move of this path
        return out, order

    @staticmethod
    def _to_width(values: torch.Tensor, width: int) -> torch.Tensor:
        """Per-token results of a cut micro-batch, zero-padded back to the batch width."""
        return torch.nn.functional.pad(values, (0, width - values.shape[1]))

    def _dp_slice(self, n: int) -> tuple[int, int]:
        per_rank = n // self.dp_size
        return self.dp_rank * per_rank, (self.dp_rank + 1) * per_rank

    # ------------------------------------------------------------------ log-probs
    @torch.no_grad()
    def compute_logprobs(self, tokens: TokenBatch, reference: bool = False,
                         entropy: bool = False) -> dict[str, torch.Tensor]:
        """Token log-probs ``[N, S]`` (and entropy) of the whole batch, on every rank."""
        n = tokens.input_ids.shape[0]
        start, end = self._dp_slice(n)
        local = tokens.slice(start, end)
        chunks = self.reference_chunks if reference else self.chunks

        width = local.input_ids.shape[1]

        def collect(logits, mb):
            out = self._kernel(logits, mb["targets"], mb["mask"], entropy)
            kept = {"token_logprobs": self._to_width(out.token_logprobs.detach(), width)}
            if entropy:
                kept["entropy"] = self._to_width(out.entropy.detach(), width)
            return out.token_logprobs.sum() * 0.0, kept

        batches, order = self._micro_batches(local, {})
        results = self._run_schedule(chunks, batches, collect, True)
        keys = ["token_logprobs"] + (["entropy"] if entropy else [])
        shape = tuple(local.input_ids.shape)
        merged = {}
        for key in keys:
            value = torch.zeros(shape, device=self.device)
            if results:  # the last pipeline stage: rows back in their original order
                value[order.to(self.device)] = torch.cat([r[key] for r in results])
            merged[key] = self._gather_over_dp(self._broadcast_from_last_stage(value))
        return merged

    def _broadcast_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        ps = _ps()
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return tensor
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        return tensor

    def _gather_over_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.dp_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.dp_size)]
        dist.all_gather(parts, tensor.contiguous(), group=_ps().get_data_parallel_group())
        return torch.cat(parts)

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
        n = tokens.input_ids.shape[0]
        start, end = self._dp_slice(n)
        extra = {"old_logprobs": old_logprobs[start:end], "advantages": advantages[start:end]}
        if rollout_weights is not None:
            extra["rollout_weights"] = rollout_weights[start:end]
        if ref_logprobs is not None:
            extra["ref_logprobs"] = ref_logprobs[start:end]
        batches, _ = self._micro_batches(tokens.slice(start, end), extra)

        def policy_loss(logits, mb):
            out = self._kernel(logits, mb["targets"], mb["mask"], entropy=True)
            loss, metrics = self.loss_fn(
                out.token_logprobs, mb["old_logprobs"], mb["advantages"], mb["mask"],
                global_normalizer, ref_logprobs=mb.get("ref_logprobs"),
                rollout_weights=mb.get("rollout_weights"), entropy=out.entropy,
            )
            metrics = {k: v.detach().float() for k, v in metrics.items()}
            metrics["loss"] = loss.detach().float()
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
        n = tokens.input_ids.shape[0]
        start, end = self._dp_slice(n)
        total_tokens = tokens.target_mask.sum().clamp(min=1)
        batches, _ = self._micro_batches(tokens.slice(start, end), {})

        def nll(logits, mb):
            out = self._kernel(logits, mb["targets"], mb["mask"], entropy=False)
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
        loss summed, maxima maxed, token means weighted) over micro-batches and DP ranks, on
        the last pipeline stage, then shared with the other stages; every rank returns them."""
        ps = _ps()
        reduced = None
        if results:  # the last pipeline stage
            reduced = reduce_metrics(results, sorted(results[0]), self.device,
                                     group=ps.get_data_parallel_group() if self.dp_size > 1 else None)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            box = [reduced]
            dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                       group=ps.get_pipeline_model_parallel_group())
            reduced = box[0]
        return reduced
