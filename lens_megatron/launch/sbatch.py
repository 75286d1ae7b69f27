"""Render, write and submit the sbatch script that runs ``lens-train`` on SLURM.

The job shape comes from the training config: ``trainer.num_nodes`` nodes with
``trainer.devices`` processes each. Two launchers:

* ``srun`` (default): one task per GPU, ``--ntasks-per-node=devices``; every task reads its rank
  from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (``lens_megatron.parallel.env``).
* ``torchrun``: one task per node running ``torch.distributed.run --nproc-per-node=devices`` with
  a c10d rendezvous on the first node; the workers read torchrun's RANK/WORLD_SIZE/LOCAL_RANK.

Preemption: ``#SBATCH --signal=B:USR1@<secs>`` warns the batch shell before the time limit (and
``scancel --signal=USR1 --batch JOB`` does the same by hand). The script's trap forwards the
signal to the running step, waits for it — the trainer saves a checkpoint and exits with
``PREEMPTED_EXIT_CODE`` — then runs ``scontrol requeue``. The requeued run (same job id,
``SLURM_RESTART_COUNT`` incremented, log appended) resumes from ``checkpoints/latest`` because
``exp_manager.resume=auto``. SIGTERM (``scancel``, scheduler preemption, time limit) is forwarded
too, but never requeues by itself: a cancelled job stays cancelled.

Failure: when a task is killed (the step exits > 128) or a rank lost contact with a peer
(``PEER_LOST_EXIT_CODE``: a process or node of the job died; the trainer's message names the
node, srun's names the task), the script requeues the job so that it resumes from its last
checkpoint — at most ``--failure-requeues`` times per job (counted in a file beside the log).
Any other non-zero exit (a bug, a configuration error) fails the job and is not retried.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ..parallel.env import PEER_LOST_EXIT_CODE
from ..preemption import PREEMPTED_EXIT_CODE, parse_signal

DEFAULT_ENTRYPOINT = '"$PYTHON" -m lens_megatron.cli train'
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class LaunchError(ValueError):
    """An invalid launcher option; the message names the option and the fix."""


@dataclass
class SlurmOptions:
    """Everything about the job that is not in the training config."""

    job_name: Optional[str] = None  # default: exp_manager.name
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None  # e.g. 04:00:00
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # per node, e.g. 0 (all) or 500G
    cpu: bool = False  # no GPU request (gloo)
    gpus_per_node: Optional[int] = None  # default: trainer.devices
    launcher: str = "srun"  # srun (one task per GPU) | torchrun (one task per node)
    env: dict[str, str] = field(default_factory=dict)  # exported in the job (NCCL_*, ...)
    container_image: Optional[str] = None  # pyxis/enroot
    container_mounts: Optional[str] = None
    container_workdir: Optional[str] = None
    python: Optional[str] = None  # default: this interpreter (``python`` inside a container)
    entrypoint: str = DEFAULT_ENTRYPOINT
    log_dir: Optional[str] = None  # default: <exp_dir>/<name>/slurm
    chdir: Optional[str] = None  # default: the current directory
    signal: str = "USR1"
    signal_seconds: int = 120
    requeue: bool = True
    step_wait: int = 300  # srun --wait: seconds the other tasks get after the first one exits
    failure_requeues: int = 2  # requeues after a lost task/peer, per job (0: never)
    setup: list[str] = field(default_factory=list)  # shell lines before the step
    sbatch_args: list[str] = field(default_factory=list)  # extra "#SBATCH" options

    def validate(self) -> None:
        """Check the options on their own (the config is checked by ``load_config``)."""
        if self.launcher not in ("srun", "torchrun"):
            raise LaunchError(f"--launcher must be srun or torchrun, got {self.launcher!r}")
        for key in self.env:
            if not _ENV_NAME.fullmatch(key):
                raise LaunchError(f"--env {key!r}: not a valid environment variable name")
        try:
            sig = parse_signal(self.signal)
        except ValueError as exc:
            raise LaunchError(f"--signal: {exc}") from None
        if sig.name in ("SIGTERM", "SIGKILL", "SIGSTOP"):
            raise LaunchError(f"--signal {sig.name}: use a signal SLURM does not send on its own "
                              "when cancelling (USR1 or USR2); SIGTERM means cancel, not requeue")
        if self.signal_seconds < 0 or self.step_wait < 0 or self.failure_requeues < 0:
            raise LaunchError("--signal-seconds, --step-wait and --failure-requeues must be >= 0")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LaunchError("--cpus-per-task must be >= 1")
        if self.cpu and self.gpus_per_node:
            raise LaunchError("--cpu and --gpus-per-node contradict each other; drop one")
        for arg in self.sbatch_args:
            if not arg.startswith("-"):
                raise LaunchError(f"--sbatch-arg {arg!r}: expected an sbatch option like "
                                  "--exclusive or --constraint=h100")


@dataclass(frozen=True)
class JobShape:
    """What the job needs from SLURM, derived from the training config."""

    nodes: int
    devices: int  # processes per node
    exp_dir: Path  # <exp_dir>/<name>, absolute
    name: str
    resume: str


def job_shape(cfg, chdir: Path) -> JobShape:
    """Read nodes, processes per node and the experiment directory from a ``LensTrainConfig``."""
    exp = Path(cfg.exp_manager.exp_dir)
    exp = exp if exp.is_absolute() else chdir / exp
    return JobShape(cfg.trainer.num_nodes, cfg.trainer.devices, exp / cfg.exp_manager.name,
                    cfg.exp_manager.name, cfg.exp_manager.resume)


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _directive(key: str, value: object) -> str:
    """One ``#SBATCH --key=value`` line; sbatch accepts double quotes around blanks."""
    text = str(value)
    if '"' in text or "\n" in text:
        raise LaunchError(f"sbatch --{key}: {text!r} contains a quote or newline")
    if any(c.isspace() for c in text):
        text = f'"{text}"'
    return f"#SBATCH --{key}={text}"


def _sbatch_header(shape: JobShape, opts: SlurmOptions, log_dir: Path, chdir: Path) -> list[str]:
    """The ``#SBATCH`` lines: shape, resources, log, signal and requeue policy."""
    items: list[tuple[str, object]] = [
        ("job-name", opts.job_name or shape.name),
        ("nodes", shape.nodes),
        ("ntasks-per-node", shape.devices if opts.launcher == "srun" else 1),
    ]
    if not opts.cpu:
        items.append(("gpus-per-node", opts.gpus_per_node or shape.devices))
    optional = {"partition": opts.partition, "account": opts.account, "qos": opts.qos,
                "time": opts.time, "cpus-per-task": opts.cpus_per_task, "mem": opts.mem}
    items += [(k, v) for k, v in optional.items() if v is not None]
    items += [
        ("output", f"{log_dir}/slurm-%j.out"),
        ("open-mode", "append"),
        ("chdir", chdir),
        ("signal", f"B:{parse_signal(opts.signal).name[3:]}@{opts.signal_seconds}"),
    ]
    lines = [_directive(k, v) for k, v in items]
    lines.append("#SBATCH --requeue" if opts.requeue else "#SBATCH --no-requeue")
    lines += [f"#SBATCH {arg}" for arg in opts.sbatch_args]
    return lines


def _step_command(shape: JobShape, opts: SlurmOptions, config: Path,
                  overrides: Sequence[str]) -> str:
    """The ``srun ...`` command that starts the trainer on every node."""
    srun = ["srun", f"--ntasks-per-node={shape.devices if opts.launcher == 'srun' else 1}",
            f"--wait={opts.step_wait}"]
    if opts.container_image:
        srun.append(f"--container-image={_q(opts.container_image)}")
        if opts.container_mounts:
            srun.append(f"--container-mounts={_q(opts.container_mounts)}")
        srun.append(f"--container-workdir={_q(opts.container_workdir or opts.chdir)}")
    train_args = ["--config", _q(config), *(_q(o) for o in overrides)]
    if opts.launcher == "srun":
        program = [opts.entrypoint]
    else:
        # torchrun runs a script, "-m module", or (--no-python) any executable.
        prefix = '"$PYTHON" '
        target = (opts.entrypoint[len(prefix):] if opts.entrypoint.startswith(prefix)
                  else "--no-python " + opts.entrypoint)
        program = ['"$PYTHON" -m torch.distributed.run',
                   '--nnodes="$SLURM_JOB_NUM_NODES"', f"--nproc-per-node={shape.devices}",
                   "--rdzv-backend=c10d", '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
                   '--rdzv-id="$SLURM_JOB_ID"',
                   "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,"
                   + parse_signal(opts.signal).name,
                   f"--shutdown-timeout={max(30, opts.step_wait)}", target]
    return " \\\n    ".join([" ".join(srun), *program, " ".join(train_args)])


def _signal_flow(signal_name: str) -> str:
    """Shell functions: forward trapped signals to the step; wait for it through the traps."""
    traps = "\n".join(f"trap 'on_signal {s}' {s}" for s in dict.fromkeys([signal_name, "TERM"]))
    return _SIGNAL_FLOW.replace("@TRAPS@", traps)


_SIGNAL_FLOW = r"""
# --- preemption: forward the signal to the step, wait for it to save, then requeue ----------
STEP_PID=""
REQUEUE_ASKED=""
SIGNALLED=""
on_signal() {  # $1 = USR1 | TERM | ...
    echo "[lens-launch] batch shell got SIG$1 at $(date -Is); forwarding to the training step"
    SIGNALLED=1
    if [ "$1" = "$REQUEUE_SIGNAL" ] && [ "$REQUEUE" = 1 ]; then REQUEUE_ASKED=1; fi
    if [ -n "$STEP_PID" ]; then kill -s "$1" "$STEP_PID" 2>/dev/null || true; fi
}
@TRAPS@

wait_step() {  # wait for the step even when trapped signals interrupt `wait`; sets STEP_RC
    local status again
    while :; do
        wait "$STEP_PID"; status=$?
        if kill -0 "$STEP_PID" 2>/dev/null; then continue; fi  # a trap interrupted wait
        if [ "$status" -gt 128 ]; then  # the step may have ended during the trap: ask again
            wait "$STEP_PID" 2>/dev/null; again=$?
            if [ "$again" -ne 127 ]; then status=$again; fi
        fi
        STEP_RC=$status
        return
    done
}

requeue_after_failure() {  # a task was killed or lost a peer: resume from the last checkpoint
    local failures
    failures=$(cat "$FAILURES_FILE" 2>/dev/null | wc -l)
    if [ "$failures" -ge "$FAILURE_REQUEUES" ]; then
        echo "[lens-launch] training step failed with code $STEP_RC; not requeueing: $failures" \
             "failure requeue(s) of this job already (--failure-requeues $FAILURE_REQUEUES," \
             "counted in $FAILURES_FILE)" >&2
        return
    fi
    echo "$(date -Is) restart ${SLURM_RESTART_COUNT:-0} step exit $STEP_RC" >> "$FAILURES_FILE"
    echo "[lens-launch] training step failed with code $STEP_RC: a task was killed or lost" \
         "contact with a peer (the srun and lens-train lines above name the node); requeueing" \
         "job $SLURM_JOB_ID to resume from its last checkpoint (failure requeue" \
         "$((failures + 1)) of $FAILURE_REQUEUES)" >&2
    scontrol requeue "$SLURM_JOB_ID" && exit "$STEP_RC"
    echo "[lens-launch] scontrol requeue failed; resubmit this script to resume" >&2
}
"""

_FINISH = r"""
STEP_PID=$!
wait_step
echo "[lens-launch] training step exited with code $STEP_RC at $(date -Is)"
if [ -n "$REQUEUE_ASKED" ]; then
    if [ "$STEP_RC" -eq 0 ]; then
        echo "[lens-launch] training finished before the stop request; not requeueing"
        exit 0
    fi
    if [ "$STEP_RC" -ne "$PREEMPTED_EXIT_CODE" ] && [ "$LAUNCHER" = srun ]; then  # torchrun: 1
        echo "[lens-launch] warning: step exited with $STEP_RC, not $PREEMPTED_EXIT_CODE;" \
             "resuming from the last complete checkpoint" >&2
    fi
    echo "[lens-launch] requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "[lens-launch] scontrol requeue failed; resubmit this script to resume" >&2
fi
if [ -z "$SIGNALLED" ] && { [ "$STEP_RC" -eq "$PEER_LOST_EXIT_CODE" ] || [ "$STEP_RC" -gt 128 ]; }; then
    requeue_after_failure
fi
exit "$STEP_RC"
"""

_EARLY_STOP = r"""if [ -n "$REQUEUE_ASKED" ]; then  # stop requested before the step started
    echo "[lens-launch] requeueing job $SLURM_JOB_ID before starting the step"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
"""


def _resolve(cfg, opts: SlurmOptions) -> tuple[SlurmOptions, JobShape, Path]:
    """Absolute working directory, job shape and log directory."""
    chdir = Path(opts.chdir or os.getcwd()).resolve()
    opts = dataclasses.replace(opts, chdir=str(chdir))
    shape = job_shape(cfg, chdir)
    log_dir = Path(opts.log_dir).resolve() if opts.log_dir else shape.exp_dir / "slurm"
    return opts, shape, log_dir


def render_sbatch(cfg, config_path: os.PathLike, overrides: Sequence[str],
                  opts: SlurmOptions) -> str:
    """The sbatch script text for ``lens-train --config config_path overrides`` on ``cfg``."""
    opts.validate()
    opts, shape, log_dir = _resolve(cfg, opts)
    python = opts.python or ("python" if opts.container_image else sys.executable)
    config = Path(config_path).resolve()
    now = datetime.datetime.now().isoformat(timespec="seconds")
    lines = ["#!/bin/bash",
             f"# Generated by lens-launch on {now} from {config}",
             f"# {shape.nodes} node(s) x {shape.devices} process(es), launcher {opts.launcher}. "
             "Resubmit with: sbatch <this file>.",
             *_sbatch_header(shape, opts, log_dir, Path(opts.chdir)),
             "set -uo pipefail", "",
             f"PYTHON={_q(python)}",
             f"PREEMPTED_EXIT_CODE={PREEMPTED_EXIT_CODE}  # lens_megatron.preemption",
             f"PEER_LOST_EXIT_CODE={PEER_LOST_EXIT_CODE}  # lens_megatron.parallel.env",
             f"FAILURE_REQUEUES={opts.failure_requeues}",
             f'FAILURES_FILE={_q(log_dir)}/"slurm-$SLURM_JOB_ID.failures"',
             f"REQUEUE={int(opts.requeue)}",
             f"REQUEUE_SIGNAL={parse_signal(opts.signal).name[3:]}",
             f"LAUNCHER={opts.launcher}",
             "export PYTHONUNBUFFERED=1",
             'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"']
    lines += [f"export {k}={_q(v)}" for k, v in opts.env.items()]
    lines += [
        "# Rendezvous on the first node; the port is derived from the job id "
        "(same rule as lens_megatron.parallel.env)",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
        'export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"',
        'echo "[lens-launch] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on '
        '$SLURM_JOB_NODELIST; master $MASTER_ADDR:$MASTER_PORT; $(date -Is)"',
        *opts.setup,
        _signal_flow(parse_signal(opts.signal).name[3:]),
        _EARLY_STOP,
        _step_command(shape, opts, config, overrides) + " &",
    ]
    return "\n".join(lines) + _FINISH


def write_sbatch(cfg, config_path: os.PathLike, overrides: Sequence[str], opts: SlurmOptions,
                 output: Optional[os.PathLike] = None) -> Path:
    """Render and write the script (default ``<exp>/slurm/<name>.sbatch``); create the log dir.

    SLURM does not create the ``--output`` directory, so it is made here.
    """
    text = render_sbatch(cfg, config_path, overrides, opts)
    _, shape, log_dir = _resolve(cfg, opts)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = Path(output) if output else log_dir / f"{shape.name}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def submit(script: os.PathLike, env: Optional[dict] = None) -> int:
    """``sbatch --parsable script``; returns the job id (raises with sbatch's message)."""
    try:
        res = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True,
                             text=True, env=env, timeout=120)
    except FileNotFoundError:
        raise LaunchError("--submit: `sbatch` is not on PATH (run on a SLURM login node, or "
                          "drop --submit and copy the script there)") from None
    if res.returncode != 0:
        raise LaunchError(f"sbatch failed ({res.returncode}): {res.stderr.strip()}")
    return int(res.stdout.strip().split(";")[0])
