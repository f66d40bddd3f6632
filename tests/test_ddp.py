"""Distributed training: a 2-process DDP run on CPU (gloo) must keep the ranks' UNet and EMA
weights bit-identical after every optimiser step while they read disjoint shards; DeepSpeed ZeRO
stage 2 runs the same check on CPU with Lightning's CUDA-only guards lifted (see
``tests/ddp_worker.py``), and unchanged on GPUs when there are some. docs/distributed.md says
what is and is not covered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from ddp_worker import checksum  # tests/ is on sys.path (pytest's default import mode)

from sdtrain.config.errors import ConfigError
from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.trainer.experiment import ExperimentConfig, load_config
from sdtrain.trainer.fit import RunPlan, build_trainer

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("ddp_worker.py")
EXPERIMENT = ROOT / "configs" / "experiments" / "tiny-inpainting.yaml"
UNET = "model.unet."

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build",
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    # 8 shards of 8 samples: 4 shards per rank (num_workers=0: one stream per rank). Every image
    # has a short side >= 64, so the tiny experiment's size filter keeps all of them.
    out = tmp_path_factory.mktemp("ddp-shards")
    write_synthetic_shards(out, SyntheticSpec(samples=64, per_shard=8, min_side=112, max_side=128))
    return str(out)


def overrides(shards: str, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.shards=[{shards}]", f"run.dir={run_dir}", "logging.wandb=false",
        "trainer.devices=2", "data.num_workers=0",
        # A small shuffle buffer keeps the first steps inside epoch 0 of each rank's shards (the
        # split is per epoch: every epoch deals the shards out afresh).
        "data.shuffle_buffer=8",
        "optim.warmup_steps=0",  # full learning rate from step 1: every step moves the weights
        *extra,
    ]  # fmt: skip


def run_worker(report: Path, args: list[str], *flags: str) -> dict[str, Any]:
    command = [sys.executable, str(WORKER), *flags, str(report), str(EXPERIMENT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    # Lightning may warn that `srun` is available but unused; only the exit status counts.
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads(report.read_text())


def check_replicas(report: dict[str, Any], first_step: int, last_step: int) -> None:
    """Identical UNet and EMA bits on every rank at every step; the EMA updated once a step."""
    steps = report["steps"]
    assert [s["step"] for s in steps] == list(range(first_step, last_step + 1))
    for record in steps:
        ranks = record["ranks"]
        assert [r["rank"] for r in ranks] == list(range(report["world_size"]))
        step = record["step"]
        for part in ("unet", "ema"):
            assert len({r[part]["sha256"] for r in ranks}) == 1, f"{part} differs at step {step}"
        assert all(r["ema_updates"] == step for r in ranks)
    # training moved the weights (and the EMA) at every step
    assert len({s["ranks"][0]["unet"]["sha256"] for s in steps}) == len(steps)
    assert len({s["ranks"][0]["ema"]["sha256"] for s in steps}) == len(steps)


def keys_by_rank(report: dict[str, Any]) -> list[list[str]]:
    world = report["world_size"]
    return [[k for s in report["steps"] for k in s["ranks"][rank]["keys"]] for rank in range(world)]


@needs_gloo
def test_ddp_two_processes_identical_weights_and_split_data(shards: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = overrides(shards, run_dir, "trainer.accelerator=cpu", "trainer.strategy=ddp")
    report = run_worker(tmp_path / "report.json", [*args, "trainer.max_steps=3"])

    assert (report["world_size"], report["strategy"]) == (2, "DDPStrategy")
    check_replicas(report, 0, 3)

    keys = keys_by_rank(report)
    batch = load_config([EXPERIMENT], args).data.batch_size
    assert [len(k) for k in keys] == [3 * batch, 3 * batch]
    assert all(len(set(k)) == len(k) for k in keys), "a rank saw a sample twice"
    assert not set(keys[0]) & set(keys[1]), "the ranks trained on the same samples"
    shard_of = [{key[:5] for key in k} for k in keys]  # img2dataset keys: 5-digit shard + index
    assert not shard_of[0] & shard_of[1], "the ranks read the same shards"

    final = run_dir / "checkpoints" / "step=00000003.ckpt"
    assert final.is_file()
    ckpt = torch.load(final, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3
    data = ckpt["sdtrain"]["data"]
    assert [(d["rank"], d["world_size"]) for d in data] == [(0, 2), (1, 2)]
    # the checkpoint holds exactly the weights the ranks ended with
    last = report["steps"][-1]["ranks"][0]
    unet = [(k[len(UNET) :], v) for k, v in ckpt["state_dict"].items() if k.startswith(UNET)]
    assert checksum(unet)["sha256"] == last["unet"]["sha256"]
    ema = ckpt["sdtrain"]["ema"]
    assert checksum(sorted(ema["shadow"].items()))["sha256"] == last["ema"]["sha256"]
    assert ema["num_updates"] == 3


@needs_gloo
def test_deepspeed_zero2_on_cpu_trains_saves_and_resumes(shards: str, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "run"
    args = overrides(
        shards, run_dir, "trainer.accelerator=cpu", "trainer.strategy=deepspeed_stage_2",
        "trainer.precision=bf16-mixed", "checkpoint.every_n_steps=1", "checkpoint.keep_last=1",
    )  # fmt: skip
    first = run_worker(
        tmp_path / "first.json", [*args, "trainer.max_steps=2"], "--deepspeed-on-cpu"
    )
    assert (first["world_size"], first["strategy"]) == (2, "DeepSpeedStrategy")
    check_replicas(first, 0, 2)
    # bf16 by autocast: the UNet weights stay float32, as under DDP
    assert {r["unet_dtype"] for s in first["steps"] for r in s["ranks"]} == {"torch.float32"}
    keys = keys_by_rank(first)
    assert not set(keys[0]) & set(keys[1])

    # DeepSpeed saves a folder; keep_last=1 removed step 1's folder.
    folders = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert folders == ["step=00000002.ckpt"]
    saved = run_dir / "checkpoints" / folders[0]
    assert (saved / "latest").read_text().strip() == "checkpoint"
    states = torch.load(
        saved / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True
    )
    assert len(states["sdtrain"]["data"]) == 2 and states["sdtrain"]["ema"]["num_updates"] == 2

    # resume=auto continues from the folder: the weights, the EMA and the data position return.
    second = run_worker(
        tmp_path / "second.json",
        [*args, "trainer.max_steps=3", "resume=auto"],
        "--deepspeed-on-cpu",
    )
    check_replicas(second, 2, 3)
    before, after = first["steps"][-1]["ranks"][0], second["steps"][0]["ranks"][0]
    assert (after["unet"], after["ema"]) == (before["unet"], before["ema"])
    resumed = keys_by_rank(second)
    assert not set(resumed[0]) & set(keys[0]), "rank 0 repeated samples after resuming"


def deepspeed_config(tmp_path: Path, stage: int, precision: str) -> ExperimentConfig:
    return load_config(
        [EXPERIMENT],
        [f"data.shards=[{tmp_path}]", f"trainer.strategy=deepspeed_stage_{stage}",
         f"trainer.precision='{precision}'", "trainer.accelerator=cpu", "logging.wandb=false",
         "logging.csv=false"],
    )  # fmt: skip


def test_deepspeed_strategy_is_passed_through(tmp_path: Path) -> None:
    """Without running anything: the config's ZeRO stage reaches Lightning's DeepSpeedStrategy,
    bf16 as torch autocast rather than DeepSpeed's cast-everything bf16 mode."""
    pytest.importorskip("deepspeed")
    from pytorch_lightning.strategies import DeepSpeedStrategy

    for stage, precision in ((2, "32"), (2, "bf16-mixed"), (3, "bf16-mixed")):
        cfg = deepspeed_config(tmp_path, stage, precision)
        trainer = build_trainer(cfg, RunPlan(tmp_path / "run", None))
        assert isinstance(trainer.strategy, DeepSpeedStrategy)
        config = trainer.strategy.config
        assert config["zero_optimization"]["stage"] == stage
        autocast = config.get("torch_autocast", {}).get("enabled", False)
        assert autocast == (precision == "bf16-mixed")
        assert not config.get("bf16", {}).get("enabled", False)
    with pytest.raises(ConfigError, match="bf16-mixed"):
        deepspeed_config(tmp_path, 2, "16-mixed")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deepspeed_zero2_on_gpu(shards: str, tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    devices = min(2, torch.cuda.device_count())
    args = overrides(
        shards, tmp_path / "run", "trainer.accelerator=gpu", f"trainer.devices={devices}",
        "trainer.strategy=deepspeed_stage_2", "trainer.precision=bf16-mixed",
        "trainer.max_steps=2",
    )  # fmt: skip
    report = run_worker(tmp_path / "report.json", args)
    assert (report["world_size"], report["strategy"]) == (devices, "DeepSpeedStrategy")
    check_replicas(report, 0, 2)
    assert (tmp_path / "run" / "checkpoints" / "step=00000002.ckpt" / "latest").is_file()
