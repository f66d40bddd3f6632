"""Training through a real SLURM (CI starts one: ``slurm/local-cluster.sh``): a 2-task DDP job, a
job across 2 nodes, and preemption (SIGUSR1 -> checkpoint -> requeue -> resume) ending with the
weights of an uninterrupted run. Skipped, with the reason, where no SLURM is running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import slurm_support
import torch
from slurm_support import restart_count, run_slurm, submit, wait_for_job, wait_for_text

from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards

slurm_cluster = slurm_support.slurm_cluster

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "configs" / "experiments" / "tiny-inpainting.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("slurm-shards")
    # every image passes the size filter (short side >= 66 px), so early steps stay in epoch 0
    write_synthetic_shards(out, SyntheticSpec(samples=48, per_shard=6, min_side=110, max_side=128))
    return str(out)


def worker_job(tmp_path: Path, shards: str, nodes: int, tasks: int) -> tuple[str, Path]:
    """A batch script running the replica-checking driver under srun."""
    report = tmp_path / "report.json"
    overrides = [
        f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", "logging.wandb=false",
        "trainer.max_steps=3", "checkpoint.every_n_steps=3", "data.num_workers=0",
        "trainer.accelerator=cpu", f"trainer.devices={tasks}", f"trainer.num_nodes={nodes}",
        "trainer.strategy=ddp", "data.shuffle_buffer=4",
    ]  # fmt: skip
    command = [sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(report)]
    command += [str(EXPERIMENT), *overrides]
    script = f"""#!/bin/bash
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node={tasks}
#SBATCH --cpus-per-task=1
#SBATCH --time=00:15:00
#SBATCH --output={tmp_path}/job.out
set -euo pipefail
export MASTER_ADDR=127.0.0.1 MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=1 WANDB_MODE=offline
srun {" ".join(command)}
"""
    return script, report


def check_replicas(report: Path, world: int) -> None:
    data = json.loads(report.read_text())
    assert data["world_size"] == world and data["global_step"] == 3
    records = data["steps"]
    assert [r["step"] for r in records] == [0, 1, 2, 3], "a record before and after each step"
    keys_by_rank: dict[int, set[str]] = {}
    for record in records:
        ranks = record["ranks"]
        assert len(ranks) == world
        assert len({r["unet"]["sha256"] for r in ranks}) == 1, "UNet differs between ranks"
        assert len({r["ema"]["sha256"] for r in ranks}) == 1, "EMA differs between ranks"
        for r in ranks:
            keys_by_rank.setdefault(r["rank"], set()).update(r["keys"])
    # within one epoch (a small shuffle buffer keeps these steps in epoch 0) ranks never share
    sets = list(keys_by_rank.values())
    assert len(sets) == world and not set.intersection(*sets), "ranks shared samples"


@pytest.mark.parametrize(("nodes", "tasks"), [(1, 2), (2, 1)], ids=["2-tasks", "2-nodes"])
def test_ddp_job(slurm_cluster, shards: str, tmp_path: Path, nodes: int, tasks: int) -> None:
    script, report = worker_job(tmp_path, shards, nodes, tasks)
    job = submit(script, tmp_path)
    state = wait_for_job(job, timeout=300)
    log = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert state == "COMPLETED", log[-3000:]
    if nodes == 2:
        info = run_slurm("scontrol", "show", "job", str(job)).stdout
        assert "node[1-2]" in info or ("node1" in info and "node2" in info)
    check_replicas(report, nodes * tasks)
    assert (tmp_path / "run" / "checkpoints" / "step=00000003.ckpt").is_file()


def test_preemption_requeues_and_resumes_exactly(
    slurm_cluster, shards: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    overrides = [
        f"data.shards={shards}", f"run.dir={run}", "logging.wandb=false",
        "trainer.max_steps=40", "checkpoint.every_n_steps=1000", "data.num_workers=2",
        "trainer.deterministic=true", "trainer.log_every_n_steps=1",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    submitted = subprocess.run(
        [sys.executable, "-m", "sdtrain.launch.cli", "slurm", "submit",
         "--config", str(EXPERIMENT), "--gpus-per-node", "0", "--tasks-per-node", "1",
         "--cpus-per-task", "1", "--time", "00:30:00", "--signal-seconds", "60", *overrides],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job = int(submitted.stdout.split("submitted job ")[1].split(":")[0])
    out = run / "slurm" / f"{job}.out"
    wait_for_text(out, "train/loss", timeout=240)
    run_slurm("scancel", "--signal=USR1", str(job))
    state = wait_for_job(job, timeout=400)
    log = out.read_text()
    assert state == "COMPLETED", log[-4000:]
    assert restart_count(job) == 1, log[-4000:]
    assert "received SIGUSR1; checkpointing" in log and "restart 1" in log
    assert "resume from: " + str(run / "checkpoints") in log

    status = subprocess.run(
        [sys.executable, "-m", "sdtrain.launch.cli", "slurm", "status", str(run)],
        capture_output=True, text=True, env=env, check=True,
    ).stdout  # fmt: skip
    assert f"job {job}: COMPLETED (restarts 1" in status and "last checkpoint: step 40" in status

    reference = tmp_path / "reference"
    subprocess.run(
        [sys.executable, "-m", "sdtrain.launch.cli", "fit", "--config",
         str(run / "slurm" / "config.yaml"), f"run.dir={reference}"],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    a = torch.load(run / "checkpoints" / "step=00000040.ckpt", weights_only=True)
    b = torch.load(reference / "checkpoints" / "step=00000040.ckpt", weights_only=True)
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
    shadow_a, shadow_b = a["sdtrain"]["ema"]["shadow"], b["sdtrain"]["ema"]["shadow"]
    assert all(torch.equal(shadow_a[k], shadow_b[k]) for k in shadow_b)


def test_allocation_mismatch_fails_at_start_naming_the_setting(
    slurm_cluster, shards: str, tmp_path: Path
) -> None:
    command = [
        sys.executable, "-m", "sdtrain.launch.cli", "fit", "--config", str(EXPERIMENT),
        f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", "logging.wandb=false",
        "trainer.accelerator=cpu", "trainer.devices=1",
    ]  # fmt: skip
    script = f"""#!/bin/bash
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --time=00:05:00
#SBATCH --output={tmp_path}/job.out
srun {" ".join(command)}
"""
    job = submit(script, tmp_path)
    assert wait_for_job(job, timeout=120) == "FAILED"
    log = (tmp_path / "job.out").read_text()
    assert "runs 2 task(s) per node but trainer.devices=1" in log
    assert "set trainer.devices=2" in log
    assert not (tmp_path / "run" / "checkpoints").exists()
