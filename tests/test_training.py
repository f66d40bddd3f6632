"""``sdtrain fit`` on CPU from generated shards: training, checkpoints, resumption (including a
SIGKILL mid-run that must end bit-identical to an uninterrupted run), init_from and widening."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("train-shards")
    write_synthetic_shards(out, SyntheticSpec(samples=48, per_shard=12, min_side=64, max_side=96))
    return str(out)


def fit_command(experiment: str, shards: str, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "sdtrain.launch.cli", "fit",
        "--config", str(EXPERIMENTS / f"{experiment}.yaml"),
        f"data.shards=[{shards}]", f"run.dir={run_dir}", "logging.wandb=false",
        "trainer.deterministic=true", *overrides,
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}


def run_fit(*args: str | Path, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(
        fit_command(*args, **kw), env=env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def final_weights(run_dir: Path, step: int) -> tuple[dict, dict]:
    ckpt = torch.load(run_dir / "checkpoints" / f"step={step:08d}.ckpt", weights_only=True)
    unet = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.unet.")}
    return unet, ckpt["sdtrain"]["ema"]["shadow"]


def test_sigkill_and_resume_is_bit_identical(shards: str, tmp_path: Path) -> None:
    steps = ("trainer.max_steps=8", "checkpoint.every_n_steps=2", "data.num_workers=2")
    straight = tmp_path / "straight"
    run_fit("tiny-inpainting", shards, straight, *steps)

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        fit_command("tiny-inpainting", shards, killed, *steps),
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    target = killed / "checkpoints" / "step=00000004.ckpt"
    deadline = time.monotonic() + 300
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert target.exists(), "the run never reached its step-4 checkpoint"
    assert not (killed / "checkpoints" / "step=00000008.ckpt").exists(), "killed too late"
    run_fit("tiny-inpainting", shards, killed, *steps, "resume=auto")

    (unet_a, ema_a), (unet_b, ema_b) = final_weights(straight, 8), final_weights(killed, 8)
    assert unet_a.keys() == unet_b.keys() and ema_a.keys() == ema_b.keys()
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # and training did move the weights
    first = torch.load(straight / "checkpoints" / "step=00000008.ckpt", weights_only=True)
    assert first["global_step"] == 8
