"""The sbatch generator (lens_megatron.launch): script contents, option errors, and the script's
shell logic (quoting, rendezvous variables, signal forwarding, requeue) run under bash with fake
``srun``/``scontrol`` — no SLURM needed. tests/test_slurm.py runs the scripts on a real cluster."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lens_megatron.config import load_config
from lens_megatron.launch import LaunchError, SlurmOptions, main, render_sbatch
from lens_megatron.preemption import PREEMPTED_EXIT_CODE

GPU_OVERRIDES = ["trainer.num_nodes=2", "trainer.devices=8", "rollout.prompts_per_step=16",
                 "rollout.group_size=8", "model.micro_batch_size=1"]


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"data: {{task: arithmetic}}\nexp_manager: {{exp_dir: {tmp_path}/runs, "
                    "name: demo}\n")
    return path


def _render(config, overrides=GPU_OVERRIDES, **opts):
    cfg = load_config(config, overrides)
    return render_sbatch(cfg, config, overrides, SlurmOptions(**opts))


def test_gpu_multi_node_script(config, tmp_path):
    text = _render(config, env={"NCCL_IB_HCA": "mlx5", "NCCL_DEBUG": "WARN"},
                   partition="gpu", time="04:00:00", chdir=str(tmp_path))
    header = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert header[:4] == ["#SBATCH --job-name=demo", "#SBATCH --nodes=2",
                          "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"]
    for line in ["#SBATCH --partition=gpu", "#SBATCH --time=04:00:00",
                 f"#SBATCH --output={tmp_path}/runs/demo/slurm/slurm-%j.out",
                 "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue",
                 f"#SBATCH --chdir={tmp_path}"]:
        assert line in header
    assert f"PYTHON={sys.executable}" in text
    assert "export NCCL_IB_HCA=mlx5" in text and "export NCCL_DEBUG=WARN" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in text
    assert 'MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"' in text
    assert "srun --ntasks-per-node=8 --wait=300" in text
    assert f'"$PYTHON" -m lens_megatron.cli train \\\n    --config {config} ' + " ".join(
        GPU_OVERRIDES) in text
    assert f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}" in text
    assert "trap 'on_signal USR1' USR1" in text and "trap 'on_signal TERM' TERM" in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_cpu_script_requests_no_gpus(config):
    text = _render(config, ["trainer.devices=2", "rollout.group_size=4", "model.micro_batch_size=2"],
                   cpu=True, cpus_per_task=1)
    assert "--gpus-per-node" not in text
    assert "#SBATCH --ntasks-per-node=2" in text and "#SBATCH --cpus-per-task=1" in text


def test_container_and_torchrun(config):
    text = _render(config, launcher="torchrun", container_image="nvcr.io/nvidia/pytorch:25.01",
                   container_mounts="/lustre:/lustre", signal="USR2", signal_seconds=300)
    assert "PYTHON=python" in text  # the venv of the login node is not in the image
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --signal=B:USR2@300" in text and "trap 'on_signal USR2' USR2" in text
    assert ("srun --ntasks-per-node=1 --wait=300 --container-image=nvcr.io/nvidia/pytorch:25.01 "
            "--container-mounts=/lustre:/lustre --container-workdir=") in text
    for piece in ['"$PYTHON" -m torch.distributed.run', '--nnodes="$SLURM_JOB_NUM_NODES"',
                  "--nproc-per-node=8", "--rdzv-backend=c10d",
                  '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
                  "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2",
                  "\n    -m lens_megatron.cli train \\\n    --config"]:
        assert piece in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_blanks_are_quoted_in_directives(config):
    text = _render(config, job_name="my run", log_dir="/tmp/with space")
    assert '#SBATCH --job-name="my run"' in text
    assert '#SBATCH --output="/tmp/with space/slurm-%j.out"' in text


@pytest.mark.parametrize("opts,match", [
    ({"launcher": "mpirun"}, "--launcher"),
    ({"env": {"1BAD": "x"}}, "--env '1BAD'"),
    ({"signal": "SIGNOPE"}, "--signal"),
    ({"signal": "TERM"}, "--signal SIGTERM"),
    ({"cpu": True, "gpus_per_node": 4}, "--cpu and --gpus-per-node"),
    ({"sbatch_args": ["exclusive"]}, "--sbatch-arg"),
    ({"job_name": 'say "hi"'}, "job-name"),
])
def test_bad_options_name_the_option(config, opts, match):
    with pytest.raises(LaunchError, match=match):
        _render(config, **opts)


def _main(config, *args):
    try:
        return main(["--config", str(config), *args])
    except SystemExit as exc:
        return exc.code


def test_main_writes_script_and_log_dir(config, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    assert _main(config, *GPU_OVERRIDES, "--env", "NCCL_SOCKET_IFNAME", "--env", "A=b c") == 0
    script = tmp_path / "runs" / "demo" / "slurm" / "demo.sbatch"
    assert f"wrote {script}" in capsys.readouterr().out
    text = script.read_text()
    assert "export NCCL_SOCKET_IFNAME=ib0" in text and "export A='b c'" in text
    assert os.access(script, os.X_OK) and script.parent.is_dir()


@pytest.mark.parametrize("args,message", [
    (["exp_manager.resume=never"], "exp_manager.resume=never"),
    (["trainer.devices=3"], "model.micro_batch_size"),
    (["trainer.nope=1"], "nope"),
    (["--env", "LENS_SURELY_UNSET_VAR"], "--env LENS_SURELY_UNSET_VAR"),
])
def test_main_reports_errors(config, capsys, args, message, monkeypatch):
    monkeypatch.delenv("LENS_SURELY_UNSET_VAR", raising=False)
    assert _main(config, *args) == 2
    assert message in capsys.readouterr().err


# -- the script's shell logic, with fake srun/scontrol ------------------------------------------
FAKE_SRUN = """#!/bin/bash
"{python}" -c 'import json, os, sys
print("ARGV " + json.dumps(sys.argv[1:]))
print("ENV " + json.dumps({{k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "NCCL_IB_HCA")}}))' "$@"
if [ -n "${{FAKE_READY:-}}" ]; then
    trap 'echo "fake srun got USR1"; exit {code}' USR1
    trap 'echo "fake srun got TERM"; exit {code}' TERM
    touch "$FAKE_READY"
    while :; do sleep 0.05; done
fi
exit "${{FAKE_RC:-0}}"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1" = show ]; then echo node-a; echo node-b; exit 0; fi
echo "$@" >> "$FAKE_SCONTROL_LOG"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable, code=PREEMPTED_EXIT_CODE))
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="node-[a-b]", SLURM_RESTART_COUNT="0",
               FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"))
    return env


def _script(config, tmp_path, overrides):
    text = _render(config, overrides, env={"NCCL_IB_HCA": "mlx5"}, chdir=str(tmp_path))
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    return path


def test_script_passes_overrides_verbatim(config, tmp_path, fake_slurm):
    overrides = GPU_OVERRIDES + ['data.prompt_template=it\'s a "run" $HOME {problem}']
    path = _script(config, tmp_path, overrides)
    res = subprocess.run(["bash", str(path)], env=dict(fake_slurm, FAKE_RC="3"),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3, res.stderr  # the step's exit code is the job's
    lines = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])
             for line in res.stdout.splitlines() if line.startswith(("ARGV", "ENV"))}
    assert lines["ARGV"] == ["--ntasks-per-node=8", "--wait=300", sys.executable, "-m",
                             "lens_megatron.cli", "train", "--config", str(config), *overrides]
    assert lines["ENV"] == {"MASTER_ADDR": "node-a", "MASTER_PORT": str(20000 + 4242),
                            "NCCL_IB_HCA": "mlx5"}
    assert not (tmp_path / "scontrol.log").exists()


def _run_and_signal(path, env, tmp_path, sig):
    ready = tmp_path / "ready"
    proc = subprocess.Popen(["bash", str(path)], env=dict(env, FAKE_READY=str(ready)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_usr1_is_forwarded_and_requeues(config, tmp_path, fake_slurm):
    rc, out = _run_and_signal(_script(config, tmp_path, GPU_OVERRIDES), fake_slurm, tmp_path,
                              signal.SIGUSR1)
    assert rc == 0, out
    assert "batch shell got SIGUSR1" in out and "fake srun got USR1" in out
    assert f"training step exited with code {PREEMPTED_EXIT_CODE}" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]


def test_term_is_forwarded_without_requeue(config, tmp_path, fake_slurm):
    rc, out = _run_and_signal(_script(config, tmp_path, GPU_OVERRIDES), fake_slurm, tmp_path,
                              signal.SIGTERM)
    assert rc == PREEMPTED_EXIT_CODE, out
    assert "batch shell got SIGTERM" in out and "fake srun got TERM" in out
    assert not (tmp_path / "scontrol.log").exists()


def test_example_script_is_what_the_generator_writes():
    """examples/slurm/lens_grpo.sbatch must not drift from the generator (see its header)."""
    repo = Path(__file__).resolve().parents[1]
    config = repo / "lens_megatron" / "configs" / "tiny_cpu.yaml"
    overrides = ["trainer.num_nodes=2", "trainer.devices=8", "model.micro_batch_size=8",
                 "exp_manager.exp_dir=/path/to/runs", "exp_manager.name=lens_grpo"]
    text = render_sbatch(load_config(config, overrides), config, overrides, SlurmOptions(
        chdir="/path/to/lens-megatron", python="/path/to/lens-megatron/.venv/bin/python",
        partition="gpu", time="04:00:00", cpus_per_task=8, sbatch_args=["--exclusive"],
        env={"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "ib0", "NCCL_DEBUG": "WARN"}))
    generated = text.replace(str(repo), "/path/to/lens-megatron").splitlines()
    example = (repo / "examples" / "slurm" / "lens_grpo.sbatch").read_text().splitlines()
    start = next(i for i, line in enumerate(example) if line.startswith("# Generated by"))
    assert example[start + 1:] == generated[2:]  # all but the shebang and the dated line
