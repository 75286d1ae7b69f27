"""The training loop (DESIGN.md §1): rollout → reward → old log-probs → LENS advantages →
clipped policy loss → optimizer step → weight sync, with checkpoint/resume, metrics and the
learning-signal guard.

Every rank runs this loop. Prompts are drawn identically everywhere; each data-parallel rank
generates and scores its slice, and the slices are gathered, so the LENS stage sees every
group. ``estimator: grpo`` and ``estimator: lens`` differ only in the advantage stage.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from .actor import LensActor, NonFiniteLossError, TokenBatch
from .algorithms.advantages import compute_advantages_with_diagnostics
from .algorithms.loss import compute_global_normalizer
from .algorithms.rollout_correction import rollout_correction_weights
from .algorithms.signal import StallGuard, learning_signal
from .checkpoint.training_state import (
    checkpoint_root,
    latest_checkpoint,
    load_training_checkpoint,
    save_training_checkpoint,
)
from .config import LensTrainConfig, to_yaml
from .data.prompt_source import PromptSource
from .metric_reduction import combine_updates
from .metrics_log import MetricsLogger
from .models.layer_spec import resolve_transformer_impl
from .parallel.collectives import is_model_parallel_leader
from .parallel.device import to_device
from .rollout.base import RolloutBatch, SamplingConfig, concat_batches
from .rollout.factory import build_engine
from .rollout.mismatch import logprob_mismatch
from .scoring import RolloutScorer
from .tokenizer import build_tokenizer

logger = logging.getLogger(__name__)


class TrainingStalled(RuntimeError):
    """``trainer.stall_steps`` consecutive steps gave no gradient signal."""


def step_seed(base: int, step: int) -> int:
    return (int(base) * 1_000_003 + int(step) * 7919) % (2**31 - 1)


def _confidence_by_group_kind(diag) -> dict[str, float]:
    """Mean confidence p̄ of wrong answers in negative and in mixed groups, and the mean over
    negative groups of their most confident wrong answer's p̄."""
    from .algorithms.advantages import GROUP_MIXED, GROUP_NEGATIVE

    conf, wrong = diag.confidence, diag.rewards < 1.0
    negative = diag.group_kind == GROUP_NEGATIVE
    out = {"confidence/max_wrong_in_negative_groups":
           float(conf.max(1).values[negative].mean()) if bool(negative.any()) else float("nan")}
    for name, kind in (("negative", GROUP_NEGATIVE), ("mixed", GROUP_MIXED)):
        chosen = (diag.group_kind == kind).unsqueeze(1) & wrong
        out[f"confidence/wrong_in_{name}_groups"] = (
            float(conf[chosen].mean()) if bool(chosen.any()) else float("nan"))
    return out


@dataclasses.dataclass
class StepTensors:
    """The step's per-token and per-sequence tensors on the model's device, moved once.

    ``mask`` and ``sampling_logprobs`` are in token coordinates (``TokenBatch``: position t
    predicts token t + 1), as wide as the token batch."""

    mask: torch.Tensor  # [N, S] bool
    sampling_logprobs: torch.Tensor  # [N, S] float32, the engine's log-probs
    rewards: torch.Tensor  # [N] float32

    @classmethod
    def move(cls, tokens: TokenBatch, batch: RolloutBatch, rewards: torch.Tensor,
             device: torch.device) -> "StepTensors":
        sampled = torch.zeros(tokens.target_mask.shape, dtype=torch.float32)
        width = batch.sampling_logprobs.shape[1]
        sampled[:, : width - 1] = batch.sampling_logprobs[:, 1:]
        return cls(*to_device((tokens.target_mask, sampled, rewards), device))


class LensTrainer:
    def __init__(self, cfg: LensTrainConfig) -> None:
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.model.tokenizer.type, cfg.model.tokenizer.path)
        if self.tokenizer.vocab_size > cfg.model.arch.vocab_size:
            raise ValueError(f"model.arch.vocab_size={cfg.model.arch.vocab_size} is smaller than the "
                             f"tokenizer's vocabulary ({self.tokenizer.vocab_size})")
        updates = cfg.optim.updates_per_rollout
        self.actor = LensActor(cfg, total_optimizer_steps=cfg.trainer.max_steps * updates)
        self.engine = build_engine(cfg, self.actor, self.tokenizer)
        self.prompts = PromptSource(cfg.data, self.tokenizer, cfg.rollout.prompts_per_step,
                                    cfg.rollout.max_prompt_length)
        self.scorer = RolloutScorer(cfg.reward) if self._prompt_shard(1)[2] else None
        self.guard = StallGuard(cfg.trainer.stall_steps)
        self.run_dir = os.path.join(cfg.exp_manager.exp_dir, cfg.exp_manager.name)
        self.ckpt_root = checkpoint_root(cfg.exp_manager.exp_dir, cfg.exp_manager.name)
        self.step = 0
        self.totals = {"negative_groups_with_gradient": 0.0, "reward_timeouts": 0.0,
                       "reward_parse_failures": 0.0, "reward_errors": 0.0,
                       "nonfinite_steps": 0.0, "overflow_skipped_updates": 0.0}

    # ---------------------------------------------------------------- run
    def run(self, stop_requested=None) -> dict:
        """Train until ``trainer.max_steps``; returns the last step's metrics."""
        self.maybe_resume()
        log = MetricsLogger(self.run_dir, enabled=dist.get_rank() == 0,
                            tensorboard=self.cfg.exp_manager.tensorboard,
                            wandb_project=self.cfg.exp_manager.wandb_project,
                            run_name=self.cfg.exp_manager.name,
                            total_steps=self.cfg.trainer.max_steps, start_step=self.step,
                            progress_bar=self.cfg.trainer.progress_bar)
        if log.set_aside:
            log.message(f"earlier metrics moved to {log.set_aside} (this run "
                        f"{'resumes at step %d' % self.step if self.step else 'starts fresh'})")
        if dist.get_rank() == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
                f.write(to_yaml(self.resolved_config()))
        metrics: dict = {}
        try:
            while self.step < self.cfg.trainer.max_steps:
                try:
                    metrics = self.train_step()
                    finite = metrics.get("train/nonfinite_updates", 0.0) == 0
                except NonFiniteLossError as exc:  # no weight changed in this step
                    finite, metrics = False, {"skipped/non_finite": 1.0}
                    log.message(f"step {self.step + 1} skipped: {exc}")
                if not finite:
                    self.totals["nonfinite_steps"] += 1
                metrics["total/nonfinite_steps"] = self.totals["nonfinite_steps"]
                self.step += 1
                metrics.update(self._maybe_evaluate())
                log.log(self.step, metrics)
                stalled = self.guard.update(
                    metrics.get("signal/effective_sequences", 0.0) > 0, finite)
                # Ask once per step (a collective): the same answer decides save and exit.
                stop = stop_requested is not None and stop_requested()
                if self._should_save() or stalled or stop:
                    self.save()
                if stalled:
                    raise TrainingStalled(self.guard.reason)
                if stop:
                    log.message(f"stopping at step {self.step} on request (checkpoint saved)")
                    break
        finally:
            log.close()
        return metrics

    def resolved_config(self) -> LensTrainConfig:
        """The config as run: ``model.transformer_impl: auto`` replaced by what it chose."""
        impl = resolve_transformer_impl(self.cfg.model.transformer_impl)
        return dataclasses.replace(
            self.cfg, model=dataclasses.replace(self.cfg.model, transformer_impl=impl))

    def _maybe_evaluate(self) -> dict[str, float]:
        every = self.cfg.trainer.eval_every
        if every <= 0 or self.step % every or not self.prompts.eval_records:
            return {}
        result = self.evaluate(self.prompts.eval_records, self.cfg.data.eval_samples_per_problem,
                               seed=step_seed(self.cfg.trainer.seed, 10**6 + self.step))
        return result.flat("eval")

    def _should_save(self) -> bool:
        every = self.cfg.trainer.save_every
        last = self.step == self.cfg.trainer.max_steps
        return last or (every > 0 and self.step % every == 0)

    @property
    def finished(self) -> bool:
        return self.step >= self.cfg.trainer.max_steps

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict[str, float]:
        cfg, timings = self.cfg, {}
        start = time.perf_counter()
        prompts = self.prompts.next_batch()
        batch, rewards, reward_counts = self._rollout_and_score(prompts, timings)
        # Host: the token batch the actor plans micro-batches from. Device: the step's
        # per-token math (one move, here), next to the log-probs the actor returns there.
        tokens = TokenBatch.from_rollout(batch.input_ids, batch.response_mask,
                                         self.actor.pad_multiple)
        step = StepTensors.move(tokens, batch, rewards, self.actor.device)
        t0 = time.perf_counter()
        old = self.actor.compute_logprobs(tokens, entropy=False)["token_logprobs"]
        self._check_finite(old, step.mask, "old-policy log-probs")
        ref = (self.actor.compute_logprobs(tokens, reference=True)["token_logprobs"]
               if cfg.loss.kl_coef > 0 else None)
        timings["time/old_logprobs_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # App. C's rho = mu needs the engine's own sequence log-probs (w = pi_theta / mu).
        sampled_sums = ((step.sampling_logprobs * step.mask).sum(1)
                        if cfg.lens.preference_function == "sampling" else None)
        advantages, diag = compute_advantages_with_diagnostics(
            step.rewards, (old * step.mask).sum(1), step.mask.sum(1), batch.group_size, cfg.lens,
            sampling_logprob_sums=sampled_sums)
        timings["time/lens_stage_s"] = time.perf_counter() - t0

        weights, mismatch, keep = self._rollout_weights(step, old)
        train_tokens = tokens if keep is None else dataclasses.replace(
            tokens, target_mask=tokens.target_mask & keep.cpu().unsqueeze(1))
        train_metrics = self._updates(train_tokens, old, advantages, weights, ref, timings)
        if cfg.trainer.measure_update_effect:
            train_metrics.update(self._update_effect(tokens, step.mask, old, diag))
        t0 = time.perf_counter()
        if train_metrics["train/applied_updates"] > 0:  # else no weight changed: nothing to sync
            timings.update({f"time/{k}": v for k, v in self.engine.sync_weights().items()})
        timings["time/weight_sync_s"] = time.perf_counter() - t0
        timings["time/step_s"] = time.perf_counter() - start
        return self._step_metrics(batch, rewards, reward_counts, advantages, diag, mismatch,
                                  train_metrics, timings)

    def _update_effect(self, tokens, mask, old, diag) -> dict[str, float]:
        """How this step's own update moved the per-token log-prob (log p̄) of its samples:
        in negative groups for the most and the least confident wrong answer of each group
        (LENS pushes the former down and, its advantages being zero-mean, the latter up),
        and in mixed groups for wrong and right answers."""
        from .algorithms.advantages import GROUP_MIXED, GROUP_NEGATIVE

        new = self.actor.compute_logprobs(tokens)["token_logprobs"]
        delta = ((new - old) * mask).sum(1) / mask.sum(1).clamp(min=1)
        delta = delta.view(diag.rewards.shape).double()
        negative = diag.group_kind == GROUP_NEGATIVE
        rows = torch.arange(delta.shape[0], device=delta.device)
        most = delta[rows, diag.confidence.argmax(1)][negative]
        least = delta[rows, diag.confidence.argmin(1)][negative]
        wrong, mixed = diag.rewards < 1.0, (diag.group_kind == GROUP_MIXED).unsqueeze(1)
        parts = {"negative_groups_most_confident": most, "negative_groups_least_confident": least,
                 "mixed_groups_wrong": delta[mixed & wrong],
                 "mixed_groups_correct": delta[mixed & ~wrong]}
        return {f"update_effect/{k}": float(v.mean()) if v.numel() else float("nan")
                for k, v in parts.items()}

    def _prompt_shard(self, n: int) -> tuple[slice, int, bool]:
        """(this rank's prompts, shard id, does this rank score/publish the shard).

        Native sampler: one shard per data-parallel rank, generated by its whole
        model-parallel group. vLLM (colocated): one shard per vLLM replica.
        """
        layout = getattr(self.engine, "layout", None)
        if layout is not None:
            return layout.shard(n), layout.replica_index, layout.tp_rank == 0
        dp_rank, dp_size = self.actor.dp_rank, self.actor.dp_size
        base, extra = divmod(n, dp_size)  # contiguous shards, sizes differing by at most one
        start = dp_rank * base + min(dp_rank, extra)
        return (slice(start, start + base + (dp_rank < extra)), dp_rank,
                is_model_parallel_leader())

    def _rollout_and_score(self, prompts, timings):
        cfg = self.cfg
        shard, shard_id, leader = self._prompt_shard(len(prompts))
        mine = prompts[shard]
        sampling = SamplingConfig(
            group_size=cfg.rollout.group_size, temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
            max_new_tokens=cfg.rollout.max_new_tokens, ignore_eos=cfg.rollout.ignore_eos,
            seed=step_seed(cfg.trainer.seed, self.step),
            row_offset=shard.start * cfg.rollout.group_size)
        t0 = time.perf_counter()
        self.engine.wake()
        local = self.engine.generate([p.token_ids for p in mine], sampling)
        self.engine.sleep()
        timings["time/rollout_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        golds = [p.record.answer for p in mine for _ in range(cfg.rollout.group_size)]
        scored = self.scorer.score(local, golds) if leader else None
        timings["time/reward_s"] = time.perf_counter() - t0
        mine_part = (shard_id, local, *scored) if leader else None
        parts = [mine_part]
        if dist.get_world_size() > 1:  # every shard leader publishes; everyone receives all
            parts = [None] * dist.get_world_size()
            dist.all_gather_object(parts, mine_part)
        parts = sorted((p for p in parts if p is not None), key=lambda p: p[0])
        batch = concat_batches([p[1] for p in parts])
        rewards = torch.cat([p[2] for p in parts])
        totals = {k: sum(p[3][k] for p in parts) for k in parts[0][3]}
        return batch, rewards, totals

    def evaluate(self, records, samples: int, seed: int = 0):
        """pass@k of the current policy on ``records`` (every rank gets the result)."""
        from .eval.rollout_eval import evaluate_pass_at_k

        return evaluate_pass_at_k(self.engine, self.scorer,
                                  lambda r: self.prompts.tokenize(r).token_ids, records, samples,
                                  self.cfg.rollout, seed=seed)

    def _rollout_weights(self, step: "StepTensors", old):
        """Engine↔trainer mismatch: metrics always; per-token correction weights when
        ``loss.rollout_correction`` is set; a keep-mask over sequences when
        ``rollout.mismatch_mask_threshold`` is (masked sequences leave the loss, counted)."""
        sampled, mask = step.sampling_logprobs, step.mask
        correction = self.cfg.loss.correction_config()
        weights, metrics = rollout_correction_weights(old, sampled, mask, correction)
        out = {f"rollout_correction/{k}": float(v) for k, v in metrics.items()}
        threshold = self.cfg.rollout.mismatch_mask_threshold
        monitor = logprob_mismatch(sampled, old, mask, threshold)
        out.update(monitor.metrics("mismatch/"))
        keep = monitor.keep if threshold is not None else None
        return (None if correction.rollout_correction == "none" else weights), out, keep

    def _updates(self, tokens, old, advantages, weights, ref, timings) -> dict[str, float]:
        """``optim.updates_per_rollout`` optimizer updates on consecutive slices of the batch.

        An update whose loss or gradient is not finite is skipped (no weight changes for it)
        and the others still run; ``train/nonfinite_updates`` counts the skipped ones and
        ``train/applied_updates`` the rest, so the weight sync after the updates runs exactly
        when some update changed the weights. If none did, :class:`NonFiniteLossError` says so.
        """
        cfg = self.cfg
        n = tokens.input_ids.shape[0]
        total = cfg.optim.updates_per_rollout
        per_update = n // total
        t0, collected, failures = time.perf_counter(), [], []
        for u in range(total):
            lo, hi = u * per_update, (u + 1) * per_update
            part = tokens.slice(lo, hi)
            normalizer = compute_global_normalizer([part.target_mask], cfg.loss.normalization)
            try:
                collected.append(self.actor.train_step(
                    part, old[lo:hi], advantages[lo:hi], normalizer,
                    rollout_weights=None if weights is None else weights[lo:hi],
                    ref_logprobs=None if ref is None else ref[lo:hi]))
            except NonFiniteLossError as exc:
                failures.append(f"update {u + 1}/{total}: {exc}")
        timings["time/train_s"] = time.perf_counter() - t0
        applied = sum(c["applied_updates"] for c in collected)
        if failures and applied == 0:
            raise NonFiniteLossError("; ".join(failures) + " — no update of this step changed "
                                     "the weights")
        for message in failures:
            logger.warning("step %d %s (the step's other updates were applied: %d of %d; "
                           "the rollout engine is synced to them)", self.step + 1, message,
                           int(applied), total)
        for key in ("time_fwd_bwd_s", "time_optimizer_s"):  # summed over the updates
            timings[f"time/{key[5:]}"] = sum(c.pop(key) for c in collected)
        metrics = combine_updates(collected)
        metrics["nonfinite_updates"] = float(len(failures))
        return {f"train/{k}": v for k, v in metrics.items()}

    @staticmethod
    def _check_finite(values, mask, what: str) -> None:
        bad = mask & ~torch.isfinite(values)
        if bool(bad.any()):
            rows = bad.any(1).nonzero().flatten()[:5].tolist()
            raise NonFiniteLossError(f"{what} are NaN/inf in sequences {rows}; the step was "
                                     "stopped before the LENS stage and no weights changed")

    def _step_metrics(self, batch, rewards, reward_counts, advantages, diag, mismatch,
                      train_metrics, timings) -> dict[str, float]:
        signal = learning_signal(rewards, advantages, batch.group_size, batch.response_lengths)
        self.totals["negative_groups_with_gradient"] += signal.negative_groups_with_gradient
        self.totals["overflow_skipped_updates"] += train_metrics.get(
            "train/overflow_skipped_updates", 0.0)
        for key in ("timeouts", "parse_failures", "errors"):
            self.totals[f"reward_{key}"] += reward_counts.get(key, 0)
        correct = rewards >= 1.0
        tokens = int(batch.response_lengths.sum() + batch.prompt_lengths.sum())
        out = {
            "reward/mean": float(rewards.mean()),
            "reward/accuracy": float(correct.float().mean()),
            "response/length_mean": float(batch.response_lengths.float().mean()),
            "response/finished_fraction": float(batch.finished.float().mean()),
            "advantage/mean": float(advantages.mean()),
            "advantage/abs_mean": float(advantages.abs().mean()),
            "throughput/tokens_per_s": tokens / max(timings["time/step_s"], 1e-9),
            "data/truncated_prompts": float(self.prompts.truncated_prompts),
            "setup/transformer_engine": float(
                resolve_transformer_impl(self.cfg.model.transformer_impl) == "transformer_engine"),
        }
        out.update(diag.as_dict(prefix="groups/"))
        out.update(_confidence_by_group_kind(diag))
        out.update(signal.as_dict())
        out.update({f"total/{k}": v for k, v in self.totals.items()})
        out.update({f"reward/{k}": float(v) for k, v in reward_counts.items()})
        out.update(mismatch)
        out.update(train_metrics)
        out.update(timings)
        return out

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> str:
        state = {"data": self.prompts.state_dict(), "guard": self.guard.state_dict(),
                 "totals": self.totals, "config": dataclasses.asdict(self.cfg)}
        return save_training_checkpoint(self.ckpt_root, self.step, self.actor.training, state,
                                        keep=self.cfg.exp_manager.keep_checkpoints,
                                        arch=self.cfg.model.arch,
                                        params_dtype=self.cfg.model.precision,
                                        optimizer_format=self.cfg.exp_manager.optimizer_checkpoint_format)

    def maybe_resume(self) -> Optional[str]:
        mode = self.cfg.exp_manager.resume
        if mode == "never":
            return None
        path = latest_checkpoint(self.ckpt_root)
        if path is None:
            if mode == "must":
                raise FileNotFoundError(f"exp_manager.resume=must but no checkpoint in {self.ckpt_root}")
            return None
        state = load_training_checkpoint(
            path, self.actor.training, params_dtype=self.cfg.model.precision,
            optimizer_format=self.cfg.exp_manager.optimizer_checkpoint_format)
        self.step = int(state["step"])
        self.prompts.load_state_dict(state["data"])
        self.guard.load_state_dict(state["guard"])
        self.totals.update(state["totals"])
        # The engine was built from the initial weights: give it the checkpoint's (a no-op for
        # the native sampler, which reads the actor's own parameters).
        self.engine.sync_weights()
        if dist.get_rank() == 0:
            logger.info("resumed from %s at step %d", path, self.step)
        return path

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()
