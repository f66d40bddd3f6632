"""Helpers and the ``slurm_cluster`` fixture for tests that run jobs on a real SLURM cluster.

CI starts one on localhost with ``slurm/local-cluster.sh start`` (two nodes, ``node1`` and
``node2``, partition ``debug``) and exports ``SLURM_CONF``; elsewhere (a laptop without SLURM)
the tests that use the fixture skip, saying why. A test module gets the fixture with::

    import slurm_support  # tests/ is on sys.path (pytest's default import mode)
    from slurm_support import submit, wait_for_job

    slurm_cluster = slurm_support.slurm_cluster

(an assignment, not ``from slurm_support import slurm_cluster``, which ruff reports as an
unused import redefined by the test's argument).

The cluster has no accounting daemon, so ``sacct`` knows nothing there: job states come from
``scontrol show job``, which keeps finished jobs for ``MinJobAge`` (600 s in the local cluster);
``sacct`` is only asked about jobs that ``scontrol`` has already forgotten, where accounting is
configured.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

# States after which a job never runs again (a requeued job goes back to PENDING instead).
FINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
# Node states (sinfo %t, without a suffix such as `*` = not responding) that can run jobs.
USABLE_NODE_STATES = frozenset({"idle", "mix", "alloc", "comp"})
COMMAND_TIMEOUT = 30.0


@dataclass(frozen=True)
class SlurmCluster:
    """What the tests know about the cluster: its config and its usable nodes."""

    conf: Path
    nodes: tuple[str, ...]


def slurm_env() -> dict[str, str]:
    """The environment for SLURM commands: ours, less the ``SLURM_*`` variables of any job
    pytest itself runs in (they would leak into the submitted jobs), ``SLURM_CONF`` kept."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("SLURM_") or key == "SLURM_CONF"
    }


def run_slurm(*args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT, **kwargs):
    """Run a SLURM command; its ``CompletedProcess`` (text). Raises with its stderr if it fails
    and ``check``."""
    result = subprocess.run(
        args, capture_output=True, text=True, env=slurm_env(), timeout=timeout, **kwargs
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
        )
    return result


def usable_nodes() -> tuple[str, ...]:
    """Names of the nodes that can run jobs now (sinfo)."""
    out = run_slurm("sinfo", "--noheader", "--Node", "--format=%N %t").stdout
    nodes = []
    for line in out.splitlines():
        name, _, state = line.strip().partition(" ")
        if state in USABLE_NODE_STATES and name not in nodes:
            nodes.append(name)
    return tuple(nodes)


def slurm_available() -> str | None:
    """None when a SLURM cluster is there to run jobs on, else why not (a skip reason)."""
    hint = "start one with `bash slurm/local-cluster.sh start` and export SLURM_CONF"
    if shutil.which("sbatch") is None:
        return f"no sbatch on PATH ({hint})"
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        return f"SLURM_CONF is not set ({hint})"
    if not os.access(conf, os.R_OK):
        return f"SLURM_CONF={conf} is not readable ({hint})"
    try:
        nodes = usable_nodes()
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as error:
        return f"sinfo failed with SLURM_CONF={conf}: {error} ({hint})"
    if not nodes:
        return f"no idle (or usable) SLURM nodes with SLURM_CONF={conf} ({hint})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The running cluster; skips the test, saying why, where there is none."""
    reason = slurm_available()
    if reason is not None:
        pytest.skip(f"no SLURM cluster: {reason}")
    return SlurmCluster(conf=Path(os.environ["SLURM_CONF"]), nodes=usable_nodes())


def submit(script: str, cwd: str | os.PathLike, *sbatch_args: str) -> int:
    """Submit a batch script (its text; ``#SBATCH`` lines work) to run in ``cwd``; the job id.
    Output goes to ``cwd/slurm-<id>.out`` unless the script says otherwise."""
    out = run_slurm(
        "sbatch", "--parsable", f"--chdir={cwd}", *sbatch_args, input=script, cwd=cwd
    ).stdout
    return int(out.strip().split(";")[0])


def job_info(job_id: int) -> dict[str, str] | None:
    """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``NodeList``...), or None
    once the controller has forgotten the job."""
    result = run_slurm("scontrol", "--oneliner", "show", "job", str(job_id), check=False)
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise RuntimeError(f"scontrol show job {job_id}: {result.stderr.strip()}")
    return dict(re.findall(r"(\w[\w:/]*)=(\S*)", result.stdout))


@cache
def accounting_configured() -> bool:
    """Whether ``sacct`` has something to ask (an accounting storage plugin is set)."""
    out = run_slurm("scontrol", "show", "config").stdout
    match = re.search(r"^AccountingStorageType\s*=\s*(\S+)", out, re.MULTILINE)
    return bool(match) and match.group(1) != "accounting_storage/none"


def job_state(job_id: int) -> str:
    """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``...), ``UNKNOWN`` if SLURM no
    longer knows it."""
    info = job_info(job_id)
    if info is not None:
        return info.get("JobState", "UNKNOWN")
    if accounting_configured():
        args = ("--noheader", "--parsable2", "--allocations", "--format=State", f"--jobs={job_id}")
        out = run_slurm("sacct", *args).stdout.split()
        if out:
            return out[0]  # "CANCELLED by 0" -> CANCELLED
    return "UNKNOWN"


def restart_count(job_id: int) -> int:
    """How often the job was requeued (``Restarts=N``; ``SLURM_RESTART_COUNT`` inside it)."""
    info = job_info(job_id)
    if info is None:
        raise RuntimeError(f"SLURM no longer knows job {job_id}")
    return int(info.get("Restarts", "0"))


def wait_for_state(job_id: int, states: set[str] | frozenset[str], timeout: float) -> str:
    """Poll until the job is in one of ``states``; that state. ``TimeoutError`` (with what
    ``scontrol`` says about the job) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(job_id)
        if state in states:
            return state
        if time.monotonic() >= deadline:
            info = job_info(job_id)
            raise TimeoutError(
                f"job {job_id} still {state} after {timeout:.0f} s (wanted {sorted(states)}): "
                f"{info}"
            )
        time.sleep(0.25)


def wait_for_job(job_id: int, timeout: float = 60.0) -> str:
    """Wait until the job is done for good (not merely requeued); its final state."""
    return wait_for_state(job_id, FINAL_STATES, timeout)


def wait_for_text(path: Path, text: str, timeout: float) -> str:
    """Poll until the file exists and contains ``text``; the file's content."""
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{text!r} not in {path} after {timeout:.0f} s: {content!r}")
        time.sleep(0.25)


def requeue_hold_seconds() -> int:
    """How long SLURM holds a requeued job before it may start again: the job credential
    lifetime (``AuthInfo=cred_expire``, default 120 s; the local cluster sets 5 s) plus 1 s."""
    out = run_slurm("scontrol", "show", "config").stdout
    match = re.search(r"cred_expire=(\d+)", out)
    return (int(match.group(1)) if match else 120) + 1
