"""Preemption signals: flag-only handlers, restore on uninstall, agreement across gloo ranks."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from lens_megatron.parallel.spawn import run_in_processes
from lens_megatron.preemption import (
    PREEMPTED_EXIT_CODE,
    PreemptionHandler,
    parse_signal,
    signal_name,
)


def _send_self(sig: int, handler: PreemptionHandler, timeout: float = 2.0) -> None:
    """Signal this process and wait until the Python-level handler has run."""
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + timeout
    while not handler.requested_locally and time.monotonic() < deadline:
        time.sleep(0.001)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_flag_and_does_not_kill(sig):
    with PreemptionHandler() as handler:
        assert not handler.should_stop() and handler.reason is None
        _send_self(sig, handler)
        assert handler.requested_locally and not handler.requested  # not yet agreed
        assert handler.should_stop() and handler.requested
        assert handler.reason == sig.name
        assert handler.should_stop()  # sticky


def test_first_signal_is_the_reason():
    with PreemptionHandler() as handler:
        _send_self(signal.SIGUSR1, handler)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert handler.should_stop() and handler.reason == "SIGUSR1"


def test_only_configured_signals_are_handled():
    seen = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: seen.append(s))
    try:
        with PreemptionHandler(signals=["USR1"]) as handler:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.01)
            assert seen == [signal.SIGUSR2]
            assert not handler.should_stop()
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_uninstall_restores_previous_handlers():
    seen = []

    def custom(signum, frame):
        seen.append(signum)

    old_usr1 = signal.signal(signal.SIGUSR1, custom)
    old_term = signal.getsignal(signal.SIGTERM)
    try:
        handler = PreemptionHandler().install()
        assert handler.installed
        assert signal.getsignal(signal.SIGUSR1) == handler._on_signal
        handler.uninstall()
        assert not handler.installed
        assert signal.getsignal(signal.SIGUSR1) is custom
        assert signal.getsignal(signal.SIGTERM) == old_term
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert seen == [signal.SIGUSR1] and not handler.requested_locally
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)


def test_install_is_idempotent_and_uninstall_restores_the_original():
    original = signal.getsignal(signal.SIGUSR1)
    handler = PreemptionHandler()
    handler.install()
    handler.install()
    handler.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == original


def test_request_from_code():
    handler = PreemptionHandler()
    assert not handler.should_stop()
    handler.request()
    assert handler.should_stop() and handler.reason == "request"


def test_install_outside_main_thread_fails_clearly():
    errors = []

    def target():
        try:
            PreemptionHandler().install()
        except RuntimeError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=target)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


@pytest.mark.parametrize("spec,expected", [
    ("USR1", signal.SIGUSR1), ("sigterm", signal.SIGTERM), ("SIGUSR2", signal.SIGUSR2),
    (15, signal.SIGTERM), ("10", signal.SIGUSR1), (signal.SIGINT, signal.SIGINT),
])
def test_parse_signal(spec, expected):
    assert parse_signal(spec) == expected


@pytest.mark.parametrize("spec", ["SIGNOPE", 0, "", 9999])
def test_parse_signal_rejects_unknown(spec):
    with pytest.raises(ValueError, match="preemption signal"):
        parse_signal(spec)


def test_empty_signal_list_rejected():
    with pytest.raises(ValueError, match="at least one signal"):
        PreemptionHandler(signals=[])


def test_signal_name():
    assert signal_name(int(signal.SIGTERM)) == "SIGTERM" and signal_name(255) == "request"


_CHILD = textwrap.dedent("""
    import sys, time
    from lens_megatron.preemption import PreemptionHandler, PREEMPTED_EXIT_CODE
    handler = PreemptionHandler().install()
    print("ready", flush=True)
    for step in range(3000):
        time.sleep(0.01)
        if handler.should_stop():
            print(f"stopping at step {step} on {handler.reason}", flush=True)
            sys.exit(PREEMPTED_EXIT_CODE)
    sys.exit(3)
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_subprocess_exits_with_preempted_code(sig):
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, out
    assert f"on {sig.name}" in out


def _two_rank_stop(signals_by_rank):
    """Rank r sends itself signals_by_rank[r] (or nothing); returns what each rank decided."""
    import torch.distributed as dist

    rank = dist.get_rank()
    with PreemptionHandler() as handler:
        before = handler.should_stop()
        sig = signals_by_rank[rank]
        if sig is not None:
            _send_self(sig, handler)
        local = handler.requested_locally
        after = handler.should_stop()
        return before, local, after, handler.reason


@pytest.mark.slow
def test_one_rank_signal_stops_both_ranks():
    results = run_in_processes(_two_rank_stop, 2, args=([None, signal.SIGUSR1],), timeout=120)
    assert [r[0] for r in results] == [False, False]
    assert [r[1] for r in results] == [False, True]  # only rank 1 saw the signal
    assert [r[2] for r in results] == [True, True]  # both stop
    assert [r[3] for r in results] == ["SIGUSR1", "SIGUSR1"]


@pytest.mark.slow
def test_ranks_agree_on_the_reason():
    results = run_in_processes(_two_rank_stop, 2, args=([signal.SIGTERM, signal.SIGUSR1],),
                               timeout=120)
    assert [r[2] for r in results] == [True, True]
    assert [r[3] for r in results] == ["SIGTERM", "SIGTERM"]  # the larger number on both


@pytest.mark.slow
def test_no_signal_no_stop_across_ranks():
    results = run_in_processes(_two_rank_stop, 2, args=([None, None],), timeout=120)
    assert [r[2] for r in results] == [False, False]
