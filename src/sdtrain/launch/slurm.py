"""SLURM from the login node: render and submit the training job or an eval job, report status.

``sdtrain slurm submit`` resolves the config, snapshots it into the run folder, renders a batch
script from the same settings the trainer uses (nodes x tasks per node = num_nodes x devices) and
submits it with ``sbatch``. The script runs ``srun sdtrain fit --config <snapshot>
run.dir=<run> resume=auto``, so a requeued job continues in the same folder from its own newest
checkpoint. What happens inside the job (allocation checks, SIGUSR1 ``--signal=USR1@<s>`` seconds
before the time limit -> checkpoint -> ``scontrol requeue``) is :mod:`sdtrain.trainer.preemption`.

``sdtrain slurm eval`` renders ``OUT/slurm/eval.sbatch`` running ``srun sdtrain eval ...`` with
the options given: every task is one rank of the eval (``SLURM_PROCID`` / ``SLURM_NTASKS``; it
uses GPU ``SLURM_LOCALID``), the ranks split the chunks and rank 0 writes the metrics. No process
group: nothing to rendezvous. A stopped or requeued job run again into the same OUT keeps the
chunks already written.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

from sdtrain.errors import ConfigError

SBATCH_TEMPLATE = Template(
    """#!/bin/bash
# sdtrain training job "${job_name}": ${nodes} node(s) x ${tasks} task(s) per node, one task per
# ${task_unit}. Rendered by `sdtrain slurm submit`; submit it again with `sbatch <this file>` to
# continue the run (it resumes from the run folder's newest checkpoint).
#SBATCH --job-name=${job_name}
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=${tasks}
${gpu_line}#SBATCH --cpus-per-task=${cpus_per_task}
#SBATCH --time=${time}
#SBATCH --signal=USR1@${signal_seconds}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=${run_dir}/slurm/%j.out
${extra_lines}
set -euo pipefail

# Rendezvous: the first node of the allocation (its NodeAddr, which need not be the node's name
# in DNS), a port derived from the job id.
FIRST_NODE=$$(scontrol show hostnames "$$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$$(scontrol show node "$$FIRST_NODE" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')
MASTER_ADDR=$${MASTER_ADDR:-$$FIRST_NODE}
MASTER_PORT=$$((20000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

# NCCL: fail fast on a hung collective instead of waiting forever; keep the log readable.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=$${NCCL_DEBUG:-WARN}
# Data-loader workers and torch threads share the task's CPUs.
export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}

echo "sdtrain: job $$SLURM_JOB_ID restart $${SLURM_RESTART_COUNT:-0} on $$SLURM_JOB_NODELIST"
srun --kill-on-bad-exit=1 ${command}
"""
)


@dataclass
class SlurmOptions:
    """What ``sdtrain slurm submit`` asks SLURM for."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 0
    """One task per GPU by default; set for CPU-only jobs (``gpus_per_node`` 0)."""
    cpus_per_task: int = 8
    time: str = "24:00:00"
    signal_seconds: int = 300
    """SIGUSR1 this long before the time limit: enough to write a checkpoint."""
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    job_name: str = ""
    sbatch_args: list[str] = field(default_factory=list)
    """Further ``#SBATCH`` options, e.g. ``--exclusive``."""

    @property
    def tasks(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1


def time_limit_seconds(text: str) -> int | None:
    """SLURM time (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``) in seconds."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        return None
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:
        h, m, s = a, b or 0, c or 0
    elif c is not None:
        h, m, s = a, b, c
    elif b is not None:
        h, m, s = 0, a, b
    else:
        h, m, s = 0, a, 0
    return (days or 0) * 86400 + h * 3600 + m * 60 + s


def check_options(options: SlurmOptions) -> None:
    for key in ("nodes", "cpus_per_task"):
        if getattr(options, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1")
    limit = time_limit_seconds(options.time)
    if limit is None:
        raise ConfigError(f"--time {options.time!r} is not a SLURM time (e.g. 24:00:00, 2-00:00)")
    if limit <= 2 * options.signal_seconds:
        # SLURM would send the warning signal right at the start and the job would requeue at once.
        raise ConfigError(
            f"--time {options.time} leaves no room for --signal-seconds {options.signal_seconds}: "
            "the warning must come well after the start; use a longer time or a shorter warning"
        )


EVAL_TEMPLATE = Template(
    """#!/bin/bash
# sdtrain eval job "${job_name}": ${nodes} node(s) x ${tasks} task(s) per node, one task per
# ${task_unit}; the tasks split the chunks (SLURM_PROCID / SLURM_NTASKS), rank 0 writes the
# metrics. Rendered by `sdtrain slurm eval`; submit it again with `sbatch <this file>` to continue a
# stopped eval (the chunks already in ${out_dir} are kept).
#SBATCH --job-name=${job_name}
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=${tasks}
${gpu_line}#SBATCH --cpus-per-task=${cpus_per_task}
#SBATCH --time=${time}
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --chdir=${workdir}
#SBATCH --output=${out_dir}/slurm/%j.out
${extra_lines}
set -euo pipefail

export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$SLURM_CPUS_PER_TASK}

echo "sdtrain eval: job $$SLURM_JOB_ID restart $${SLURM_RESTART_COUNT:-0} on $$SLURM_JOB_NODELIST"
srun --kill-on-bad-exit=1 ${command}
"""
)


def sdtrain_command() -> list[str]:
    """How to run this very sdtrain (same interpreter / virtual environment) on the nodes."""
    return [sys.executable, "-m", "sdtrain.launch.cli"]


def render_sbatch(
    options: SlurmOptions,
    run_dir: Path,
    config_snapshot: Path,
    program: Sequence[str] | None = None,
) -> str:
    """The batch script for a run folder whose resolved config is ``config_snapshot``.

    ``program`` runs sdtrain on the nodes: by default this interpreter (same environment).
    """
    check_options(options)
    command = [*(program or sdtrain_command()), "fit", "--config", str(config_snapshot)]
    command += [f"run.dir={run_dir}", "resume=auto"]
    return SBATCH_TEMPLATE.substitute(
        **_allocation(options, run_dir.name),
        signal_seconds=options.signal_seconds,
        run_dir=run_dir,
        command=shlex.join(command),
    )


def render_eval_sbatch(
    options: SlurmOptions,
    out_dir: Path,
    eval_args: Sequence[str],
    workdir: Path,
    program: Sequence[str] | None = None,
) -> str:
    """The batch script of ``sdtrain eval <eval_args>`` writing into ``out_dir``, run from
    ``workdir`` (relative paths in the arguments are relative to it)."""
    check_options(options)
    command = [*(program or sdtrain_command()), "eval", *eval_args]
    return EVAL_TEMPLATE.substitute(
        **_allocation(options, f"eval-{out_dir.name}"),
        out_dir=out_dir,
        workdir=workdir,
        command=shlex.join(command),
    )


def _allocation(options: SlurmOptions, default_name: str) -> dict[str, object]:
    """The template fields both scripts share: the allocation and the extra #SBATCH lines."""
    extra = [
        f"#SBATCH --{name}={value}"
        for name, value in (
            ("partition", options.partition),
            ("account", options.account),
            ("qos", options.qos),
            ("constraint", options.constraint),
        )
        if value
    ] + [f"#SBATCH {arg}" for arg in options.sbatch_args]
    return dict(
        job_name=options.job_name or default_name,
        nodes=options.nodes,
        tasks=options.tasks,
        task_unit="GPU" if options.gpus_per_node else "CPU process",
        gpu_line=f"#SBATCH --gpus-per-node={options.gpus_per_node}\n"
        if options.gpus_per_node
        else "",
        cpus_per_task=options.cpus_per_task,
        time=options.time,
        extra_lines="\n".join(extra),
    )


def allocation_overrides(options: SlurmOptions) -> list[str]:
    """Trainer settings that make the run agree with the allocation."""
    overrides = [f"trainer.num_nodes={options.nodes}", f"trainer.devices={options.tasks}"]
    if not options.gpus_per_node:
        overrides.append("trainer.accelerator=cpu")
    return overrides


def submit(
    config_paths: Sequence[str | Path],
    overrides: Sequence[str],
    options: SlurmOptions,
    dry_run: bool = False,
) -> tuple[str, Path, str | None]:
    """Resolve, snapshot, render and (unless ``dry_run``) sbatch; returns (script, path, job)."""
    from sdtrain.config.loader import to_yaml
    from sdtrain.trainer.experiment import load_config
    from sdtrain.trainer.fit import prepare_run

    check_options(options)
    cfg = load_config(config_paths, [*overrides, *allocation_overrides(options)])
    plan = prepare_run(cfg)  # refuses a folder holding another run's checkpoints
    run_dir = plan.dir.resolve()
    snapshot = run_dir / "slurm" / "config.yaml"
    script = render_sbatch(options, run_dir, snapshot)
    path = run_dir / "slurm" / "train.sbatch"
    if dry_run:
        return script, path, None
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch is not on PATH: is this a SLURM login node?")
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.write_text(to_yaml(cfg))
    path.write_text(script)
    result = subprocess.run(
        ["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr.strip() or result.stdout.strip()}")
    job = result.stdout.strip().split(";")[0]
    with (run_dir / "slurm" / "jobs").open("a") as handle:
        handle.write(f"{job}\n")
    return script, path, job


def submit_eval(
    out_dir: Path, eval_args: Sequence[str], options: SlurmOptions, dry_run: bool = False
) -> tuple[str, Path, str | None]:
    """Render ``OUT/slurm/eval.sbatch`` for ``sdtrain eval <eval_args>`` (already checked by the
    caller) and (unless ``dry_run``) sbatch it; returns (script, path, job)."""
    out_dir = Path(out_dir).resolve()
    script = render_eval_sbatch(options, out_dir, eval_args, Path.cwd())
    path = out_dir / "slurm" / "eval.sbatch"
    if dry_run:
        return script, path, None
    return script, path, _sbatch(path, script, out_dir / "slurm" / "jobs")


def _sbatch(path: Path, script: str, jobs: Path) -> str:
    """Write ``script`` to ``path``, submit it, append the job id to ``jobs``."""
    if shutil.which("sbatch") is None:
        raise RuntimeError("sbatch is not on PATH: is this a SLURM login node?")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    result = subprocess.run(
        ["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"sbatch failed: {result.stderr.strip() or result.stdout.strip()}")
    job = result.stdout.strip().split(";")[0]
    with jobs.open("a") as handle:
        handle.write(f"{job}\n")
    return job


def status(run_dir: Path) -> str:
    """The run's jobs (as SLURM reports them) and its newest checkpoint."""
    from sdtrain.trainer.fit import step_checkpoints

    lines = [f"run {run_dir}"]
    jobs_file = run_dir / "slurm" / "jobs"
    jobs = jobs_file.read_text().split() if jobs_file.is_file() else []
    for job in jobs:
        lines.append(f"  job {job}: {job_state(job)}")
    if not jobs:
        lines.append("  no SLURM jobs recorded (submit with `sdtrain slurm submit`)")
    checkpoints = step_checkpoints(run_dir / "checkpoints")
    if checkpoints:
        step, path = checkpoints[-1]
        lines.append(f"  last checkpoint: step {step} ({path})")
    else:
        lines.append("  no checkpoint yet")
    return "\n".join(lines)


def job_state(job: str) -> str:
    """``STATE (restarts N, reason)`` from scontrol, or why it is unknown."""
    if shutil.which("scontrol") is None:
        return "unknown (scontrol not on PATH)"
    result = subprocess.run(
        ["scontrol", "show", "job", job], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        return "unknown (no longer known to SLURM)"
    fields = dict(re.findall(r"(\w+)=(\S+)", result.stdout))
    return f"{fields.get('JobState', '?')} (restarts {fields.get('Restarts', '0')}, " + (
        f"reason {fields.get('Reason', 'None')}, nodes {fields.get('NodeList', '?')})"
    )
