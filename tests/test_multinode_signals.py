"""A signal SLURM relays reaches every process of a job step — slurmstepd signals the whole
process tree, on every node — not only the trainer. The helper processes the trainer starts
(math-verify workers, megatron's checkpoint-writer Manager) must survive SIGUSR1/SIGTERM, or a
preemption turns the interrupted step's verdicts into errors, or fails the save it asked for
(seen on two SLURM nodes: ``EOFError`` from the writer's Manager). Checked here directly, each
against the same kind of process started without the protection, which dies."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

RELAYED = (signal.SIGUSR1, signal.SIGTERM)


def _send(pid: int) -> None:
    for sig in RELAYED:
        os.kill(pid, sig)


def test_verifier_workers_survive_relayed_preemption_signals():
    from lens_megatron.rewards.verifier_pool import OK, VerifierPool

    with VerifierPool(num_workers=2, timeout_s=30.0) as pool:
        assert [o.status for o in pool.judge_many([("\\boxed{1}", "1")])] == [OK]  # all ready
        for worker in pool._workers:
            _send(worker.process.pid)
        time.sleep(1.0)
        assert all(w.process.is_alive() for w in pool._workers)
        outcomes = pool.judge_many([("\\boxed{2}", "2"), ("\\boxed{3}", "4")])
        assert [(o.status, o.correct) for o in outcomes] == [(OK, True), (OK, False)], outcomes
        assert pool.workers_replaced == 0


WRITER_PROBE = textwrap.dedent('''
    import multiprocessing, os, signal, sys, time
    from multiprocessing import resource_tracker
    import psutil
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from lens_megatron.checkpoint.training_state import _start_writer_queue_shielded

    def manager_pid(before):
        new = {p.pid for p in psutil.Process().children()} - before
        assert len(new) == 1, new
        return new.pop()

    def survives(pid):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            os.kill(pid, sig)
        time.sleep(1.0)
        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE

    resource_tracker.ensure_running()  # one more child, started by the first spawn otherwise
    before = {p.pid for p in psutil.Process().children()}
    plain = multiprocessing.get_context("spawn").Manager()  # what megatron starts, unprotected
    print("plain", survives(manager_pid(before)))
    before = {p.pid for p in psutil.Process().children()}
    _start_writer_queue_shielded()
    pid = manager_pid(before)
    # forked (the parent's command line, torch already imported), not a spawned interpreter
    # that imports torch to unpickle the first write result (3.3 s of a tiny model's first save)
    print("forked", psutil.Process(pid).cmdline() == psutil.Process().cmdline())
    print("shielded", survives(pid))
    queue = filesystem_async._get_write_results_queue()
    queue.put("ok")
    print("queue", queue.get(timeout=10))
''')


def test_checkpoint_writer_manager_survives_relayed_preemption_signals():
    res = subprocess.run([sys.executable, "-c", WRITER_PROBE], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.split()
    assert lines == ["plain", "False", "forked", "True", "shielded", "True", "queue", "ok"], (
        res.stdout + res.stderr)


@pytest.mark.parametrize("blocked", [False, True])
def test_a_blocked_mask_is_what_protects_a_spawned_child(blocked):
    """The mechanism both rely on: a spawned Python inherits the blocked signal mask."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(RELAYED) if blocked else set())
    try:
        child = ctx.Process(target=time.sleep, args=(30,), daemon=True)
        child.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        time.sleep(1.0)  # let the child's interpreter start
        _send(child.pid)
        child.join(timeout=5)
        assert child.is_alive() == blocked
    finally:
        child.kill()
        child.join()
