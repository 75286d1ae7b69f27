"""Command-line entry points.

``lens-train --config CFG [key=value ...]`` — train (single process, under torchrun, or under
srun; the process layout comes from the launcher's environment).
``python -m lens_megatron.cli train|demo ...`` — the same, plus the CPU demo.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import Optional, Sequence

from .config import ConfigError, load_config, validate
from .parallel.env import detect_dist_env

logger = logging.getLogger("lens_megatron")


def _quiet_third_party() -> None:
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=".*is not a leaf Tensor is being accessed.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-train",
        description="GRPO/LENS training on megatron-core. Overrides use Hydra/OmegaConf "
                    "dot syntax, e.g. model.tensor_model_parallel_size=2 lens.estimator=grpo.")
    parser.add_argument("--config", help="NeMo-style YAML config (defaults apply without one)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved, validated config and exit")
    return parser


def load_and_check(config: Optional[str], overrides: Sequence[str]):
    """Load + validate the config against the launcher's world size (no process group yet)."""
    cfg = load_config(config, overrides)
    env = detect_dist_env()
    if env.world_size != cfg.world_size:
        raise ConfigError(
            f"trainer.num_nodes × trainer.devices = {cfg.trainer.num_nodes}×{cfg.trainer.devices} "
            f"= {cfg.world_size} processes, but the launcher started {env.world_size} "
            f"({env.launcher}); launch with `torchrun --nproc-per-node {cfg.trainer.devices}` / "
            "`srun`, or change trainer.devices")
    validate(cfg, env.world_size)
    return cfg, env


def run_training(cfg, stop_requested=None) -> Optional[int]:
    """Initialise process groups, train (or generate, on a separate rollout rank), tear down.

    A trainer rank returns None when trainer.max_steps was reached, else the preemption exit
    code; a rollout rank returns the exit code the trainer sent it."""
    from .parallel.initialize import destroy_parallel, initialize_from_config
    from .preemption import PREEMPTED_EXIT_CODE
    from .trainer import LensTrainer

    groups = initialize_from_config(cfg)
    try:
        if groups is not None and groups.roles.role == "rollout":
            from .rollout.rollout_rank import run_rollout_rank

            return run_rollout_rank(cfg, groups)
        trainer = LensTrainer(cfg, groups)
        try:
            trainer.run(stop_requested=stop_requested)
            return None if trainer.finished else PREEMPTED_EXIT_CODE
        finally:
            trainer.close()
    finally:
        destroy_parallel()


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit codes: 0 done, 2 configuration error, PREEMPTED_EXIT_CODE (75) stopped by a
    preemption signal after saving a checkpoint (the SLURM script requeues on it)."""
    from .preemption import PreemptionHandler

    args = train_parser().parse_args(argv)
    # Installed first: a preemption signal during the (slow) imports below must not kill us.
    handler = PreemptionHandler()
    handler.install()
    try:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        _quiet_third_party()
        try:
            cfg, _ = load_and_check(args.config, args.overrides)
        except ConfigError as exc:
            print(f"lens-train: configuration error: {exc}", file=sys.stderr)
            return 2
        if args.print_config:
            from .config import to_yaml

            print(to_yaml(cfg))
            return 0
        code = run_training(cfg, stop_requested=handler.should_stop)
    finally:
        handler.uninstall()
    # A stop that arrived after the last step needs no requeue; a rollout rank leaves with the
    # trainer's code (it ignores signals itself: the trainer decides when to stop).
    return 0 if code is None else code


def demo_main(argv: Optional[Sequence[str]] = None) -> int:
    from .demo import main

    _quiet_third_party()
    return main(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train_main, "demo": demo_main}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m lens_megatron.cli {{{'|'.join(commands)}}} ...", file=sys.stderr)
        return 2
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
