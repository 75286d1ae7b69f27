"""A rank whose peer dies: the report names the peer's host and rank (from the table gathered when
the process group starts) and ``lens-train`` turns it into PEER_LOST_EXIT_CODE, which the batch
script requeues on. Two local gloo processes, one of which SIGKILLs itself mid-loop; the same
path on two SLURM nodes is tests/test_multinode.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch.distributed as dist

from lens_megatron.parallel.env import PEER_LOST_EXIT_CODE
from lens_megatron.parallel.initialize import describe_peer_failure
from lens_megatron.parallel.spawn import find_free_port

RANK = textwrap.dedent('''
    import os, sys, torch
    import torch.distributed as dist
    from lens_megatron.parallel.initialize import describe_peer_failure, init_process_group
    init_process_group("gloo", timeout_minutes=1)
    rank = dist.get_rank()
    value = torch.ones(4)
    try:
        for i in range(100000):
            dist.all_reduce(value)
            if rank == 1 and i == 20:
                os.kill(os.getpid(), 9)
    except Exception as exc:
        print("REPORT", describe_peer_failure(exc, 1), flush=True)
        sys.exit(76)
''')


@pytest.mark.slow
def test_survivor_names_the_dead_peer():
    port = find_free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", RANK], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    started = time.monotonic()
    out0, _ = procs[0].communicate(timeout=120)
    procs[1].wait(timeout=60)
    assert procs[1].returncode == -9
    assert procs[0].returncode == 76, out0
    report = next(line for line in out0.splitlines() if line.startswith("REPORT"))
    host = socket.gethostname()
    assert f"rank 0 on {host} lost contact with {host} (127.0.0.1, rank 1): RuntimeError" in report
    assert f"exiting with code {PEER_LOST_EXIT_CODE}" in report
    assert "This is typically caused" not in report  # gloo's boilerplate is cut
    print(f"survivor reported in {time.monotonic() - started:.1f}s: {report}")


def test_timeouts_and_other_errors():
    store_timeout = dist.DistStoreError("Timed out after 61 seconds waiting for clients. 1/2 "
                                        "clients joined.")
    report = describe_peer_failure(store_timeout, timeout_minutes=1)
    assert "did not answer within trainer.timeout_minutes=1" in report
    assert "1/2 clients joined" in report
    wrapped = ValueError("step failed")
    wrapped.__cause__ = RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error "
                                     "[10.0.0.7]:4242: Connection reset by peer")
    assert "lost contact with 10.0.0.7: RuntimeError" in describe_peer_failure(wrapped)
    for other in (ValueError("bad config"), RuntimeError("CUDA out of memory"), KeyError("x")):
        assert describe_peer_failure(other) is None
