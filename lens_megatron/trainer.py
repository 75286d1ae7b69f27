"""The training loop (DESIGN.md §1): rollout → reward → old log-probs → LENS advantages →
clipped policy loss → optimizer step → weight sync, with checkpoint/resume, metrics and the
learning-signal guard.

Every trainer rank runs this loop over a rollout *source* (``rollout/source.py``): colocated,
each data-parallel rank generates and scores its share of the step's prompts now; with
``rollout.placement: separate`` the rollout ranks generate ahead (at most
``rollout.max_staleness`` versions behind) and the weights go to them after every step. The
loop is the same either way. ``estimator: grpo`` and ``estimator: lens`` differ only in the
advantage stage.
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
    load_checkpoint_object,
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
from .rollout.base import RolloutBatch
from .rollout.generation import step_seed
from .rollout.mismatch import logprob_mismatch
from .rollout.source import LocalRollouts, RemoteRollouts, engine_shard_fn
from .scoring import RolloutScorer
from .step_metrics import step_metrics, update_effect
from .tokenizer import build_tokenizer

ROLLOUT_BUFFER_FILE = "rollout_buffer.pt"  # in-flight rollouts of a separate placement

logger = logging.getLogger(__name__)


class TrainingStalled(RuntimeError):
    """``trainer.stall_steps`` consecutive steps gave no gradient signal."""


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
    def __init__(self, cfg: LensTrainConfig, groups=None) -> None:
        """``groups``: the ``parallel.roles.RoleGroups`` of a separate placement (None when
        colocated)."""
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.model.tokenizer.type, cfg.model.tokenizer.path)
        if self.tokenizer.vocab_size > cfg.model.arch.vocab_size:
            raise ValueError(f"model.arch.vocab_size={cfg.model.arch.vocab_size} is smaller than the "
                             f"tokenizer's vocabulary ({self.tokenizer.vocab_size})")
        updates = cfg.optim.updates_per_rollout
        self.actor = LensActor(cfg, total_optimizer_steps=cfg.trainer.max_steps * updates)
        self.prompts = PromptSource(cfg.data, self.tokenizer, cfg.rollout.prompts_per_step,
                                    cfg.rollout.max_prompt_length,
                                    one_at_a_time=cfg.rollout.dynamic_sampling.enabled)
        self.engine, self.scorer = None, None
        if groups is None:
            from .rollout.factory import build_engine

            self.engine = build_engine(cfg, self.actor, self.tokenizer)
            from megatron.core import parallel_state

            leader = is_model_parallel_leader() and parallel_state.get_context_parallel_rank() == 0
            shard_fn = engine_shard_fn(self.engine, self.actor.dp_rank, self.actor.dp_size, leader)
            self.scorer = RolloutScorer(cfg.reward) if shard_fn(1)[2] else None
            self.rollouts = LocalRollouts(cfg, self.engine, self.scorer, self.prompts, shard_fn)
        else:
            self.rollouts = _remote_rollouts(cfg, groups, self.actor)
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
        exit_code = 1  # what the rollout ranks of a separate placement leave with
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
            from .preemption import PREEMPTED_EXIT_CODE

            exit_code = 0 if self.finished else PREEMPTED_EXIT_CODE
        finally:
            log.close()
            self._stop_rollouts(exit_code)
        return metrics

    def _stop_rollouts(self, exit_code: int) -> None:
        """End the rollout ranks' loop (separate placement) with this run's exit code; after a
        failure, best effort — the original error is the one to report."""
        try:
            self.rollouts.stop(self.step, exit_code)
        except Exception:  # noqa: BLE001
            if exit_code == 0:
                raise
            logger.warning("could not tell the rollout ranks to stop", exc_info=True)

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
        start = time.perf_counter()
        scored = self.rollouts.next(self.step)
        timings = dict(scored.timings)
        try:
            metrics = self._learn(scored, timings)
        except NonFiniteLossError:
            self._publish_weights(changed=False, timings=timings)
            raise
        self._publish_weights(metrics["train/applied_updates"] > 0, timings)
        timings["time/step_s"] = time.perf_counter() - start
        metrics.update(timings)
        metrics["throughput/tokens_per_s"] = (
            int(scored.batch.response_lengths.sum() + scored.batch.prompt_lengths.sum())
            / max(timings["time/step_s"], 1e-9))
        return metrics

    def _publish_weights(self, changed: bool, timings: dict[str, float]) -> None:
        """After a step: the rollout side gets the new weights (version = steps done)."""
        t0 = time.perf_counter()
        if changed or self.rollouts.placement == "separate":  # the rollout ranks wait for each
            timings.update({f"time/{k}": v for k, v in
                            self.rollouts.weights_updated(self.step + 1).items()})
        timings["time/weight_sync_s"] = time.perf_counter() - t0

    def _learn(self, scored, timings: dict[str, float]) -> dict[str, float]:
        """Old log-probs, the LENS stage and the optimizer updates on one scored rollout."""
        cfg, batch = self.cfg, scored.batch
        # Host: the token batch the actor plans micro-batches from. Device: the step's
        # per-token math (one move, here), next to the log-probs the actor returns there.
        tokens = TokenBatch.from_rollout(batch.input_ids, batch.response_mask,
                                         self.actor.pad_multiple)
        step = StepTensors.move(tokens, batch, scored.rewards, self.actor.device)
        t0 = time.perf_counter()
        if cfg.loss.old_logprobs == "engine":  # the engine sampled pi_old itself (validated)
            old = torch.where(step.mask, step.sampling_logprobs, 0.0)
        else:
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
            new = self.actor.compute_logprobs(tokens)["token_logprobs"]
            train_metrics.update(update_effect(new, old, step.mask, diag))
        signal = learning_signal(scored.rewards, advantages.cpu(), batch.group_size,
                                 batch.response_lengths)
        self._count(signal, scored.reward_counts, train_metrics)
        extra = dict(mismatch, **train_metrics, **{f"total/{k}": v for k, v in self.totals.items()})
        extra["setup/transformer_engine"] = float(
            resolve_transformer_impl(cfg.model.transformer_impl) == "transformer_engine")
        # Where pi_old came from. From the engine, mismatch/* compares the engine with itself;
        # train/approx_kl and train/ratio_* of the (single) update then measure the
        # engine/trainer gap: the trainer's log-probs under the unchanged weights vs the engine's.
        extra["setup/old_logprobs_from_engine"] = float(cfg.loss.old_logprobs == "engine")
        return step_metrics(scored, advantages, diag, signal, extra)

    def _count(self, signal, reward_counts, train_metrics) -> None:
        self.totals["negative_groups_with_gradient"] += signal.negative_groups_with_gradient
        self.totals["overflow_skipped_updates"] += train_metrics.get(
            "train/overflow_skipped_updates", 0.0)
        for key in ("timeouts", "parse_failures", "errors"):
            self.totals[f"reward_{key}"] += reward_counts.get(key, 0)

    def evaluate(self, records, samples: int, seed: int = 0):
        """pass@k of the current policy on ``records`` (every rank gets the result)."""
        from .eval.rollout_eval import evaluate_pass_at_k

        if self.engine is None:  # separate placement: a native sampler over the trainer's model
            from .rollout.factory import native_sampler

            self.engine = native_sampler(self.cfg, self.actor.chunks, self.tokenizer)
            self.scorer = RolloutScorer(self.cfg.reward) if is_model_parallel_leader() else None
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

    # ---------------------------------------------------------------- checkpoints
    def save(self) -> str:
        """Collective. With separate rollout ranks, the rollouts they generated from weights
        older than this step's are received first and saved with it (``rollout_buffer.pt``):
        they cannot be regenerated from this checkpoint's weights."""
        rollout_state = self.rollouts.state_dict(self.step)
        state = {"data": rollout_state["data"], "guard": self.guard.state_dict(),
                 "totals": self.totals, "config": dataclasses.asdict(self.cfg),
                 "rollout_placement": self.rollouts.placement}
        buffered = self.rollouts.buffered()
        objects = {ROLLOUT_BUFFER_FILE: buffered} if buffered else {}
        return save_training_checkpoint(self.ckpt_root, self.step, self.actor.training, state,
                                        keep=self.cfg.exp_manager.keep_checkpoints,
                                        arch=self.cfg.model.arch,
                                        params_dtype=self.cfg.model.precision,
                                        optimizer_format=self.cfg.exp_manager.optimizer_checkpoint_format,
                                        objects=objects)

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
        self.guard.load_state_dict(state["guard"])
        self.totals.update(state["totals"])
        buffered = load_checkpoint_object(path, ROLLOUT_BUFFER_FILE, default=[])
        # Colocated: the data position, and the engine (built from the initial weights) synced to
        # the checkpoint's. Separate: the in-flight rollouts and the position after them; the
        # rollout ranks get the weights when the source starts.
        self.rollouts.load_state_dict({"data": state["data"]}, buffered, self.step)
        if dist.get_rank() == 0:
            logger.info("resumed from %s at step %d", path, self.step)
        return path

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()


def _remote_rollouts(cfg, groups, actor) -> RemoteRollouts:
    """The trainer side of a separate placement: weights streamed from the actor's shards
    (collective over the trainer ranks), broadcast by trainer rank 0."""
    from .models.gather import full_parameter_manifest, iter_full_parameters_all_stages
    from .parallel.roles import channel_device
    from .rollout.weight_broadcast import WeightBroadcaster

    tied = cfg.model.arch.tie_word_embeddings
    manifest = full_parameter_manifest(actor.chunks, tied)
    broadcaster = (WeightBroadcaster(groups.weights, channel_device(dist.get_backend()), manifest)
                   if groups.weights is not None else None)
    return RemoteRollouts(cfg, groups, lambda: iter_full_parameters_all_stages(actor.chunks, tied),
                          broadcaster)
