"""End-to-end SLURM: a real one-node cluster (munged + slurmctld + slurmd), scripts written by
``tools/launch_slurm.py``, 2-task gloo jobs, preemption by signal, requeue and resume.

The first tests run a stand-in trainer (``STANDIN`` below) that honours the lens-train contract —
``metrics.jsonl``, ``checkpoints/step_<N>/`` + ``checkpoints/latest``, resume from ``latest``,
:mod:`lens_megatron.preemption` polled once per step, ``PREEMPTED_EXIT_CODE`` — with a real gloo
process group built from the SLURM environment but no model, so the SLURM mechanics are checked
in seconds. The last tests run the real ``lens_megatron.cli train`` on the tiny default.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lens_megatron.preemption import PREEMPTED_EXIT_CODE

from slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "tools" / "launch_slurm.py"

STANDIN = textwrap.dedent('''
    """Stand-in trainer: the lens-train checkpoint/metrics/preemption contract, no model."""
    import argparse, json, os, sys, time
    from pathlib import Path
    from lens_megatron.preemption import PREEMPTED_EXIT_CODE, PreemptionHandler

    HANDLER = PreemptionHandler().install()  # first thing: a signal during imports must not kill

    import torch
    import torch.distributed as dist
    from lens_megatron.config import load_config
    from lens_megatron.parallel.initialize import init_process_group


    def save(ckpt, step, rank):
        d = ckpt / f"step_{step}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"rank_{rank}.json").write_text(json.dumps({"step": step}))
        dist.barrier()
        if rank == 0:
            (ckpt / "latest.tmp").write_text(d.name)
            os.replace(ckpt / "latest.tmp", ckpt / "latest")
        dist.barrier()


    def main():
        p = argparse.ArgumentParser()
        p.add_argument("--config", required=True)
        p.add_argument("overrides", nargs="*")
        a = p.parse_args()
        cfg = load_config(a.config, a.overrides)
        env = init_process_group(backend="gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        print(f"standin rank {rank}/{world} local {env.local_rank}/{env.local_world_size} "
              f"launcher {env.launcher} master {env.master_addr}:{env.master_port}", flush=True)
        run = Path(cfg.exp_manager.exp_dir) / cfg.exp_manager.name
        ckpt = run / "checkpoints"
        start = 1
        if (ckpt / "latest").exists():
            start = int((ckpt / "latest").read_text().strip().split("_")[1]) + 1
            print(f"standin rank {rank} resuming at step {start}", flush=True)
        step_seconds = float(os.environ["STANDIN_STEP_SECONDS"])
        for step in range(start, cfg.trainer.max_steps + 1):
            time.sleep(step_seconds)
            total = torch.tensor([float(rank + 1)])
            dist.all_reduce(total)
            if rank == 0:
                record = {"step": step, "world": world, "rank_sum": total.item(),
                          "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}
                with open(run / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\\n")
            stop = HANDLER.should_stop()
            if stop or step == cfg.trainer.max_steps:
                save(ckpt, step, rank)
            if stop:
                print(f"standin rank {rank} preempted by {HANDLER.reason} after step {step}",
                      flush=True)
                dist.destroy_process_group()
                sys.exit(PREEMPTED_EXIT_CODE)
        dist.destroy_process_group()


    if __name__ == "__main__":
        main()
''')


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster for this module; skipped (with the reason) if impossible."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    started = time.monotonic()
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"cannot run a SLURM cluster here: {exc}")
    print(f"slurm cluster up in {time.monotonic() - started:.1f}s at {cluster.root}")
    try:
        yield cluster
    finally:
        cluster.stop()


# -- helpers ------------------------------------------------------------------------------
def write_config(path: Path, exp_dir: Path, name: str, max_steps: int, **extra: dict) -> Path:
    """A tiny-default config for 1 node x 2 processes."""
    sections = {
        "trainer": {"num_nodes": 1, "devices": 2, "max_steps": max_steps, "progress_bar": False},
        "data": {"task": "arithmetic"},
        "exp_manager": {"exp_dir": str(exp_dir), "name": name, "resume": "auto"},
    }
    for key, values in extra.items():
        sections.setdefault(key, {}).update(values)
    path.write_text(json.dumps(sections))  # JSON is YAML
    return path


def launch(cluster: SlurmCluster, config: Path, *args: str) -> tuple[Path, int]:
    """Run tools/launch_slurm.py --submit; return (script path, job id)."""
    res = subprocess.run([sys.executable, str(LAUNCH), "--config", str(config), "--cpu",
                          "--submit", *args], cwd=config.parent, env=cluster.env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.strip().splitlines()
    script = Path(lines[0].split()[1])
    job_id = int(lines[-1].split()[-1])
    return script, job_id


def standin_args(tmp: Path, step_seconds: float) -> list[str]:
    program = tmp / "standin.py"
    program.write_text(STANDIN)
    return ["--entrypoint", f'"$PYTHON" {program}', "--env", f"STANDIN_STEP_SECONDS={step_seconds}"]


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for_steps(run: Path, cluster: SlurmCluster, job_id: int, count: int,
                   timeout: float) -> list[dict]:
    """Wait until metrics.jsonl has ``count`` records (fail early if the job ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = read_metrics(run)
        if len(records) >= count:
            return records
        state = cluster.job(job_id).get("JobState")
        if state not in ("PENDING", "RUNNING", "CONFIGURING"):
            pytest.fail(f"job {job_id} is {state} before writing {count} step(s):\n"
                        f"{log_text(run, job_id)}")
        time.sleep(0.5)
    pytest.fail(f"job {job_id} wrote no {count} step(s) in {timeout:.0f}s:\n{log_text(run, job_id)}")


def log_text(run: Path, job_id: int) -> str:
    path = run / "slurm" / f"slurm-{job_id}.out"
    return path.read_text() if path.exists() else f"<no log {path}>"


def latest_step(run: Path) -> int:
    name = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / name).is_dir(), f"latest names {name}, which does not exist"
    return int(name.split("_")[-1])


def preempt_and_release(cluster: SlurmCluster, run: Path, job_id: int,
                        timeout: float) -> tuple[list[dict], dict]:
    """USR1 to the batch shell; wait for the requeue; return first-run metrics and job info."""
    assert cluster.run(["scancel", "--signal=USR1", "--batch", str(job_id)]).returncode == 0
    deadline = time.monotonic() + timeout
    info = cluster.job(job_id)
    while not (info.get("JobState") == "PENDING" and info.get("Restarts") == "1"):
        if time.monotonic() > deadline or info.get("JobState") in ("COMPLETED", "FAILED",
                                                                   "CANCELLED"):
            pytest.fail(f"job {job_id} not requeued ({info.get('JobState')}, "
                        f"Restarts={info.get('Restarts')}):\n{log_text(run, job_id)}")
        time.sleep(0.5)
        info = cluster.job(job_id)
    first_run = read_metrics(run)
    # slurmd refuses a relaunch in the same second as the revocation of the old instance's
    # credential ("Job credential revoked" -> FAILED; seen here once when released ~0.1 s after
    # the requeue). SLURM's own BeginTime hold (cred_expire, 120 s) exists for this; wait a bit.
    time.sleep(3)
    cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])
    return first_run, info


def check_resumed(first: list[dict], final: list[dict]) -> None:
    """The requeued run continued right after the first run's last step, with no repeats."""
    steps = [r["step"] for r in final]
    assert final[: len(first)] == first
    first_steps = [r["step"] for r in first]
    assert first_steps == list(range(first_steps[0], first_steps[0] + len(first))), first_steps
    assert steps == list(range(steps[0], steps[0] + len(steps))), f"gap or repeat: {steps}"


# -- stand-in trainer: the SLURM mechanics ------------------------------------------------
def test_two_task_job_runs_to_completion(slurm, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "runs", "standin", max_steps=4)
    run = tmp_path / "runs" / "standin"
    started = time.monotonic()
    script, job_id = launch(slurm, cfg, *standin_args(tmp_path, 0.2))
    info = slurm.wait_job(job_id, timeout=180)
    log = log_text(run, job_id)
    print(f"stand-in job {job_id}: {info['JobState']} in {time.monotonic() - started:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "#SBATCH --ntasks-per-node=2" in script.read_text()
    assert "--gpus-per-node" not in script.read_text()
    for rank in (0, 1):
        assert f"standin rank {rank}/2 local {rank}/2 launcher slurm master {slurm.node}:" in log
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["world"] == 2 and r["rank_sum"] == 3.0 and r["restart"] == 0 for r in records)
    assert latest_step(run) == 4
    assert sorted(p.name for p in (run / "checkpoints" / "step_4").iterdir()) == [
        "rank_0.json", "rank_1.json"]


def test_usr1_saves_requeues_and_resumes(slurm, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "runs", "preempt", max_steps=10)
    run = tmp_path / "runs" / "preempt"
    started = time.monotonic()
    _, job_id = launch(slurm, cfg, *standin_args(tmp_path, 0.5))
    wait_for_steps(run, slurm, job_id, 1, timeout=120)
    first, _ = preempt_and_release(slurm, run, job_id, timeout=120)
    saved = latest_step(run)
    assert first and first[-1]["step"] == saved < 10, (first, saved)
    info = slurm.wait_job(job_id, timeout=180)
    log = log_text(run, job_id)
    print(f"preempted job {job_id}: saved at step {saved}, {info['JobState']} after "
          f"{time.monotonic() - started:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "batch shell got SIGUSR1" in log
    assert f"training step exited with code {PREEMPTED_EXIT_CODE}" in log
    assert "preempted by SIGUSR1" in log and "requeueing job" in log
    assert f"job {job_id} restart 1 on" in log  # SLURM_RESTART_COUNT=1 in the rerun
    assert f"standin rank 0 resuming at step {saved + 1}" in log
    final = read_metrics(run)
    check_resumed(first, final)
    assert [r["step"] for r in final] == list(range(1, 11))
    assert {r["restart"] for r in final[len(first):]} == {1}
    assert latest_step(run) == 10


def test_plain_scancel_saves_but_does_not_requeue(slurm, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "runs", "cancel", max_steps=200)
    run = tmp_path / "runs" / "cancel"
    _, job_id = launch(slurm, cfg, *standin_args(tmp_path, 0.5))
    wait_for_steps(run, slurm, job_id, 1, timeout=120)
    slurm.run(["scancel", str(job_id)])
    info = slurm.wait_job(job_id, timeout=120)
    deadline = time.monotonic() + 30  # the trainer may still be writing when the state flips
    while not (run / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    log = log_text(run, job_id)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log
    assert "preempted by SIGTERM" in log, log
    assert latest_step(run) == read_metrics(run)[-1]["step"]
    assert "requeueing" not in log


def test_torchrun_launcher_preempt_and_resume(slurm, tmp_path):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "runs", "torchrun", max_steps=6)
    run = tmp_path / "runs" / "torchrun"
    script, job_id = launch(slurm, cfg, "--launcher", "torchrun", *standin_args(tmp_path, 0.5))
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "--nproc-per-node=2" in text
    wait_for_steps(run, slurm, job_id, 1, timeout=180)
    first, _ = preempt_and_release(slurm, run, job_id, timeout=180)
    info = slurm.wait_job(job_id, timeout=240)
    log = log_text(run, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "launcher torchrun" in log and "preempted by SIGUSR1" in log
    final = read_metrics(run)
    check_resumed(first, final)
    assert [r["step"] for r in final] == list(range(1, 7))


# -- the real trainer (lens_megatron.cli train) on the tiny default ------------------------------
TINY = REPO / "lens_megatron" / "configs" / "tiny_cpu.yaml"
TINY_OVERRIDES = ["trainer.num_nodes=1", "trainer.devices=2", "rollout.prompts_per_step=2",
                  "rollout.group_size=4", "rollout.max_new_tokens=16", "model.micro_batch_size=4",
                  "trainer.progress_bar=false", "trainer.save_every=0"]


@pytest.fixture(scope="module")
def real_trainer():
    """Skip (with the reason) while ``python -m lens_megatron.cli train`` is not usable."""
    if not TINY.exists():
        pytest.skip(f"the tiny default config {TINY} does not exist yet")
    res = subprocess.run([sys.executable, "-m", "lens_megatron.cli", "train", "--help"],
                         capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        pytest.skip(f"`python -m lens_megatron.cli train --help` failed ({res.returncode}):\n"
                    f"{res.stderr[-2000:]}")


def launch_tiny(cluster: SlurmCluster, tmp: Path, name: str, max_steps: int) -> tuple[Path, int]:
    overrides = [*TINY_OVERRIDES, f"trainer.max_steps={max_steps}",
                 f"exp_manager.exp_dir={tmp / 'runs'}", f"exp_manager.name={name}"]
    res = subprocess.run([sys.executable, str(LAUNCH), "--config", str(TINY), *overrides, "--cpu",
                          "--submit"], cwd=tmp, env=cluster.env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return tmp / "runs" / name, int(res.stdout.strip().splitlines()[-1].split()[-1])


def test_real_trainer_two_tasks(slurm, real_trainer, tmp_path):
    started = time.monotonic()
    run, job_id = launch_tiny(slurm, tmp_path, "tiny2", max_steps=3)
    info = slurm.wait_job(job_id, timeout=600)
    log = log_text(run, job_id)
    print(f"real trainer job {job_id}: {info['JobState']} in {time.monotonic() - started:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "training step exited with code 0" in log
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3], log
    assert latest_step(run) == 3
    assert (run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()).is_dir()


def test_real_trainer_preempt_requeue_resume(slurm, real_trainer, tmp_path):
    started = time.monotonic()
    steps = 30  # ~0.3-1 s each here: long enough for the signal to land mid-run
    run, job_id = launch_tiny(slurm, tmp_path, "tiny_preempt", max_steps=steps)
    wait_for_steps(run, slurm, job_id, 1, timeout=600)
    first, _ = preempt_and_release(slurm, run, job_id, timeout=600)
    saved = latest_step(run)
    log = log_text(run, job_id)
    assert f"training step exited with code {PREEMPTED_EXIT_CODE}" in log, log
    assert first and first[-1]["step"] == saved < steps, (first, saved, log)
    info = slurm.wait_job(job_id, timeout=600)
    log = log_text(run, job_id)
    print(f"real trainer preempted job {job_id}: saved at step {saved}, {info['JobState']} "
          f"after {time.monotonic() - started:.1f}s")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert f"job {job_id} restart 1 on" in log
    final = read_metrics(run)
    check_resumed(first, final)
    assert [r["step"] for r in final] == list(range(1, steps + 1)), log
    assert latest_step(run) == steps
