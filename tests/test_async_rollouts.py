"""Rollouts on separate ranks (rollout.placement: separate), one-step-off with a staleness bound,
in gloo processes launched the way torchrun/srun would (each role builds its own groups)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lens_megatron.parallel.spawn import find_free_port, run_in_processes
from trainer_helpers import full_weights, tiny_config

pytestmark = pytest.mark.slow

NO_GROUP = {"LENS_SPAWN_INIT_GROUP": "0"}
COMPARE = ("reward/", "groups/", "train/", "advantage/", "confidence/", "signal/", "response/",
           "mismatch/")


def _digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rollout_side_digests(worker) -> dict:
    """Wrap the worker's weight application: the digest of its model after each version."""
    from lens_megatron.models.gather import gather_full_state_dict

    seen = {}
    if not hasattr(worker.generator, "chunks"):  # vLLM: no megatron model to digest
        return seen
    apply = worker.generator.apply_weights
    arch = worker.cfg.model.arch

    def recording(stream):
        apply(stream)
        state = gather_full_state_dict(worker.generator.chunks, arch.tie_word_embeddings)
        for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if name in state:
                state[name] = state[name][: arch.vocab_size]
        seen[len(seen)] = _digest(state)

    worker.generator.apply_weights = recording
    return seen


def job_worker(tmp_dir, overrides, devices, steps):
    """One rank of a job: trains or generates, by its role."""
    from lens_megatron.parallel.initialize import initialize_from_config
    from lens_megatron.rollout.rollout_rank import build_rollout_worker
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, f"trainer.max_steps={steps}", "model.init_seed=3",
                      "optim.lr=0.05", "optim.adam_eps=1.0", *overrides, devices=devices)
    groups = initialize_from_config(cfg)
    if groups is not None and groups.roles.role == "rollout":
        worker = build_rollout_worker(cfg, groups)
        digests = _rollout_side_digests(worker)
        code = worker.run()
        worker.close()
        return {"role": "rollout", "code": code, "digests": list(digests.values())}
    trainer = LensTrainer(cfg, groups)
    sent = []
    if groups is not None:
        original = trainer.rollouts.weights_updated

        def recording(version):
            sent.append(_digest(full_weights(trainer)))
            return original(version)

        trainer.rollouts.weights_updated = recording
    trainer.run()
    trainer.close()
    with open(os.path.join(trainer.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"role": "trainer", "rows": rows, "weights": full_weights(trainer),
            "sent": sent, "start_digest": None}


def _same_rows(got, ref, label):
    assert len(got) == len(ref), label
    for a, b in zip(got, ref):
        for key, value in b.items():
            if key.startswith(COMPARE) and isinstance(value, (int, float)):
                assert a[key] == pytest.approx(value, rel=1e-6, abs=1e-7, nan_ok=True), (label, key)


def test_staleness_zero_on_separate_ranks_equals_the_colocated_loop(tmp_path):
    """rollout.max_staleness 0 with a rollout rank: the synchronous loop, sample for sample
    and weight for weight the colocated run (the weights reach the rollout rank bit-exact)."""
    ref = run_in_processes(job_worker, 1, (str(tmp_path / "colocated"), [], 1, 3))[0]
    sep = ["rollout.placement=separate", "rollout.num_ranks=1", "rollout.max_staleness=0"]
    trainer, rollout = run_in_processes(job_worker, 2, (str(tmp_path / "sep"), sep, 2, 3),
                                        env=NO_GROUP)
    assert trainer["role"] == "trainer" and rollout["role"] == "rollout" and rollout["code"] == 0
    _same_rows(trainer["rows"], ref["rows"], "staleness 0")
    for name, value in ref["weights"].items():
        assert torch.equal(trainer["weights"][name], value), name
    assert all(r["rollout/version_lag"] == 0.0 for r in trainer["rows"])
    # The initial weights come from the trainer's start broadcast (not in `sent`).
    assert rollout["digests"][1:len(trainer["sent"]) + 1] == trainer["sent"]


def test_staleness_one_lag_and_bit_exact_weights(tmp_path):
    sep = ["rollout.placement=separate", "rollout.num_ranks=1", "rollout.max_staleness=1"]
    trainer, rollout = run_in_processes(job_worker, 2, (str(tmp_path), sep, 2, 4), env=NO_GROUP)
    lags = [r["rollout/version_lag"] for r in trainer["rows"]]
    assert max(lags) <= 1.0 and lags[0] == 0.0 and 1.0 in lags, lags
    assert all("time/wait_for_rollout_s" in r and "time/rollout_wait_for_weights_s" in r
               for r in trainer["rows"])
    assert rollout["digests"][1:len(trainer["sent"]) + 1] == trainer["sent"]
    assert trainer["rows"][-1]["train/grad_norm"] > 0


# ----------------------------------------------------------------------------- real launches
def _launch(tmp_dir, steps, port, extra=(), world=2):
    """The job as srun would start it: one `lens-train` process per rank, rendezvous env set."""
    procs = []
    args = [sys.executable, "-m", "lens_megatron.cli", "train",
            "--config", "lens_megatron/configs/tiny_cpu.yaml", f"trainer.devices={world}",
            "rollout.placement=separate", "rollout.num_ranks=1", "rollout.max_staleness=1",
            f"trainer.max_steps={steps}", "trainer.save_every=1", "trainer.progress_bar=false",
            "reward.num_workers=0", "trainer.measure_update_effect=false",
            "rollout.prompts_per_step=4", "model.micro_batch_size=32",
            f"exp_manager.exp_dir={tmp_dir}", "exp_manager.name=run", *extra]
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True,
                                      cwd=os.path.dirname(os.path.dirname(__file__))))
    return procs


def _rows(tmp_dir):
    path = os.path.join(tmp_dir, "run", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _wait(procs, timeout=300):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append((p.returncode, out))
    return outs


def test_sigterm_during_an_overlapped_step_then_resume_reproduces_the_run(tmp_path):
    steps = 5
    full = _wait(_launch(str(tmp_path / "full"), steps, find_free_port()))
    assert [code for code, _ in full] == [0, 0], full[0][1][-3000:]
    procs = _launch(str(tmp_path / "cut"), steps, find_free_port())
    deadline = time.time() + 240
    while len(_rows(str(tmp_path / "cut"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    for p in procs:  # the whole job, as SLURM signals it
        p.send_signal(signal.SIGTERM)
    cut = _wait(procs)
    assert [code for code, _ in cut] == [75, 75], cut[0][1][-3000:]
    stopped_at = len(_rows(str(tmp_path / "cut")))
    assert 2 <= stopped_at < steps
    resumed = _wait(_launch(str(tmp_path / "cut"), steps, find_free_port()))
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1][-3000:]
    got, ref = _rows(str(tmp_path / "cut")), _rows(str(tmp_path / "full"))
    _same_rows(got, ref, "resumed")
    assert [r["rollout/weight_version"] for r in got] == [r["rollout/weight_version"] for r in ref]


def test_a_killed_rollout_rank_fails_the_job_with_its_name(tmp_path):
    procs = _launch(str(tmp_path), 50, find_free_port(), extra=["trainer.timeout_minutes=1"])
    deadline = time.time() + 240
    while len(_rows(str(tmp_path))) < 1 and time.time() < deadline:
        time.sleep(0.2)
    start = time.time()
    procs[1].kill()
    out, _ = procs[0].communicate(timeout=120)
    code = procs[0].returncode
    procs[1].wait()
    assert code not in (0, None) and time.time() - start < 60
    assert "rollout rank 0 (global rank 1)" in out, out[-3000:]


SMALL_BUCKETS = 64 << 10  # bytes: the tiny model's weights in several buckets


def failing_refit_worker(tmp_dir):
    """A job whose rollout rank fails while applying the second weight version."""
    from lens_megatron.parallel.initialize import initialize_from_config
    from lens_megatron.rollout.rollout_rank import build_rollout_worker
    from lens_megatron.trainer import LensTrainer

    cfg = tiny_config(tmp_dir, "trainer.max_steps=3", "rollout.placement=separate",
                      "rollout.num_ranks=1", "rollout.max_staleness=0",
                      "trainer.timeout_minutes=1", devices=2)
    groups = initialize_from_config(cfg)
    if groups.roles.role == "rollout":
        worker = build_rollout_worker(cfg, groups)
        apply, applied = worker.generator.apply_weights, []

        def breaking(stream):
            if applied:
                next(iter(stream))  # part of the version taken, then the refit breaks
                raise ValueError("refit broke on purpose")
            applied.append(1)
            apply(stream)

        worker.generator.apply_weights = breaking
        worker.receiver.bucket_bytes = SMALL_BUCKETS  # many broadcasts per version
        try:
            worker.run()
        except ValueError as exc:
            return {"role": "rollout", "error": str(exc)}
        return {"role": "rollout", "error": None}
    trainer = LensTrainer(cfg, groups)
    trainer.rollouts.broadcaster.bucket_bytes = SMALL_BUCKETS
    try:
        trainer.run()
    except Exception as exc:  # noqa: BLE001 - what the trainer reports is under test
        return {"role": "trainer", "error": f"{type(exc).__name__}: {exc}"}
    return {"role": "trainer", "error": None}


def test_a_rollout_rank_failing_in_a_refit_fails_the_job_with_its_name(tmp_path):
    """The failure arrives while the trainer is inside the weight broadcast: the rollout rank
    finishes that version's collectives, then reports; the trainer names it, no hang."""
    start = time.time()
    trainer, rollout = run_in_processes(failing_refit_worker, 2, (str(tmp_path),), env=NO_GROUP,
                                        timeout=240)
    assert time.time() - start < 200
    assert rollout == {"role": "rollout", "error": "refit broke on purpose"}
    assert trainer["role"] == "trainer" and trainer["error"] is not None
    assert "rollout rank 0 (global rank 1)" in trainer["error"], trainer["error"]
    assert "refit broke on purpose" in trainer["error"], trainer["error"]
