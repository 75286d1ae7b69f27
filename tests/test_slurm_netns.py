"""The two-node fixture's cleanup of what a killed earlier run left behind: a namespace named
like ours (``lens<pid>n1``) whose pytest process is gone is emptied (its processes killed) and
deleted before a new cluster is made; one whose owner is alive (another session) is left alone."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from slurm_netns import pids_in_namespace, remove_stale_namespaces

pytestmark = [pytest.mark.multinode]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _add(name: str) -> subprocess.Popen:
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(f"`ip netns add {name}` failed: {res.stderr.strip()} (needs root with "
                    "CAP_SYS_ADMIN and iproute2)", pytrace=False)
    return subprocess.Popen(["ip", "netns", "exec", name, "sleep", "300"])


def test_stale_namespaces_are_emptied_and_deleted_live_ones_kept():
    stale, live = f"lens{_dead_pid()}n1", f"lens{os.getpid()}n9"
    sleepers = [_add(stale), _add(live)]
    try:
        deadline = time.monotonic() + 10
        while not (pids_in_namespace(stale) and pids_in_namespace(live)):
            assert time.monotonic() < deadline, "sleep did not start in the namespaces"
            time.sleep(0.05)
        assert stale in remove_stale_namespaces()
        assert not Path(f"/run/netns/{stale}").exists()
        assert sleepers[0].wait(timeout=10) == -9  # killed, not left running outside
        assert Path(f"/run/netns/{live}").exists() and sleepers[1].poll() is None
    finally:
        for proc in sleepers:
            proc.kill()
            proc.wait()
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
