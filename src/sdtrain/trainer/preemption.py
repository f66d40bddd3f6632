"""Inside a training job: the allocation check, preemption (signal -> checkpoint -> stop) and the
SLURM requeue.

SLURM sends SIGUSR1 ``--signal=USR1@<s>`` seconds before the time limit (or on ``scancel
--signal=USR1``) and SIGTERM on preemption, to every process of the step. ``PreemptionCallback``
makes every rank stop after the same optimiser step, writes the step checkpoint and, inside a
SLURM step, asks SLURM to requeue the job (the requeued job resumes from that checkpoint).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Callback

from sdtrain.errors import ConfigError

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


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


class PreemptionCallback(Callback):
    """On SIGUSR1 / SIGTERM: every rank stops after the same step, a checkpoint is written and
    the job is requeued (under SLURM)."""

    def __init__(self, save: Any) -> None:
        self.save = save  # the StepCheckpoint's save function
        self.signalled = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signalled = True
        print(f"sdtrain: received {signal.Signals(signum).name}; checkpointing", file=sys.stderr)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig in REQUEUE_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

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
            return
        self.save(trainer)
        trainer.should_stop = True
        if trainer.is_global_zero and in_slurm_step():
            requeue_job()
