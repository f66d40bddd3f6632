"""FSDP (``trainer.strategy: fsdp``, trainer/fsdp.py) on CPU with 2 gloo processes: the UNet, its
EMA and the exported weights must equal those of the same run under DDP, bit for bit, at every
step, through a save and a resume from the sharded checkpoint; the frozen parts stay whole. GPU
paths (bf16 autocast under FSDP, NCCL) are marked ``gpu`` and skipped without one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_ddp import check_replicas, needs_gloo, overrides, run_worker

from sdtrain.config.errors import ConfigError
from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.launch.export import export_run
from sdtrain.trainer.checkpoints import read_training_checkpoint
from sdtrain.trainer.experiment import load_config
from sdtrain.trainer.fit import RunPlan, build_trainer
from sdtrain.trainer.fsdp import UNetFSDPStrategy
from sdtrain.utils import files

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "configs" / "experiments" / "tiny-inpainting.yaml"
WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("fsdp-shards")
    write_synthetic_shards(out, SyntheticSpec(samples=64, per_shard=8, min_side=112, max_side=128))
    return str(out)


def fsdp_args(shards: str, run_dir: Path, *extra: str) -> list[str]:
    return overrides(shards, run_dir, "trainer.accelerator=cpu", *extra)


def by_step(report: dict[str, Any]) -> dict[int, tuple[str, str]]:
    """Rank 0's (UNet, EMA) SHA-256 at every step of a report."""
    return {
        s["step"]: (s["ranks"][0]["unet"]["sha256"], s["ranks"][0]["ema"]["sha256"])
        for s in report["steps"]
    }


@pytest.fixture(scope="module")
def ddp_run(shards: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The reference: the same run under DDP, 3 steps."""
    tmp = tmp_path_factory.mktemp("fsdp-ddp-reference")
    args = fsdp_args(shards, tmp / "run", "trainer.strategy=ddp", "trainer.max_steps=3")
    return tmp / "run", run_worker(tmp / "ddp.json", args)


@needs_gloo
def test_fsdp_equals_ddp_through_sharded_save_and_resume(
    shards: str, ddp_run: tuple[Path, dict], tmp_path: Path
) -> None:
    ddp_dir, ddp = ddp_run
    run_dir = tmp_path / "run"
    args = fsdp_args(
        shards, run_dir, "trainer.strategy=fsdp", "checkpoint.every_n_steps=1",
        "checkpoint.keep_last=1",
    )  # fmt: skip
    first = run_worker(tmp_path / "first.json", [*args, "trainer.max_steps=2"])
    assert (first["world_size"], first["strategy"]) == (2, "UNetFSDPStrategy")
    check_replicas(first, 0, 2)  # the gathered weights and the EMA agree on both ranks

    # The sharded checkpoint: a folder; keep_last=1 removed step 1's.
    saved = run_dir / "checkpoints"
    assert sorted(p.name for p in saved.iterdir()) == ["step=00000002.ckpt"]
    folder = saved / "step=00000002.ckpt"
    assert sorted(p.name for p in folder.iterdir()) == [
        "full.ckpt", "full.ckpt.integrity.json", "shard-0-of-2.pt", "shard-1-of-2.pt",
    ]  # fmt: skip
    shard_sizes = []
    for rank in (0, 1):
        shard = files.load_torch(folder / f"shard-{rank}-of-2.pt")
        assert (shard["rank"], shard["world_size"]) == (rank, 2)
        shard_sizes.append(sum(t.numel() for t in shard["params"].values()))
    full = files.load_torch(folder / "full.ckpt")
    unet_numel = sum(
        v.numel() for k, v in full["state_dict"].items() if k.startswith("model.unet.")
    )
    # each rank holds about half of the UNet (FSDP pads the flat parameters to an even split)
    assert unet_numel <= sum(shard_sizes) <= unet_numel + 64
    assert all(abs(size - unet_numel / 2) < unet_numel * 0.05 for size in shard_sizes)
    assert "optimizer_states" not in full and full["sdtrain"]["ema"]["num_updates"] == 2

    second = run_worker(tmp_path / "second.json", [*args, "trainer.max_steps=3", "resume=auto"])
    check_replicas(second, 2, 3)

    # Bit-identical to DDP at every step, the resumed one included.
    fsdp_steps = {**by_step(first), **by_step(second)}
    assert fsdp_steps == by_step(ddp)

    # export reads the FSDP folder's full state; the same weights as DDP's checkpoint.
    mine, reference = read_training_checkpoint(run_dir), read_training_checkpoint(ddp_dir)
    assert mine.global_step == reference.global_step == 3
    assert mine.unet.keys() == reference.unet.keys()
    assert all(torch.equal(mine.unet[k], reference.unet[k]) for k in reference.unet)
    assert mine.ema is not None and reference.ema is not None
    assert all(torch.equal(mine.ema[k], reference.ema[k]) for k in reference.ema)
    exported = export_run(run_dir, tmp_path / "model.safetensors")
    ddp_export = export_run(ddp_dir, tmp_path / "ddp.safetensors")
    a, _ = files.read_safetensors(exported.path)
    b, _ = files.read_safetensors(ddp_export.path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)

    # Shards resume with as many ranks as saved them; one rank is told so, naming the files.
    command = [sys.executable, str(WORKER), str(tmp_path / "x.json"), str(EXPERIMENT), *args,
               "trainer.devices=1", "trainer.max_steps=4", "resume=auto"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "holds no shard-0-of-1.pt (it has shard-0-of-2.pt, shard-1-of-2.pt)" in result.stderr


@needs_gloo
def test_fsdp_full_shard_equals_ddp(
    shards: str, ddp_run: tuple[Path, dict], tmp_path: Path
) -> None:
    args = fsdp_args(
        shards, tmp_path / "run", "trainer.strategy=fsdp",
        "trainer.fsdp.sharding_strategy=FULL_SHARD", "trainer.max_steps=2",
    )  # fmt: skip
    report = run_worker(tmp_path / "full.json", args)
    check_replicas(report, 0, 2)
    reference = by_step(ddp_run[1])
    assert by_step(report) == {step: reference[step] for step in (0, 1, 2)}


def fsdp_config(tmp_path: Path, *extra: str) -> Any:
    return load_config(
        [EXPERIMENT],
        [f"data.shards=[{tmp_path}]", "trainer.strategy=fsdp", "trainer.accelerator=cpu",
         "trainer.devices=2", "logging.wandb=false", "logging.csv=false", *extra],
    )  # fmt: skip


def test_fsdp_strategy_from_config(tmp_path: Path) -> None:
    """Without running: the config reaches the strategy (sharding, per-block wrapping, float32
    weights and reductions); what FSDP does not cover is refused with the key at fault."""
    from torch.distributed.fsdp import ShardingStrategy

    for name in ("SHARD_GRAD_OP", "FULL_SHARD"):
        cfg = fsdp_config(tmp_path, f"trainer.fsdp.sharding_strategy={name}")
        strategy = build_trainer(cfg, RunPlan(tmp_path / "run", None)).strategy
        assert isinstance(strategy, UNetFSDPStrategy)
        assert strategy.sharding_strategy == ShardingStrategy[name]
        assert strategy.mixed_precision_config.param_dtype == torch.float32
        assert strategy.mixed_precision_config.buffer_dtype is None  # buffers never cast
    assert fsdp_config(tmp_path).trainer.fsdp.sharding_strategy == "SHARD_GRAD_OP"
    with pytest.raises(ConfigError, match="sharding_strategy"):
        fsdp_config(tmp_path, "trainer.fsdp.sharding_strategy=NO_SHARD")
    with pytest.raises(ConfigError, match="gradient_clip_val"):
        fsdp_config(tmp_path, "trainer.gradient_clip_val=1.0")
    with pytest.raises(ConfigError, match=r"validation\.every_n_steps"):
        fsdp_config(tmp_path, "validation.every_n_steps=10")


def test_the_temp_folder_of_a_killed_save_is_removed_when_the_run_starts(tmp_path: Path) -> None:
    """A sharded save killed midway leaves its hidden temp folder (named by rank 0, shard files
    inside); the next start removes it with the other temp files of writers that died, and keeps
    a live writer's temp folder and the finished checkpoint folders."""
    from sdtrain.trainer.checkpoints import FSDP_FULL_FILE, fsdp_shard_name
    from sdtrain.trainer.fit import ready_run_folder

    checkpoints = tmp_path / "run" / "checkpoints"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = files.temp_path(checkpoints / "step=00000006.ckpt")  # this process's: alive
    name = files.temp_path(checkpoints / "step=00000004.ckpt").name
    killed = checkpoints / name.replace(f".{os.getpid()}.", f".{dead.pid}.")
    done = checkpoints / "step=00000002.ckpt"
    for folder, names in ((killed, [fsdp_shard_name(0, 2)]), (live, [fsdp_shard_name(1, 2)]),
                          (done, [FSDP_FULL_FILE, fsdp_shard_name(0, 2)])):  # fmt: skip
        folder.mkdir(parents=True)
        for file in names:
            (folder / file).write_bytes(b"\0" * 100)
    lines = ready_run_folder(RunPlan(tmp_path / "run", None))
    assert "removed 1 temp file(s) left by writers that died" in lines
    assert not killed.exists()
    assert (live / fsdp_shard_name(1, 2)).is_file() and (done / FSDP_FULL_FILE).is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fsdp_bf16_on_gpus(shards: str, tmp_path: Path) -> None:
    """bf16 autocast over float32 weights under FSDP with NCCL, on up to 2 GPUs (GPU only)."""
    devices = min(2, torch.cuda.device_count())
    args = overrides(
        shards, tmp_path / "run", "trainer.accelerator=gpu", "trainer.strategy=fsdp",
        f"trainer.devices={devices}", "trainer.precision=bf16-mixed", "trainer.max_steps=2",
        "checkpoint.every_n_steps=1",
    )  # fmt: skip
    report = run_worker(tmp_path / "gpu.json", args)
    assert report["world_size"] == devices
    check_replicas(report, 0, 2)
    assert {r["unet_dtype"] for s in report["steps"] for r in s["ranks"]} == {"torch.float32"}
    assert (tmp_path / "run" / "checkpoints" / "step=00000002.ckpt" / "full.ckpt").is_file()


def test_parameter_counts_in_the_docs_are_the_shipped_models() -> None:
    """docs/distributed.md's memory table counts the parameters of the real-size configs."""
    from sdtrain.models.stable_diffusion import build_stable_diffusion

    doc = (ROOT / "docs" / "distributed.md").read_text()
    for name, label in (("sd15", "SD 1.5"), ("sd2-base", "SD 2")):
        cfg = load_config([ROOT / "configs" / "models" / f"{name}.yaml"], ["logging.wandb=false"])
        model = build_stable_diffusion(cfg.model, device="meta")
        unet, vae, text = (
            sum(p.numel() for p in part.parameters())
            for part in (model.unet, model.autoencoder, model.text_encoder)
        )
        row = next(line for line in doc.splitlines() if line.startswith(f"| {label} (`configs"))
        cells = [cell.strip().split(" ")[0] for cell in row.strip("|").split("|")]
        assert cells[1:] == [f"{unet:,}", f"{vae:,}", f"{text:,}", f"{vae + text:,}"]
