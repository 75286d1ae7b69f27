"""HF <-> Megatron conversion end to end, on tiny random HF models built here with transformers.

- Converted checkpoints give HF's logits (fp32, <= 1e-4) in Megatron at TP=1, TP=2 and PP=2;
  a checkpoint re-saved by the TP=2 model through ``save_model_checkpoint`` loads at PP=2.
- HF -> Megatron -> HF is bit-exact per tensor (fp32, and bf16 from a bf16 model), and
  transformers loads the result.
- Bad inputs fail with errors naming the problem and leave no output behind.

Conversions run in one spawned process (they set up Megatron's parallel state); Megatron
forwards run in gloo ranks.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lens_megatron.checkpoint.conversion import convert_hf_to_megatron
from lens_megatron.checkpoint.convert_cli import hf_to_megatron_main
from lens_megatron.checkpoint.hf_files import HFCheckpointError
from lens_megatron.checkpoint.hf_mapping import UnsupportedModelError
from lens_megatron.checkpoint.model_io import read_checkpoint_arch
from lens_megatron.checkpoint.random_hf_model import write_random_hf_model
from lens_megatron.models.arch import ModelArch
from lens_megatron.parallel.spawn import run_in_processes
from megatron_helpers import MICRO_BATCH, SEQ, position_ids, setup_model, token_batch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
HF_MODELS = {
    # GQA, llama3 RoPE scaling, non-default theta/eps, untied, vocab not a multiple of 128.
    "llama": (LlamaForCausalLM, LlamaConfig(
        vocab_size=300, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}, **COMMON)),
    "qwen2_tied": (Qwen2ForCausalLM, Qwen2Config(vocab_size=100, rope_theta=1e6,
                                                 tie_word_embeddings=True, **COMMON)),
    "qwen2_untied": (Qwen2ForCausalLM, Qwen2Config(vocab_size=200, rope_theta=1e6,
                                                   tie_word_embeddings=False, **COMMON)),
}
MAX_ABS_LOGIT_ERROR = 1e-4


def _tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "</s>": 1, **{f"t{i}": i + 2 for i in range(98)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                            eos_token="</s>").save_pretrained(directory)


def _save_hf_model(name: str, directory: Path, dtype=torch.float32, **save_kwargs) -> Path:
    """Random weights, norms and biases included (HF initialises those to 1 and 0)."""
    model_class, config = HF_MODELS[name]
    torch.manual_seed(sorted(HF_MODELS).index(name))
    model = model_class(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model.to(dtype).save_pretrained(directory, **save_kwargs)
    return directory


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    dirs = {name: _save_hf_model(name, root / name) for name in HF_MODELS}
    _tiny_tokenizer(dirs["llama"])
    dirs["qwen2_bf16"] = _save_hf_model("qwen2_untied", root / "qwen2_bf16", torch.bfloat16)
    dirs["llama_sharded"] = _save_hf_model("llama", root / "llama_sharded",
                                           max_shard_size="60KB")
    return dirs


def _hf_logits(directory: Path, batches: list[torch.Tensor]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.cat([model(ids).logits for ids in batches])


def _batches(vocab_size: int) -> list[torch.Tensor]:
    return token_batch(2, vocab=vocab_size, seed=3)


# ------------------------------------------------------------------ spawned workers

def conversion_worker(jobs: list[dict], failing_job: dict) -> dict:
    """Run the conversions of ``jobs`` in this process; one more whose reader fails mid-write."""
    from lens_megatron.checkpoint import conversion, hf_files

    for job in jobs:
        if "strip_info_from" in job:  # like a training checkpoint: no lens_checkpoint.json
            shutil.copytree(job["strip_info_from"], job["megatron"])
            for name in ("lens_checkpoint.json", "hf_config.json"):
                Path(job["megatron"], name).unlink()
        else:
            conversion.convert_hf_to_megatron(job["hf"], job["megatron"], job.get("tp", 1),
                                              job.get("pp", 1), job.get("dtype", "auto"),
                                              progress=False)
        conversion.convert_megatron_to_hf(job["megatron"], job["back"], progress=False,
                                          max_shard_bytes=job.get("max_shard_bytes", 2 << 30),
                                          arch_config=job.get("arch_config"))
    calls = {"n": 0}
    original_get = hf_files.HFCheckpointReader.get

    def failing_get(self, name):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk vanished while reading")
        return original_get(self, name)

    hf_files.HFCheckpointReader.get = failing_get
    try:
        conversion.convert_hf_to_megatron(failing_job["hf"], failing_job["megatron"],
                                          progress=False)
    except OSError as exc:
        return {"mid_write_error": str(exc), "reads_before_failure": calls["n"]}
    return {"mid_write_error": None}


def _megatron_logits(chunks, arch: ModelArch, batches: list[torch.Tensor]):
    """Full-vocab logits on the last stage's TP rank 0 (None elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from lens_megatron.parallel import cpu_mode

    def step(data_iterator, model):
        ids = next(data_iterator)

        def collect(logits):
            full = gather_from_tensor_model_parallel_region(logits)[..., : arch.vocab_size]
            return logits.sum() * 0.0, {"logits": full.detach().clone()}

        return model(ids, position_ids(ids), None), collect

    with cpu_mode.cuda_to_cpu():
        results = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(batches), model=chunks[0],
            num_microbatches=len(batches), seq_length=SEQ, micro_batch_size=MICRO_BATCH,
            forward_only=True)
    if (not parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            or parallel_state.get_tensor_model_parallel_rank() != 0):
        return None
    return torch.cat([r["logits"] for r in results])


def megatron_logits_worker(tp: int, pp: int, checkpoints: dict[str, str],
                           resave_root: str | None) -> dict | None:
    """Load each checkpoint at this layout and return its logits (optionally re-save it)."""
    from lens_megatron.checkpoint.model_io import load_model_checkpoint, save_model_checkpoint

    out = {}
    for name, directory in checkpoints.items():
        arch = read_checkpoint_arch(directory)
        _, chunks = setup_model(tp, pp, None, arch, seed=123)
        load_model_checkpoint(chunks, directory)
        out[name] = _megatron_logits(chunks, arch, _batches(arch.vocab_size))
        if resave_root is not None:
            save_model_checkpoint(chunks, f"{resave_root}/{name}", arch, {"layout": [tp, pp]})
    holds_logits = all(logits is not None for logits in out.values())
    return out if holds_logits else None


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("converted")
    jobs = [{"name": name, "hf": str(hf_models[name]), "megatron": str(root / f"{name}.megatron"),
             "back": str(root / f"{name}.hf")} for name in hf_models]
    jobs[0].update(tp=2, pp=2)  # llama: validated for TP=2/PP=2, recorded in lens_config.yaml
    next(j for j in jobs if j["name"] == "llama_sharded")["max_shard_bytes"] = 50_000
    tied = next(j for j in jobs if j["name"] == "qwen2_tied")
    jobs.append({"name": "qwen2_tied_via_arch_config", "hf": tied["hf"],
                 "strip_info_from": tied["megatron"], "megatron": str(root / "stripped.megatron"),
                 "arch_config": str(Path(tied["megatron"]) / "lens_config.yaml"),
                 "back": str(root / "stripped.hf")})
    failing = {"hf": str(hf_models["qwen2_tied"]), "megatron": str(root / "failing.megatron")}
    report = run_in_processes(conversion_worker, 1, (jobs, failing), timeout=600)[0]
    return {"root": root, "jobs": {j["name"]: j for j in jobs}, "failing": failing, **report}


# ------------------------------------------------------------------ tests

def _single(results):
    found = [r for r in results if r is not None]
    assert len(found) == 1
    return found[0]


@pytest.mark.slow
def test_megatron_logits_equal_hf_logits_at_tp1_tp2_pp2(hf_models, converted):
    names = ("llama", "qwen2_tied", "qwen2_untied")
    checkpoints = {n: converted["jobs"][n]["megatron"] for n in names}
    reference = {n: _hf_logits(hf_models[n], _batches(HF_MODELS[n][1].vocab_size)) for n in names}
    resaved = converted["root"] / "resaved_tp2"
    # The TP=2 ranks re-save each model (save_model_checkpoint); PP=2 loads those too.
    with_resaved = {**checkpoints, **{f"{n} re-saved at TP=2": str(resaved / n) for n in names}}
    for tp, pp, inputs, resave in ((2, 1, checkpoints, str(resaved)), (1, 1, checkpoints, None),
                                   (1, 2, with_resaved, None)):
        got = _single(run_in_processes(megatron_logits_worker, tp * pp,
                                       (tp, pp, inputs, resave), timeout=600))
        assert got.keys() == inputs.keys()
        for label, logits in got.items():
            error = (logits - reference[label.split()[0]]).abs().max().item()
            assert error <= MAX_ABS_LOGIT_ERROR, f"{label} at TP={tp} PP={pp}: {error:.2e}"


def _safetensors_state(directory: str | Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) \
        if index.exists() else ["model.safetensors"]
    state = {}
    for file_name in files:
        with safe_open(str(directory / file_name), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    return state


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2_tied", "qwen2_untied", "qwen2_bf16",
                                  "llama_sharded", "qwen2_tied_via_arch_config"])
def test_hf_megatron_hf_round_trip_is_bit_exact(name, hf_models, converted):
    original = _safetensors_state(converted["jobs"][name]["hf"])
    back = _safetensors_state(converted["jobs"][name]["back"])
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    config = json.loads((Path(converted["jobs"][name]["back"]) / "config.json").read_text())
    assert config["dtype"] == ("bfloat16" if name == "qwen2_bf16" else "float32")
    if name in HF_MODELS:  # transformers reads the exported config and weights identically
        batches = _batches(HF_MODELS[name][1].vocab_size)
        torch.testing.assert_close(_hf_logits(converted["jobs"][name]["back"], batches),
                                   _hf_logits(hf_models[name], batches), rtol=0, atol=0)


@pytest.mark.slow
def test_sharded_output_has_index_and_tokenizer_files_travel(converted):
    back = Path(converted["jobs"]["llama_sharded"]["back"])
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    megatron = Path(converted["jobs"]["llama"]["megatron"])
    for directory in (megatron / "tokenizer", Path(converted["jobs"]["llama"]["back"])):
        assert (directory / "tokenizer.json").is_file()
        assert (directory / "generation_config.json").is_file()
        assert AutoTokenizer.from_pretrained(directory)("t1 t5").input_ids == [3, 7]


@pytest.mark.slow
def test_lens_config_yaml_is_a_trainer_model_section(converted):
    from lens_megatron.config import load_config

    megatron = Path(converted["jobs"]["llama"]["megatron"])
    cfg = load_config(megatron / "lens_config.yaml", ["data.task=arithmetic", "trainer.devices=4"])
    assert cfg.model.arch == read_checkpoint_arch(megatron)
    assert cfg.model.arch.rope_scaling.original_max_position_embeddings == 64
    assert (cfg.model.tensor_model_parallel_size, cfg.model.pipeline_model_parallel_size) == (2, 2)
    assert cfg.model.load == str(megatron) and cfg.model.precision == "fp32"
    assert cfg.model.tokenizer.type == "hf"
    assert cfg.model.tokenizer.path == str(megatron / "tokenizer")


@pytest.mark.slow
def test_failure_while_writing_leaves_nothing_behind(converted):
    assert converted["mid_write_error"] == "disk vanished while reading"
    target = Path(converted["failing"]["megatron"])
    assert not target.exists()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(f".{target.name}")]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_shard_file_is_named(hf_models, tmp_path):
    model = _copy(hf_models["llama_sharded"], tmp_path / "model")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (model / victim).unlink()
    with pytest.raises(HFCheckpointError, match=victim):
        convert_hf_to_megatron(model, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_config_that_does_not_match_the_tensors_is_refused(hf_models, tmp_path):
    model = _copy(hf_models["qwen2_untied"], tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFCheckpointError, match=r"gate_proj.*\(128, 64\).*\(96, 64\)"):
        convert_hf_to_megatron(model, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_unsupported_architecture_is_refused(hf_models, tmp_path):
    model = _copy(hf_models["llama"], tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="MistralForCausalLM"):
        convert_hf_to_megatron(model, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_tp_that_does_not_divide_the_heads_fails_on_the_command_line(hf_models, tmp_path, capsys):
    out = tmp_path / "out"
    code = hf_to_megatron_main(["--hf-dir", str(hf_models["llama"]), "--out", str(out),
                                "--tp", "3", "--no-progress"])
    assert code == 1
    assert "num_attention_heads (4) is not divisible by TP=3" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_export_without_architecture_says_how_to_give_one(tmp_path):
    from lens_megatron.checkpoint.conversion import convert_megatron_to_hf
    from lens_megatron.checkpoint.model_io import CheckpointError

    (tmp_path / "ckpt").mkdir()
    with pytest.raises(CheckpointError, match="no lens_checkpoint.json"):
        convert_megatron_to_hf(tmp_path / "ckpt", tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_existing_output_is_never_overwritten(hf_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_hf_to_megatron(hf_models["llama"], out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"


def test_random_model_tool_writes_a_model_transformers_loads(tmp_path):
    arch = ModelArch(family="qwen2", vocab_size=150, hidden_size=32, ffn_hidden_size=64,
                     num_layers=2, num_attention_heads=4, num_query_groups=2, qkv_bias=True)
    out = write_random_hf_model(tmp_path / "random", arch, "bf16", seed=1, max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model.config.num_key_value_heads == 2
    bias = model.model.layers[1].self_attn.q_proj.bias
    assert bias.abs().sum() > 0  # biases and norms are random too
