"""Job-side helpers shared by tests/test_slurm.py (one node) and tests/test_multinode.py (two):
the run directory a lens-train job writes (``metrics.jsonl``, ``checkpoints/latest``, the SLURM
log), waiting for steps and requeues, and comparing metrics rows."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster

#: Metrics that measure the machine, not the training (excluded when runs are compared).
TIMING_PREFIXES = ("time/", "throughput/")


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def comparable(rows: list[dict]) -> list[dict]:
    """``rows`` without the timing metrics."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in rows]


def log_text(run: Path, job_id: int) -> str:
    path = run / "slurm" / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"<no log {path}>"


def latest_step(run: Path) -> int:
    name = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / name).is_dir(), f"latest names {name}, which does not exist"
    return int(name.split("_")[-1])


def wait_for_steps(cluster: SlurmCluster, run: Path, job_id: int, count: int,
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
        time.sleep(0.2)
    pytest.fail(f"job {job_id} wrote no {count} step(s) in {timeout:.0f}s:\n{log_text(run, job_id)}")


def wait_requeued(cluster: SlurmCluster, run: Path, job_id: int, timeout: float,
                  restarts: int = 1) -> dict[str, str]:
    """Wait until the job is pending again after its ``restarts``-th requeue."""
    deadline = time.monotonic() + timeout
    info = cluster.job(job_id)
    while not (info.get("JobState") == "PENDING" and info.get("Restarts") == str(restarts)):
        if time.monotonic() > deadline or info.get("JobState") in ("COMPLETED", "FAILED",
                                                                   "CANCELLED"):
            pytest.fail(f"job {job_id} not requeued ({info.get('JobState')}, "
                        f"Restarts={info.get('Restarts')}):\n{log_text(run, job_id)}")
        time.sleep(0.2)
        info = cluster.job(job_id)
    return info


def release(cluster: SlurmCluster, job_id: int) -> None:
    """Start a requeued job now instead of after its BeginTime hold.

    slurmd refuses a relaunch in the same second as the revocation of the old instance's
    credential ("Job credential revoked" -> FAILED; seen here once when released ~0.1 s after
    the requeue). SLURM's own BeginTime hold (cred_expire, 120 s) exists for this; wait a bit.
    """
    time.sleep(3)
    cluster.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"])


def check_resumed(first: list[dict], final: list[dict]) -> None:
    """The requeued run continued right after the first run's last step, with no repeats."""
    steps = [r["step"] for r in final]
    assert final[: len(first)] == first
    first_steps = [r["step"] for r in first]
    assert first_steps == list(range(first_steps[0], first_steps[0] + len(first))), first_steps
    assert steps == list(range(steps[0], steps[0] + len(steps))), f"gap or repeat: {steps}"
