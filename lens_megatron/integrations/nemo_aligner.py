"""NeMo-Aligner's generative-actor face over the LENS actor, so a NeMo-Aligner-style
REINFORCE/GRPO trainer loop can drive our Megatron actor, sampler and LENS advantage stage.

Interface read from NVIDIA/NeMo-Aligner (Apache-2.0; no code copied):
``nemo_aligner/models/alignable_interface.py`` (``AlignableGenerativeInterface``),
``models/nlp/gpt/megatron_gpt_reinforce_actor.py``, ``megatron_gpt_ppo_actor.py`` and
``algorithms/reinforce.py`` at af2b3bd96ad78190f6ebfb552b9e599e313ce027 (main, 2025-05-16, = PyPI
0.7.0); ``megatron_gpt_reinforce_math_actor.py`` at 3d1294716e2d35f138a6b5fc15d45966662f10ed;
``experimental/grpo/`` (actor, ``algorithms/grpo.py``) at 8c319267922322b12d96bd35b18ab5f2a361fb67
(branch llama-nemotron-dev). docs/nemo_aligner.md has the method-by-method mapping.

NeMo-Aligner conventions used here (B sequences, S = padded prompt+response width):
- ``response_tokens [B, S]``: prompt then response; ``prompt_lengths [B]``;
  ``response_lengths [B]`` = prompt + response length (the end index, not the response size);
  ``is_end [B]``: the response ended with EOS.
- ``logprobs [B, S-1]``: position t holds log p(token t+1) (its ``from_parallel_logits_to_logprobs``),
  which is our ``token_logprobs`` without the last column.
- ``mask [B, S-1]``: ones on ``[prompt_length - 1, response_length - 1)`` (its ``create_mask``).
- A data-parallel rank's trainer hands the actor only its own share of a batch; groups of samples
  are found by identical prompt rows (``prompt_tokens``, or ``text`` in GRPO), not by position.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..actor import LensActor, TokenBatch
from ..algorithms.advantages import AdvantageConfig, compute_advantages_with_diagnostics
from ..algorithms.loss import compute_global_normalizer
from ..rollout.base import RolloutBatch, SamplingConfig
from ..trainer import step_seed

__all__ = ["LensAlignerActor", "lens_advantages", "nemo_response_mask", "rollout_dict"]

OLD_LOGPROB_KEYS = ("prev_logprobs", "logprobs", "log_probs")  # PPO, GRPO, math REINFORCE
REFERENCE_KEYS = ("init_logprobs", "init_log_probs")


def _ps():
    from megatron.core import parallel_state

    return parallel_state


def nemo_response_mask(prompt_lengths: torch.Tensor, response_lengths: torch.Tensor,
                       seq_len: int) -> torch.Tensor:
    """NeMo-Aligner's ``create_mask``: float ``[B, seq_len - 1]``, one on the log-prob positions
    that predict response tokens (EOS included)."""
    t = torch.arange(seq_len - 1).unsqueeze(0)
    lo, hi = prompt_lengths.view(-1, 1) - 1, response_lengths.view(-1, 1) - 1
    return ((t >= lo) & (t < hi)).float()


def rollout_dict(batch: RolloutBatch) -> dict:
    """A ``RolloutBatch`` in the layout of NeMo-Aligner's ``infer`` output. ``logprobs`` and
    ``response_trt_lps`` (the GRPO actor's name) are the *sampler's* log-probs, in NeMo's
    ``[B, S-1]`` and the engine's ``[B, S]`` coordinates; trainers replace ``logprobs`` with
    ``get_inference_log_probs`` as NeMo-Aligner's do."""
    return {
        "response_tokens": batch.input_ids,
        "response_lengths": batch.prompt_lengths + batch.response_lengths,
        "prompt_lengths": batch.prompt_lengths,
        "is_end": batch.finished,
        "logprobs": batch.sampling_logprobs[:, 1:],
        "response_trt_lps": batch.sampling_logprobs,
        "response_sentences": list(batch.response_texts),
    }


def _group_order(prompt_rows: torch.Tensor, group_size: Optional[int]) -> tuple[torch.Tensor, int]:
    """(permutation making each prompt's samples contiguous, G); every prompt needs G samples."""
    _, inverse = torch.unique(prompt_rows, dim=0, return_inverse=True)
    counts = torch.bincount(inverse)
    sizes = sorted(set(counts.tolist()))
    if len(sizes) != 1:
        raise ValueError(f"LENS needs the same number of samples for every prompt; found group "
                         f"sizes {sizes} (two different prompts with identical token rows merge)")
    if group_size is not None and sizes[0] != group_size:
        raise ValueError(f"expected {group_size} samples per prompt, found {sizes[0]}")
    return torch.sort(inverse, stable=True).indices, sizes[0]


def lens_advantages(rollout_batch: dict, cfg: Optional[AdvantageConfig] = None,
                    group_size: Optional[int] = None, prompt_key: Optional[str] = None):
    """Our LENS (or GRPO) advantage stage on a NeMo-Aligner rollout batch: the one call that
    replaces ``calculate_rloo_baseline`` / ``calculate_baseline_and_std_per_prompt``.

    Reads ``rewards [B]``, ``logprobs [B, S-1]`` (old policy), ``mask`` (or ``prompt_lengths`` and
    ``response_lengths``) and the prompt rows (``prompt_key``, default ``prompt_tokens`` or
    ``text``) that define the groups. Pass the *global* batch (every group whole), as NeMo-Aligner
    does for its baselines. Returns ``(advantages [B] float32 in the batch's order, diagnostics)``.
    """
    keys = [prompt_key] if prompt_key else ["prompt_tokens", "text"]
    found = [k for k in keys if k in rollout_batch]
    if not found:
        raise KeyError(f"the rollout batch has none of the prompt keys {keys}; they define groups")
    logprobs = rollout_batch["logprobs"].float()
    mask = rollout_batch.get("mask")
    if mask is None:
        mask = nemo_response_mask(rollout_batch["prompt_lengths"],
                                  rollout_batch["response_lengths"], logprobs.shape[1] + 1)
    valid = mask.bool()
    order, g = _group_order(rollout_batch[found[0]], group_size)
    sums = torch.where(valid, logprobs, 0.0).sum(1)
    rewards = torch.as_tensor(rollout_batch["rewards"]).float().view(-1)
    adv, diagnostics = compute_advantages_with_diagnostics(
        rewards[order], sums[order], valid.sum(1)[order], g, cfg)
    out = torch.empty_like(adv)
    out[order] = adv
    return out, diagnostics


def _sequence_advantages(batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """One advantage per sequence from ``advantages`` ([B], [B, 1] or [B, S-1] constant over the
    response), or from ``rewards(_with_kl) - baseline`` (NeMo-Aligner's REINFORCE batches)."""
    if "advantages" not in batch:
        reward_key = next((k for k in ("rewards_with_kl", "rewards") if k in batch), None)
        if reward_key is None or "baseline" not in batch:
            raise KeyError("the batch needs `advantages` (see lens_advantages) or rewards and "
                           "`baseline`")
        return (batch[reward_key].float() - batch["baseline"].float()).view(-1)
    adv = batch["advantages"].float()
    if adv.dim() == 2 and adv.shape[1] == 1:
        adv = adv[:, 0]
    if adv.dim() == 1:
        return adv
    valid = mask.bool()
    first = torch.where(valid, adv, 0.0).sum(1) / valid.sum(1).clamp(min=1)
    if not torch.allclose(torch.where(valid, adv, first.unsqueeze(1)), first.unsqueeze(1).expand_as(adv)):
        raise ValueError("per-token advantages (PPO with a critic and GAE) are not supported: the "
                         "LENS loss takes one advantage per sequence ([B], [B, 1], or [B, S-1] "
                         "constant over each response)")
    return first


def _check_widths(batch: dict) -> None:
    """Per-token tensors must be ``[B, S-1]`` for ``response_tokens [B, S]``."""
    s = batch["response_tokens"].shape[1]
    for key in ("mask", "advantages", "importance_correction", *OLD_LOGPROB_KEYS, *REFERENCE_KEYS):
        value = batch.get(key)
        if torch.is_tensor(value) and value.dim() == 2 and value.shape[1] not in (1, s - 1):
            raise ValueError(f"batch[{key!r}] is [B, {value.shape[1]}]; NeMo-Aligner's per-token "
                             f"tensors are [B, S-1] = [B, {s - 1}] for response_tokens [B, {s}]")


class _NemoTokenizerView:
    """The tokenizer attributes NeMo-Aligner trainers use (``eos_id``, ``ids_to_text``)."""

    def __init__(self, tokenizer) -> None:
        self.inner = tokenizer
        self.eos_id, self.pad_id = tokenizer.eos_id, tokenizer.pad_id

    def ids_to_text(self, ids) -> str:
        return self.inner.decode(list(ids))

    def text_to_ids(self, text: str) -> list[int]:
        return self.inner.encode(text)


class LensAlignerActor:
    """``AlignableGenerativeInterface`` (registered as one when NeMo-Aligner is installed) over a
    ``LensActor``, a rollout engine and a tokenizer. Every rank of the job calls every method, as
    in NeMo-Aligner; batches are this data-parallel rank's share, results are replicated (metrics
    on all ranks, plain floats)."""

    def __init__(self, actor: LensActor, engine, tokenizer, cfg=None) -> None:
        self.actor, self.engine, self.cfg = actor, engine, cfg or actor.cfg
        self.tokenizer = _NemoTokenizerView(tokenizer)
        self.phase = "idle"  # idle | inference | training
        self.optimizer_steps = 0
        self._engine_stale = False
        self._infer_calls = 0
        self._stepped = False
        layout = getattr(engine, "layout", None)
        m = self.cfg.model
        if layout is not None and (layout.tensor_parallel_size != m.tensor_model_parallel_size
                                   or m.pipeline_model_parallel_size != 1):
            raise ValueError("NeMo-Aligner trainers give every rank of a model-parallel group the "
                             "same prompts; with vLLM that needs rollout.vllm.tensor_parallel_size "
                             "== model.tensor_model_parallel_size and no pipeline parallelism")

    @classmethod
    def from_trainer(cls, trainer) -> "LensAlignerActor":
        """The adapter over a ``LensTrainer``'s actor, engine and tokenizer."""
        return cls(trainer.actor, trainer.engine, trainer.tokenizer, trainer.cfg)

    # ------------------------------------------------------------------ phases
    def _require(self, phase: str, method: str) -> None:
        if self.phase != phase:
            hint = {"inference": "prepare_for_inference()", "training": "prepare_for_training()"}
            raise RuntimeError(f"{method} needs {hint[phase]} first (the adapter is in phase "
                               f"{self.phase!r}); NeMo-Aligner trainers call them in that order")

    def prepare_for_inference(self) -> None:
        """NeMo: refit the TRT-LLM engine and offload Adam. Ours: sync the engine's weights if
        the policy moved since the last rollout (the trainer's weight sync), then wake it."""
        self._require("idle", "prepare_for_inference()")
        if self._engine_stale:
            self.engine.sync_weights()
            self._engine_stale = False
        self.engine.wake()
        self.phase = "inference"

    def finish_inference(self) -> None:
        """NeMo: free the generation engine. Ours: ``engine.sleep()`` (vLLM's KV cache)."""
        self._require("inference", "finish_inference()")
        self.engine.sleep()
        self.phase = "idle"

    def prepare_for_training(self) -> None:
        """NeMo: set micro-batch sizes, onload Adam states. Ours keeps the optimizer resident
        and uses ``model.micro_batch_size``: only the phase changes."""
        self._require("idle", "prepare_for_training()")
        self.phase = "training"

    def finish_training(self) -> None:
        """NeMo: nothing (its actors keep Adam on GPU here). Ours: back to idle; the engine is
        re-synced at the next ``prepare_for_inference`` if a step was taken."""
        self._require("training", "finish_training()")
        self.phase = "idle"

    def prepare_for_training_step(self) -> None:
        """Train mode on every model chunk (NeMo's ``prepare_for_training_step``)."""
        self._require("training", "prepare_for_training_step()")
        for chunk in self.actor.chunks:
            chunk.train()
        self._stepped = False

    def finish_training_step(self) -> None:
        """NeMo: gradient all-reduce. Ours already did it (megatron's ``finalize_model_grads``)
        and stepped inside ``get_loss_and_metrics``; this checks that a step happened."""
        self._require("training", "finish_training_step()")
        if not self._stepped:
            raise RuntimeError("no optimizer step since prepare_for_training_step(): this adapter "
                               "steps inside get_loss_and_metrics(batch, forward_only=False)")

    def prepare_for_validation_step(self) -> None:
        """Eval mode for a validation ``get_loss_and_metrics(batch, forward_only=True)``."""
        for chunk in self.actor.chunks:
            chunk.eval()

    def finish_validation_step(self) -> None:
        for chunk in self.actor.chunks:
            chunk.train()

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def infer(self, inference_batch: dict) -> dict:
        """One sampled response per prompt row of ``inference_batch`` (``text`` or ``problem``
        ``[B, P]`` right-padded, ``length [B]``), as NeMo-Aligner's ``infer``; see
        ``rollout_dict`` for the keys returned (CPU tensors)."""
        self._require("inference", "infer()")
        key = "text" if "text" in inference_batch else "problem"
        rows, lengths = inference_batch[key], inference_batch["length"]
        prompts = [row[: int(n)].tolist() for row, n in zip(rows, lengths)]
        r = self.cfg.rollout
        sampling = SamplingConfig(
            group_size=1, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
            max_new_tokens=r.max_new_tokens, ignore_eos=r.ignore_eos,
            seed=step_seed(self.cfg.trainer.seed + 1, self._infer_calls),
            row_offset=self.actor.dp_rank * len(prompts))
        self._infer_calls += 1
        return rollout_dict(self.engine.generate(prompts, sampling))

    def get_inference_log_probs(self, response_tokens: torch.Tensor,
                                forward_micro_batch_size: Optional[int] = None) -> torch.Tensor:
        """Current-policy ``logprobs [B, S-1]`` of this rank's sequences (every position, as
        NeMo). ``forward_micro_batch_size`` is accepted for NeMo's signature; our passes use
        ``model.micro_batch_size`` (it changes memory, not results). Log-probs are of the
        sampling distribution at ``rollout.temperature``, like the sampler's."""
        return self._logprobs(response_tokens, reference=False)

    def get_init_policy_logprobs(self, rollout_batches):
        """Initial-policy ``logprobs [B, S-1]``. NeMo-Aligner's trainers call this only when
        ``initial_policy_kl_penalty > 0``; our actor keeps the frozen initial policy only when
        ``loss.kl_coef > 0`` and otherwise raises. Takes ``response_tokens`` (what NeMo-Aligner's
        REINFORCE trainer passes, positionally) or a list of rollout dicts (what the interface's
        parameter name, ``rollout_batches``, says: one tensor each)."""
        if self.actor.reference_chunks is None:
            raise RuntimeError("no initial-policy model: loss.kl_coef is 0 (NeMo-Aligner: "
                               "initial_policy_kl_penalty 0), so there is no KL term to feed")
        if isinstance(rollout_batches, (list, tuple)):
            return [self._logprobs(b["response_tokens"], reference=True) for b in rollout_batches]
        return self._logprobs(rollout_batches, reference=True)

    def _logprobs(self, response_tokens: torch.Tensor, reference: bool) -> torch.Tensor:
        width = response_tokens.shape[1]
        full, rows = self._gather_over_dp({"response_tokens": response_tokens.cpu()})
        tokens = full["response_tokens"]
        everywhere = torch.ones((tokens.shape[0], tokens.shape[1] - 1))
        token_logprobs = self.actor.compute_logprobs(self._token_batch(tokens, everywhere),
                                                     reference=reference)["token_logprobs"]
        return token_logprobs[rows, : width - 1].contiguous()

    # ------------------------------------------------------------------ training
    def get_loss_and_metrics(self, batch: dict, forward_only: bool):
        """``(loss, metrics)``, replicated on every rank as plain floats.

        ``forward_only=False``: one optimizer step (zero grads, forward/backward, clip, Adam,
        LR schedule) of our clipped policy loss on this batch with the global normalizer, i.e.
        ``LensActor.train_step``; NeMo's trainer-side ``zero_grad/clip/step`` are part of it.
        ``forward_only=True``: the same loss and metrics at the current weights, no update.
        Batch: ``response_tokens``, ``mask``, ``advantages`` (or rewards and ``baseline``), old
        log-probs (``prev_logprobs``/``logprobs``/``log_probs``; if absent they are computed
        now: on-policy REINFORCE), ``init_logprobs`` when ``loss.kl_coef > 0``, optional
        ``importance_correction`` and ``prompt_mask``. ``is_end`` is not a loss mask (as in
        NeMo's GRPO and our trainer: truncated responses train too).
        """
        if not forward_only:
            self._require("training", "get_loss_and_metrics(forward_only=False)")
        full, _ = self._gather_over_dp(self._step_tensors(batch))
        tokens = self._token_batch(full["response_tokens"], full["mask"])
        width = tokens.input_ids.shape[1]
        if "old" in full:
            old = self._token_coords(full["old"], width)
        else:
            old = self.actor.compute_logprobs(tokens)["token_logprobs"]
        ref = self._token_coords(full["ref"], width) if "ref" in full else None
        weights = self._token_coords(full["weights"], width) if "weights" in full else None
        normalizer = compute_global_normalizer([tokens.target_mask], self.cfg.loss.normalization)
        if forward_only:
            metrics = self._evaluate_loss(tokens, old, full["advantages"], normalizer, weights, ref)
        else:
            metrics = self.actor.train_step(tokens, old, full["advantages"], normalizer,
                                            rollout_weights=weights, ref_logprobs=ref)
            self.optimizer_steps += 1
            self._engine_stale = self._stepped = True
        metrics = self._replicate(metrics)
        return metrics["loss"], metrics

    def _step_tensors(self, batch: dict) -> dict[str, torch.Tensor]:
        """The batch's tensors under our names, in NeMo's ``[B, S-1]`` coordinates, on CPU
        (NeMo's trainers may hand GPU tensors; our actor takes CPU batches like our trainer's)."""
        batch = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
        _check_widths(batch)
        tokens = batch["response_tokens"]
        mask = batch["mask"].float()
        if "prompt_mask" in batch:  # the math REINFORCE trainer's filtered-out prompts
            mask = mask * batch["prompt_mask"].float().view(-1, 1)
        out = {"response_tokens": tokens, "mask": mask,
               "advantages": _sequence_advantages(batch, mask)}
        old_key = next((k for k in OLD_LOGPROB_KEYS if k in batch), None)
        if old_key is not None:
            out["old"] = batch[old_key].float()
        ref_key = next((k for k in REFERENCE_KEYS if k in batch), None)
        if self.cfg.loss.kl_coef > 0:
            if ref_key is None:
                raise KeyError(f"loss.kl_coef > 0 needs the initial-policy log-probs in the batch "
                               f"(one of {REFERENCE_KEYS}; see get_init_policy_logprobs)")
            out["ref"] = batch[ref_key].float()
        correction = batch.get("importance_correction")
        if correction is not None and not bool((correction[mask.bool()] == 1).all()):
            if self.cfg.loss.kl_coef > 0:
                raise ValueError("importance_correction with loss.kl_coef > 0: NeMo-Aligner also "
                                 "weights the KL term by it, our loss weights the policy term only")
            out["weights"] = correction.float()
        return out

    @torch.no_grad()
    def _evaluate_loss(self, tokens, old, advantages, normalizer, weights, ref) -> dict:
        out = self.actor.compute_logprobs(tokens, entropy=True)
        loss, metrics = self.actor.loss_fn(
            out["token_logprobs"], old, advantages, tokens.target_mask, normalizer,
            ref_logprobs=ref, rollout_weights=weights, entropy=out["entropy"])
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["loss"] = float(loss)
        return metrics

    # ------------------------------------------------------------------ plumbing
    def _token_batch(self, response_tokens: torch.Tensor, mask: torch.Tensor) -> TokenBatch:
        """NeMo ``mask [B, S-1]`` is our ``target_mask``: response_mask[:, t+1] = mask[:, t]."""
        response_mask = torch.zeros(response_tokens.shape, dtype=torch.bool)
        response_mask[:, 1:] = mask.bool()
        return TokenBatch.from_rollout(response_tokens.long(), response_mask,
                                       self.actor.pad_multiple)

    @staticmethod
    def _token_coords(values: torch.Tensor, width: int) -> torch.Tensor:
        out = torch.zeros((values.shape[0], width), dtype=torch.float32)
        out[:, : values.shape[1]] = values
        return out

    def _gather_over_dp(self, named: dict[str, torch.Tensor]) -> tuple[dict, slice]:
        """Every data-parallel rank's rows, concatenated in rank order (our actor slices its
        batches by data-parallel rank again), and this rank's rows in the result."""
        rows = next(iter(named.values())).shape[0]
        dp = self.actor.dp_size
        if dp == 1:
            return dict(named), slice(0, rows)
        parts = [None] * dp
        dist.all_gather_object(parts, {k: v.cpu() for k, v in named.items()},
                               group=_ps().get_data_parallel_group())
        counts = [next(iter(p.values())).shape[0] for p in parts]
        if len(set(counts)) != 1:
            raise ValueError(f"data-parallel ranks hold {counts} sequences; they must be equal "
                             "(NeMo-Aligner balances its rollout batches the same way)")
        out = {}
        for key in named:
            pieces = [p[key] for p in parts]
            if pieces[0].dim() == 2:
                width = max(t.shape[1] for t in pieces)
                pieces = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in pieces]
            out[key] = torch.cat(pieces)
        start = self.actor.dp_rank * rows
        return out, slice(start, start + rows)

    @staticmethod
    def _replicate(metrics: dict) -> dict[str, float]:
        """The last rank's metrics on every rank (NeMo broadcasts from ``get_last_rank()``)."""
        box = [{k: float(v) for k, v in metrics.items()}]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=dist.get_world_size() - 1)
        return box[0]


def _register_with_nemo_aligner() -> None:
    """With NeMo-Aligner installed (``nemo-aligner==0.7.0`` imports with Jinja2 and jsonlines
    only), register the adapter as a virtual subclass of its ``AlignableGenerativeInterface``,
    so ``isinstance`` checks in NeMo-Aligner code hold. Without it there is nothing to register
    with; tests/test_nemo_aligner.py checks the signatures against the real wheel."""
    try:
        from nemo_aligner.models.alignable_interface import AlignableGenerativeInterface
    except ImportError:
        return
    AlignableGenerativeInterface.register(LensAlignerActor)


_register_with_nemo_aligner()
