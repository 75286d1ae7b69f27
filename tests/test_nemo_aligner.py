"""The NeMo-Aligner face: the adapter driven through NeMo-Aligner's actor interface by a small
NeMo-style trainer loop (compared with our own ``LensTrainer.train_step`` on the same rollout),
the LENS helper on NeMo-style batches, and the NeMo-Aligner YAML mapping."""
from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from lens_megatron.algorithms.advantages import AdvantageConfig, compute_advantages
from lens_megatron.config import ConfigError
from lens_megatron.integrations.nemo_aligner import (
    _sequence_advantages,
    lens_advantages,
    nemo_response_mask,
)
from lens_megatron.integrations.nemo_aligner_config import (
    NemoAlignerConfigWarning,
    lens_config_from_nemo_aligner,
    nemo_aligner_mapping,
)
from lens_megatron.parallel.spawn import run_in_processes
from trainer_helpers import full_weights, init_for, tiny_config


# ----------------------------------------------------------------------------- batch conventions
def test_response_mask_is_nemo_create_mask():
    prompt_lengths, response_lengths, s = torch.tensor([3, 1, 4]), torch.tensor([7, 2, 9]), 9
    expected = torch.zeros(3, s - 1)
    for i in range(3):  # NeMo-Aligner: mask[i, prompt_len - 1 : response_len - 1] = 1
        expected[i, prompt_lengths[i] - 1: response_lengths[i] - 1] = 1.0
    assert torch.equal(nemo_response_mask(prompt_lengths, response_lengths, s), expected)


def _interleaved_batch(num_prompts=3, group=4, seed=0):
    """A REINFORCE-style batch: ``group`` infer calls, each one sample of every prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, 50, (num_prompts, 5), generator=g)
    rows = torch.arange(num_prompts).repeat(group)  # order (call k, prompt b)
    n, s = num_prompts * group, 12
    prompt_lengths = torch.full((n,), 5)
    response_lengths = prompt_lengths + torch.randint(1, s - 5, (n,), generator=g)
    batch = {"prompt_tokens": prompts[rows], "rewards": (torch.rand(n, generator=g) < 0.3).float(),
             "logprobs": -torch.rand(n, s - 1, generator=g) * 3, "prompt_lengths": prompt_lengths,
             "response_lengths": response_lengths}
    return batch, rows


@pytest.mark.parametrize("estimator", ["lens", "grpo"])
def test_lens_advantages_find_groups_by_prompt_rows(estimator):
    batch, rows = _interleaved_batch()
    cfg = AdvantageConfig(estimator=estimator)
    got, _ = lens_advantages(batch, cfg)
    order = torch.sort(rows, stable=True).indices  # each prompt's samples contiguous
    mask = nemo_response_mask(batch["prompt_lengths"], batch["response_lengths"], 12).bool()
    sums = torch.where(mask, batch["logprobs"], 0.0).sum(1)
    contiguous = compute_advantages(batch["rewards"][order], sums[order], mask.sum(1)[order], 4, cfg)
    torch.testing.assert_close(got[order], contiguous, rtol=0, atol=0)
    assert got.abs().sum() > 0


def test_lens_advantages_reject_unequal_groups_and_missing_prompts():
    batch, _ = _interleaved_batch()
    batch["prompt_tokens"] = batch["prompt_tokens"].clone()
    batch["prompt_tokens"][0, 0] = 99  # one sample now has a prompt of its own
    with pytest.raises(ValueError, match="same number of samples"):
        lens_advantages(batch)
    with pytest.raises(ValueError, match="expected 5 samples"):
        lens_advantages(_interleaved_batch()[0], group_size=5)
    with pytest.raises(KeyError, match="prompt keys"):
        lens_advantages({k: v for k, v in _interleaved_batch()[0].items() if k != "prompt_tokens"})


def test_sequence_advantages_accept_nemo_shapes():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.float)
    adv = torch.tensor([0.5, -1.0, 0.0])
    for given in (adv, adv.view(-1, 1), adv.view(-1, 1) * mask):  # [B], GRPO [B,1], per-token
        torch.testing.assert_close(_sequence_advantages({"advantages": given}, mask), adv)
    baseline = {"rewards_with_kl": torch.tensor([1.0, 0.0, 0.5]), "baseline": torch.tensor([0.5, 1.0, 0.5])}
    torch.testing.assert_close(_sequence_advantages(baseline, mask), adv)
    per_token = torch.tensor([[0, 1.0, 2.0, 0], [1.0] * 4, [0.0] * 4])
    with pytest.raises(ValueError, match="per-token advantages"):
        _sequence_advantages({"advantages": per_token}, mask)


def test_step_batch_conversion(tmp_path):
    from types import SimpleNamespace

    from lens_megatron.integrations.nemo_aligner import LensAlignerActor

    def adapter(*overrides):
        cfg = tiny_config(str(tmp_path), *overrides)
        tokenizer = SimpleNamespace(eos_id=2, pad_id=0)
        return LensAlignerActor(SimpleNamespace(cfg=cfg), SimpleNamespace(), tokenizer, cfg)

    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float)
    batch = {"response_tokens": torch.ones(2, 5, dtype=torch.long), "mask": mask,
             "advantages": torch.tensor([[1.0], [-1.0]]), "prev_logprobs": -torch.ones(2, 4),
             "prompt_mask": torch.tensor([1.0, 0.0]), "is_end": torch.tensor([True, False])}
    out = adapter()._step_tensors(batch)
    assert torch.equal(out["mask"], mask * torch.tensor([[1.0], [0.0]]))  # prompt_mask drops row 1
    assert torch.equal(out["advantages"], torch.tensor([1.0, -1.0])) and "weights" not in out
    ones = dict(batch, importance_correction=torch.ones(2, 4))
    assert "weights" not in adapter()._step_tensors(ones)  # all ones: the plain loss
    skewed = dict(batch, importance_correction=torch.full((2, 4), 0.5))
    assert torch.equal(adapter()._step_tensors(skewed)["weights"], torch.full((2, 4), 0.5))
    with pytest.raises(ValueError, match="weights the KL term"):
        adapter("loss.kl_coef=0.1")._step_tensors(dict(skewed, init_logprobs=torch.zeros(2, 4)))
    with pytest.raises(KeyError, match="initial-policy log-probs"):
        adapter("loss.kl_coef=0.1")._step_tensors(batch)
    with pytest.raises(ValueError, match=r"\[B, S-1\] = \[B, 4\]"):
        adapter()._step_tensors(dict(batch, prev_logprobs=torch.zeros(2, 5)))


# ----------------------------------------------------------------------------- YAML mapping
GRPO_YAML = textwrap.dedent("""\
    trainer:
      num_nodes: 2
      devices: 8
      accelerator: gpu
      precision: bf16
      grpo:
        max_epochs: 1
        max_steps: -1
        val_check_interval: 10
        save_interval: 5
        gradient_clip_val: 1.0
        initial_policy_kl_penalty: 0.01
        use_leave_one_out_baseline: true
        normalize_rewards: true
        importance_sample_correct: false
        length_penalty_enabled: false
        generation_rollout_mbs: 8
        num_prompts_per_grpo_step: 64
        samples_per_prompt: 16
        environments: {math: {servers: {math_grader: {ip: localhost, port: 3141}}}}
        inference_backend:
          type: vllm
          enable: true
          seed: ${model.seed}
          max_input_len: ${subtract:${model.encoder_seq_length}, ${model.grpo.length_params.max_length}}
          config: {vllm: {enable: true, port: 4321}}
        model_gbs: ${model.global_batch_size}
      logger: false
      max_steps: ${.grpo.max_steps}
    exp_manager:
      explicit_log_dir: /results/grpo
      name: megatron_gpt_grpo_actor
      resume_if_exists: true
      create_wandb_logger: false
      checkpoint_callback_params:
        save_top_k: 1
        model_parallel_size: ${multiply:${model.tensor_model_parallel_size}, ${model.pipeline_model_parallel_size}}
    pretrained_checkpoint:
      restore_from_path: null
    model:
      grpo:
        forward_micro_batch_size: ${trainer.grpo.generation_rollout_mbs}
        offload_adam_states: true
        ratio_eps: 0.2
        ratio_eps_low: 0.2
        ratio_eps_high: 0.28
        sampling_params: {use_greedy: false, temperature: 0.9, top_k: 0, top_p: 0.95,
                          repetition_penalty: 1.0, add_BOS: false, end_strings: ["<|endoftext|>"]}
        length_params: {max_length: 1024, min_length: 1}
        initial_policy_kl_penalty: ${trainer.grpo.initial_policy_kl_penalty}
        dapo: {token_loss: true, clip_higher: true}
      peft: {peft_scheme: none}
      mcore_gpt: true
      micro_batch_size: 2
      global_batch_size: 256
      tensor_model_parallel_size: 4
      pipeline_model_parallel_size: 2
      megatron_amp_O2: true
      encoder_seq_length: 4096
      sequence_parallel: true
      seed: 1234
      optim:
        name: distributed_fused_adam
        lr: 9e-7
        weight_decay: 0.1
        betas: [0.9, 0.98]
        sched: {name: CosineAnnealing, warmup_steps: 10, constant_steps: 1000, min_lr: 9e-8}
      precision: ${trainer.precision}
      data: {data_impl: jsonl, seq_length: 512, reset_position_ids: false, apply_chat_template: false}
    """)


def test_grpo_yaml_maps_onto_our_config(tmp_path):
    path = tmp_path / "gpt_grpo.yaml"
    path.write_text(GRPO_YAML)
    with pytest.raises(ConfigError) as error:
        lens_config_from_nemo_aligner(path, environment=False)
    assert "trainer.grpo.max_steps" in str(error.value)
    assert "model.optim.sched.constant_steps" in str(error.value)
    # the .nemo config would supply the architecture; the tiny one and a data task stand in
    ours = ["trainer.max_steps=3", "data.task=arithmetic", "model.arch.num_attention_heads=8",
            "model.arch.num_query_groups=4", "model.arch.num_layers=4"]
    with pytest.warns(NemoAlignerConfigWarning) as warned:
        cfg = lens_config_from_nemo_aligner(path, overrides=ours, environment=False,
                                            accept=["model.optim.sched.constant_steps"])
    text = "\n".join(str(w.message) for w in warned)
    for key in ("use_leave_one_out_baseline", "end_strings", "accepted: 1000", "offload_adam_states"):
        assert key in text, key
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.max_steps) == (2, 8, 3)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size) == (64, 16)
    assert cfg.optim.updates_per_rollout == 64 * 16 // 256
    assert (cfg.loss.kl_coef, cfg.loss.kl_estimator, cfg.loss.normalization) == (0.01, "k3", "token")
    assert (cfg.loss.clip_eps_low, cfg.loss.clip_eps_high) == (0.2, 0.28)
    assert (cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k) == (0.9, 0.95, -1)
    assert (cfg.rollout.max_new_tokens, cfg.rollout.max_prompt_length, cfg.rollout.engine) == (1024, 512, "vllm")
    m = cfg.model
    assert (m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.sequence_parallel) == (4, 2, True)
    assert (m.precision, m.micro_batch_size, cfg.trainer.seed) == ("bf16", 2, 1234)
    o = cfg.optim
    assert (o.lr, o.min_lr, o.weight_decay, o.adam_beta2, o.warmup_steps) == (9e-7, 9e-8, 0.1, 0.98, 10)
    assert (o.lr_decay_style, o.use_distributed_optimizer, o.clip_grad) == ("cosine", True, 1.0)
    assert (cfg.exp_manager.exp_dir, cfg.exp_manager.resume, cfg.trainer.save_every) == ("/results/grpo", "auto", 5)


def _reinforce_yaml(**changes) -> dict:
    cfg = {"trainer": {"devices": 8, "reinforce": {"max_steps": 100, "num_rollouts_per_prompt": 4,
                                                   "initial_policy_kl_penalty": 0.0, "use_absolute_kl": True}},
           "model": {"global_batch_size": 64, "micro_batch_size": 1,
                     "reinforce": {"num_rollout_samples": 32, "sampling_params": {"temperature": 1.0}},
                     "optim": {"name": "distributed_fused_adam", "lr": 1e-6}}}
    for dotted, value in changes.items():
        node = cfg
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return cfg


def test_reinforce_keys_that_change_the_math_are_errors():
    bad = _reinforce_yaml(**{"trainer.reinforce.initial_policy_kl_penalty": 0.05,
                             "model.reinforce.entropy_bonus": 0.01, "model.reinforce.new_knob": 3,
                             "model.reinforce.sampling_params.repetition_penalty": 1.2})
    with pytest.raises(ConfigError) as error:
        lens_config_from_nemo_aligner(bad, overrides=["data.task=arithmetic"], environment=False)
    for key in ("initial_policy_kl_penalty", "entropy_bonus", "model.reinforce.new_knob", "repetition_penalty"):
        assert key in str(error.value), key
    with pytest.warns(NemoAlignerConfigWarning):
        cfg = lens_config_from_nemo_aligner(_reinforce_yaml(), overrides=["data.task=arithmetic"],
                                            environment=False)
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size, cfg.optim.updates_per_rollout) == (32, 4, 2)
    assert cfg.loss.kl_coef == 0.0 and cfg.trainer.max_steps == 100


def test_ppo_needs_a_group_size():
    ppo = _reinforce_yaml()
    ppo["trainer"]["ppo"] = ppo["trainer"].pop("reinforce")
    del ppo["trainer"]["ppo"]["num_rollouts_per_prompt"]
    ppo["trainer"]["ppo"]["gae_lambda"] = 0.95
    ppo["model"]["ppo"] = ppo["model"].pop("reinforce")
    with pytest.raises(ConfigError, match="group_size=G"):
        lens_config_from_nemo_aligner(ppo, overrides=["data.task=arithmetic"], environment=False)
    mapping = nemo_aligner_mapping(ppo, group_size=8)  # 32 sequences per step = 4 prompts × 8
    assert mapping.overrides["rollout.prompts_per_step"] == 4 and "trainer.ppo.gae_lambda" in mapping.replaced


# ----------------------------------------------------------------------------- the adapter, driven
# A NeMo-Aligner-style trainer loop (its ReinforceTrainer/GRPOTrainer, reduced to the calls it makes
# on the actor), run in spawned gloo ranks on the tiny default, then our own LensTrainer.train_step
# on the same rollout in the same process for comparison.
def _inference_batch(prompts) -> dict:
    """NeMo's prompt collate: right-padded ``text [B, P]`` and ``length [B]``."""
    text = torch.zeros((len(prompts), max(len(p.token_ids) for p in prompts)), dtype=torch.long)
    for i, p in enumerate(prompts):
        text[i, : len(p.token_ids)] = torch.tensor(p.token_ids)
    return {"text": text, "length": torch.tensor([len(p.token_ids) for p in prompts])}


def _stack(batches: list[dict], pad_id: int) -> dict:
    """NeMo's ``from_rollout_batches``: 1-D tensors concatenated, 2-D right-padded."""
    out = {}
    for key in batches[0]:
        values = [b[key] for b in batches]
        if values[0].dim() == 1:
            out[key] = torch.cat(values)
        else:
            width = max(v.shape[1] for v in values)
            fill = pad_id if key == "response_tokens" else 0
            out[key] = torch.cat([F.pad(v, (0, width - v.shape[1]), value=fill) for v in values])
    return out


def _rollout_phase(adapter, trainer, kl: bool):
    """prepare_for_inference → infer ×G → rewards → (init) log-probs → finish_inference, then the
    global batch (NeMo gathers it over data-parallel ranks) and LENS advantages on it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from lens_megatron.parallel.collectives import share_from_model_parallel_leader

    cfg, pad = trainer.cfg, trainer.tokenizer.pad_id
    g, dp, rank = cfg.rollout.group_size, ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    prompts = trainer.prompts.next_batch()
    mine = prompts[rank * len(prompts) // dp: (rank + 1) * len(prompts) // dp]
    inference_batch = _inference_batch(mine)
    adapter.prepare_for_inference()
    rollouts, texts = [], []
    for _ in range(g):  # ReinforceTrainer: num_rollouts_per_prompt infer calls per prompt batch
        rollout = adapter.infer(inference_batch)
        texts += rollout.pop("response_sentences")
        rollouts.append({**rollout, "prompt_tokens": inference_batch["text"]})
    golds = [p.record.answer for _ in range(g) for p in mine]
    rewards = trainer.scorer.reward(texts, golds).as_tensor(torch.float32) if trainer.scorer else None
    local = _stack(rollouts, pad)
    local["rewards"] = share_from_model_parallel_leader(rewards)
    local["logprobs"] = adapter.get_inference_log_probs(local["response_tokens"])
    if kl:
        local["init_logprobs"] = adapter.get_init_policy_logprobs(local["response_tokens"])
    adapter.finish_inference()
    parts = [local]
    if dp > 1:
        parts = [None] * dp
        dist.all_gather_object(parts, local, group=ps.get_data_parallel_group())
    glob = _stack(parts, pad)
    glob["mask"] = nemo_response_mask(glob["prompt_lengths"], glob["response_lengths"],
                                      glob["response_tokens"].shape[1])
    advantages, _ = lens_advantages(glob, cfg.lens, group_size=g)
    n = local["rewards"].shape[0]
    local["mask"] = nemo_response_mask(local["prompt_lengths"], local["response_lengths"],
                                       local["response_tokens"].shape[1])
    local["advantages"] = advantages[rank * n: (rank + 1) * n].view(-1, 1)  # GRPO's [B, 1]
    return local, glob, advantages


def _training_phase(adapter, trainer, local: dict, kl: bool) -> dict:
    keys = ["response_tokens", "mask", "logprobs", "advantages"] + (["init_logprobs"] if kl else [])
    batch = {k: local[k] for k in keys}
    before = full_weights(trainer)
    adapter.prepare_for_training()
    adapter.prepare_for_training_step()
    fo_loss, fo_metrics = adapter.get_loss_and_metrics(dict(batch), forward_only=True)
    after_forward_only = full_weights(trainer)
    try:  # a trainer that expects to step by itself would call this now: told clearly
        adapter.finish_training_step()
        no_step_error = None
    except RuntimeError as exc:
        no_step_error = str(exc)
    loss, metrics = adapter.get_loss_and_metrics(dict(batch), forward_only=False)
    adapter.finish_training_step()
    adapter.finish_training()
    after = full_weights(trainer)
    post_loss, post_metrics = adapter.get_loss_and_metrics(dict(batch), forward_only=True)
    return {"fo_loss": fo_loss, "fo_metrics": fo_metrics, "loss": loss, "metrics": metrics,
            "post_loss": post_loss, "post_metrics": post_metrics, "weights": after,
            "no_step_error": no_step_error,
            "forward_only_change": max((after_forward_only[k] - before[k]).abs().max().item() for k in before),
            "step_change": max((after[k] - before[k]).abs().max().item() for k in before)}


def _contiguous_rollout(glob: dict, g: int, pad_id: int):
    """The global batch as our RolloutBatch (each prompt's samples contiguous) and its order."""
    from lens_megatron.rollout.base import RolloutBatch

    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(glob["prompt_tokens"].tolist()):
        groups.setdefault(tuple(row), []).append(i)
    order = torch.tensor([i for rows in groups.values() for i in rows])
    ids = glob["response_tokens"][order]
    start, end = glob["prompt_lengths"][order], glob["response_lengths"][order]
    t = torch.arange(ids.shape[1]).unsqueeze(0)
    batch = RolloutBatch(
        input_ids=ids, response_mask=(t >= start.unsqueeze(1)) & (t < end.unsqueeze(1)),
        sampling_logprobs=glob["response_trt_lps"][order], prompt_lengths=start,
        response_lengths=end - start, finished=glob["is_end"][order], group_size=g, pad_id=pad_id)
    batch.validate()
    return batch, glob["rewards"][order], order


def _reference_step(cfg, glob: dict) -> dict:
    """Our own trainer's step on the same rollout (its rollout stage replaced by that batch)."""
    import lens_megatron.trainer as trainer_module

    trainer = trainer_module.LensTrainer(cfg)
    batch, rewards, order = _contiguous_rollout(glob, cfg.rollout.group_size, trainer.tokenizer.pad_id)
    from lens_megatron.rollout.exchange import ScoredBatch

    trainer.rollouts.next = lambda step: ScoredBatch(step, step, batch, rewards, {})
    seen, original = {}, trainer_module.compute_advantages_with_diagnostics

    def spy(*args, **kwargs):
        seen["advantages"] = original(*args, **kwargs)[0]
        return original(*args, **kwargs)

    old = trainer.actor.compute_logprobs
    trainer.actor.compute_logprobs = lambda tokens, **kw: seen.setdefault("old", old(tokens, **kw)) \
        if not kw.get("reference") else old(tokens, **kw)
    trainer_module.compute_advantages_with_diagnostics = spy
    try:
        metrics = trainer.train_step()
    finally:
        trainer_module.compute_advantages_with_diagnostics = original
    trainer.close()
    return {"metrics": metrics, "weights": full_weights(trainer), "order": order,
            "advantages": seen["advantages"], "old": seen["old"]["token_logprobs"]}


def adapter_worker(tmp_dir, tp, dp, kl):
    from lens_megatron.integrations.nemo_aligner import LensAlignerActor
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, f"model.tensor_model_parallel_size={tp}", "model.init_seed=3",
                      "optim.adam_eps=1.0", "optim.lr=0.1", f"loss.kl_coef={0.1 if kl else 0.0}",
                      devices=tp * dp)
    init_for(cfg)
    trainer = LensTrainer(cfg)
    adapter = LensAlignerActor.from_trainer(trainer)
    errors = {}
    for name, call in (("infer", lambda: adapter.infer({})),
                       ("init_logprobs", lambda: adapter.get_init_policy_logprobs(torch.ones(2, 3)))):
        try:
            call()
        except RuntimeError as exc:
            errors[name] = str(exc)
    syncs = []
    trainer.engine.sync_weights = lambda: syncs.append(1) or {}
    local, glob, advantages = _rollout_phase(adapter, trainer, kl)
    out = _training_phase(adapter, trainer, local, kl)
    adapter.prepare_for_inference()  # the policy moved: the engine is re-synced once
    adapter.finish_inference()
    trainer.close()
    out.update(errors=errors, syncs=len(syncs), glob=glob, advantages=advantages,
               reference=_reference_step(cfg, glob))
    return out


def _check_against_trainer(out: dict) -> None:
    ref, glob = out["reference"], out["glob"]
    order, mask = ref["order"], glob["mask"][ref["order"]].bool()
    s = glob["logprobs"].shape[1]
    torch.testing.assert_close(glob["logprobs"][order][mask], ref["old"][:, :s][mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["advantages"][order], ref["advantages"], rtol=1e-5, atol=1e-6)
    assert out["metrics"]["grad_norm"] > 0 and out["advantages"].abs().sum() > 0
    assert out["loss"] == pytest.approx(ref["metrics"]["train/loss"], rel=1e-4, abs=1e-7)
    assert out["metrics"]["grad_norm"] == pytest.approx(ref["metrics"]["train/grad_norm"], rel=1e-4)
    for name, value in ref["weights"].items():
        torch.testing.assert_close(out["weights"][name], value, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")
    assert out["fo_loss"] == pytest.approx(out["loss"], rel=1e-5, abs=1e-8)
    assert out["forward_only_change"] == 0.0 and out["step_change"] > 1e-5
    assert out["post_loss"] < out["loss"] - 1e-7
    assert all(type(v) is float for v in {**out["metrics"], **out["fo_metrics"]}.values())
    assert out["syncs"] == 1
    assert "steps inside get_loss_and_metrics" in out["no_step_error"]


@pytest.mark.slow
def test_adapter_step_equals_our_trainer_step(tmp_path):
    out = run_in_processes(adapter_worker, 1, (str(tmp_path), 1, 1, False))[0]
    _check_against_trainer(out)
    assert "prepare_for_inference()" in out["errors"]["infer"]
    assert "kl_coef is 0" in out["errors"]["init_logprobs"]
    glob = out["glob"]  # NeMo's infer layout: end index, [B, S-1] sampler log-probs
    assert torch.equal(glob["mask"].sum(1).long(), glob["response_lengths"] - glob["prompt_lengths"])
    assert glob["logprobs"].shape[1] == glob["response_tokens"].shape[1] - 1 and glob["is_end"].dtype == torch.bool


@pytest.mark.slow
@pytest.mark.parametrize("tp,dp", [(2, 1), (1, 2)])
def test_adapter_under_tensor_and_data_parallelism_with_kl(tmp_path, tp, dp):
    outs = run_in_processes(adapter_worker, tp * dp, (str(tmp_path), tp, dp, True))
    for out in outs:
        _check_against_trainer(out)
        assert out["metrics"] == outs[0]["metrics"] and out["fo_metrics"] == outs[0]["fo_metrics"]
    assert outs[0]["metrics"]["kl_ref"] == 0.0 < outs[0]["post_metrics"]["kl_ref"]  # moved off the init
