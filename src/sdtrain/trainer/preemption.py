"""Inside a training run: the allocation check, signals (checkpoint, stop, say so) and the SLURM
requeue.

SLURM sends SIGUSR1 ``--signal=USR1@<s>`` seconds before the time limit (or on ``scancel
--signal=USR1``) and SIGTERM on preemption, to every process of the step; an operator sends
SIGTERM (``kill``) or SIGINT (Ctrl-C). ``StopSignals`` owns these three signals from the first line
of ``fit`` to its last, and what a signal does depends on where the run is:

- setting up, or waiting for data with nothing trained since the last checkpoint: stop at once;
- waiting for data (a slow or stalled shard) after training, in a single process: write the
  step checkpoint now, then stop;
- inside a step, between gradient-accumulation micro-batches, or with several ranks (which must
  agree): ``PreemptionCallback`` stops every rank after the same optimiser step and writes its
  checkpoint; if no step ends within ``STOP_DEADLINE_S``, stop without one;
- a second signal stops at once.

The stop is ``RunInterrupted`` (the message says what was saved and how to continue; the CLI exits
128 + the signal number) — except inside a SLURM step on SIGUSR1 / SIGTERM, where rank 0 asks SLURM
to requeue the job and ``fit`` returns normally: the requeued job resumes from the checkpoint.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

from sdtrain.errors import ConfigError, RunInterrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Under SLURM these end in a requeue; SIGINT (an operator's Ctrl-C) never does."""
STOP_DEADLINE_S = 120.0
"""Longest wait, after a signal, for the current step to end before stopping without a checkpoint
(a hung step, a storage stall with several ranks)."""


def in_slurm_step() -> bool:
    """True inside an ``srun`` task of a batch job (not on a login node, not under salloc bash)."""
    return "SLURM_JOB_ID" in os.environ and "SLURM_STEP_ID" in os.environ


def tasks_per_node_from_env() -> int | None:
    """``SLURM_NTASKS_PER_NODE``, else the first count of ``SLURM_TASKS_PER_NODE`` ("8(x2)")."""
    value = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not value:
        return None
    match = re.match(r"(\d+)", value)
    return int(match.group(1)) if match else None


def check_allocation(devices: int, num_nodes: int) -> None:
    """Inside a SLURM step, the trainer's devices x nodes must be the allocation's tasks."""
    if not in_slurm_step():
        return
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES") or os.environ.get("SLURM_NNODES") or 1)
    tasks = tasks_per_node_from_env()
    problems = []
    if nodes != num_nodes:
        problems.append(
            f"the job has {nodes} node(s) but trainer.num_nodes={num_nodes}: set "
            f"trainer.num_nodes={nodes} or submit with --nodes={num_nodes}"
        )
    if tasks is not None and tasks != devices:
        problems.append(
            f"the job runs {tasks} task(s) per node but trainer.devices={devices}: set "
            f"trainer.devices={tasks} or submit with --ntasks-per-node={devices} (one task per "
            "GPU)"
        )
    if problems:
        raise ConfigError("; ".join(problems), key="trainer.devices")


def requeue_job() -> None:
    """Ask SLURM to requeue this job (it restarts the batch script, which resumes)."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    result = subprocess.run(
        ["scontrol", "requeue", job], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        print(f"sdtrain: scontrol requeue {job} failed: {result.stderr.strip()}", file=sys.stderr)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """The run's handler of SIGTERM, SIGINT and SIGUSR1 (see the module docstring), installed by
    ``with StopSignals():`` and restored on leaving. ``received`` lists every signal that came."""

    def __init__(self, deadline_s: float = STOP_DEADLINE_S) -> None:
        self.deadline_s = deadline_s
        self.received: list[int] = []
        self.phase = "setup"
        """setup | waiting (between optimiser steps) | step | done."""
        self.trainer: pl.Trainer | None = None
        self.save: Callable[[pl.Trainer], None] | None = None
        self.saved_step: Callable[[], int] = lambda: -1
        """The step of the newest checkpoint on disk."""
        self.start_step = 0
        """The step training started (or resumed) from."""
        self.requeued = False
        self.stopped = False
        """Set when the run stopped for a signal (this rank's or another's) after a step."""
        self._previous: dict[int, Any] = {}

    @property
    def signum(self) -> int | None:
        """The first signal received, if any."""
        return self.received[0] if self.received else None

    # --- installing -----------------------------------------------------------------------

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (*STOP_SIGNALS, signal.SIGALRM):
                self._previous[sig] = signal.getsignal(sig)
            self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.cancel_deadline()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if self._previous and in_slurm_step():
            # SLURM's warning signal may come after the work is done (or stopped): it must not
            # kill the step while it exits (SIGUSR1's default action would mark the job FAILED).
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self._previous = {}

    def install(self) -> None:
        """(Re)install the handlers: Lightning puts its own SIGTERM handler in front of ours when
        training starts, and would end the run with exit status 0 after the next step."""
        if self._previous:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handler)
            signal.signal(signal.SIGALRM, self._deadline_passed)

    # --- what a signal does ---------------------------------------------------------------

    def _handler(self, signum: int, frame: Any) -> None:
        first = not self.received
        self.received.append(signum)
        name = signal_name(signum)
        if not first:
            raise self.interrupted(f"stopped at once by a second signal ({name})")
        if self.phase == "done":
            print(f"sdtrain: received {name} while finishing; stopping after that", file=sys.stderr)
            return
        trained = self.trainer is not None and self.trainer.global_step > max(
            self.start_step, self.saved_step()
        )
        if self.phase == "setup" or (self.phase == "waiting" and not trained):
            print(f"sdtrain: received {name}; stopping (nothing trained since the last "
                  "checkpoint)", file=sys.stderr)  # fmt: skip
            raise self.interrupted(self._requeue_note(signum))
        if self.phase == "waiting" and self.trainer is not None and self.trainer.world_size == 1:
            print(f"sdtrain: received {name}; checkpointing (while waiting for data)",
                  file=sys.stderr)  # fmt: skip
            assert self.save is not None
            self.save(self.trainer)
            raise self.interrupted(self._requeue_note(signum))
        print(f"sdtrain: received {name}; checkpointing after this step", file=sys.stderr)
        self.arm_deadline()

    def _requeue_note(self, signum: int) -> str:
        if signum in REQUEUE_SIGNALS and in_slurm_step() and self._is_rank_zero():
            requeue_job()
            self.requeued = True
            return "SLURM requeues the job"
        return ""

    def _is_rank_zero(self) -> bool:
        return self.trainer is None or self.trainer.is_global_zero

    def arm_deadline(self) -> None:
        if self._previous and self.deadline_s > 0:
            signal.setitimer(signal.ITIMER_REAL, self.deadline_s)

    def cancel_deadline(self) -> None:
        if self._previous:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _deadline_passed(self, signum: int, frame: Any) -> None:
        raise self.interrupted(
            f"no training step ended within {self.deadline_s:g} s of the signal: stopped without "
            "a checkpoint"
        )

    def interrupted(self, note: str = "") -> RunInterrupted:
        """The stop, for the first signal received (``fit`` words the message for the user)."""
        assert self.signum is not None
        step = self.trainer.global_step if self.trainer is not None else None
        return RunInterrupted(self.signum, note, step=step, requeued=self.requeued,
                              received=tuple(self.received))  # fmt: skip


class PreemptionCallback(Callback):
    """Tells ``StopSignals`` where the run is and, after an optimiser step during which any rank
    was signalled, makes every rank stop after that step: checkpoint, then (inside a SLURM step,
    on SIGUSR1 / SIGTERM) requeue. Put it after every other callback: it acts at the very end of
    the step."""

    def __init__(
        self,
        save: Callable[[pl.Trainer], None],
        signals: StopSignals | None = None,
        saved_step: Callable[[], int] | None = None,
    ) -> None:
        self.save = save  # the StepCheckpoint's save function
        self.signals = signals or StopSignals()
        self.signals.save = save
        if saved_step is not None:
            self.signals.saved_step = saved_step

    @property
    def signalled(self) -> bool:
        return bool(self.signals.received)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signals.trainer = trainer
        self.signals.start_step = trainer.global_step
        self.signals.install()
        self.signals.phase = "waiting"

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.signals.phase = "step"

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.signals.phase = "done"

    def _anyone_signalled(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.signalled else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # only between optimiser steps
        if not self._anyone_signalled(pl_module.device):
            self.signals.phase = "waiting"
            return
        self.signals.cancel_deadline()
        self.signals.phase = "done"
        self.signals.stopped = True
        self.save(trainer)
        trainer.should_stop = True
        signum = self.signals.signum or signal.SIGTERM  # another rank's signal
        if trainer.is_global_zero and in_slurm_step() and signum in REQUEUE_SIGNALS:
            requeue_job()
            self.signals.requeued = True
