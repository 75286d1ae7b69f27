"""Two SLURM nodes on one machine (tests/slurm_netns.py: slurmctld and two slurmd, each in its own
network/UTS/mount namespace, a bridge and veth pairs made here): the real trainer on the tiny
default, in batch scripts written by tools/launch_slurm.py, across the nodes.

* 2 nodes x 1 task (DP=2) and 2 nodes x 2 tasks (TP=2 inside a node, DP=2 across): rendezvous at
  the first host of SLURM_JOB_NODELIST; metrics equal the same layout run on one node.
* SIGUSR1 to the batch shell, and SIGTERM to the whole job (``scontrol requeue``, what scheduler
  preemption does): save, requeue, resume — and the metrics still equal the uninterrupted run.
* One node's processes killed mid-step: the survivors exit naming the node, the job requeues
  within trainer.timeout_minutes, and resumes from the previous checkpoint.
* A node down at submit time: ``--submit`` refuses with the node and its reason; nothing queued.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lens_megatron.launch import main as launch_main
from lens_megatron.parallel.env import PEER_LOST_EXIT_CODE
from lens_megatron.preemption import PREEMPTED_EXIT_CODE

from slurm_cluster import SlurmUnavailable
from slurm_jobs import (check_resumed, comparable, latest_step, log_text, read_metrics, release,
                        wait_for_steps, wait_requeued)
from slurm_netns import NetnsSlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.multinode, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "tools" / "launch_slurm.py"
TINY = REPO / "lens_megatron" / "configs" / "tiny_cpu.yaml"
STEPS = 6
TIMEOUT_MINUTES = 1
TINY_OVERRIDES = [
    "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=16",
    "model.micro_batch_size=4", "trainer.progress_bar=false", "trainer.measure_update_effect=false",
    "reward.num_workers=0", f"trainer.max_steps={STEPS}",
    f"trainer.timeout_minutes={TIMEOUT_MINUTES}"]
# Saves cost seconds of CPU each. Uninterrupted and signalled runs save only at the end and on
# the signal (so a resume can only come from the preemption save); the killed run saves every
# 2 steps, so that a checkpoint before the kill exists.
SAVE_EVERY_FOR_KILL = 2
LAYOUTS = {"dp2": (1, ["model.tensor_model_parallel_size=1"]),  # tasks per node x nodes = 2
           "tp2dp2": (2, ["model.tensor_model_parallel_size=2"])}  # 4 ranks


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The two-node cluster; a machine where it cannot be built fails here, saying why."""
    c = NetnsSlurmCluster(tmp_path_factory.mktemp("slurm2"), nodes=2, cpus_per_node=4)
    started = time.monotonic()
    try:
        c.start()
    except SlurmUnavailable as exc:
        pytest.fail(f"cannot run the two-node SLURM cluster here: {exc}", pytrace=False)
    print(f"two-node cluster up in {time.monotonic() - started:.1f}s at {c.root}")
    try:
        yield c
    finally:
        c.stop()
    left = [ns for ns in c.namespaces.values() if Path(f"/run/netns/{ns}").exists()]
    assert not left, f"namespaces left after stop: {left}"


@pytest.fixture(autouse=True)
def no_jobs_left(cluster):
    """A test that fails mid-job must not leave it running into the next test."""
    yield
    cluster.cancel_all()


def overrides(run_dir: Path, name: str, layout: str, nodes: int, save_every: int = 0,
              ) -> list[str]:
    per_node, extra = LAYOUTS[layout]
    devices = per_node * 2 // nodes  # the same world size on one node as on two
    return [*TINY_OVERRIDES, *extra, f"trainer.num_nodes={nodes}", f"trainer.devices={devices}",
            f"trainer.save_every={save_every}", f"exp_manager.exp_dir={run_dir}",
            f"exp_manager.name={name}"]


def generate(tmp: Path, name: str, layout: str, nodes: int, save_every: int = 0,
             ) -> tuple[Path, Path]:
    """Write the batch script with lens-launch (in this process); returns (script, run dir)."""
    script = tmp / f"{name}.sbatch"
    args = ["--config", str(TINY), *overrides(tmp / "runs", name, layout, nodes, save_every),
            "--cpu",
            "--chdir", str(tmp), "--output", str(script), "--step-wait", "30"]
    assert launch_main(args) == 0
    return script, tmp / "runs" / name


def finish(cluster, run: Path, job_id: int, timeout: float = 240) -> tuple[dict, str]:
    info = cluster.wait_job(job_id, timeout=timeout)
    return info, log_text(run, job_id)


@pytest.fixture(scope="module")
def one_node(cluster, tmp_path_factory):
    """Both layouts run to the end on ONE node of the cluster (submitted together)."""
    tmp = tmp_path_factory.mktemp("one_node")
    jobs = {}
    for layout in LAYOUTS:
        script, run = generate(tmp, f"ref_{layout}", layout, nodes=1)
        jobs[layout] = (run, cluster.sbatch(script))
    rows = {}
    for layout, (run, job_id) in jobs.items():
        info, log = finish(cluster, run, job_id)
        assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "1", log
        rows[layout] = read_metrics(run)
        assert [r["step"] for r in rows[layout]] == list(range(1, STEPS + 1)), log
    return rows


def kill_node_processes(cluster, node: str, job_id: int) -> list[int]:
    """SIGKILL every process of the job on ``node`` (trainer, its checkpoint writer, ...)."""
    pids = cluster.job_pids(node, job_id)
    assert pids, f"no process of job {job_id} found on {node}"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def preempt_and_finish(cluster, run, job_id: int, signal_command: list[str], first_step_timeout):
    """After the first step: ``signal_command``, the requeue, the resumed run to the end.
    Returns (metrics before, step saved, final job info, log, metrics after)."""
    wait_for_steps(cluster, run, job_id, 1, timeout=first_step_timeout)
    cluster.run(signal_command)
    wait_requeued(cluster, run, job_id, timeout=120)
    first, saved = read_metrics(run), latest_step(run)
    release(cluster, job_id)
    info, log = finish(cluster, run, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert f"training step exited with code {PREEMPTED_EXIT_CODE}" in log
    assert first[-1]["step"] == saved < STEPS and f"at step {saved}" in log, (saved, log)
    final = read_metrics(run)
    check_resumed(first, final)
    return first, saved, info, log, final


# -- 2 nodes x 1 task, DP=2: generated and submitted by tools/launch_slurm.py; SIGUSR1 -----------
def test_two_nodes_dp2_usr1_requeue_resumes_to_the_one_node_metrics(cluster, one_node, tmp_path):
    started = time.monotonic()
    res = subprocess.run(cluster.command(
        [sys.executable, str(LAUNCH), "--config", str(TINY),
         *overrides(tmp_path / "runs", "dp2", "dp2", nodes=2), "--cpu", "--submit",
         "--chdir", str(tmp_path), "--step-wait", "30"]),
        env=cluster.env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = int(res.stdout.strip().splitlines()[-1].split()[-1])
    run = tmp_path / "runs" / "dp2"
    text = (run / "slurm" / "dp2.sbatch").read_text()
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text

    first, saved, info, log, final = preempt_and_finish(
        cluster, run, job_id, ["scancel", "--signal=USR1", "--batch", str(job_id)], 180)
    print(f"2x1 job {job_id}: USR1 after step {saved}, {info['JobState']} after "
          f"{time.monotonic() - started:.1f}s")
    assert f"job {job_id} restart 0 on node[1-2]; master node1:" in log
    for rank, node in ((0, "node1"), (1, "node2")):
        assert f"rank {rank}/2 on {node} via slurm (gloo), rendezvous node1:" in log, log
    assert "batch shell got SIGUSR1" in log and "requeueing job" in log
    assert f"job {job_id} restart 1 on node[1-2]" in log
    assert comparable(final) == comparable(one_node["dp2"])


# -- 2 nodes x 2 tasks, TP=2 inside a node, DP=2 across; SIGTERM to the whole job -------------------
def test_two_nodes_tp2_dp2_sigterm_requeue_resumes_to_the_one_node_metrics(cluster, one_node,
                                                                           tmp_path):
    started = time.monotonic()
    script, run = generate(tmp_path, "tp2dp2", "tp2dp2", nodes=2)
    job_id = cluster.sbatch(script)
    # scontrol requeue: SIGTERM to every process, then the requeue
    first, saved, info, log, final = preempt_and_finish(
        cluster, run, job_id, ["scontrol", "requeue", str(job_id)], 240)
    print(f"2x2 job {job_id}: SIGTERM after step {saved}, {info['JobState']} after "
          f"{time.monotonic() - started:.1f}s")
    for rank, node in ((0, "node1"), (1, "node1"), (2, "node2"), (3, "node2")):
        assert f"rank {rank}/4 on {node} via slurm (gloo), rendezvous node1:" in log, log
    assert "batch shell got SIGTERM" in log and "requeueing" not in log
    assert comparable(final) == comparable(one_node["tp2dp2"])


# -- one node's processes killed mid-step ----------------------------------------------------------
def test_node_killed_mid_step_exits_naming_it_requeues_and_resumes(cluster, one_node, tmp_path):
    script, run = generate(tmp_path, "kill", "dp2", nodes=2, save_every=SAVE_EVERY_FOR_KILL)
    job_id = cluster.sbatch(script)
    wait_for_steps(cluster, run, job_id, 3, timeout=240)  # step_2 is saved, step 3 logged
    killed_at = time.monotonic()
    pids = kill_node_processes(cluster, "node2", job_id)
    wait_requeued(cluster, run, job_id, timeout=TIMEOUT_MINUTES * 60 + 30)
    took = time.monotonic() - killed_at
    log = log_text(run, job_id)
    print(f"killed {pids} on node2: job {job_id} requeued {took:.1f}s later")
    assert took < TIMEOUT_MINUTES * 60, log
    assert "srun: error: node2: task 1: Killed" in log, log
    assert "lens-train: rank 0 on node1 lost contact with node2 (10.199.0.12, rank 1)" in log, log
    assert f"exiting with code {PEER_LOST_EXIT_CODE}" in log
    assert "training step failed with code 137" in log and "failure requeue 1 of 2" in log, log
    assert len((run / "slurm" / f"slurm-{job_id}.failures").read_text().splitlines()) == 1
    saved = latest_step(run)
    release(cluster, job_id)
    info, log = finish(cluster, run, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert f"checkpoints/step_{saved:06d} at step {saved}" in log, log  # the previous one loads
    assert comparable(read_metrics(run)) == comparable(one_node["dp2"])


# -- a node down at submit time ----------------------------------------------------------------------
def test_node_down_at_submit_is_refused_not_queued(cluster, tmp_path):
    cluster.stop_daemon("slurmd-node2")
    reason = "lens test: node2 powered off"
    try:
        cluster.run(["scontrol", "update", "NodeName=node2", "State=DOWN", f"Reason={reason}"])
        started = time.monotonic()
        res = subprocess.run(cluster.command(
            [sys.executable, str(LAUNCH), "--config", str(TINY),
             *overrides(tmp_path / "runs", "down", "dp2", nodes=2), "--cpu", "--submit",
             "--chdir", str(tmp_path)]),
            env=cluster.env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        print(f"launcher refused in {took:.1f}s: {res.stderr.strip()}")
        assert res.returncode == 1, res.stdout + res.stderr
        assert "needs 2 node(s)" in res.stderr and "has 1 usable of 2" in res.stderr
        assert "node2 is down" in res.stderr and reason in res.stderr, res.stderr
        assert "submitted job" not in res.stdout
        assert cluster.run(["squeue", "-h", "-n", "down", "-o", "%i"]).stdout.strip() == ""
        # What the check prevents: the same script, queued anyway, just waits.
        job_id = cluster.sbatch(tmp_path / "runs" / "down" / "slurm" / "down.sbatch")
        time.sleep(2)
        info = cluster.job(job_id)
        print(f"queued anyway: {info['JobState']} (Reason={info.get('Reason')})")
        assert info["JobState"] == "PENDING", info
        cluster.run(["scancel", str(job_id)])
    finally:
        cluster.start_node("node2")
        cluster.run(["scontrol", "update", "NodeName=node2", "State=RESUME"], check=False)
        deadline = time.monotonic() + 60
        while cluster.node_states().get("node2", "").rstrip("*") != "idle":
            assert time.monotonic() < deadline, cluster.node_states()
            time.sleep(0.5)
