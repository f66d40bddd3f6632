"""The lifecycle of DataLoader worker processes: they leave the preemption signals to the trainer,
yet end when their loader shuts them down, and die with their parent.

SLURM signals every process of a job step (SIGUSR1 before the time limit, SIGTERM on preemption or
``scancel``). The trainer checkpoints on them; a worker that died of one would make the DataLoader
raise in the trainer while it saves. So the workers ignore SIGUSR1 and ignore SIGTERM, except
when the SIGTERM comes from their own loader: torch's ``_shutdown_workers`` asks the workers to
stop, waits a few seconds and then ``terminate()``s the ones still busy. Ignoring that SIGTERM too
(as the workers once did) hung every run that stopped on a data error: the loader, and then
Python's exit, waited on workers that would never end.

A loader tells its workers that it is stopping through a shared flag (``WorkerControl.stop``),
set before torch's shutdown begins, and at interpreter exit for loaders never closed. Workers
check the flag between samples and end their stream; a SIGTERM that finds the flag set (or the
parent gone) ends the worker at once. On Linux the kernel kills a worker whose parent dies
(``PR_SET_PDEATHSIG``), so a SIGKILL of the trainer leaves no orphans spinning.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import os
import signal
import sys
import weakref
from types import FrameType

from sdtrain.data.shards import kill_pipe_commands

_PR_SET_PDEATHSIG = 1
_LIVE: weakref.WeakSet[WorkerControl] = weakref.WeakSet()


class WorkerControl:
    """Shared by one iteration of a loader and its workers; also the workers' ``worker_init_fn``.

    Created in the loader's process (``parent``); pickled into each worker with the dataset.
    """

    def __init__(self) -> None:
        self.parent = os.getpid()
        self._stopping = multiprocessing.Event()
        _LIVE.add(self)

    # --- the loader's side ------------------------------------------------------------------

    def stop(self) -> None:
        """The loader is about to shut its workers down: they may end (and SIGTERM ends them)."""
        self._stopping.set()

    # --- the workers' side ------------------------------------------------------------------

    def stopping(self) -> bool:
        """True once the loader stops its workers, or when the process that started them is
        gone (the kernel's parent-death signal covers Linux; this covers the rest)."""
        return self._stopping.is_set() or os.getppid() != self.parent

    def __call__(self, worker_id: int) -> None:
        """``worker_init_fn``: die with the parent, ignore SIGUSR1, end on the loader's SIGTERM."""
        _die_with_parent(self.parent)
        # Handlers rather than SIG_IGN: an ignored signal stays ignored in the ``pipe:`` shard
        # commands a worker runs, a handled one is reset to its default there.
        signal.signal(signal.SIGUSR1, _ignore)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping():
            kill_pipe_commands()
            os._exit(0)  # the loader is done with this worker; nothing of its state is needed
        # Otherwise SLURM's step-wide SIGTERM (or a stray kill): the trainer handles it and then
        # shuts this worker down through its loader.

    def __getstate__(self) -> dict[str, object]:
        return {"parent": self.parent, "_stopping": self._stopping}


def _ignore(signum: int, frame: FrameType | None) -> None:
    """SIGUSR1 in a worker: the trainer's signal, not ours."""


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; elsewhere the workers
    notice through ``WorkerControl.stopping`` and torch's own watchdog)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


@atexit.register
def _stop_all() -> None:
    """At interpreter exit, before multiprocessing terminates and joins its children: loaders
    never closed (a generator left suspended) must still let their workers end."""
    for control in list(_LIVE):
        control.stop()
