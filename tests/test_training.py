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
from sdtrain.trainer.experiment import load_config

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


def kill_at_checkpoint(command: list[str], target: Path, timeout: float = 300) -> None:
    """Runs ``command`` (a fit) until its checkpoint ``target`` exists (or it ends, or ``timeout``
    seconds pass), then SIGKILLs it: the callers check where it stopped."""
    process = subprocess.Popen(
        command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout
    while not target.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_sigkill_and_resume_is_bit_identical(shards: str, tmp_path: Path) -> None:
    steps = ("trainer.max_steps=8", "checkpoint.every_n_steps=2", "data.num_workers=2")
    straight = tmp_path / "straight"
    run_fit("tiny-inpainting", shards, straight, *steps)

    killed = tmp_path / "killed"
    target = killed / "checkpoints" / "step=00000004.ckpt"
    kill_at_checkpoint(fit_command("tiny-inpainting", shards, killed, *steps), target)
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


# ---------------------------------------------------------------------------------------------
# In-process runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def depth_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("depth-shards")
    spec = SyntheticSpec(samples=24, per_shard=6, min_side=64, max_side=96, depth=True)
    write_synthetic_shards(out, spec)
    return str(out)


def in_process_cfg(experiment: str, shards: str, run_dir: Path, *overrides: str):
    return load_config(
        [EXPERIMENTS / f"{experiment}.yaml"],
        [f"data.shards=[{shards}]", f"run.dir={run_dir}", "logging.wandb=false",
         "data.num_workers=0", "trainer.log_every_n_steps=1", *overrides],
    )  # fmt: skip


def metrics(run_dir: Path) -> list[dict[str, str]]:
    import csv

    rows = []
    for path in sorted((run_dir / "logs").glob("version_*/metrics.csv")):
        with path.open() as handle:
            rows.extend(csv.DictReader(handle))
    return rows


@pytest.mark.parametrize("experiment", ["tiny-base", "tiny-inpainting", "tiny-depth"])
def test_trains_each_model_kind(
    experiment: str, shards: str, depth_shards: str, tmp_path: Path
) -> None:
    from sdtrain.trainer.fit import fit

    data = depth_shards if experiment == "tiny-depth" else shards
    cfg = in_process_cfg(
        experiment, data, tmp_path, "trainer.max_steps=3", "checkpoint.every_n_steps=3"
    )
    fit(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "step=00000003.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert all(k.startswith("model.unet.") for k in ckpt["state_dict"])
    in_channels = {"tiny-base": 4, "tiny-inpainting": 9, "tiny-depth": 5}[experiment]
    assert ckpt["state_dict"]["model.unet.input_blocks.0.0.weight"].shape[1] == in_channels
    assert ckpt["sdtrain"]["ema"]["num_updates"] == 3
    assert "model:" in ckpt["sdtrain"]["config"] and (tmp_path / "config.yaml").is_file()
    losses = [float(r["train/loss"]) for r in metrics(tmp_path) if r.get("train/loss")]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)


def test_init_from_widens_a_base_checkpoint_to_inpainting(tmp_path: Path, shards: str) -> None:
    from sdtrain.models.adapters.original import write_checkpoint
    from sdtrain.models.stable_diffusion import StableDiffusion
    from sdtrain.trainer.fit import build_module

    base_cfg = in_process_cfg("tiny-base", shards, tmp_path / "unused")
    base = StableDiffusion(base_cfg.model)
    with torch.no_grad():
        for p in base.unet.parameters():
            p.normal_(0, 0.02)
    ema = {k: v + 1 for k, v in base.unet.state_dict().items()}
    source = write_checkpoint(tmp_path / "base.safetensors", **base.original_parts(ema))
    cfg = in_process_cfg("tiny-inpainting", shards, tmp_path / "run", f"init_from={source}")
    module = build_module(cfg)
    weight = module.model.unet.input_blocks[0][0].weight
    assert weight.shape[1] == 9 and torch.count_nonzero(weight[:, 4:]) == 0
    torch.testing.assert_close(weight[:, :4], base.unet.input_blocks[0][0].weight, rtol=0, atol=0)
    shadow = module.ema.shadow["input_blocks.0.0.weight"]
    assert torch.count_nonzero(shadow[:, 4:]) == 0
    torch.testing.assert_close(shadow[:, :4], ema["input_blocks.0.0.weight"], rtol=0, atol=0)
    vae_a, vae_b = base.autoencoder.state_dict(), module.model.autoencoder.state_dict()
    assert all(torch.equal(vae_a[k], vae_b[k]) for k in vae_a)


def test_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(
    tmp_path: Path, shards: str, monkeypatch
) -> None:
    from sdtrain.trainer import module as module_lib
    from sdtrain.trainer.fit import fit

    original = module_lib.LatentDiffusionModule.diffusion_loss

    def poisoned(self, batch, g, *rest):
        loss = original(self, batch, g, *rest)
        return loss * float("nan") if self.global_step >= 2 else loss

    monkeypatch.setattr(module_lib.LatentDiffusionModule, "diffusion_loss", poisoned)
    cfg = in_process_cfg(
        "tiny-base", shards, tmp_path, "trainer.max_steps=20", "checkpoint.every_n_steps=2",
        "trainer.max_nonfinite_steps=3",
    )  # fmt: skip
    with pytest.raises(module_lib.NonFiniteError, match="3 consecutive steps"):
        fit(cfg)
    good = torch.load(tmp_path / "checkpoints" / "step=00000002.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values())


def test_stage_change_on_resume_keeps_weights_and_follows_new_lr(
    tmp_path: Path, shards: str
) -> None:
    from sdtrain.trainer.fit import fit

    steps = ("checkpoint.every_n_steps=2", "optim.warmup_steps=0")
    fit(in_process_cfg("tiny-base", shards, tmp_path, "trainer.max_steps=2", *steps))
    fit(
        in_process_cfg(
            "tiny-base",
            shards,
            tmp_path,
            "trainer.max_steps=4",
            *steps,
            "resume=auto",
            "optim.lr=5e-4",
            "data.batch_size=2",
            "data.image.size=32",
        )
    )
    lrs = [float(r["train/lr"]) for r in metrics(tmp_path) if r.get("train/lr")]
    assert lrs[:2] == pytest.approx([1e-4, 1e-4]) and lrs[-1] == pytest.approx(5e-4)
    ckpt = torch.load(tmp_path / "checkpoints" / "step=00000004.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["state"], "the optimiser state was kept"


def test_run_folder_collision_is_refused(tmp_path: Path, shards: str) -> None:
    from sdtrain.config.errors import ConfigError
    from sdtrain.trainer.fit import fit

    fit(
        in_process_cfg(
            "tiny-base", shards, tmp_path, "trainer.max_steps=1", "checkpoint.every_n_steps=1"
        )
    )
    with pytest.raises(ConfigError, match="resume=auto"):
        fit(in_process_cfg("tiny-base", shards, tmp_path, "trainer.max_steps=2"))
