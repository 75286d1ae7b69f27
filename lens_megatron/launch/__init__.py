"""Launchers: SLURM batch scripts for multi-node runs (``lens-launch``, docs/slurm.md)."""
from .sbatch import (
    DEFAULT_ENTRYPOINT,
    JobShape,
    LaunchError,
    SlurmOptions,
    job_shape,
    render_sbatch,
    submit,
    write_sbatch,
)
from .nodes import NodeState, check_nodes_available
from .slurm import main

__all__ = ["DEFAULT_ENTRYPOINT", "JobShape", "LaunchError", "NodeState", "SlurmOptions",
           "check_nodes_available", "job_shape", "render_sbatch", "submit", "write_sbatch", "main"]
