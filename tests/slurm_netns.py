"""A two-node SLURM cluster on one machine: every daemon in network namespaces the test makes.

    <tag>c   controller: bridge br0 10.199.0.1/24, slurmctld, hostname ``ctl``; clients run here
    <tag>n1  node1: eth0 10.199.0.11 (a veth pair to br0), hostname ``node1``, ``slurmd -N node1``
    <tag>n2  node2: eth0 10.199.0.12, hostname ``node2``, ``slurmd -N node2``

Each daemon starts as ``nsenter --net=/run/netns/<ns> unshare --uts --mount sh -c 'mount --bind
<hosts> /etc/hosts; hostname <name>; exec <daemon>'`` — not ``ip netns exec``, which remounts /sys
so that slurmd dies on "No filesystem mounted on /sys/fs/cgroup" (DESIGN.md §7d). The private
``/etc/hosts`` (visible only in the daemons' mount namespaces, inherited by their jobs) names
ctl/node1/node2, so a job resolves the first host of ``SLURM_JOB_NODELIST`` as on a real cluster,
and gloo finds its node's own address from its host name. munged runs in the host namespaces: its
socket is a file that every namespace reaches. Nothing listens or connects outside the namespaces
made here; :meth:`NetnsSlurmCluster.stop` kills what is left in them and deletes them.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

from slurm_cluster import SlurmCluster, SlurmUnavailable, ensure_installed

SUBNET = "10.199.0"
NAMESPACE_TOOLS = ("ip", "nsenter", "unshare", "mount")
#: Our namespaces: lens<pid of the pytest process>c / n<node>.
_OURS = re.compile(r"lens(\d+)(?:c|n\d+)")


def pids_in_namespace(netns: str) -> list[int]:
    """Processes whose network namespace is /run/netns/``netns``."""
    try:
        target = os.stat(f"/run/netns/{netns}").st_ino
    except FileNotFoundError:
        return []
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _kill_all_in(netns: str) -> None:
    for _ in range(20):
        pids = pids_in_namespace(netns)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.25)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces a killed earlier run left (its pytest pid is gone); returns them.

    A run ended by SIGKILL never reaches :meth:`NetnsSlurmCluster.stop`; its daemons keep
    running inside namespaces no test owns, and its subnet would clash with the next run's."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    stale = []
    for name in names:
        found = _OURS.fullmatch(name)
        if found and not os.path.exists(f"/proc/{found.group(1)}"):
            _kill_all_in(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            stale.append(name)
    return stale


class NetnsSlurmCluster(SlurmCluster):
    """``nodes`` slurmd hosts and a controller, each in its own network/UTS/mount namespace."""

    def __init__(self, root: os.PathLike, nodes: int = 2, cpus_per_node: int = 4,
                 first_job_id: Optional[int] = None) -> None:
        super().__init__(root, cpus=cpus_per_node, first_job_id=first_job_id)
        tag = f"lens{os.getpid()}"
        self.addresses = {"ctl": f"{SUBNET}.1"}
        self.namespaces = {"ctl": f"{tag}c"}
        for i in range(1, nodes + 1):
            self.addresses[f"node{i}"] = f"{SUBNET}.{10 + i}"
            self.namespaces[f"node{i}"] = f"{tag}n{i}"
        self.hosts_file = self.root / "hosts"
        self._made: list[str] = []  # namespaces created (deleted by stop)

    @property
    def node_names(self) -> list[str]:
        return [h for h in self.addresses if h != "ctl"]

    def command(self, cmd: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.namespaces['ctl']}", "--", *cmd]

    def _topology(self) -> str:
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.addresses[n]} CPUs={self.cpus} "
                          f"RealMemory=2048 State=UNKNOWN" for n in self.node_names)
        return f"""\
SlurmctldHost=ctl({self.addresses['ctl']})
SlurmctldPort=6817
SlurmdPort=6818
SlurmdTimeout=10
# The namespaces share this machine's CPUs: take CPUs= from here, not from the hardware
# (oversubscribed on purpose; without this the nodes register as INVAL "Low CPUs").
SlurmdParameters=config_overrides
SlurmdSpoolDir={self.root}/spool/%n
SlurmdPidFile={self.root}/run/slurmd-%n.pid
SlurmdLogFile={self.root}/log/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
"""

    # -- namespaces ---------------------------------------------------------------------
    def _ip(self, *args: str) -> None:
        res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            raise SlurmUnavailable(
                f"`ip {' '.join(args)}` failed ({res.returncode}): {res.stderr.strip()}. The "
                "two-node cluster needs root with CAP_NET_ADMIN/CAP_SYS_ADMIN to create network "
                "namespaces, a bridge and veth pairs (iproute2)")

    def _make_network(self) -> None:
        remove_stale_namespaces()
        for name, ns in self.namespaces.items():
            if Path(f"/run/netns/{ns}").exists():
                raise SlurmUnavailable(f"network namespace {ns} already exists (left by an "
                                       f"earlier run with this pid?); remove it: ip netns del {ns}")
            self._ip("netns", "add", ns)
            self._made.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")
        ctl = self.namespaces["ctl"]
        self._ip("-n", ctl, "link", "add", "br0", "type", "bridge")
        self._ip("-n", ctl, "addr", "add", f"{self.addresses['ctl']}/24", "dev", "br0")
        self._ip("-n", ctl, "link", "set", "br0", "up")
        for i, node in enumerate(self.node_names, 1):
            ns = self.namespaces[node]
            self._ip("-n", ctl, "link", "add", f"veth{i}", "type", "veth", "peer", "name", "eth0",
                     "netns", ns)
            self._ip("-n", ctl, "link", "set", f"veth{i}", "master", "br0", "up")
            self._ip("-n", ns, "addr", "add", f"{self.addresses[node]}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
        lines = ["127.0.0.1 localhost"] + [f"{a} {h}" for h, a in self.addresses.items()]
        self.hosts_file.write_text("\n".join(lines) + "\n")

    def _in_namespace(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` as a process of ``host``: its network, its host name, the private hosts file."""
        script = 'mount --bind "$0" /etc/hosts && hostname "$1" && shift && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.namespaces[host]}", "--",
                "unshare", "--uts", "--mount", "--propagation", "private", "--",
                "sh", "-c", script, str(self.hosts_file), host, *argv]

    def _start_daemons(self) -> None:
        ensure_installed(programs=NAMESPACE_TOOLS)
        for node in self.node_names:
            (self.root / "spool" / node).mkdir(parents=True, exist_ok=True)
        self._make_network()
        self._spawn("slurmctld", self._in_namespace(
            "ctl", ["slurmctld", "-D", "-i", "-f", str(self.conf)]))
        for node in self.node_names:
            self._spawn(f"slurmd-{node}", self._in_namespace(
                node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)]))

    def start_node(self, node: str) -> None:
        """(Re)start ``node``'s slurmd after :meth:`stop_daemon` ``("slurmd-<node>")``."""
        self._spawn(f"slurmd-{node}", self._in_namespace(
            node, ["slurmd", "-D", "-N", node, "-f", str(self.conf)]))

    # -- processes on a node ------------------------------------------------------------
    def pids_in(self, host: str) -> list[int]:
        """Processes whose network namespace is ``host``'s."""
        return pids_in_namespace(self.namespaces[host])

    def job_pids(self, node: str, job_id: int) -> list[int]:
        """Processes of job ``job_id`` on ``node`` (its tasks and their children; not slurmstepd)."""
        found = []
        for pid in self.pids_in(node):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"SLURM_JOB_ID={job_id}".encode() in environ and not cmdline.startswith(b"slurmstepd"):
                found.append(pid)
        return found

    # -- teardown -----------------------------------------------------------------------
    def stop(self, grace: float = 20.0) -> None:
        """Stop the daemons (pid files), kill what is left in our namespaces, delete them."""
        try:
            super().stop(grace)
        finally:
            for ns in self.namespaces.values():
                _kill_all_in(ns)
            while self._made:
                subprocess.run(["ip", "netns", "del", self._made.pop()], capture_output=True,
                               timeout=30)
