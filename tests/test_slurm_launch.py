"""SLURM launching without a cluster: the batch script, time limits, allocation checks,
submit --dry-run, and the preemption callback (signal -> checkpoint -> stop)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import pytest

from sdtrain.config.errors import ConfigError
from sdtrain.launch.cli import EXIT_OK, EXIT_USAGE, main
from sdtrain.launch.slurm import SlurmOptions, render_sbatch, time_limit_seconds
from sdtrain.trainer.preemption import check_allocation

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_template_is_the_rendered_script() -> None:
    opts = SlurmOptions(
        nodes=32, gpus_per_node=8, cpus_per_task=8, time="2-00:00:00", partition="a100",
        account="my-account", job_name="sd15-inpainting",
    )  # fmt: skip
    run = Path("/scratch/runs/sd15-inpainting")
    text = render_sbatch(opts, run, run / "slurm" / "config.yaml", program=["sdtrain"])
    assert (ROOT / "slurm" / "train.sbatch").read_text() == text
    for line in ("--nodes=32", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR1@300",
                 "--requeue", "--partition=a100", "--account=my-account"):  # fmt: skip
        assert f"#SBATCH {line}" in text
    assert "MASTER_ADDR=" in text and "MASTER_PORT=" in text
    assert text.rstrip().endswith(
        "srun --kill-on-bad-exit=1 sdtrain fit --config "
        "/scratch/runs/sd15-inpainting/slurm/config.yaml "
        "run.dir=/scratch/runs/sd15-inpainting resume=auto"
    )


def test_cpu_job_has_no_gpu_line() -> None:
    text = render_sbatch(SlurmOptions(gpus_per_node=0, tasks_per_node=2, time="1:00:00"),
                         Path("/r"), Path("/r/c.yaml"))  # fmt: skip
    assert "--gpus-per-node" not in text and "#SBATCH --ntasks-per-node=2" in text


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("10:30", 630), ("01:00:00", 3600), ("2-00:00:00", 172800), ("1-2", 93600)],
)
def test_time_limits(text: str, seconds: int) -> None:
    assert time_limit_seconds(text) == seconds
    assert time_limit_seconds("soon") is None


def test_warning_signal_must_leave_room() -> None:
    with pytest.raises(ConfigError, match="signal-seconds"):
        render_sbatch(SlurmOptions(time="00:05:00", signal_seconds=300), Path("/r"), Path("/c"))


def test_allocation_mismatch_names_the_setting(monkeypatch) -> None:
    check_allocation(devices=8, num_nodes=4)  # outside SLURM: nothing to check
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "4(x2)")
    check_allocation(devices=4, num_nodes=2)
    with pytest.raises(ConfigError, match=r"trainer\.num_nodes=2") as info:
        check_allocation(devices=8, num_nodes=1)
    assert "trainer.devices=4" in str(info.value)


def test_submit_dry_run_matches_the_trainer_settings(tmp_path: Path, capsys) -> None:
    code = main([
        "slurm", "submit", "--config", "tiny-base", "--nodes", "2", "--gpus-per-node", "0",
        "--tasks-per-node", "2", "--time", "00:30:00", "--signal-seconds", "60", "--dry-run",
        f"run.dir={tmp_path / 'run'}", "data.shards=/data/{000..009}.tar",
    ])  # fmt: skip
    assert code == EXIT_OK
    out = capsys.readouterr().out
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=2" in out
    assert f"run.dir={(tmp_path / 'run').resolve()} resume=auto" in out
    assert not (tmp_path / "run").exists(), "a dry run writes nothing"


def test_submit_refuses_a_folder_with_another_runs_checkpoints(tmp_path: Path, capsys) -> None:
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step=00000010.ckpt").write_bytes(b"x")
    code = main(["slurm", "submit", "--config", "tiny-base", "--gpus-per-node", "0",
                 "--time", "1:00:00", "--dry-run", f"run.dir={tmp_path / 'run'}"])  # fmt: skip
    assert code == EXIT_USAGE and "resume=auto" in capsys.readouterr().err


def test_fit_dry_run_prints_the_plan(tmp_path: Path, capsys) -> None:
    from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards

    write_synthetic_shards(tmp_path / "shards", SyntheticSpec(samples=8, per_shard=4,
                           min_side=64, max_side=80))  # fmt: skip
    code = main(["fit", "--config", str(ROOT / "configs/experiments/tiny-inpainting.yaml"),
                 f"data.shards={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}",
                 "--dry-run"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "global batch 4 = 1 node(s) x 1 device(s) x 1 accumulation x 4 per device" in out
    assert "UNet 1,056,484 (trained)" in out and "2 shard(s)" in out
    assert not (tmp_path / "run").exists()


def test_signal_checkpoints_and_stops(tmp_path: Path) -> None:
    """SIGUSR1 mid-run: the current step is checkpointed and training stops early (no SLURM:
    nothing to requeue)."""
    import torch

    from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
    from sdtrain.trainer.experiment import load_config
    from sdtrain.trainer.fit import fit
    from sdtrain.trainer.module import LatentDiffusionModule
    from sdtrain.trainer.preemption import RunInterrupted

    write_synthetic_shards(tmp_path / "shards", SyntheticSpec(samples=16, per_shard=8,
                           min_side=64, max_side=80))  # fmt: skip
    cfg = load_config([ROOT / "configs/experiments/tiny-base.yaml"], [
        f"data.shards={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}", "logging.wandb=false",
        "data.num_workers=0", "trainer.max_steps=1000", "checkpoint.every_n_steps=1000",
    ])  # fmt: skip
    original = LatentDiffusionModule.training_step

    def step_then_signal(self, batch, batch_idx):
        if self.global_step == 3:
            threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGUSR1)).start()
        return original(self, batch, batch_idx)

    LatentDiffusionModule.training_step = step_then_signal
    try:
        with pytest.raises(RunInterrupted) as stop:  # outside SLURM: a stop, not a success
            fit(cfg)
    finally:
        LatentDiffusionModule.training_step = original
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step=*.ckpt"))
    assert len(saved) == 1
    step = int(saved[0].removeprefix("step=").removesuffix(".ckpt"))
    assert 4 <= step <= 6, saved
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / saved[0], weights_only=True)
    assert ckpt["global_step"] == step
    assert stop.value.exit_code == 128 + signal.SIGUSR1 and stop.value.step == step
    assert "resume=auto" in str(stop.value)
