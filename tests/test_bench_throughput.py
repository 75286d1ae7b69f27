"""lens-bench smoke test: real steps at tiny scale; JSON fields present, numbers positive
and consistent."""
import json
import os

import pytest

from lens_megatron.parallel.spawn import run_in_processes

pytestmark = pytest.mark.slow

TINY = os.path.join(os.path.dirname(__file__), "..", "lens_megatron", "configs", "tiny_cpu.yaml")


def bench_worker(out, exp_dir):
    import torch.distributed as dist

    from lens_megatron.bench.throughput import main

    dist.destroy_process_group()  # lens-bench initialises its own (single) process group
    return main(["--config", TINY, "--steps", "2", "--warmup", "1", "--output", out,
                 "--compare", "--fixed-length", "rollout.prompts_per_step=2",
                 "rollout.group_size=4", "rollout.max_new_tokens=8", "model.micro_batch_size=8",
                 "reward.num_workers=0", f"exp_manager.exp_dir={exp_dir}"])


def test_bench_json_is_complete_and_consistent(tmp_path):
    out = tmp_path / "bench.json"
    assert run_in_processes(bench_worker, 1, (str(out), str(tmp_path / "runs")))[0] == 0
    report = json.loads(out.read_text())
    assert report["world_size"] == 1 and report["model_params"] > 0
    assert {r["estimator"] for r in report["results"]} == {"grpo", "lens"}
    for result in report["results"]:
        stages = result["stages"]
        for stage in ("rollout", "old_logprobs", "lens_stage", "fwd_bwd", "optimizer", "step"):
            assert stages[stage]["median_s"] > 0, stage
        for stage in ("rollout", "old_logprobs", "fwd_bwd"):
            assert stages[stage]["tokens_per_s"] > 0 and stages[stage]["model_tflops_per_s"] > 0
            assert stages[stage]["mfu"] is None  # no peak on a CPU
        parts = sum(stages[s]["median_s"] for s in ("rollout", "old_logprobs", "fwd_bwd"))
        assert parts <= stages["step"]["median_s"] * 1.5
        assert 0 < result["lens_stage_share_of_step"] < 0.5
        # Fixed length: every sequence generated exactly max_new_tokens tokens.
        gen = stages["rollout"]["tokens_per_s"] * stages["rollout"]["median_s"]
        assert gen == pytest.approx(2 * 4 * 8, rel=1e-6)
