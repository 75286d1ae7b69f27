"""End-to-end SLURM on one node: a real cluster (munged + slurmctld + slurmd), scripts written
and submitted by ``lens-launch --submit`` (``tools/launch_slurm.py``), 2-task gloo jobs,
preemption by signal, requeue and resume, and the cap on requeues after failures.

These run a stand-in trainer (``STANDIN`` below) that honours the lens-train contract —
``metrics.jsonl``, ``checkpoints/step_<N>/`` + ``checkpoints/latest``, resume from ``latest``,
:mod:`lens_megatron.preemption` polled once per step, ``PREEMPTED_EXIT_CODE`` — with a real gloo
process group built from the SLURM environment but no model, so the SLURM mechanics are checked
in seconds. The real ``lens_megatron.cli train`` runs under SLURM in tests/test_multinode.py:
on one node (both layouts) and on two, through preemption, requeue and a lost node.
"""
from __future__ import annotations

import contextlib
import io
import json
import textwrap
import time
from pathlib import Path

import pytest

from lens_megatron.launch import main as launch_main

from slurm_cluster import SlurmCluster, SlurmUnavailable
from slurm_jobs import (check_resumed, latest_step, log_text, read_metrics, release,
                        wait_for_steps, wait_requeued)

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
    from omegaconf import OmegaConf
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
        cfg = OmegaConf.merge(OmegaConf.load(a.config), OmegaConf.from_dotlist(a.overrides))
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
        die_at = int(os.environ.get("STANDIN_RANK1_DIES_AT", "0"))
        for step in range(start, cfg.trainer.max_steps + 1):
            time.sleep(step_seconds)
            if rank == 1 and step == die_at:  # a lost task: SIGKILL, as by the OOM killer
                os.kill(os.getpid(), 9)
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
    """A running one-node cluster for this module; a machine where it cannot run fails here."""
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    started = time.monotonic()
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.fail(f"cannot run a SLURM cluster here: {exc}", pytrace=False)
    print(f"slurm cluster up in {time.monotonic() - started:.1f}s at {cluster.root}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(autouse=True)
def no_jobs_left(slurm):
    """A test that fails mid-job must not leave it running into the next test."""
    yield
    slurm.cancel_all()


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


def launch(cluster: SlurmCluster, config: Path, monkeypatch, *args: str) -> tuple[Path, int]:
    """``lens-launch --config CONFIG --cpu --submit ARGS`` in this process (what
    tools/launch_slurm.py runs), against ``cluster``; returns (script path, job id)."""
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    monkeypatch.chdir(config.parent)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert launch_main(["--config", str(config), "--cpu", "--submit", *args]) == 0
    lines = out.getvalue().strip().splitlines()
    return Path(lines[0].split()[1]), int(lines[-1].split()[-1])


def standin_args(tmp: Path, step_seconds: float) -> list[str]:
    program = tmp / "standin.py"
    program.write_text(STANDIN)
    return ["--entrypoint", f'"$PYTHON" {program}', "--env", f"STANDIN_STEP_SECONDS={step_seconds}"]


def preempt_and_release(cluster: SlurmCluster, run: Path, job_id: int,
                        timeout: float) -> list[dict]:
    """USR1 to the batch shell; wait for the requeue; release; return the first run's metrics."""
    assert cluster.run(["scancel", "--signal=USR1", "--batch", str(job_id)]).returncode == 0
    wait_requeued(cluster, run, job_id, timeout)
    first_run = read_metrics(run)
    release(cluster, job_id)
    return first_run


# -- stand-in trainer: the SLURM mechanics ------------------------------------------------
def test_two_task_job_runs_to_completion(slurm, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "runs", "standin", max_steps=4)
    run = tmp_path / "runs" / "standin"
    started = time.monotonic()
    script, job_id = launch(slurm, cfg, monkeypatch, *standin_args(tmp_path, 0.2))
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


def test_plain_scancel_saves_but_does_not_requeue(slurm, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "runs", "cancel", max_steps=200)
    run = tmp_path / "runs" / "cancel"
    _, job_id = launch(slurm, cfg, monkeypatch, *standin_args(tmp_path, 0.5))
    wait_for_steps(slurm, run, job_id, 1, timeout=120)
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


def test_torchrun_launcher_preempt_and_resume(slurm, tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "runs", "torchrun", max_steps=6)
    run = tmp_path / "runs" / "torchrun"
    script, job_id = launch(slurm, cfg, monkeypatch, "--launcher", "torchrun",
                            *standin_args(tmp_path, 0.5))
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "--nproc-per-node=2" in text
    wait_for_steps(slurm, run, job_id, 1, timeout=180)
    first = preempt_and_release(slurm, run, job_id, timeout=180)
    info = slurm.wait_job(job_id, timeout=240)
    log = log_text(run, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "launcher torchrun" in log and "preempted by SIGUSR1" in log
    final = read_metrics(run)
    check_resumed(first, final)
    assert [r["step"] for r in final] == list(range(1, 7))


def test_lost_task_requeues_at_most_failure_requeues_times(slurm, tmp_path, monkeypatch):
    """A task killed mid-run requeues the job (it resumes from its last checkpoint); the same
    failure again, once --failure-requeues is used up, fails the job instead of looping."""
    cfg = write_config(tmp_path / "cfg.yaml", tmp_path / "runs", "lost", max_steps=20)
    run = tmp_path / "runs" / "lost"
    _, job_id = launch(slurm, cfg, monkeypatch, *standin_args(tmp_path, 0.2), "--env",
                       "STANDIN_RANK1_DIES_AT=2", "--failure-requeues", "1", "--step-wait", "10")
    wait_requeued(slurm, run, job_id, timeout=120)
    log = log_text(run, job_id)
    assert "srun: error: " in log and "task 1: Killed" in log, log
    assert "training step failed with code 137" in log and "failure requeue 1 of 1" in log, log
    release(slurm, job_id)
    info = slurm.wait_job(job_id, timeout=120)
    log = log_text(run, job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", log
    assert info["ExitCode"] == "137:0", info
    assert "not requeueing: 1 failure requeue(s) of this job already" in log, log
    assert len((run / "slurm" / f"slurm-{job_id}.failures").read_text().splitlines()) == 1
