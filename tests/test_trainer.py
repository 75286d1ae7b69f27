"""The trainer end to end on the tiny default (real Megatron, kernel, LENS, loss, optimizer,
native sampler, verifier), in spawned gloo processes."""
from __future__ import annotations

import json
import os

import pytest
import torch

from lens_megatron.parallel.spawn import run_in_processes
from trainer_helpers import force_boxed_answers, full_weights, init_for, tiny_config

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- layouts
def one_step_worker(tmp_dir, tp, pp, vpp, devices, sequence_parallel=False):
    from lens_megatron.trainer import LensTrainer

    extra = [f"model.tensor_model_parallel_size={tp}", f"model.pipeline_model_parallel_size={pp}",
             f"model.sequence_parallel={str(sequence_parallel).lower()}"]
    if vpp:
        extra.append(f"model.virtual_pipeline_model_parallel_size={vpp}")
    # adam_eps=1 makes the update ≈ lr·grad: Adam with a tiny eps turns float-rounding noise in
    # near-zero gradients into ±lr steps, which would hide real differences behind noise.
    cfg = tiny_config(tmp_dir, *extra, "model.arch.num_layers=4", "model.init_seed=3",
                      "rollout.kv_cache=true", "optim.adam_eps=1.0", "optim.lr=0.1",
                      devices=devices)
    init_for(cfg)
    trainer = LensTrainer(cfg)
    captured = {}
    original = trainer.actor.compute_logprobs

    def spy(tokens, **kw):
        out = original(tokens, **kw)
        captured.setdefault("old", out["token_logprobs"].clone())
        return out

    trainer.actor.compute_logprobs = spy
    metrics = trainer.train_step()
    weights = full_weights(trainer)
    trainer.close()
    if torch.distributed.get_rank() != 0:
        return None
    return {"old": captured["old"], "loss": metrics["train/loss"],
            "grad_norm": metrics["train/grad_norm"], "weights": weights,
            "reward": metrics["reward/mean"], "neg": metrics["groups/negative_group_ratio"]}


def test_one_trainer_step_identical_across_layouts(tmp_path):
    ref = run_in_processes(one_step_worker, 1, (str(tmp_path / "ref"), 1, 1, None, 1))[0]
    assert ref["grad_norm"] > 0
    for tp, pp, vpp, sp in [(2, 1, None, False), (2, 1, None, True), (1, 2, None, False),
                            (1, 2, 2, False)]:
        got = [r for r in run_in_processes(
            one_step_worker, tp * pp,
            (str(tmp_path / f"l{tp}{pp}{vpp}{sp}"), tp, pp, vpp, tp * pp, sp))
            if r is not None][0]
        label = f"TP={tp} PP={pp} VPP={vpp} SP={sp}"
        width = ref["old"].shape[1]  # sequence parallelism pads the width to a multiple of TP
        assert bool((got["old"][:, width:] == 0).all()), label
        torch.testing.assert_close(got["old"][:, :width], ref["old"], rtol=1e-5, atol=1e-5,
                                   msg=label)
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-7), label
        assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), label
        for name, value in ref["weights"].items():
            torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{label} {name}: {m}")


def test_data_parallel_step_matches_one_process(tmp_path):
    ref = run_in_processes(one_step_worker, 1, (str(tmp_path / "ref"), 1, 1, None, 1))[0]
    got = run_in_processes(one_step_worker, 2, (str(tmp_path / "dp"), 1, 1, None, 2))[0]
    torch.testing.assert_close(got["old"], ref["old"], rtol=1e-5, atol=1e-5)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    for name, value in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], value, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- estimators
def negative_batch_worker(tmp_dir, estimator):
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, f"lens.estimator={estimator}")
    init_for(cfg)
    trainer = LensTrainer(cfg)  # an untrained model: every answer is wrong
    before = full_weights(trainer)
    metrics = trainer.train_step()
    after = full_weights(trainer)
    trainer.close()
    change = max((after[k] - before[k]).abs().max().item() for k in before)
    return metrics, change


def test_all_negative_batch_grpo_does_not_move_lens_does(tmp_path):
    grpo, grpo_change = run_in_processes(negative_batch_worker, 1, (str(tmp_path / "g"), "grpo"))[0]
    lens, lens_change = run_in_processes(negative_batch_worker, 1, (str(tmp_path / "l"), "lens"))[0]
    for metrics in (grpo, lens):
        assert metrics["reward/mean"] == 0.0 and metrics["groups/negative_group_ratio"] == 1.0
    assert grpo["advantage/abs_mean"] == 0.0 and grpo_change == 0.0
    assert lens["advantage/abs_mean"] > 0.0 and lens_change > 0.0
    assert lens["signal/negative_groups_with_gradient"] == 2.0


# ----------------------------------------------------------------------------- resume
def resume_worker(tmp_dir, phase):
    from lens_megatron.trainer import LensTrainer

    steps = 2 if phase in ("straight", "second") else 1
    cfg = tiny_config(tmp_dir, f"trainer.max_steps={steps}", "exp_manager.resume=auto",
                      "lens.estimator=lens")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    last = trainer.run()
    weights = full_weights(trainer)
    trainer.close()
    return last, weights


def test_resume_gives_the_same_next_step(tmp_path):
    straight, w_straight = run_in_processes(resume_worker, 1, (str(tmp_path / "a"), "straight"))[0]
    run_in_processes(resume_worker, 1, (str(tmp_path / "b"), "first"))
    resumed, w_resumed = run_in_processes(resume_worker, 1, (str(tmp_path / "b"), "second"))[0]
    assert resumed["train/loss"] == pytest.approx(straight["train/loss"], rel=1e-6, abs=1e-9)
    assert resumed["reward/mean"] == straight["reward/mean"]
    for name, value in w_straight.items():
        torch.testing.assert_close(w_resumed[name], value, rtol=0, atol=0)
    lines = [json.loads(l) for l in open(tmp_path / "b" / "lens" / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [1, 2]


def crash_during_save_worker(tmp_dir):
    from megatron.core import dist_checkpointing

    from lens_megatron.checkpoint import training_state
    from lens_megatron.checkpoint.training_state import latest_checkpoint
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, "trainer.max_steps=1")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    trainer.run()  # saves step 1
    good = latest_checkpoint(trainer.ckpt_root)

    def dying_save(state, path, *a, **k):
        os.makedirs(path, exist_ok=True)
        open(os.path.join(path, "partial.distcp"), "w").write("half")
        raise KeyboardInterrupt("killed during save")

    original = dist_checkpointing.save
    dist_checkpointing.save = dying_save
    trainer.step = 2
    try:
        trainer.save()
    except KeyboardInterrupt:
        pass
    finally:
        dist_checkpointing.save = original
    still = latest_checkpoint(trainer.ckpt_root)
    fresh = LensTrainer(tiny_config(tmp_dir, "trainer.max_steps=1"))
    loaded_from = fresh.maybe_resume()
    trainer.close()
    fresh.close()
    return good, still, loaded_from, fresh.step, training_state.TRAINER_STATE_FILE


def test_crash_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    good, still, loaded_from, step, _ = run_in_processes(crash_during_save_worker, 1,
                                                         (str(tmp_path),))[0]
    assert good is not None and still == good == loaded_from and step == 1


# ----------------------------------------------------------------------------- failures
def nan_worker(tmp_dir):
    from lens_megatron.actor import NonFiniteLossError
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir)
    init_for(cfg)
    trainer = LensTrainer(cfg)
    before = full_weights(trainer)
    original = trainer.actor.compute_logprobs

    def poisoned(tokens, **kw):
        out = original(tokens, **kw)
        out["token_logprobs"] = torch.where(tokens.target_mask, torch.nan, out["token_logprobs"])
        return out

    trainer.actor.compute_logprobs = poisoned
    message = None
    try:
        trainer.train_step()
    except NonFiniteLossError as exc:
        message = str(exc)
    after = full_weights(trainer)
    trainer.close()
    return message, max((after[k] - before[k]).abs().max().item() for k in before)


def test_nan_logprobs_stop_the_step_without_updating(tmp_path):
    message, change = run_in_processes(nan_worker, 1, (str(tmp_path),))[0]
    assert message is not None and "NaN" in message and "no weights changed" in message
    assert change == 0.0


def hanging_verifier_worker(tmp_dir):
    import time

    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, "reward.num_workers=1", "reward.timeout_s=1.0",
                      "reward.judge=trainer_helpers:hanging_judge",
                      "rollout.prompts_per_step=1", "rollout.group_size=2")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    force_boxed_answers(trainer)  # so the (hanging) judge is called on every sample
    start = time.perf_counter()
    metrics = trainer.train_step()
    elapsed = time.perf_counter() - start
    trainer.close()
    return metrics, elapsed


def test_hanging_verifier_is_timed_out(tmp_path):
    metrics, elapsed = run_in_processes(hanging_verifier_worker, 1, (str(tmp_path),),
                                        env={"PYTHONPATH": os.path.dirname(__file__)})[0]
    assert metrics["reward/timeouts"] == 2.0 and metrics["reward/mean"] == 0.0
    assert elapsed < 30


def malformed_data_worker(tmp_dir, data_path):
    from lens_megatron.trainer import LensTrainer

    from lens_megatron.config import replace

    cfg = replace(tiny_config(tmp_dir), data={"task": "file", "train_path": data_path,
                                               "prompt_template": "{problem}="})
    init_for(cfg)
    trainer = LensTrainer(cfg)
    metrics = trainer.train_step()
    n = len(trainer.prompts.train_records)
    trainer.close()
    return n, metrics["reward/samples"]


def test_malformed_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = ['{"problem": "1+2", "answer": "3"}', "not json", '{"problem": "4+4"}',
            '{"problem": "2+2", "answer": "4"}', '{"problem": "", "answer": "1"}',
            '{"problem": "5+1", "answer": "6"}']
    path.write_text("\n".join(rows) + "\n")
    n, samples = run_in_processes(malformed_data_worker, 1, (str(tmp_path / "run"), str(path)))[0]
    assert n == 3 and samples == 8.0


def off_policy_worker(tmp_dir):
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, "optim.updates_per_rollout=2", "model.micro_batch_size=2",
                      "lens.estimator=lens")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    steps_before = trainer.actor.training.scheduler.num_steps
    metrics = trainer.train_step()
    steps_after = trainer.actor.training.scheduler.num_steps
    trainer.close()
    return steps_after - steps_before, metrics


def test_several_off_policy_updates_per_rollout(tmp_path):
    """updates_per_rollout=2: two optimizer steps on halves of one rollout batch; the second
    is off-policy (its ratio is no longer 1)."""
    optimizer_steps, metrics = run_in_processes(off_policy_worker, 1, (str(tmp_path),))[0]
    assert optimizer_steps == 2
    assert metrics["train/ratio_max"] > 1.0 or metrics["train/approx_kl"] > 0.0


# ----------------------------------------------------------------------------- DP edge cases
def dp_metrics_worker(tmp_dir, devices, prompts, updates=2):
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, f"rollout.prompts_per_step={prompts}",
                      f"optim.updates_per_rollout={updates}",
                      "model.micro_batch_size=2", "model.init_seed=3", "optim.lr=0.05",
                      "optim.adam_eps=1.0", "rollout.kv_cache=true", devices=devices)
    init_for(cfg)
    trainer = LensTrainer(cfg)
    seen = {}
    original = trainer.rollouts.next

    def spy(step):
        scored = original(step)
        seen["ids"] = scored.batch.input_ids.clone()
        return scored

    trainer.rollouts.next = spy
    metrics = trainer.train_step()
    trainer.close()
    keep = {k: v for k, v in metrics.items() if k.startswith(("train/", "reward/", "groups/"))
            and not k.startswith("train/time")}
    return {"metrics": keep, "ids": seen["ids"]}


def test_dp_metrics_reduced_by_their_own_rule(tmp_path):
    """DP=2 gives the one-process metrics: counts summed, maxima maxed, means token-weighted
    (a plain mean of per-micro-batch maxima and fractions does not)."""
    ref = run_in_processes(dp_metrics_worker, 1, (str(tmp_path / "one"), 1, 2))[0]
    got = run_in_processes(dp_metrics_worker, 2, (str(tmp_path / "dp"), 2, 2))[0]
    assert ref["metrics"]["train/ratio_max"] > ref["metrics"]["train/ratio_mean"]  # off-policy
    for key, value in ref["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert got["metrics"]["train/num_sequences"] == 2 * 4  # 2 prompts × G=4, both updates


def test_prompts_not_a_multiple_of_dp_are_all_generated(tmp_path):
    """3 prompts at DP=2: the ranks generate 2 + 1, nothing is dropped, and the batch is the
    one-process batch token for token."""
    ref = run_in_processes(dp_metrics_worker, 1, (str(tmp_path / "one"), 1, 3, 1))[0]
    got = run_in_processes(dp_metrics_worker, 2, (str(tmp_path / "dp"), 2, 3, 1))[0]
    assert ref["ids"].shape[0] == 3 * 4 and torch.equal(got["ids"], ref["ids"])


def test_too_few_prompts_for_the_replicas_is_a_config_error(tmp_path):
    from lens_megatron.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.prompts_per_step.*2 generating replicas"):
        tiny_config(str(tmp_path), "rollout.prompts_per_step=1", "model.micro_batch_size=1",
                    devices=2)


def preference_worker(tmp_dir, overrides):
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, "model.init_seed=3",
                      "reward.judge=trainer_helpers:every_third_correct_judge", *overrides)
    init_for(cfg)
    trainer = LensTrainer(cfg)
    force_boxed_answers(trainer)
    metrics = trainer.train_step()
    trainer.close()
    return metrics


def test_sampling_preference_gets_the_engine_logprobs(tmp_path):
    """App. C's rho = mu in the trainer: the engine's sequence log-probs reach the advantage
    stage. The native sampler samples from the trainer's own distribution (w = 1), so the
    penalty is constant per group and the z-scored advantages are GRPO's."""
    got = run_in_processes(preference_worker, 1, (str(tmp_path / "mu"), ["lens.preference=sampling"]))[0]
    grpo = run_in_processes(preference_worker, 1, (str(tmp_path / "grpo"), ["lens.estimator=grpo"]))[0]
    assert got["groups/mixed_group_ratio"] > 0
    assert got["advantage/abs_mean"] == pytest.approx(grpo["advantage/abs_mean"], rel=1e-4)


def old_logprobs_worker(tmp_dir, source):
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, f"loss.old_logprobs={source}", "model.init_seed=3",
                      "reward.judge=trainer_helpers:every_third_correct_judge",
                      "optim.lr=0.05", "optim.adam_eps=1.0")
    init_for(cfg)
    trainer = LensTrainer(cfg)
    force_boxed_answers(trainer)
    calls = []
    original = trainer.actor.compute_logprobs
    trainer.actor.compute_logprobs = lambda *a, **k: calls.append(1) or original(*a, **k)
    metrics = trainer.train_step()
    weights = full_weights(trainer)
    trainer.close()
    return metrics, weights, len(calls)


def test_old_logprobs_from_the_engine_equal_the_recompute(tmp_path):
    """loss.old_logprobs: engine skips the old-log-prob forward and, where the engine samples the
    trainer's distribution (fp32 native sampler, one update, no truncation), gives the same loss,
    gradient and weights as recomputing pi_old."""
    rec, rec_w, rec_calls = run_in_processes(old_logprobs_worker, 1, (str(tmp_path / "r"), "recompute"))[0]
    eng, eng_w, eng_calls = run_in_processes(old_logprobs_worker, 1, (str(tmp_path / "e"), "engine"))[0]
    assert rec_calls == 1 and eng_calls == 0
    assert eng["setup/old_logprobs_from_engine"] == 1.0 and rec["setup/old_logprobs_from_engine"] == 0.0
    assert rec["groups/mixed_group_ratio"] > 0 and rec["train/grad_norm"] > 0
    for key in ("train/loss", "train/grad_norm", "advantage/abs_mean"):
        assert eng[key] == pytest.approx(rec[key], rel=1e-5, abs=1e-5), key
    for name, value in rec_w.items():
        torch.testing.assert_close(eng_w[name], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("override,key", [
    ("optim.updates_per_rollout=2", "optim.updates_per_rollout"),
    ("rollout.top_k=5", "rollout.top_k"),
    ("rollout.top_p=0.9", "rollout.top_k"),
    ("loss.rollout_correction=tis_token", "loss.rollout_correction"),
])
def test_old_logprobs_from_the_engine_refused_where_it_is_not_pi_old(tmp_path, override, key):
    from lens_megatron.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.") + ".*old_logprobs: engine"):
        tiny_config(str(tmp_path), "loss.old_logprobs=engine", override)
