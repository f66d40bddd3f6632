"""Data reliability (issues 10, 11, 12): fewer shards than workers, shard specs that name nothing,
loader workers that end with the loader and die with their parent, and passes that yield nothing.

The ``sdtrain fit`` cases run real subprocesses on tiny configs, each under a hard timeout, so a
regression fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from sdtrain.data.config import DataConfig, FilterConfig, ImageConfig
from sdtrain.data.pipeline import LaionLoader, check_shards
from sdtrain.data.shards import expand_shards
from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"


def small_cfg(shards: list[str], **overrides) -> DataConfig:
    values = dict(
        shards=shards,
        batch_size=3,
        num_workers=2,
        shuffle_buffer=8,
        filters=FilterConfig(min_size=64),
        image=ImageConfig(size=32),
        error_rate_min_samples=10_000,
    )
    values.update(overrides)
    return DataConfig(**values)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reliability-shards")
    spec = SyntheticSpec(samples=36, per_shard=12, min_side=64, max_side=96, reject_fraction=0.25)
    write_synthetic_shards(out, spec)
    return out


def tars(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.glob("*.tar"))


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def keys_of(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


# ---------------------------------------------------------------------------------------------
# Fewer shards than ranks x workers (issue 10)
# ---------------------------------------------------------------------------------------------


def test_one_shard_runs_one_worker_and_says_so(shard_dir: Path, caplog) -> None:
    one = tars(shard_dir)[:1]
    with caplog.at_level(logging.WARNING, logger="sdtrain.data"):
        loader = LaionLoader(small_cfg(one, num_workers=2, seed=11))
    assert loader.plan.workers == 1 and loader.plan.requested == 2
    assert "using 1 dataloader worker(s) per rank instead of data.num_workers=2" in caplog.text
    assert loader.position()["num_workers"] == 1
    # The one worker reads every sample of the shard once per pass.
    epoch = keys_of(list(LaionLoader(small_cfg(one, num_workers=2, resampled=False))))
    assert len(epoch) == len(set(epoch)) and set(epoch) == expected_kept(one[0])


def expected_kept(shard: str) -> set[str]:
    """Keys the default thresholds keep (with min_size 64), read from the shard's json."""
    keys = set()
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".json"):
                meta = json.load(tar.extractfile(member))
                if (
                    meta["AESTHETIC_SCORE"] >= 5.0
                    and meta["pwatermark"] < 0.5
                    and meta["punsafe"] < 0.1
                    and min(meta["original_width"], meta["original_height"]) >= 64
                ):
                    keys.add(member.name.split(".")[0])
    return keys


@pytest.mark.parametrize(("shards", "ranks"), [(1, 1), (3, 2)])
def test_reduced_workers_resume_exactly(shard_dir: Path, shards: int, ranks: int) -> None:
    """Save the positions mid-run (through JSON, as a checkpoint does) and continue: the same
    batches as an uninterrupted loader, across an epoch boundary, with fewer workers than asked."""
    cfg = small_cfg(tars(shard_dir)[:shards], num_workers=2)
    for rank in range(ranks):
        straight = take(LaionLoader(cfg, rank, ranks), 7)
        first = LaionLoader(cfg, rank, ranks)
        assert first.plan.workers == 1
        head = take(first, 3)
        state = json.loads(json.dumps(first.position()))
        tail = take(LaionLoader(cfg, rank, ranks, state=state), 4)
        assert keys_of(head + tail) == keys_of(straight)
        for x, y in zip(head + tail, straight, strict=True):
            assert torch.equal(x["image"], y["image"])


def test_more_ranks_than_shards_stays_a_startup_error(shard_dir: Path) -> None:
    with pytest.raises(DataError, match=r"1 shard\(s\) for 2 rank\(s\).*at least one shard"):
        check_shards(small_cfg(tars(shard_dir)[:1]), world_size=2)
    plan = check_shards(small_cfg(tars(shard_dir)[:3], num_workers=4), world_size=2)
    assert plan.workers == 1 and "3 shard(s) for 2 rank(s)" in (plan.reduction_note() or "")
    assert check_shards(small_cfg(tars(shard_dir), num_workers=0), 1).reduction_note() is None


# ---------------------------------------------------------------------------------------------
# Shard specs that name nothing (issue 12)
# ---------------------------------------------------------------------------------------------


def test_globs_are_expanded_sorted(shard_dir: Path) -> None:
    assert expand_shards(f"{shard_dir}/*.tar") == tars(shard_dir)
    assert expand_shards(f"{shard_dir}/0000[12].tar") == tars(shard_dir)[1:3]
    assert check_shards(small_cfg([f"{shard_dir}/*.tar"]), 1).urls == tars(shard_dir)


def test_specs_naming_nothing_are_refused_at_startup(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.shards.*no such file: /nope/\*\.tar"):
        expand_shards("/nope/*.tar")
    with pytest.raises(ConfigError, match=r"no such file: /nope/one\.tar$"):
        check_shards(small_cfg(["/nope/one.tar"]), 1)
    with pytest.raises(ConfigError, match=r"no such file: none of the 2 .*/nope/00000\.tar"):
        check_shards(small_cfg(["/nope/{00000..00001}.tar"]), 1)
    with pytest.raises(ConfigError, match="no shards configured"):
        check_shards(small_cfg([]), 1)


def test_some_missing_shards_are_a_warning_only(shard_dir: Path, caplog) -> None:
    specs = [*tars(shard_dir), "/nope/gone.tar"]
    with caplog.at_level(logging.WARNING, logger="sdtrain.data"):
        plan = check_shards(small_cfg(specs), 1)
    assert len(plan.urls) == 4 and "1 of the 4 shard files do not exist" in caplog.text


# ---------------------------------------------------------------------------------------------
# Through the CLI
# ---------------------------------------------------------------------------------------------


def fit_command(experiment: str, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "sdtrain.launch.cli", "fit",
        "--config", str(EXPERIMENTS / f"{experiment}.yaml"),
        f"run.dir={run_dir}", "logging.wandb=false", "logging.csv=false",
        "trainer.max_steps=2", "checkpoint.every_n_steps=2", *overrides,
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def run_bounded(command: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command``; a run past ``timeout`` seconds fails the test (and is killed)."""
    start = time.monotonic()
    try:
        result = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-2000:], (err.stderr or b"")[-2000:]
        pytest.fail(f"hung: still running after {timeout:.0f} s; output tail {tail}")
    return result, time.monotonic() - start


def run_in_process(command: list[str], capsys) -> subprocess.CompletedProcess:
    """``fit_command``'s command through ``main`` in this process, for runs that end during
    start-up (no interpreter and torch start-up: ~10 CPU s a run); its code and output."""
    from sdtrain.launch.cli import main

    assert command[1:3] == ["-m", "sdtrain.launch.cli"]
    capsys.readouterr()
    code = main(command[3:])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(command, code, out, err)


def test_cli_quoted_glob_matching_nothing_exits_2(tmp_path: Path, capsys) -> None:
    result = run_in_process(
        fit_command("tiny-base", tmp_path / "run", "data.shards=/nope/*.tar"), capsys
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no such file: /nope/*.tar" in result.stderr
    assert "Traceback" not in result.stderr
    run = tmp_path / "run"  # nothing written but, at most, the run folder's lock
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


def test_cli_one_make_shards_shard_trains_with_one_worker(tmp_path: Path) -> None:
    """What ``sdtrain data make-shards`` writes from a plain folder (no scores) trains with the
    default filters, and one shard runs one worker (tiny-base asks for 2)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
        (folder / f"{i}.txt").write_text(f"a photo number {i}")
    from sdtrain.launch.cli import main

    assert main(["data", "make-shards", str(folder), str(tmp_path / "shards")]) == 0
    one = tmp_path / "shards" / "00000.tar"
    result, _ = run_bounded(
        fit_command("tiny-base", tmp_path / "run", f"data.shards={one}", "data.num_workers=2"), 300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "using 1 dataloader worker(s) per rank instead of data.num_workers=2" in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "step=00000002.ckpt").is_file()


# ---------------------------------------------------------------------------------------------
# Loader workers: preemption signals ignored, shutdown obeyed, no orphans (issue 11)
# ---------------------------------------------------------------------------------------------


def run_python(code: str, timeout: float) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; past ``timeout`` seconds the test fails (not hangs)."""
    try:
        return subprocess.run(
            [sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung: still running after {timeout:.0f} s")


LOADER_SCRIPT = """
import multiprocessing, os, signal, sys, time
from sdtrain.data.config import DataConfig, FilterConfig, ImageConfig
from sdtrain.data.pipeline import LaionLoader
cfg = DataConfig(shards={shards!r}, batch_size=2, num_workers=2, shuffle_buffer=4,
                 filters=FilterConfig(min_size={min_size}), image=ImageConfig(size=32), seed=1)
"""


def test_workers_ignore_preemption_signals_yet_end_with_the_loader(shard_dir: Path) -> None:
    code = (
        LOADER_SCRIPT.format(shards=tars(shard_dir), min_size=64)
        + """
batches = iter(LaionLoader(cfg))
next(batches)
workers = multiprocessing.active_children()
assert len(workers) == 2, workers
for w in workers:  # what SLURM sends to every process of the step
    os.kill(w.pid, signal.SIGUSR1)
    os.kill(w.pid, signal.SIGTERM)
time.sleep(1.0)
assert all(w.is_alive() for w in workers), "a worker died of a preemption signal"
for _ in range(6):
    next(batches)  # the loader carries on
start = time.monotonic()
batches.close()  # the loader shuts its workers down
print("shutdown", time.monotonic() - start, [w.is_alive() for w in workers])
"""
    )
    result = run_python(code, 90)
    assert result.returncode == 0, result.stderr[-3000:]
    seconds, alive = result.stdout.split("shutdown")[1].split(" ", 2)[1:]
    assert "True" not in alive and float(seconds) < 4.0, result.stdout


def test_a_worker_data_error_ends_the_loader_promptly_without_a_traceback(
    shard_dir: Path,
) -> None:
    code = (
        LOADER_SCRIPT.format(shards=tars(shard_dir), min_size=10_000)
        + """
from sdtrain.errors import DataError
start = time.monotonic()
try:
    list(LaionLoader(cfg))
except DataError as err:
    print("message:", err)
print("left:", multiprocessing.active_children(), "seconds:", time.monotonic() - start)
"""
    )
    result = run_python(code, 90)  # the interpreter's exit must not wait on workers either
    assert result.returncode == 0, result.stderr[-3000:]
    assert "message: worker" in result.stdout and "data.filters.min_size=10000" in result.stdout
    assert "Traceback" not in result.stdout and "left: []" in result.stdout


def test_a_worker_stalled_in_a_pipe_shard_is_ended_by_the_loader(
    shard_dir: Path, tmp_path: Path
) -> None:
    """Worker 0 stops on a data error while worker 1 waits on a stalled storage command: the
    loader's shutdown SIGTERMs worker 1, which ends (its command with it) instead of ignoring it."""
    marker = "sleep 171.25"  # a command line no one else runs
    shards = [str(tmp_path / "gone.tar"), f"pipe:{marker}; cat {tars(shard_dir)[0]}"]
    code = (
        LOADER_SCRIPT.format(shards=shards, min_size=64)
        + """
import dataclasses
from sdtrain.errors import DataError
start = time.monotonic()
try:
    list(LaionLoader(dataclasses.replace(cfg, shuffle_shards=False)))
except DataError as err:
    print("message:", err)
print("left:", multiprocessing.active_children(), "seconds:", time.monotonic() - start)
"""
    )
    result = run_python(code, 60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "none of its 1 shard(s) could be read" in result.stdout, result.stdout
    assert "left: []" in result.stdout
    leftover = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    assert not leftover.stdout.strip(), "the stalled shard command outlived its worker"


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_their_parent(tmp_path: Path) -> None:
    """SIGKILL of the trainer while its workers spin (depth shards without depth maps and a
    buffer too big to ever fill): no worker survives it."""
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, SyntheticSpec(samples=24, per_shard=12, min_side=64))
    command = fit_command(
        "tiny-depth", tmp_path / "run", f"data.shards={shards}", "data.shuffle_buffer=10000000"
    )
    process = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        workers: list[int] = []
        while len(workers) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
            workers = child_pids(process.pid)
        assert len(workers) >= 2, "the loader workers never started"
        time.sleep(1.0)
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()]
    assert not alive, f"workers {alive} outlived their parent"


# ---------------------------------------------------------------------------------------------
# sdtrain fit on bad data ends, with one message (issue 11)
# ---------------------------------------------------------------------------------------------


def assert_data_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    assert "sdtrain: data error:" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in needles:
        assert needle in result.stderr, result.stderr[-3000:]


def test_cli_pattern_matching_no_file_exits_2_at_startup(tmp_path: Path, capsys) -> None:
    pattern = "/tmp/nonexistent/{00000..00001}.tar"
    result = run_in_process(
        fit_command("tiny-base", tmp_path / "run", f"data.shards={pattern}"), capsys
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "no such file: none of the 2 shard files" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("resampled", ["true", "false"])
def test_cli_everything_filtered_ends_naming_the_filter_and_key(
    shard_dir: Path, tmp_path: Path, resampled: str
) -> None:
    result, _ = run_bounded(
        fit_command("tiny-base", tmp_path / "run", f"data.shards={shard_dir}",
                    "data.filters.aesthetic.value=100", f"data.resampled={resampled}"),
        150,
    )  # fmt: skip
    assert_data_error(result, "aesthetic", "data.filters.aesthetic.value", ">= 100")


def test_cli_depth_model_on_shards_without_depth_maps_ends(shard_dir: Path, tmp_path: Path) -> None:
    result, _ = run_bounded(
        fit_command("tiny-depth", tmp_path / "run", f"data.shards={shard_dir}"), 150
    )
    assert_data_error(result, "no depth member", "data.depth.missing=keep")


def test_cli_error_rate_cap_ends_the_run(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    spec = SyntheticSpec(samples=24, per_shard=12, min_side=64, corrupt_fraction=0.5)
    write_synthetic_shards(shards, spec)
    result, _ = run_bounded(
        fit_command("tiny-base", tmp_path / "run", f"data.shards={shards}",
                    "data.max_error_rate=0.1", "data.error_rate_min_samples=4"),
        150,
    )  # fmt: skip
    assert_data_error(result, "data.max_error_rate")


def test_cli_shard_truncated_before_resume(tmp_path: Path) -> None:
    """Train to a checkpoint, truncate the shards, ``resume=auto``: an error naming the shards
    and ``data.on_changed_shards``; with ``skip``, the run drops those samples and finishes."""
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, SyntheticSpec(samples=24, per_shard=12, min_side=64))
    run_dir = tmp_path / "run"
    first, _ = run_bounded(fit_command("tiny-base", run_dir, f"data.shards={shards}"), 300)
    assert first.returncode == 0, first.stderr[-3000:]
    for shard in shards.glob("*.tar"):
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 3])
    more = ("trainer.max_steps=4", "resume=auto")
    result, _ = run_bounded(fit_command("tiny-base", run_dir, f"data.shards={shards}", *more), 300)
    assert_data_error(result, "no longer in their shards", "data.on_changed_shards=skip")
    skip = "data.on_changed_shards=skip"
    result, _ = run_bounded(
        fit_command("tiny-base", run_dir, f"data.shards={shards}", *more, skip), 300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropped them (data.on_changed_shards=skip)" in result.stderr
    assert (run_dir / "checkpoints" / "step=00000004.ckpt").is_file()
