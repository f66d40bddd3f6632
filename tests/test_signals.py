"""Signals and the run-folder lock, with real processes (issue 10 / 11).

- SIGTERM mid-training: checkpoint, a message saying how to continue, exit 143 (not 0).
- SIGTERM during start-up (slow ``pipe:`` shards): ends at once, no checkpoint, exit 143.
- SIGTERM / SIGINT during a storage stall (a ``pipe:`` shard that sleeps after its samples):
  checkpoint of what was trained, exit 128 + N, within a bounded time.
- The demo: its own SIGUSR1 interruption resumes; a SIGTERM from outside ends it.
- Two processes on one run folder: the second fails at once with exit 2 naming the holder;
  a dead holder's lock is stale and taken over; a requeue of the same SLURM job waits for it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.errors import RunFolderLocked
from sdtrain.trainer.run_lock import LOCK_NAME, RunLock

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "experiments" / "tiny-base.yaml"


def sdtrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "sdtrain.launch.cli", *args]


def start(cmd: list[str], tmp_path: Path, name: str, env: dict | None = None) -> subprocess.Popen:
    """A process whose output goes to files (a pipe would also wait for the shell children of
    ``pipe:`` shards)."""
    out = (tmp_path / f"{name}.out").open("w")
    err = (tmp_path / f"{name}.err").open("w")
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=out, stderr=err, env=full_env, cwd=tmp_path)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the run did not end within {timeout} s of the signal") from None


def fit_args(tmp_path: Path, shards: str, *extra: str) -> list[str]:
    return sdtrain(
        "fit", "--config", str(TINY), f"data.shards={shards}", f"run.dir={tmp_path / 'run'}",
        "logging.wandb=false", "data.num_workers=0", "trainer.max_steps=1000",
        "optim.warmup_steps=0", *extra,
    )  # fmt: skip


def checkpoints(run: Path) -> list[int]:
    folder = run / "checkpoints"
    names = sorted(p.name for p in folder.glob("step=*.ckpt")) if folder.is_dir() else []
    return [int(n.removeprefix("step=").removesuffix(".ckpt")) for n in names]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, SyntheticSpec(samples=16, per_shard=16, min_side=64, max_side=80))
    return out


# ---------------------------------------------------------------------------------------------
# Signals
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_mid_training_checkpoints_and_exits_non_zero(shard_dir: Path, tmp_path) -> None:
    run = tmp_path / "run"
    proc = start(fit_args(tmp_path, str(shard_dir), "checkpoint.every_n_steps=2"), tmp_path, "fit")
    wait_for(lambda: checkpoints(run), 240, "the first checkpoint")
    first = checkpoints(run)[-1]
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = finish(proc, 60)
    err = (tmp_path / "fit.err").read_text()
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert time.monotonic() - sent < 60
    saved = checkpoints(run)
    assert saved[-1] >= first
    assert f"stopped by SIGTERM at step {saved[-1]}" in err
    assert f"Continue with: sdtrain fit --config {run / 'config.yaml'} resume=auto" in err


@pytest.mark.slow
def test_sigterm_during_start_up_with_slow_shards(shard_dir: Path, tmp_path) -> None:
    shard = next(shard_dir.glob("*.tar"))
    run = tmp_path / "run"
    proc = start(fit_args(tmp_path, f"pipe:sleep 20; cat {shard}"), tmp_path, "fit")
    wait_for(lambda: "resume from:" in (tmp_path / "fit.out").read_text(), 240, "the set-up")
    time.sleep(1.0)  # waiting for the first shard
    proc.send_signal(signal.SIGTERM)
    code = finish(proc, 40)
    err = (tmp_path / "fit.err").read_text()
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err and "no checkpoint (nothing was trained)" in err
    assert checkpoints(run) == []


def test_sigterm_while_the_command_starts(tmp_path) -> None:
    """Even before the run has set up its handlers (imports): a message and exit 143."""
    proc = start(sdtrain("fit", "--config", str(TINY)), tmp_path, "fit")
    time.sleep(2.0)  # the interpreter and the CLI module are up; torch is still importing
    proc.send_signal(signal.SIGTERM)
    code = finish(proc, 60)
    err = (tmp_path / "fit.err").read_text()
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM" in err


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_a_storage_stall(shard_dir: Path, tmp_path, signum: int) -> None:
    """The shard's samples arrive, then the stream stalls (the command sleeps before it ends):
    the steps trained on them are checkpointed while the run waits for data."""
    shard = next(shard_dir.glob("*.tar"))
    run = tmp_path / "run"
    args = fit_args(tmp_path, f"pipe:cat {shard}; sleep 30", "checkpoint.every_n_steps=2",
                    "data.shuffle_buffer=0", "data.filters.min_size=0")  # fmt: skip
    # 16 samples = 4 batches; Lightning fetches one batch ahead, so steps 1-3 train, then the
    # fetch of batch 5 waits for the stream to end (30 s): checkpoint 2 is on disk, step 3 not
    proc = start(args, tmp_path, "fit")
    try:
        wait_for(lambda: checkpoints(run), 240, "the step-2 checkpoint")
        time.sleep(8.0)  # step 3 trains, then the run waits for data
        proc.send_signal(signum)
        sent = time.monotonic()
        code = finish(proc, 40)
    finally:
        proc.kill()
    err = (tmp_path / "fit.err").read_text()
    assert code == 128 + signum, err[-2000:]
    assert time.monotonic() - sent < 40
    # (on a loaded machine step 3 may still be running: then it stops at the step's end)
    assert "checkpointing (while waiting for data)" in err or "after this step" in err
    saved = checkpoints(run)
    assert saved == [2, 3], (saved, err[-2000:])
    assert f"stopped by {signal.Signals(signum).name} at step 3" in err
    assert "resume=auto" in err


@pytest.mark.slow
def test_demo_resumes_its_own_interruption_but_stops_on_sigterm(tmp_path) -> None:
    """A tiny demo: the planned SIGUSR1 after step 8 resumes by itself; a SIGTERM sent once it has
    resumed ends the demo (exit 143) with the stage's checkpoint and a message."""
    script = textwrap.dedent(f"""
        import sys
        import sdtrain.launch.demo as demo
        demo.PLANS["quick"] = demo.DemoPlan(300, 4, 400, 8, 4, 4, 2)
        from sdtrain.launch.cli import main
        sys.exit(main(["demo", "--quick", "--out", {str(tmp_path / "demo")!r}]))
    """)
    proc = start([sys.executable, "-c", script], tmp_path, "demo")
    out = tmp_path / "demo.out"
    wait_for(lambda: "resuming the interrupted run" in out.read_text(), 420, "the resumption")
    base = tmp_path / "demo" / "base"
    wait_for(lambda: out.read_text().count("resume from:") >= 2, 120, "the resumed run")
    time.sleep(3.0)
    proc.send_signal(signal.SIGTERM)
    code = finish(proc, 60)
    err = (tmp_path / "demo.err").read_text()
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "sdtrain demo: stopped by SIGTERM" in err
    assert "--overwrite" in err and "resume=auto" in err
    assert len(list((base / "logs").glob("version_*"))) == 2  # one planned resumption only
    assert not (tmp_path / "demo" / "inpainting").exists()


# ---------------------------------------------------------------------------------------------
# The run-folder lock
# ---------------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from sdtrain.trainer.run_lock import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
if sys.argv[3] == "release":
    lock.release()
"""


def hold(folder: Path, tmp_path: Path, seconds: float, job: str = "", release: bool = True):
    env = {"SLURM_JOB_ID": job} if job else {}
    proc = start([sys.executable, "-c", HOLDER, str(folder), str(seconds),
                  "release" if release else "keep"], tmp_path, f"holder{job}", env)  # fmt: skip
    wait_for(lambda: "locked" in (tmp_path / f"holder{job}.out").read_text(), 60, "the holder")
    return proc


def test_second_fit_on_a_locked_run_folder_fails_at_once_naming_the_holder(tmp_path) -> None:
    run = tmp_path / "run"
    holder = hold(run, tmp_path, 120, job="4242")
    try:
        started = time.monotonic()
        result = subprocess.run(
            fit_args(tmp_path, str(tmp_path / "no-shards-needed")), capture_output=True,
            text=True, timeout=120, env={**os.environ, "SLURM_JOB_ID": ""},
        )  # fmt: skip
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"pid {holder.pid}" in result.stderr and "SLURM job 4242" in result.stderr
        assert f"host {os.uname().nodename}" in result.stderr
        assert "in use by another sdtrain run" in result.stderr
        assert time.monotonic() - started < 60
        assert not (run / "config.yaml").exists()  # nothing of the holder's folder touched
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path) -> None:
    run = tmp_path / "run"
    holder = hold(run, tmp_path, 120, release=False)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f'"pid": {holder.pid}' in (run / LOCK_NAME).read_text()  # the dead holder's record
    with RunLock(run) as lock:
        assert any(f"pid {holder.pid}" in note and "stale" in note for note in lock.notes)
        assert f'"pid": {os.getpid()}' in (run / LOCK_NAME).read_text()
        with pytest.raises(RunFolderLocked, match=f"pid {os.getpid()}"):
            RunLock(run).acquire()  # a second holder, even in the same process
    assert (run / LOCK_NAME).read_text() == ""  # released


def test_requeue_of_the_same_slurm_job_waits_for_its_predecessor(tmp_path, monkeypatch) -> None:
    run = tmp_path / "run"
    holder = hold(run, tmp_path, 3, job="77")
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    started = time.monotonic()
    with RunLock(run, requeue_wait_s=30):
        waited = time.monotonic() - started
    holder.wait()
    assert 0.5 < waited < 30
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job does not wait
    other = hold(run, tmp_path, 60, job="77")
    try:
        with pytest.raises(RunFolderLocked, match="SLURM job 77"):
            RunLock(run, requeue_wait_s=30).acquire()
    finally:
        other.kill()
        other.wait()
