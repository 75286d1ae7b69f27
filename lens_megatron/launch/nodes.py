"""Before ``--submit``: can the partition give the job its nodes at all right now?

A job that asks for more nodes than its partition has *usable* (a node that is down, drained,
failing or not responding cannot be allocated) does not fail in SLURM: it stays pending with
``Reason=ReqNodeNotAvail`` or ``Resources`` until an administrator returns the nodes — from the
user's side, a hang. ``lens-launch --submit`` refuses such a submission with the nodes and their
reasons instead (``--no-node-check`` submits anyway). Busy nodes are fine: they free up.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional

from .sbatch import LaunchError

#: Base states (``sinfo %T`` without its flag suffixes) in which a node takes no new job.
UNUSABLE_STATES = frozenset({"down", "drain", "drained", "draining", "fail", "failing", "future",
                             "inval"})
_FLAGS = "*~#!%$@^-+"  # sinfo suffixes; "*" = not responding


@dataclass(frozen=True)
class NodeState:
    name: str
    state: str  # as sinfo prints it, e.g. "idle", "down*", "drained"
    reason: str

    @property
    def usable(self) -> bool:
        return not self.state.endswith("*") and self.state.rstrip(_FLAGS) not in UNUSABLE_STATES


def _sinfo(args: list[str], env: Optional[Mapping[str, str]]) -> str:
    try:
        res = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True,
                             env=None if env is None else dict(env), timeout=60)
    except FileNotFoundError:
        raise LaunchError("--submit: `sinfo` is not on PATH (run on a SLURM login node, or "
                          "drop --submit and copy the script there)") from None
    if res.returncode != 0:
        raise LaunchError(f"`sinfo -h {' '.join(args)}` failed ({res.returncode}): "
                          f"{res.stderr.strip()}; pass --no-node-check to submit without it")
    return res.stdout


def default_partition(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The partition sbatch uses without ``--partition`` (sinfo marks it with ``*``)."""
    for name in _sinfo(["-o", "%P"], env).split():
        if name.endswith("*"):
            return name[:-1]
    return None


def partition_nodes(partition: str, env: Optional[Mapping[str, str]] = None) -> list[NodeState]:
    """Every node of ``partition`` with its state and reason."""
    nodes = []
    for line in _sinfo(["-N", "-p", partition, "-o", "%N|%T|%E"], env).splitlines():
        parts = line.strip().split("|", 2)
        if len(parts) == 3:
            nodes.append(NodeState(*parts))
    return nodes


def check_nodes_available(nodes: int, partition: Optional[str] = None,
                          env: Optional[Mapping[str, str]] = None) -> list[NodeState]:
    """Raise :class:`LaunchError` naming the unusable nodes when ``partition`` (default: the
    default partition) has fewer than ``nodes`` usable ones; return the partition's nodes."""
    partition = partition or default_partition(env)
    if partition is None:
        return []  # no default partition: sbatch itself reports the missing --partition
    found = partition_nodes(partition, env)
    usable = [n for n in found if n.usable]
    if len(usable) >= nodes:
        return found
    down = [n for n in found if not n.usable]
    listed = "; ".join(f"{n.name} is {n.state} (reason: {n.reason})" for n in down) or "none"
    raise LaunchError(
        f"the job needs {nodes} node(s) (trainer.num_nodes) but partition {partition} has "
        f"{len(usable)} usable of {len(found)}: {listed}. SLURM would keep the job pending until "
        "an administrator returns those nodes, so it was not submitted; choose another "
        "partition (--partition), fewer nodes, or pass --no-node-check to queue it anyway")
