"""The SLURM cluster the training tests run on (slurm/local-cluster.sh in CI): batch jobs on one
and on two nodes, requeue (how soon a requeued job restarts) and USR1 delivery to the batch
script and to job steps. Skipped, saying why, where no SLURM cluster is running."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
import slurm_support  # tests/ is on sys.path (pytest's default import mode)
from slurm_support import (
    SlurmCluster,
    job_info,
    requeue_hold_seconds,
    restart_count,
    run_slurm,
    slurm_available,
    submit,
    wait_for_job,
    wait_for_state,
    wait_for_text,
)

slurm_cluster = slurm_support.slurm_cluster  # the fixture: skips without a cluster


def stamps(text: str, label: str) -> list[float]:
    """The epoch times printed as ``<label> <seconds>`` lines by a job script."""
    return [float(t) for t in re.findall(rf"^{re.escape(label)} (\S+)$", text, re.MULTILINE)]


def test_slurm_available_gives_a_reason_without_a_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    reason = slurm_available()
    assert reason is not None and ("SLURM_CONF" in reason or "sbatch" in reason)
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "missing.conf"))
    reason = slurm_available()
    assert reason is not None and ("not readable" in reason or "sbatch" in reason)


def test_one_node_job_runs_srun(slurm_cluster: SlurmCluster, tmp_path: Path):
    started = time.monotonic()
    job = submit("#!/bin/bash\n#SBATCH --nodes=1 --ntasks=1\nsrun hostname\n", tmp_path)
    assert wait_for_job(job, timeout=60) == "COMPLETED"
    print(f"1-node job: submit to COMPLETED in {time.monotonic() - started:.1f} s")
    assert (tmp_path / f"slurm-{job}.out").read_text().split() == [socket.gethostname()]


def test_two_node_job_runs_a_task_on_each_node(slurm_cluster: SlurmCluster, tmp_path: Path):
    if len(slurm_cluster.nodes) < 2:
        pytest.skip(f"needs 2 SLURM nodes, has {slurm_cluster.nodes}")
    script = """#!/bin/bash
#SBATCH --nodes=2 --ntasks-per-node=1
srun bash -c 'echo "task $SLURM_PROCID on $SLURMD_NODENAME of $SLURM_JOB_NUM_NODES"'
"""
    started = time.monotonic()
    job = submit(script, tmp_path)
    assert wait_for_job(job, timeout=60) == "COMPLETED"
    print(f"2-node job: submit to COMPLETED in {time.monotonic() - started:.1f} s")
    lines = sorted((tmp_path / f"slurm-{job}.out").read_text().splitlines())
    tasks = [re.fullmatch(r"task (\d) on (\S+) of 2", line) for line in lines]
    assert all(tasks), lines
    assert sorted(task[1] for task in tasks) == ["0", "1"]
    nodes = {task[2] for task in tasks}
    assert len(nodes) == 2 and nodes <= set(slurm_cluster.nodes), lines


def test_requeued_job_restarts_soon(slurm_cluster: SlurmCluster, tmp_path: Path):
    """A job that requeues itself runs again with SLURM_RESTART_COUNT=1. SLURM holds a requeued
    job for the credential lifetime + 1 s (121 s by default, 6 s in the local cluster)."""
    script = """#!/bin/bash
#SBATCH --requeue --open-mode=append --output=requeue.out
echo "restart count ${SLURM_RESTART_COUNT:-0}"
echo "started $(date +%s.%N)"
if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then
    echo "requeue $(date +%s.%N)"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 120
    echo "never requeued"
    exit 1
fi
"""
    hold = requeue_hold_seconds()
    job = submit(script, tmp_path)
    assert wait_for_job(job, timeout=hold + 60) == "COMPLETED", job_info(job)
    out = (tmp_path / "requeue.out").read_text()
    assert restart_count(job) == 1
    assert re.findall(r"^restart count (\d+)$", out, re.MULTILINE) == ["0", "1"], out
    (requeued,) = stamps(out, "requeue")
    _first, second = stamps(out, "started")
    delay = second - requeued
    print(f"requeue: restarted {delay:.1f} s after `scontrol requeue` (hold {hold} s)")
    assert delay < hold + 20, out


def test_usr1_reaches_the_batch_script(slurm_cluster: SlurmCluster, tmp_path: Path):
    """``scancel --batch --signal=USR1``: the batch shell's trap runs (between commands)."""
    script = """#!/bin/bash
trap 'echo "got USR1 $(date +%s.%N)"; exit 0' USR1
echo ready
while true; do sleep 0.2; done
"""
    job = submit(script, tmp_path)
    out_file = tmp_path / f"slurm-{job}.out"
    wait_for_text(out_file, "ready", timeout=60)
    sent = time.time()
    run_slurm("scancel", "--batch", "--signal=USR1", str(job))
    assert wait_for_job(job, timeout=30) == "COMPLETED"
    (received,) = stamps(out_file.read_text(), "got USR1")
    print(f"USR1 to the batch script: trap ran {received - sent:.2f} s after scancel")


def test_usr1_reaches_a_job_step(slurm_cluster: SlurmCluster, tmp_path: Path):
    """``scancel --signal=USR1`` (no --batch) signals the job's steps: what a training process
    started by ``srun`` (Lightning's SIGUSR1 handler) gets."""
    script = """#!/bin/bash
srun --ntasks=1 bash -c '
trap "echo \\"step got USR1 \\$(date +%s.%N)\\"; exit 0" USR1
echo ready
while true; do sleep 0.2; done'
"""
    job = submit(script, tmp_path)
    out_file = tmp_path / f"slurm-{job}.out"
    wait_for_text(out_file, "ready", timeout=60)
    sent = time.time()
    run_slurm("scancel", "--signal=USR1", str(job))
    assert wait_for_job(job, timeout=30) == "COMPLETED"
    (received,) = stamps(out_file.read_text(), "step got USR1")
    print(f"USR1 to a job step: trap ran {received - sent:.2f} s after scancel")


@pytest.mark.slow
def test_warning_signal_can_come_at_job_start(slurm_cluster: SlurmCluster, tmp_path: Path):
    """``--signal=B:USR1@60`` with ``--time=1``: time limit minus warning time is 0, and
    slurmctld, which checks time limits every 30 s and sends warnings up to one check early,
    signals the job at its first check after the start, not at a later, computed time."""
    script = """#!/bin/bash
#SBATCH --time=1 --signal=B:USR1@60
echo "started $(date +%s.%N)"
trap 'echo "got USR1 $(date +%s.%N)"; exit 0' USR1
while true; do sleep 0.2; done
"""
    job = submit(script, tmp_path)
    wait_for_state(job, {"RUNNING"}, timeout=60)
    assert wait_for_job(job, timeout=60) == "COMPLETED", job_info(job)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    (started,) = stamps(out, "started")
    (received,) = stamps(out, "got USR1")
    print(f"warning signal: USR1 {received - started:.1f} s after the job started")
    assert received - started < 40, out
