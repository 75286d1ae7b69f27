"""NeMo-Aligner REINFORCE / PPO / GRPO actor YAMLs → our ``LensTrainConfig``.

Every key of the NeMo-Aligner YAML is classified (the table below, docs/nemo_aligner.md):
*mapped* to one of ours; *ignored* (no effect on what is trained: logging, servers, generation
batching, memory offload — listed in a warning); *replaced* (NeMo-Aligner's meaning differs from
ours by design, e.g. its RLOO/GRPO baseline is our LENS advantage stage — listed in a warning);
or *unsupported* (a value that would change the results and that we cannot honour, or a key we do
not know) — ``ConfigError`` listing them all, unless the caller names them in ``accept``.
YAMLs read: ``examples/nlp/gpt/conf/gpt_reinforce_actor.yaml``, ``gpt_ppo_actor.yaml`` (main
af2b3bd9), the math variant of ``gpt_reinforce_actor.yaml`` (3d129471), ``gpt_grpo.yaml``
(llama-nemotron-dev 8c319267).
"""
from __future__ import annotations

import fnmatch
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import omegaconf
from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError, LensTrainConfig, load_config

FAMILIES = ("grpo", "reinforce", "ppo")


@dataclass
class NemoAlignerMapping:
    """What a NeMo-Aligner YAML became: our overrides and the fate of every other key."""

    family: str
    overrides: dict[str, Any] = field(default_factory=dict)  # our key -> value
    ignored: dict[str, str] = field(default_factory=dict)  # NeMo key -> why it does not matter
    replaced: dict[str, str] = field(default_factory=dict)  # NeMo key -> what of ours differs
    unsupported: dict[str, str] = field(default_factory=dict)  # NeMo key -> why (an error)
    values: dict[str, Any] = field(default_factory=dict)  # the YAML's leaves (ALG = family)

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def dotlist(self) -> list[str]:
        """Our ``key=value`` overrides, for ``load_config`` / the ``lens-train`` command line."""
        return [f"{k}={json.dumps(v)}" for k, v in self.overrides.items()]  # JSON is YAML


# ---------------------------------------------------------------- rule helpers
Rule = Callable[[NemoAlignerMapping, str, Any], None]


def to(our_key: str, convert: Callable[[Any], Any] = lambda v: v) -> Rule:
    """Map to ``our_key``; a null NeMo value keeps our default."""
    def rule(m, key, value):
        if value is None:
            m.ignored[key] = "null: our default"
        else:
            m.overrides[our_key] = convert(value)
    return rule


def _passive(rule: Rule) -> Rule:
    rule.passive = True  # does not read the value: fine for an unresolvable interpolation
    return rule


def ignore(reason: str) -> Rule:
    return _passive(lambda m, key, value: m.ignored.__setitem__(key, reason))


def replace(reason: str) -> Rule:
    return _passive(lambda m, key, value: m.replaced.__setitem__(key, reason))


def only(allowed: Sequence[Any], reason: str, then: Optional[Rule] = None) -> Rule:
    """Harmless when the value is one of ``allowed``; otherwise unsupported with ``reason``."""
    def rule(m, key, value):
        if value in allowed:
            (then or ignore(f"{value!r}: nothing to do"))(m, key, value)
        else:
            m.unsupported[key] = f"{value!r}: {reason}"
    return rule


def _precision(m, key, value):
    names = {"bf16": "bf16", "bf16-mixed": "bf16", "16": "fp16", "16-mixed": "fp16", "32": "fp32",
             "32-true": "fp32"}
    if str(value) in names:
        m.overrides["model.precision"] = names[str(value)]
    else:
        m.unsupported[key] = f"{value!r}: ours are bf16 | 16 | 32"


def _top_k(value: Any) -> int:
    return -1 if int(value) <= 0 else int(value)  # NeMo 0 (and vLLM -1) = off; ours -1


def _data_prefix(m, key, value):
    """``data_prefix: {train: [path], validation: [path]}`` (or one path) → our prompt files."""
    split = "train" if key == "model.data.data_prefix" else key.rsplit(".", 1)[1]
    paths = list(value) if isinstance(value, (list, tuple)) else [value]
    if value is None or not paths:
        m.ignored[key] = "empty: set data.train_path"
    elif len(paths) > 1:
        m.unsupported[key] = "blended data sets (weights and several paths) are not implemented"
    elif split == "train":
        m.overrides.update({"data.task": "file", "data.train_path": str(paths[0])})
    elif split == "validation":
        m.overrides["data.eval_path"] = str(paths[0])
    else:
        m.ignored[key] = f"{split} split: not used in training"


def _kl(m, key, value):
    if float(value) == 0:
        m.overrides["loss.kl_coef"] = 0.0
    elif m.family == "grpo" or m.get("model.ALG.use_grpo_loss") is not None:
        m.overrides.update({"loss.kl_coef": float(value), "loss.kl_estimator": "k3"})
    else:  # REINFORCE / PPO on main: subtracted from the reward, not a loss term
        m.unsupported[key] = (f"{value}: NeMo-Aligner's REINFORCE/PPO subtract a per-sequence KL "
                              "(k1 or |k1|) from the reward; ours adds k3·kl_coef to the loss")


def _clip_eps(m, key, value):
    """ratio_eps (PPO/GRPO), grpo_eps (math REINFORCE), ratio_eps_low/high (GRPO clip_higher)."""
    leaf = key.rsplit(".", 1)[1]
    clip_higher = bool(m.get("model.ALG.dapo.clip_higher", False))
    used = {"ratio_eps": not clip_higher, "grpo_eps": bool(m.get("model.ALG.use_grpo_loss")),
            "ratio_eps_low": clip_higher, "ratio_eps_high": clip_higher}.get(leaf)
    if used is None:
        m.unsupported[key] = "unknown key: not understood, so not dropped silently"
    elif not used:
        m.ignored[key] = "not used with these dapo.clip_higher / use_grpo_loss settings"
    elif leaf.startswith("ratio_eps_"):
        m.overrides["loss.clip_eps_" + leaf[len("ratio_eps_"):]] = float(value)
    else:
        m.overrides.update({"loss.clip_eps_low": float(value), "loss.clip_eps_high": float(value)})


def _engine(m, key, value):
    if key.endswith("type"):
        m.ignored[key] = "which fast engine: ours is vLLM when enabled"
    else:
        m.overrides["rollout.engine"] = "vllm" if value else "megatron"


def _optimizer(m, key, value):
    distributed = {"distributed_fused_adam": True, "mcore_distributed_optim": True,
                   "fused_adam": False, "adam": False, "adamw": False}
    if value not in distributed:
        m.unsupported[key] = f"{value!r}: our optimizer is (distributed) AdamW"
    else:
        m.overrides["optim.use_distributed_optimizer"] = distributed[value]


def _schedule(m, key, value):
    if value in (None, "Constant", "ConstantLR"):
        m.overrides["optim.lr_decay_style"] = "constant"
    elif value == "CosineAnnealing":
        m.overrides["optim.lr_decay_style"] = "cosine"
    else:
        m.unsupported[key] = f"{value!r}: ours has constant | linear | cosine schedules"


def _betas(m, key, value):
    m.overrides.update({"optim.adam_beta1": float(value[0]), "optim.adam_beta2": float(value[1])})


def _max_steps(m, key, value):
    if value is not None and int(value) > 0:
        m.overrides["trainer.max_steps"] = int(value)
    else:
        m.unsupported[key] = (f"{value}: 'the whole data set' has no equivalent; pass the "
                              "override trainer.max_steps=N")


def _resume(m, key, value):
    if key.endswith("resume_if_exists"):
        m.overrides.setdefault("exp_manager.resume", "auto" if value else "never")
    elif not value and m.get("exp_manager.resume_if_exists", False):
        m.overrides["exp_manager.resume"] = "must"
    else:
        m.ignored[key] = "covered by exp_manager.resume"


def _wandb(m, key, value):
    if key.endswith("create_wandb_logger") and value:
        m.overrides["exp_manager.wandb_project"] = m.get("exp_manager.wandb_logger_kwargs.project") or "lens"
    else:
        m.ignored[key] = "wandb settings (our run name is exp_manager.name)"


def _token_loss(m, key, value):
    if value:
        m.overrides["loss.normalization"] = "token"  # DAPO: sum / global token count, as ours
    else:
        m.replaced[key] = ("false: NeMo averages tokens per micro-batch; ours normalises by the "
                           "global count (loss.normalization: sequence, paper Eq. 3)")


def _max_prompt(m, key, value):
    m.overrides["rollout.max_prompt_length"] = int(value)
    m.replaced[key] = "NeMo drops longer prompts; ours keeps their last tokens (counted)"


GENERATION = "generation batching/scheduling: changes speed and memory, not what is sampled"
MIRROR = "a copy of another key (interpolation), mapped there"
REWARD = "the reward comes from our verifier (reward.judge), not a reward-model/critic server"
BASELINE = ("the group baseline and normalisation are our advantage stage (lens.estimator: lens "
            "or grpo, lens.*), not NeMo-Aligner's RLOO / leave-one-out baseline")
MEMORY = "memory management only"
LOGGING = "logging / checkpoint bookkeeping"

PENALTY = "length-penalised rewards are not implemented"
T, M = "trainer.ALG.", "model.ALG."  # the algorithm's sections (trainer.grpo, model.reinforce, ...)

# (glob patterns separated by "|", rule); the first matching entry decides.
RULES: list[tuple[str, Rule]] = [
    ("defaults", ignore("Hydra defaults list")),
    ("trainer.precision|model.precision", _precision),
    ("trainer.accelerator", only(("gpu", "auto"), "we run on GPUs (or CPU for tests)")),
    ("trainer.max_time", only((None,), "wall-clock limits: use the SLURM time limit (we requeue)")),
    (T + "max_steps", _max_steps), (T + "save_interval", to("trainer.save_every")),
    (T + "gradient_clip_val", to("optim.clip_grad")), (T + "initial_policy_kl_penalty", _kl),
    (f"{T}num_rollouts_per_prompt|{T}samples_per_prompt", to("rollout.group_size")),
    (T + "num_prompts_per_grpo_step", to("rollout.prompts_per_step")),
    (f"{T}trt_llm.enable|{T}inference_backend.enable|{T}inference_backend.type", _engine),
    (T + "max_length_penalty", only((0, 0.0), PENALTY)),
    (f"{T}length_penalty_enabled|{T}dapo.length_penalty", only((False,), PENALTY)),
    (T + "importance_sample_correct", only((False,), "uncapped IS on the policy and KL terms; "
                                           "ours: loss.rollout_correction (capped, policy term)")),
    (T + "online_filtering_min_accuracy_threshold", only((0, 0.0), "prompt filtering is not implemented")),
    (T + "online_filtering_max_accuracy_threshold", only((1, 1.0), "prompt filtering is not implemented")),
    (f"{T}use_leave_one_out_baseline|{T}normalize_rewards", replace(BASELINE)),
    (f"{T}critic_warmup_steps|{T}discount_factor|{T}gae_lambda|{T}normalize_advantages",
     replace("no critic/GAE: " + BASELINE)),
    (f"{T}environments.*|remote_rm.*|remote_critic_rm.*", replace(REWARD)),
    (T + "use_absolute_kl", ignore("see initial_policy_kl_penalty")),
    (f"{T}max_sequence_length|{T}dapo.length_penalty_params.*", ignore("used only by the length penalty")),
    (T + "rollout_batch_seq_length", ignore("pads batches to a fixed width: " + MEMORY)),
    (T + "max_epochs", ignore("we stop at trainer.max_steps; the prompt sampler reshuffles")),
    (f"{T}val_check_interval|{T}run_validation_step_0|{T}greedy_on_validation|{T}val_*",
     ignore("validation only (ours: trainer.eval_every, pass@k)")),
    (f"{T}*rollout_mbs|{T}*micro_batch*|{T}*rollouts_per_microbatch|{T}batch_iterator.*|{T}trt_llm.*"
     f"|{T}inference_backend.*|{T}trt_model_dir", ignore(GENERATION)),
    (f"{T}model_*|trainer.max_steps|trainer.max_epochs", ignore(MIRROR)),
    (f"{T}generation_save_dir|trainer.logger|trainer.enable_checkpointing", ignore(LOGGING)),
    ("trainer.use_distributed_sampler", ignore("our prompt sampler shards by data-parallel rank")),
    ("exp_manager.explicit_log_dir|exp_manager.exp_dir", to("exp_manager.exp_dir", str)),
    ("exp_manager.name", to("exp_manager.name")),
    ("exp_manager.resume_if_exists|exp_manager.resume_ignore_no_checkpoint", _resume),
    ("exp_manager.resume_from_checkpoint", only((None,), "resume from our checkpoints (exp_manager.resume)")),
    ("exp_manager.create_wandb_logger|exp_manager.wandb_logger_kwargs.*", _wandb),
    ("exp_manager.create_tensorboard_logger", to("exp_manager.tensorboard")),
    ("exp_manager.*", ignore(LOGGING)),
    ("pretrained_checkpoint.restore_from_path", only((None,), "a .nemo file: convert the HF model "
                                                     "with lens-convert and set model.load")),
    (M + "num_rollout_samples", to("rollout.prompts_per_step", int)),  # PPO: sequences, _derive
    (M + "entropy_bonus", only((0, 0.0), "an entropy bonus is not implemented")),
    (f"{M}ratio_eps*|{M}grpo_eps", _clip_eps),
    (M + "use_grpo_loss", only((True,), "our loss is always the clipped surrogate (Eq. 3); its "
                               "first update per rollout has REINFORCE's gradient",
                               then=ignore("the clipped surrogate: ours too"))),
    (M + "disable_baseline", only((False,), BASELINE)),
    (M + "dapo.token_loss", _token_loss), (M + "dapo.clip_higher", ignore("see ratio_eps_low/high")),
    (M + "sampling_params.temperature", to("rollout.temperature", float)),
    (M + "sampling_params.top_p", to("rollout.top_p", float)),
    (M + "sampling_params.top_k", to("rollout.top_k", _top_k)),
    (M + "sampling_params.use_greedy", only((False,), "greedy training rollouts")),
    (M + "sampling_params.repetition_penalty", only((1, 1.0), "repetition penalty not implemented")),
    (M + "sampling_params.end_strings", replace("generation stops at the tokenizer's EOS token")),
    (M + "sampling_params.*", ignore("output formatting / prompt tokens come from our formatter")),
    (M + "length_params.max_length", to("rollout.max_new_tokens", int)),
    (M + "length_params.min_length", only((0, 1), "a minimum response length is not implemented")),
    (M + "offload_adam_states", ignore(MEMORY)),
    (f"{M}*micro_batch_size|{M}num_val_samples|{M}trt_llm*|{M}inference_backend*|{M}share_dir"
     f"|{M}generation_rollout_mbs|{M}trt_model_dir", ignore(GENERATION)),
    (f"{M}initial_policy_kl_penalty|{M}prompt_rollouts_per_microbatch", ignore(MIRROR)),
    ("model.peft.peft_scheme", only(("none",), "LoRA/PEFT is not implemented")),
    ("model.peft.*", ignore("PEFT settings, unused without peft_scheme")),
    ("model.global_batch_size", ignore("sequences per optimizer step: optim.updates_per_rollout")),
    ("model.seed", to("trainer.seed")),
    ("model.encoder_seq_length", ignore(MIRROR + " (max_position_embeddings)")),
    ("model.megatron_amp_O2", ignore("bf16 weights with fp32 master copies in megatron's optimizer")),
    ("model.mcore_gpt", only((True,), "we build megatron-core GPTModel only")),
    ("model.hf_model_name_or_configs_dir", ignore("engine conversion: our vLLM refit is in-memory")),
    ("model.optim.name", _optimizer), ("model.optim.lr", to("optim.lr", float)),
    ("model.optim.weight_decay", to("optim.weight_decay", float)),
    ("model.optim.betas", _betas), ("model.optim.eps", to("optim.adam_eps", float)),
    ("model.optim.sched.name", _schedule),
    ("model.optim.sched.warmup_steps", to("optim.warmup_steps", int)),
    ("model.optim.sched.min_lr", to("optim.min_lr", float)),
    ("model.optim.sched.constant_steps", only((0, None), "NeMo holds min_lr for the last "
                                              "constant_steps; our cosine decays over all steps")),
    ("model.optim.*", ignore("gradient-bucket / overlap tuning: speed only")),
    ("model.data.data_prefix*", _data_prefix),
    ("model.data.apply_chat_template", to("data.use_chat_template")),
    ("model.data.seq_length", _max_prompt),
    ("model.data.reset_position_ids|model.data.reset_attention_mask",
     only((False,), "document resets inside a sequence")),
    ("model.data.prompt_file", only((None,), "prompt templates: data.prompt_template")),
    ("model.data.system_prompt_file", only((None,), "system prompts are not implemented")),
    ("model.data.*", ignore("dataset loading details: ours reads jsonl/parquet prompt sets")),
    ("model.overwrite_base_config.*", ignore("merging with the .nemo config")),
    ("model.ub_tp_comm_overlap_cfg*", ignore("communication overlap: speed only")),
]
SAME_NAME = ("trainer.num_nodes", "trainer.devices", "model.tensor_model_parallel_size",
             "model.pipeline_model_parallel_size", "model.virtual_pipeline_model_parallel_size",
             "model.context_parallel_size", "model.sequence_parallel", "model.micro_batch_size")
ARCH = {"num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
        "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
        "kv_channels": "kv_channels", "rotary_base": "rope_theta", "layernorm_epsilon": "rms_norm_eps",
        "share_embeddings_and_output_weights": "tie_word_embeddings", "init_method_std": "init_std",
        "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
        "max_position_embeddings": "max_position_embeddings"}  # if the YAML carries the architecture
RULES += [(k, to(k)) for k in SAME_NAME] + [(f"model.{k}", to(f"model.arch.{v}")) for k, v in ARCH.items()]

IMPLICIT = {  # differences without a key of their own, reported with the replaced keys
    "(advantages)": BASELINE,
    "(loss normalisation)": ("NeMo-Aligner's losses average tokens per micro-batch; ours divides "
                             "by the global sequence/token count (loss.normalization)"),
    "(is_end)": "truncated responses train too (NeMo's PPO masks them out of the loss)",
}
SETTLED_BY = {"trainer.ALG.max_steps": "trainer.max_steps",  # unsupported key -> our override
              "model.global_batch_size": "optim.updates_per_rollout"}


class NemoAlignerConfigWarning(UserWarning):
    """Keys of a NeMo-Aligner YAML that were ignored or whose meaning differs from ours."""


def _register_resolver(name: str, fn: Callable) -> None:
    """OmegaConf >= 2.4 renamed ``register_new_resolver`` to ``register_resolver`` (before 2.4 that
    name is the old string-argument API)."""
    major_minor = tuple(int(p) for p in omegaconf.__version__.split(".")[:2])
    register = OmegaConf.register_resolver if major_minor >= (2, 4) else OmegaConf.register_new_resolver
    register(name, fn)


class _Unresolved(str):
    """An interpolation the YAML cannot resolve alone (NeMo merges the .nemo model config)."""


def _load(source: Union[str, os.PathLike, dict, DictConfig]) -> dict[str, Any]:
    """The YAML's leaves by dotted key, interpolations resolved where possible."""
    for name, fn in (("multiply", lambda x, y: x * y), ("int_div", lambda x, y: x // y),
                     ("subtract", lambda x, y: x - y)):  # NeMo-Aligner's example scripts' resolvers
        if not OmegaConf.has_resolver(name):
            _register_resolver(name, fn)
    if isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ConfigError(f"NeMo-Aligner config {str(source)!r} does not exist")
        tree = OmegaConf.load(source)
    else:
        tree = OmegaConf.create(source)
    leaves = _flatten(OmegaConf.to_container(tree, resolve=False))
    for key, raw in leaves.items():
        try:
            leaves[key] = OmegaConf.select(tree, key)
        except Exception:  # noqa: BLE001 - an interpolation to a key the YAML does not have
            leaves[key] = _Unresolved(raw)
    return leaves


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _family(leaves: dict[str, Any]) -> str:
    found = [f for f in FAMILIES if any(k.startswith(f"trainer.{f}.") for k in leaves)]
    if len(found) != 1:
        raise ConfigError(f"expected exactly one of trainer.{{{','.join(FAMILIES)}}} in a NeMo-Aligner "
                          f"actor config, found {found or 'none'}")
    return found[0]


def _normalize(key: str, family: str) -> str:
    for section in ("trainer", "model"):
        if key.startswith(f"{section}.{family}."):
            return f"{section}.ALG." + key[len(section) + len(family) + 2:]
    return key


def _derive(m: NemoAlignerMapping, group_size: Optional[int]) -> None:
    """Group size for PPO (one response per prompt), updates per rollout from the batch sizes."""
    if m.family == "ppo":
        sequences = m.overrides.pop("rollout.prompts_per_step", None)
        if group_size is None:
            m.unsupported["(group size)"] = ("PPO samples one response per prompt; LENS needs G >= 2: "
                                             "pass group_size=G (num_rollout_samples stays the "
                                             "sequences per step)")
        elif sequences is not None:
            if sequences % group_size:
                m.unsupported["model.ppo.num_rollout_samples"] = (
                    f"{sequences} sequences do not split into groups of {group_size}")
            else:
                m.overrides["rollout.prompts_per_step"] = sequences // group_size
            m.overrides["rollout.group_size"] = group_size
    elif group_size is not None:
        raise ConfigError(f"group_size is for PPO configs; a {m.family} config sets it itself")
    prompts, g = m.overrides.get("rollout.prompts_per_step"), m.overrides.get("rollout.group_size")
    gbs = m.get("model.global_batch_size")
    if None not in (prompts, g, gbs):
        if (prompts * g) % gbs:
            m.unsupported["model.global_batch_size"] = (
                f"{gbs} does not divide the rollout batch ({prompts} prompts × {g} samples)")
        else:
            m.overrides["optim.updates_per_rollout"] = prompts * g // gbs
    for key, reason in IMPLICIT.items():
        if not (key == "(loss normalisation)" and m.get("model.ALG.dapo.token_loss") is not None):
            m.replaced.setdefault(key, reason)


def nemo_aligner_mapping(source, group_size: Optional[int] = None) -> NemoAlignerMapping:
    """Classify every key of a NeMo-Aligner REINFORCE/PPO/GRPO actor YAML (path or dict)."""
    leaves = _load(source)
    family = _family(leaves)
    m = NemoAlignerMapping(family, values={_normalize(k, family): v for k, v in leaves.items()})
    for key, value in leaves.items():
        normalized = _normalize(key, family)
        rule = next((r for patterns, r in RULES
                     if any(fnmatch.fnmatchcase(normalized, p) for p in patterns.split("|"))), None)
        if rule is None:
            m.unsupported[key] = "unknown key: not understood, so not dropped silently"
        elif isinstance(value, _Unresolved) and not getattr(rule, "passive", False):
            m.unsupported[key] = (f"{value} does not resolve (a value of the .nemo model config?); "
                                  "write the value into the YAML")
        else:
            rule(m, key, value)
    _derive(m, group_size)
    return m


def lens_config_from_nemo_aligner(source, overrides: Sequence[str] = (),
                                  accept: Iterable[str] = (), group_size: Optional[int] = None,
                                  environment: bool = True) -> LensTrainConfig:
    """Our validated config from a NeMo-Aligner actor YAML (path or dict) plus our ``key=value``
    ``overrides`` (applied last). Raises ``ConfigError`` listing every unsupported key, except
    those matched by ``accept`` (glob patterns of NeMo keys whose effect you knowingly give
    up) or settled by an override; warns with the ignored and the replaced keys."""
    m = nemo_aligner_mapping(source, group_size)
    ours = {o.split("=", 1)[0].lstrip("+") for o in overrides}
    accept = list(accept)
    for key in list(m.unsupported):
        settled = SETTLED_BY.get(_normalize(key, m.family)) in ours
        if settled or any(fnmatch.fnmatchcase(key, pattern) for pattern in accept):
            reason = m.unsupported.pop(key)
            m.replaced[key] = f"{'settled by an override' if settled else 'accepted'}: {reason}"
    if m.unsupported:
        listing = "\n".join(f"  {k}: {v}" for k, v in sorted(m.unsupported.items()))
        raise ConfigError(f"NeMo-Aligner {m.family} config: {len(m.unsupported)} key(s) would "
                          f"change the results and have no equivalent here:\n{listing}\n"
                          "Change them, override ours, or pass accept=[...] to give them up.")
    for title, entries in (("replaced (meaning differs from NeMo-Aligner)", m.replaced),
                           ("ignored (no effect on training)", m.ignored)):
        if entries:
            lines = "\n".join(f"  {k}: {v}" for k, v in sorted(entries.items()))
            warnings.warn(f"NeMo-Aligner {m.family} config, {title}:\n{lines}",
                          NemoAlignerConfigWarning, stacklevel=2)
    return load_config(overrides=[*m.dotlist(), *overrides], environment=environment)
