"""``lens-launch`` / ``tools/launch_slurm.py``: write and optionally submit a SLURM batch script.

    python tools/launch_slurm.py --config cfg.yaml [options] [key=value ...] [--submit]

The config and the Hydra-style overrides are loaded and validated here (so a bad key fails on
the login node, not after queueing), the job shape is read from ``trainer.num_nodes`` and
``trainer.devices``, and the script runs ``"$PYTHON" -m lens_megatron.cli train --config <cfg>
<overrides>`` — the same config and overrides, verbatim. See ``docs/slurm.md``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..parallel.env import PEER_LOST_EXIT_CODE
from .nodes import check_nodes_available
from .sbatch import DEFAULT_ENTRYPOINT, LaunchError, SlurmOptions, submit, write_sbatch


def _env_item(item: str) -> tuple[str, str]:
    """``KEY=VALUE``, or ``KEY`` to copy the value from the current environment."""
    key, sep, value = item.partition("=")
    if not sep:
        if key not in os.environ:
            raise LaunchError(f"--env {key}: not set in the current environment; "
                              f"pass --env {key}=VALUE")
        value = os.environ[key]
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (one option per :class:`SlurmOptions` field)."""
    p = argparse.ArgumentParser(
        prog="lens-launch", description="Write (and optionally submit) an sbatch script that "
        "runs lens-train with one process per GPU on trainer.num_nodes x trainer.devices.")
    p.add_argument("--config", required=True, help="training YAML (passed to lens-train)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, passed to lens-train")
    p.add_argument("--output", "-o", help="script path (default <exp_dir>/<name>/slurm/<name>.sbatch)")
    p.add_argument("--submit", action="store_true", help="sbatch the script after writing it")
    p.add_argument("--print", dest="print_script", action="store_true", help="print the script")
    g = p.add_argument_group("resources")
    g.add_argument("--job-name")
    g.add_argument("--partition", "-p")
    g.add_argument("--account", "-A")
    g.add_argument("--qos")
    g.add_argument("--time", "-t", help="time limit, e.g. 04:00:00")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--mem", help="memory per node, e.g. 0 (all) or 480G")
    g.add_argument("--cpu", action="store_true", help="request no GPUs (CPU/gloo runs)")
    g.add_argument("--gpus-per-node", type=int, help="default: trainer.devices")
    g.add_argument("--sbatch-arg", action="append", default=[], dest="sbatch_args",
                   help="extra #SBATCH option, e.g. --sbatch-arg=--exclusive (repeatable)")
    g = p.add_argument_group("processes and environment")
    g.add_argument("--launcher", choices=("srun", "torchrun"), default="srun",
                   help="srun: one task per GPU (default); torchrun: one torchrun per node")
    g.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="export in the job, e.g. --env NCCL_IB_HCA=mlx5 (repeatable); "
                   "KEY alone copies the current value")
    g.add_argument("--setup", action="append", default=[],
                   help="shell line run before the step, e.g. 'module load cuda' (repeatable)")
    g.add_argument("--python", help="interpreter in the job (default: this one; "
                   "'python' with --container-image)")
    g.add_argument("--entrypoint", default=DEFAULT_ENTRYPOINT,
                   help=f"command that receives --config and overrides (default {DEFAULT_ENTRYPOINT})")
    g.add_argument("--container-image", help="pyxis/enroot image (srun --container-image)")
    g.add_argument("--container-mounts", help="pyxis mounts, e.g. /lustre:/lustre")
    g.add_argument("--container-workdir", help="default: the submit directory")
    g.add_argument("--chdir", help="job working directory (default: the current one)")
    g.add_argument("--log-dir", help="slurm-%%j.out directory (default <exp_dir>/<name>/slurm)")
    g = p.add_argument_group("preemption")
    g.add_argument("--signal", default="USR1", help="warning signal to the batch shell")
    g.add_argument("--signal-seconds", type=int, default=120,
                   help="send it this long before the time limit (--signal=B:SIG@secs)")
    g.add_argument("--no-requeue", dest="requeue", action="store_false",
                   help="do not requeue after a preemption signal")
    g.add_argument("--step-wait", type=int, default=300,
                   help="srun --wait: seconds other tasks get once the first task exits")
    g = p.add_argument_group("failures")
    g.add_argument("--failure-requeues", type=int, default=2,
                   help="requeue the job at most this often after a task was killed or a rank "
                   "lost a peer (exit > 128 or %d); 0: never" % PEER_LOST_EXIT_CODE)
    g.add_argument("--no-node-check", dest="node_check", action="store_false",
                   help="with --submit: do not refuse a job the partition has too few usable "
                   "(not down/drained) nodes for")
    return p


def options_from_args(args: argparse.Namespace) -> SlurmOptions:
    """Map parsed arguments onto :class:`SlurmOptions`."""
    fields = set(SlurmOptions.__dataclass_fields__) - {"env"}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return SlurmOptions(env=dict(_env_item(e) for e in args.env), **values)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: returns 0 on success, 2 on a configuration or option error."""
    from ..config import ConfigError, load_config

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opts = options_from_args(args)
        cfg = load_config(args.config, args.overrides)
        if opts.requeue and cfg.exp_manager.resume == "never":
            raise LaunchError("exp_manager.resume=never would restart a requeued job from step 0; "
                              "set exp_manager.resume=auto or pass --no-requeue")
        path = write_sbatch(cfg, args.config, args.overrides, opts, args.output)
    except (ConfigError, LaunchError) as exc:
        parser.exit(2, f"lens-launch: error: {exc}\n")
    print(f"wrote {path} ({cfg.trainer.num_nodes} node(s) x {cfg.trainer.devices} "
          f"process(es), launcher {opts.launcher})")
    if args.print_script:
        print(path.read_text())
    if args.submit:
        try:
            if args.node_check:
                check_nodes_available(cfg.trainer.num_nodes, opts.partition)
            job_id = submit(path)
        except LaunchError as exc:
            parser.exit(1, f"lens-launch: error: {exc}\n")
        print(f"submitted job {job_id}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
