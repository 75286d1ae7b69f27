"""A real one-node SLURM cluster for tests: munged + slurmctld + slurmd on localhost.

Everything the daemons write (munge key and socket, state, spool, pid and log files,
``slurm.conf``) lives under one directory, and the daemons listen on free ports, so the cluster
neither needs nor touches ``/etc/slurm`` and two test sessions on one machine do not collide.
Client commands find it through ``SLURM_CONF`` (see :meth:`SlurmCluster.env`).

Recipe measured on Debian's slurm-wlm 22.05.8 (DESIGN.md §7c): ``proctrack/linuxproc`` and
``task/none`` (no cgroups needed), ``select/cons_tres`` with ``CR_CPU``, ``SlurmUser=root``,
``JobRequeue=1``. Anything that makes the cluster impossible here (not root, no apt, a daemon
that will not start) raises :class:`SlurmUnavailable` with the reason and the daemon log tail,
which the tests turn into a failure (CI must run them; deselect with ``-m "not slurm"``).

:class:`SlurmCluster` is the one-node cluster; ``tests/slurm_netns.py`` derives the two-node one
(each slurmd in its own network, UTS and mount namespace) from it through the hooks
``_topology``, ``_start_daemons``, ``node_names`` and ``command``.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
APT_PACKAGES = ("slurm-wlm", "munge", "iproute2")
#: States after which a job will not run again by itself.
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                 "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class SlurmUnavailable(RuntimeError):
    """SLURM cannot run on this machine; the message says why (the test failure message)."""


def _which_all(names: Iterable[str]) -> list[str]:
    """The names among ``names`` not found on PATH (daemons live in /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [n for n in names if shutil.which(n, path=path) is None]


def ensure_installed(timeout: float = 900.0, programs: Iterable[str] = DAEMONS + CLIENTS) -> None:
    """Install ``slurm-wlm``, ``munge`` (and ``iproute2``) with apt when ``programs`` are missing."""
    programs = tuple(programs)
    missing = _which_all(programs)
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"programs {missing} are missing and this user is not root, "
                               f"so `apt-get install {' '.join(APT_PACKAGES)}` cannot run")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"programs {missing} are missing and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES]
    result = None
    for cmd in (install, ["apt-get", "update", "-q"], install):
        try:
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` took more than {timeout:.0f}s") from None
        if cmd is install and result.returncode == 0:
            break
    if result is None or result.returncode != 0 or _which_all(programs):
        tail = "" if result is None else (result.stdout + result.stderr)[-2000:]
        raise SlurmUnavailable(f"`{' '.join(install)}` failed; still missing "
                               f"{_which_all(programs)}:\n{tail}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_total_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmUnavailable("cannot read MemTotal from /proc/meminfo")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as exc:
        return f"<no log at {path}: {exc}>"


class SlurmCluster:
    """Start, query and stop a private one-node SLURM cluster rooted at ``root``."""

    def __init__(self, root: os.PathLike, cpus: Optional[int] = None,
                 first_job_id: Optional[int] = None) -> None:
        self.root = Path(root).resolve()
        # Jobs derive MASTER_PORT from the job id: a random first id keeps two test clusters on
        # one machine (each starting at job 1 otherwise) off each other's ports.
        self.first_job_id = first_job_id or random.randint(1000, 19000)
        self.node = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = max(256, int(_mem_total_mb() * 0.8))
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}

    # -- hooks for other topologies (tests/slurm_netns.py) ------------------------------
    @property
    def node_names(self) -> list[str]:
        return [self.node]

    def command(self, cmd: list[str]) -> list[str]:
        """How a client command (``sbatch``, ``scontrol``, a launcher) reaches the controller."""
        return cmd

    def _topology(self) -> str:
        """slurm.conf lines naming the controller, the node(s) and the partition."""
        return f"""\
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmdSpoolDir={self.root}/spool
SlurmdPidFile={self._pid_file('slurmd')}
SlurmdLogFile={self.log_file('slurmd')}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""

    def _start_daemons(self) -> None:
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])

    # -- configuration ------------------------------------------------------------------
    def _pid_file(self, daemon: str) -> Path:
        return self.root / "run" / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.root / "log" / f"{daemon}.log"

    def _write_config(self) -> None:
        for sub in ("munge", "run", "log", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o711)  # munged wants the socket dir traversable
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        (self.root / "plugstack.conf").write_text("")
        r = self.root
        self.conf.write_text(f"""\
ClusterName=lens{os.getpid()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
FirstJobId={self.first_job_id}
ReturnToService=2
MinJobAge=3600
KillWait=30
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PlugStackConfig={r}/plugstack.conf
StateSaveLocation={r}/state
SlurmctldPidFile={self._pid_file('slurmctld')}
SlurmctldLogFile={self.log_file('slurmctld')}
SlurmctldDebug=info
SlurmdDebug=info
{self._topology()}""")

    def env(self) -> dict[str, str]:
        """Environment for client commands (and the jobs they submit)."""
        return dict(os.environ, SLURM_CONF=str(self.conf),
                    PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")

    # -- lifecycle ----------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "ab")
        self._procs[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env=self.env(),
            stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        time.sleep(0.5)
        if self._procs[name].poll() is not None:
            raise SlurmUnavailable(self.failure(f"{name} exited with code "
                                                f"{self._procs[name].returncode} at start"))

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        """Start munged, slurmctld and slurmd(s); wait until ``sinfo`` shows every node idle."""
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("the SLURM test cluster runs its daemons as root; "
                                   "this user is not root")
        try:
            self._write_config()
            m = self.root / "munge"
            self._spawn("munged", ["munged", "-F", "--force", f"--key-file={m / 'munge.key'}",
                                   f"--socket={self.munge_socket}",
                                   f"--pid-file={self._pid_file('munged')}",
                                   f"--log-file={self.log_file('munged')}",
                                   f"--seed-file={m / 'munged.seed'}"])
            self._start_daemons()
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def node_states(self) -> dict[str, str]:
        """``sinfo -N`` state of every node (``idle``, ``alloc``, ``down*``, ...)."""
        res = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False)
        return dict(line.split()[:2] for line in res.stdout.splitlines() if len(line.split()) >= 2)

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise SlurmUnavailable(self.failure(
                        f"{name} exited with code {proc.returncode} while starting"))
            states = self.node_states()
            bad = {n: s for n, s in states.items() if s.rstrip("*~#") in ("inval", "drained",
                                                                         "draining", "down")}
            if bad and not any(s.endswith("*") for s in bad.values()):
                raise SlurmUnavailable(self.failure(f"nodes registered unusable: {bad}"))
            if all(states.get(n, "").rstrip("*") == "idle" for n in self.node_names):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(self.failure(f"nodes {self.node_names} not idle after "
                                            f"{timeout:.0f}s (sinfo states {states})"))

    def failure(self, what: str) -> str:
        """``what`` followed by the tail of every daemon's log (the failure message)."""
        parts = [what]
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path} ---\n{_tail(path)}")
        return "\n".join(parts)

    def cancel_all(self, grace: float = 20.0) -> None:
        """Cancel every job and wait (up to ``grace`` s) until the queue is empty."""
        if "slurmctld" not in self._procs or self._procs["slurmctld"].poll() is not None:
            return
        self.run(["scancel", "--user", "root"], check=False)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            res = self.run(["squeue", "-h", "-o", "%i"], check=False)
            if res.returncode != 0 or not res.stdout.strip():
                break
            time.sleep(0.5)

    def stop(self, grace: float = 20.0) -> None:
        """Cancel every job, then stop slurmd(s), slurmctld and munged (pid files, our pids)."""
        self.cancel_all(grace)
        for name in [n for n in self._procs if n.startswith("slurmd")] + ["slurmctld", "munged"]:
            self.stop_daemon(name)

    def stop_daemon(self, name: str, wait: float = 10.0) -> None:
        """SIGTERM the daemon ``name`` (its pid file and the process we started); wait for it."""
        pids = set()
        try:
            pids.add(int(self._pid_file(name).read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
        proc = self._procs.pop(name, None)
        if proc is not None and proc.poll() is None:
            pids.add(proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        if proc is not None:
            try:
                proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=wait)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- client helpers -----------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60.0, retries: int = 0,
            ) -> subprocess.CompletedProcess:
        """Run a client command against this cluster; ``check`` raises with its output.

        ``retries``: for queries only — on a loaded machine a client now and then loses its
        connection to slurmctld (``scontrol`` ended by SIGPIPE, seen at load 24 on 2 cores)."""
        for attempt in range(retries + 1):
            res = subprocess.run(self.command(cmd), env=self.env(), capture_output=True,
                                 text=True, timeout=timeout)
            if res.returncode == 0 or attempt == retries:
                break
            time.sleep(1.0)
        if check and res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({res.returncode}):\n"
                               f"{res.stdout}{res.stderr}")
        return res

    def sbatch(self, script: os.PathLike, *args: str) -> int:
        """Submit ``script``; returns the job id."""
        res = self.run(["sbatch", "--parsable", *args, str(script)])
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``ExitCode``, ...)."""
        res = self.run(["scontrol", "show", "job", "-o", str(job_id)], retries=3)
        return dict(re.findall(r"(\w+)=(\S*)", res.stdout))

    def wait_job(self, job_id: int, states: Iterable[str] = FINAL_STATES,
                 timeout: float = 300.0, poll: float = 0.5) -> dict[str, str]:
        """Wait until the job's state is one of ``states``; returns its ``scontrol`` record."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while info.get("JobState") not in wanted:
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after "
                                   f"{timeout:.0f}s (waiting for {sorted(wanted)}):\n{info}")
            time.sleep(poll)
            info = self.job(job_id)
        return info
