"""Graceful preemption: turn SIGUSR1/SIGTERM into "save a checkpoint and exit".

SLURM announces the end of a job with a signal: ``#SBATCH --signal=B:USR1@120`` sends SIGUSR1
to the batch shell 120 s before the time limit (our generated script forwards it to the ``srun``
step, which forwards it to every task), and a cancelled or preempted job gets SIGTERM followed by
SIGKILL ``KillWait`` seconds later. The trainer must not die inside a collective or half-way
through writing a checkpoint, so the signal handler only sets a flag; the training loop polls
:meth:`PreemptionHandler.should_stop` once per step at a safe point. That call agrees across ranks
(one all-reduce MAX of a single integer over the process group), because a signal may reach only
some ranks — every rank must take the same branch or the next collective hangs.

Usage in a training loop::

    handler = PreemptionHandler().install()
    try:
        for step in ...:
            train_one_step()
            if handler.should_stop():
                save_checkpoint()
                raise SystemExit(PREEMPTED_EXIT_CODE)
    finally:
        handler.uninstall()

The exit code :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL``: "temporary failure, retry
later") tells the batch script that the run saved a resumable checkpoint and should be requeued.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from types import FrameType
from typing import Any, Callable, Iterable, Optional, Union

#: Exit status of a trainer that stopped on request after saving a resumable checkpoint.
PREEMPTED_EXIT_CODE = 75

#: Signals handled by default: SIGUSR1 (SLURM's advance warning) and SIGTERM (cancel/preempt).
DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")

# Value all-reduced for a stop requested by code (request()) rather than by a signal; larger than
# any real signal number so MAX prefers a named request over "no request" deterministically.
_MANUAL_REQUEST = 255

SignalSpec = Union[str, int, signal.Signals]
_Handler = Union[Callable[[int, Optional[FrameType]], Any], int, None]


def parse_signal(spec: SignalSpec) -> signal.Signals:
    """``"USR1"``, ``"SIGUSR1"``, ``10`` or ``signal.SIGUSR1`` -> ``signal.SIGUSR1``."""
    if isinstance(spec, signal.Signals):
        return spec
    if isinstance(spec, int):
        try:
            return signal.Signals(spec)
        except ValueError:
            raise ValueError(f"preemption signal {spec} is not a valid signal number") from None
    name = str(spec).strip().upper()
    if name.isdigit():
        return parse_signal(int(name))
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(
            f"preemption signal {spec!r} is not a known signal name (e.g. SIGUSR1, SIGTERM)"
        ) from None


def signal_name(signum: int) -> str:
    """Name for a signal number as reported by :attr:`PreemptionHandler.reason`."""
    if signum == _MANUAL_REQUEST:
        return "request"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class PreemptionHandler:
    """Installs flag-only handlers for preemption signals and answers "should we stop?".

    ``signals`` is an iterable of names or numbers (default SIGUSR1 and SIGTERM). Handlers must be
    installed from the main thread (a Python rule for ``signal.signal``). ``uninstall`` restores
    the previous handlers; the object is also a context manager.
    """

    def __init__(self, signals: Iterable[SignalSpec] = DEFAULT_SIGNALS) -> None:
        self.signals: tuple[signal.Signals, ...] = tuple(dict.fromkeys(
            parse_signal(s) for s in signals))
        if not self.signals:
            raise ValueError("PreemptionHandler needs at least one signal to handle")
        self._previous: dict[signal.Signals, _Handler] = {}
        self._local: int = 0  # first signal number received here (or _MANUAL_REQUEST), 0 = none
        self._agreed: int = 0  # result of the last should_stop() agreement

    # -- installation -------------------------------------------------------------------
    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def install(self) -> "PreemptionHandler":
        """Install the handlers (idempotent); returns ``self``."""
        if self.installed:
            return self
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must be called from the main thread "
                               "(Python only delivers signals to handlers set there)")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were active before :meth:`install`."""
        while self._previous:
            sig, previous = self._previous.popitem()
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)

    def __enter__(self) -> "PreemptionHandler":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        # Runs between bytecodes of the main thread: set a flag, nothing else (no I/O, no locks).
        if not self._local:
            self._local = signum

    # -- queries ------------------------------------------------------------------------
    def request(self) -> None:
        """Ask for a stop from code (e.g. a wall-clock budget), as if a signal had arrived."""
        if not self._local:
            self._local = _MANUAL_REQUEST

    @property
    def requested(self) -> bool:
        """Whether :meth:`should_stop` has returned True (the same on every rank).

        Use it after the training loop to pick the exit code: a signal that arrived after the
        last poll (the run finished anyway) does not count, so the job is not requeued.
        """
        return bool(self._agreed)

    @property
    def requested_locally(self) -> bool:
        """Whether this process received a signal (or :meth:`request`); no communication."""
        return bool(self._local)

    @property
    def reason(self) -> Optional[str]:
        """``"SIGUSR1"``/``"SIGTERM"``/``"request"`` once a stop is known, else ``None``.

        After :meth:`should_stop` returned True this is the same on every rank (the largest
        signal number seen on any rank).
        """
        value = self._agreed or self._local
        return signal_name(value) if value else None

    def should_stop(self, group: Any = None) -> bool:
        """True when a stop was requested on any rank of ``group``; the same answer everywhere.

        With ``torch.distributed`` initialised this is a collective: every rank of ``group``
        (default: the world) must call it at the same point of the step. Without a process group
        it is the local flag.
        """
        self._agreed = max(self._agreed, _all_reduce_max(self._local, group))
        return bool(self._agreed)


def _all_reduce_max(value: int, group: Any = None) -> int:
    """MAX of ``value`` over ``group``; ``value`` itself when no process group is up."""
    try:
        import torch
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch is a hard dependency of the package
        return value
    if not (dist.is_available() and dist.is_initialized()):
        return value
    device = "cpu"
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([value], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


#: What a job step's helper processes must not die of: SLURM relays these to every process of
#: the step (slurmstepd signals the whole process tree), not only to the trainer.
RELAYED_SIGNALS = frozenset({signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM})


@contextlib.contextmanager
def signals_blocked_for_children(signals: Iterable[signal.Signals] = RELAYED_SIGNALS):
    """Start helper processes (verifier workers, a checkpoint writer) inside this block.

    A child inherits the blocked mask (across fork and exec), so it never receives a relayed
    preemption signal, before or after its interpreter starts; it still ends by its own
    protocol or SIGKILL. Here the signals stay pending and reach the flag-only handler when the
    block ends. multiprocessing's resource tracker (a spawned helper too) is started inside the
    block; its start-up unblocks SIGINT and SIGTERM (CPython bpo-33613), so the block is set
    again before the caller's children start.
    """
    from multiprocessing import resource_tracker

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
    try:
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signals))
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


__all__ = ["PREEMPTED_EXIT_CODE", "DEFAULT_SIGNALS", "RELAYED_SIGNALS", "PreemptionHandler",
           "parse_signal", "signal_name", "signals_blocked_for_children"]
