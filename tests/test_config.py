"""Config loading and validation: every rule names the key and the fix, before any
process group exists."""
import os

import pytest

from lens_megatron.config import ConfigError, load_config

BASE = ["data.task=arithmetic"]


def load(*overrides):
    return load_config(overrides=[*BASE, *overrides])


def test_defaults_load_and_overrides_apply():
    cfg = load("model.tensor_model_parallel_size=2", "trainer.devices=2", "lens.estimator=grpo",
               "model.micro_batch_size=4")
    assert cfg.model.tensor_model_parallel_size == 2 and cfg.lens.estimator == "grpo"
    assert cfg.data_parallel_size == 1


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  max_steps: 7\nmodel:\n  arch:\n    num_layers: 6\n")
    cfg = load_config(path, ["data.task=arithmetic", "trainer.max_steps=9"])
    assert cfg.trainer.max_steps == 9 and cfg.model.arch.num_layers == 6


@pytest.mark.parametrize("overrides,key,fragment", [
    (["model.arch.num_attention_heads=3", "model.arch.num_query_groups=3",
      "model.tensor_model_parallel_size=2", "trainer.devices=2"],
     "model.tensor_model_parallel_size", "not divisible by TP=2"),
    (["model.arch.num_layers=3", "model.pipeline_model_parallel_size=2", "trainer.devices=2"],
     "model.arch.num_layers", "divisible by pipeline_model_parallel_size"),
    (["model.arch.num_layers=4", "model.pipeline_model_parallel_size=2",
      "model.virtual_pipeline_model_parallel_size=4", "trainer.devices=2"],
     "model.arch.num_layers", "2×4 = 8"),
    (["model.tensor_model_parallel_size=2", "trainer.devices=3"],
     "trainer.devices", "not divisible by TP×PP×CP"),
    (["model.fp8=hybrid", "model.precision=bf16"], "model.fp8", "Transformer Engine"),
    (["model.transformer_impl=transformer_engine"], "model.transformer_impl", "pip install"),
    (["rollout.engine=nonsense"], "rollout.engine", "must be one of"),
    (["rollout.temperature=0"], "rollout.temperature", "must be > 0"),
    (["optim.updates_per_rollout=3"], "optim.updates_per_rollout", "must divide"),
    (["model.micro_batch_size=3"], "model.micro_batch_size", "micro_batch_size (3)"),
    (["rollout.group_size=1"], "rollout.group_size", "G >= 2"),
    (["model.arch.num_layers=4", "model.pipeline_model_parallel_size=2",
      "model.virtual_pipeline_model_parallel_size=2", "trainer.devices=2",
      "rollout.prompts_per_step=4", "rollout.group_size=4", "model.micro_batch_size=16"],
     "model.micro_batch_size", "interleaved (virtual-pipeline) schedule needs a multiple"),
    (["model.sequence_parallel=true"], "model.sequence_parallel", "tensor_model_parallel_size > 1"),
    (["model.context_parallel_size=2", "trainer.devices=2", "model.sequence_packing=true"],
     "model.sequence_packing", "not supported yet"),
    (["model.context_parallel_size=2", "trainer.devices=4", "model.tensor_model_parallel_size=2"],
     "rollout.engine", "lean KV-cache decoder"),
    (["model.context_parallel_size=2", "trainer.devices=3"], "trainer.devices", "TP×PP×CP"),
    (["model.sequence_packing=true", "model.max_tokens_per_microbatch=33",
      "model.tensor_model_parallel_size=2", "model.sequence_parallel=true", "trainer.devices=2"],
     "model.max_tokens_per_microbatch", "multiple of 2"),
    (["rollout.placement=separate", "rollout.num_ranks=2", "trainer.devices=2"],
     "rollout.num_ranks", "leaving at least one rank"),
    (["rollout.max_staleness=1"], "rollout.max_staleness", "placement: separate"),
    (["rollout.num_ranks=1"], "rollout.num_ranks", "only used with rollout.placement"),
    (["data.task=file"], "data.train_path", "required"),
    (["data.task=file", "data.train_path=/nonexistent.jsonl"], "data.train_path", "does not exist"),
])
def test_invalid_configs_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        load(*overrides)
    message = str(info.value)
    assert key in message and fragment in message, message


def test_unknown_key_and_wrong_type_are_rejected():
    with pytest.raises(ConfigError, match="not_a_key"):
        load("trainer.not_a_key=1")
    with pytest.raises(ConfigError, match="max_steps"):
        load("trainer.max_steps=many")
    with pytest.raises(ConfigError, match="key=value"):
        load("trainer.max_steps")


def test_algorithm_sections_validate_through_their_dataclasses():
    with pytest.raises(ConfigError, match="estimator"):
        load("lens.estimator=ppo")
    with pytest.raises(ConfigError, match="rollout_correction"):
        load("loss.rollout_correction=bogus")
    cfg = load("loss.rollout_correction=tis_token", "loss.rollout_correction_cap=3.0")
    assert cfg.loss.correction_config().cap == 3.0
    assert cfg.loss.loss_config().clip_eps_low == 0.2


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nope/config.yaml")


EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "configs")


@pytest.mark.parametrize("name", sorted(os.listdir(EXAMPLES)))
def test_example_configs_are_valid(name):
    """Cluster configs validate against the schema and layout rules (not this machine's
    packages or data paths); the tiny default validates fully."""
    path = os.path.join(EXAMPLES, name)
    cfg = load_config(path, environment=name == "tiny_cpu.yaml")
    if name.startswith("llama31_8b"):
        assert cfg.optim.lr == 3e-7 and cfg.model.arch.rope_scaling.factor == 8.0
    if name.startswith("qwen25_3b"):
        assert cfg.optim.lr == 1e-6 and cfg.model.arch.tie_word_embeddings
    if name != "tiny_cpu.yaml":
        assert cfg.rollout.prompts_per_step * cfg.rollout.group_size == 2048  # 4 updates × 512
        assert cfg.rollout.max_new_tokens == 4096 and cfg.optim.updates_per_rollout == 4
        assert cfg.lens.negative_group_weight == 0.25 and cfg.loss.kl_coef == 0.0


def test_override_values_with_braces_must_be_quoted():
    with pytest.raises(ConfigError, match="quote values"):
        load("data.prompt_template={problem} Answer:")
    cfg = load('data.prompt_template="{problem} Answer:"')
    assert cfg.data.prompt_template == "{problem} Answer:"


def _config_keys(cls, prefix=""):
    import dataclasses

    for f in dataclasses.fields(cls):
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        if dataclasses.is_dataclass(default):
            yield from _config_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_readme_documents_every_config_key():
    from lens_megatron.config import LensTrainConfig

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    missing = [k for k in _config_keys(LensTrainConfig) if f"`{k}`" not in readme]
    assert not missing, f"README's configuration reference lacks {missing}"


def test_fp8_shapes_and_token_multiple():
    """FP8 (TE) needs multiples of 16: per-rank GEMM sizes are checked at config time, and the
    actor pads every micro-batch's width to ``sequence_multiple`` (×TP under SP)."""
    from lens_megatron.config import ConfigError, load_config

    fp8 = ["model.fp8=hybrid", "model.precision=bf16", "model.transformer_impl=transformer_engine",
           "model.arch.hidden_size=256", "model.arch.ffn_hidden_size=512",
           "model.arch.num_attention_heads=4", "model.arch.num_query_groups=2",
           "data.task=arithmetic"]
    cfg = load_config(overrides=fp8, environment=False)
    assert cfg.model.sequence_multiple() == 16
    cfg = load_config(overrides=fp8 + ["model.tensor_model_parallel_size=2",
                                       "model.sequence_parallel=true", "trainer.devices=2",
                                       "model.micro_batch_size=4"], environment=False)
    assert cfg.model.sequence_multiple() == 32
    with pytest.raises(ConfigError, match=r"model\.arch\.ffn_hidden_size.*multiples of 16"):
        load_config(overrides=fp8 + ["model.arch.ffn_hidden_size=520"], environment=False)
    with pytest.raises(ConfigError, match=r"model\.arch\.hidden_size"):
        load_config(overrides=fp8 + ["model.arch.hidden_size=264",
                                     "model.arch.num_attention_heads=2",
                                     "model.arch.num_query_groups=2"], environment=False)
    plain = load_config(overrides=["data.task=arithmetic"], environment=False)
    assert plain.model.sequence_multiple() == 1
