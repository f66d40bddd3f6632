"""Periodic validation on CPU: sample grids (files, sizes, determinism, EMA), held-out loss per
timestep bucket, data counters and the global batch in the CSV metrics, the offline wandb run,
and that validation leaves training bit-identical."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.data.filters import DataStats
from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.trainer.experiment import ExperimentConfig, load_config
from sdtrain.trainer.fit import build_module, fit
from sdtrain.trainer.validation import (
    ValidationCallback,
    data_metrics,
    evaluation_weights,
    find_laion_loader,
    make_grid,
    timestep_buckets,
)

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
SIZE = 64  # data.image.size of the tiny experiments
PROMPTS = ["a red circle", "a blue square"]
BUCKETS = ["val/loss_t0-250", "val/loss_t250-500", "val/loss_t500-750", "val/loss_t750-1000"]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest (and steadiest beside other jobs) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("validation-shards")
    spec = SyntheticSpec(samples=32, per_shard=8, min_side=64, max_side=96)
    write_synthetic_shards(root / "train", spec)
    write_synthetic_shards(root / "heldout", SyntheticSpec(**{**vars(spec), "seed": 1}))
    return {"train": str(root / "train"), "heldout": str(root / "heldout")}


def experiment(
    name: str, shards: dict[str, str], run_dir: Path, *overrides: str
) -> ExperimentConfig:
    return load_config(
        [EXPERIMENTS / f"{name}.yaml"],
        [
            f"data.shards=[{shards['train']}]", f"run.dir={run_dir}", "data.num_workers=0",
            "trainer.max_steps=4", "trainer.log_every_n_steps=2", "validation.every_n_steps=2",
            "validation.steps=3", f"validation.prompts=[{','.join(PROMPTS)}]",
            f"validation.shards=[{shards['heldout']}]", "validation.loss_batches=2",
            "logging.wandb=false", *overrides,
        ],
    )  # fmt: skip


def fit_and_close(cfg: ExperimentConfig) -> Path:
    """Train; end the wandb run so that the next fit in this process starts its own."""
    import wandb

    try:
        return fit(cfg)
    finally:
        wandb.finish()


@pytest.fixture(scope="module")
def validated_run(shards: dict[str, str], tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("validated") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        return fit_and_close(experiment("tiny-inpainting", shards, run_dir, "logging.wandb=true"))


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "logs" / "version_0" / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def values(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    """step -> value of ``key`` where it was logged."""
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def unet_weights(run_dir: Path, step: int) -> tuple[dict, dict]:
    ckpt = torch.load(run_dir / "checkpoints" / f"step={step:08d}.ckpt", weights_only=True)
    unet = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("model.unet.")}
    return unet, ckpt["sdtrain"]["ema"]["shadow"]


# ---------------------------------------------------------------------------------------------
# A training run with validation
# ---------------------------------------------------------------------------------------------


def test_grids_for_every_validation_step_and_sampler(validated_run: Path) -> None:
    samples = validated_run / "samples"
    for step in (2, 4):
        for sampler in ("ddim", "plms"):
            grid = samples / f"step={step:08d}-{sampler}.png"
            assert grid.is_file(), sorted(p.name for p in samples.iterdir())
            # inpainting rows: input, mask, result; one column per prompt
            assert Image.open(grid).size == (len(PROMPTS) * SIZE, 3 * SIZE)
            captioned = Image.open(samples / f"step={step:08d}-{sampler}-captioned.png")
            assert captioned.width == len(PROMPTS) * SIZE and captioned.height > 3 * SIZE
    assert not list(samples.glob("step=00000001-*")) + list(samples.glob("step=00000003-*"))
    # the input and mask rows are fixed inputs: the same at every validation
    a = np.asarray(Image.open(samples / "step=00000002-ddim.png"))
    b = np.asarray(Image.open(samples / "step=00000004-ddim.png"))
    assert np.array_equal(a[: 2 * SIZE], b[: 2 * SIZE])


def test_validation_loss_and_data_counters_in_csv(validated_run: Path) -> None:
    rows = metric_rows(validated_run)
    for key in ["val/loss", *BUCKETS]:
        logged = values(rows, key)
        assert sorted(logged) == [2, 4], key
        assert all(math.isfinite(v) and v > 0 for v in logged.values()), (key, logged)
    step2 = values(rows, "val/loss")[2]
    assert step2 == pytest.approx(sum(values(rows, k)[2] for k in BUCKETS) / len(BUCKETS))
    seen, kept = values(rows, "data/seen"), values(rows, "data/kept")
    assert sorted(seen) == [2, 4] and sorted(kept) == [2, 4]
    assert 0 < kept[2] <= seen[2] and seen[2] <= seen[4] and kept[2] < kept[4]
    # the synthetic images below 64 px are rejected by the size filter, and counted
    assert values(rows, "data/rejected_size")[4] > 0
    assert list(values(rows, "train/global_batch").values()) == [4.0]


def test_wandb_offline_run_holds_config_metrics_and_images(validated_run: Path) -> None:
    runs = list((validated_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((validated_run / "wandb").iterdir())
    records = list(runs[0].glob("run-*.wandb"))
    assert len(records) == 1
    data = records[0].read_bytes()
    # wandb 0.31 offline writes the config into the .wandb protobuf log (no files/config.yaml)
    for key in (b"every_n_steps", b"loss_buckets", b"tiny-inpainting", b"guidance_scale"):
        assert key in data, key
    for key in (b"val/loss_t0-250", b"data/seen", b"train/global_batch"):
        assert key in data, key
    media = runs[0] / "files" / "media" / "images" / "val"
    for sampler in ("ddim", "plms"):
        images = sorted(media.glob(f"samples_{sampler}_*.png"))
        assert len(images) == 2 * len(PROMPTS), images  # 2 validations x one column per prompt
        assert {Image.open(p).size for p in images} == {(SIZE, 3 * SIZE)}


def test_validation_leaves_training_unchanged(
    validated_run: Path, shards: dict[str, str], tmp_path: Path
) -> None:
    plain = fit_and_close(
        experiment("tiny-inpainting", shards, tmp_path / "plain", "validation.every_n_steps=0")
    )
    assert not (plain / "samples").exists()
    (unet_a, ema_a), (unet_b, ema_b) = unet_weights(validated_run, 4), unet_weights(plain, 4)
    assert unet_a.keys() == unet_b.keys() and ema_a.keys() == ema_b.keys()
    assert all(torch.equal(unet_a[k], unet_b[k]) for k in unet_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # ...and the run did train: EMA and weights moved apart
    assert any(not torch.equal(unet_a[f"model.unet.{k}"], ema_a[k]) for k in ema_a)


# ---------------------------------------------------------------------------------------------
# The pieces, without training
# ---------------------------------------------------------------------------------------------


def test_sampling_is_deterministic_and_ema_weights_are_used(
    shards: dict[str, str], tmp_path: Path
) -> None:
    cfg = experiment("tiny-inpainting", shards, tmp_path)
    module = build_module(cfg)
    unet = module.model.unet
    with torch.no_grad():  # raw weights != EMA weights, as after some training
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    callback = ValidationCallback(cfg, tmp_path)
    unet.train()

    def grid(use_ema: bool) -> np.ndarray:
        with evaluation_weights(module, use_ema):
            assert not unet.training
            return make_grid(callback.sample_grids(module)["ddim"])

    first, second = grid(True), grid(True)
    assert np.array_equal(first, second)
    raw = grid(False)
    assert first.shape == raw.shape == (3 * SIZE, len(PROMPTS) * SIZE, 3)
    assert not np.array_equal(first[2 * SIZE :], raw[2 * SIZE :])  # results differ
    assert np.array_equal(first[: 2 * SIZE], raw[: 2 * SIZE])  # inputs and masks do not
    # the training weights and mode are back
    assert unet.training
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())

    # the same step and seed give the same PNG bytes
    with evaluation_weights(module, True):
        grids = callback.sample_grids(module)
    callback.publish_grids(None, 7, grids)
    png = callback.grid_path(7, "plms").read_bytes()
    with evaluation_weights(module, True):
        callback.publish_grids(None, 7, callback.sample_grids(module))
    assert callback.grid_path(7, "plms").read_bytes() == png


def test_text_to_image_grid_and_heldout_loss(shards: dict[str, str], tmp_path: Path) -> None:
    cfg = experiment("tiny-base", shards, tmp_path, "validation.loss_buckets=3")
    module = build_module(cfg)
    callback = ValidationCallback(cfg, tmp_path)
    with evaluation_weights(module, True), torch.no_grad():
        rows = callback.sample_grids(module)["plms"]
        losses = callback.heldout_losses(module)
        again = callback.heldout_losses(module)
    assert make_grid(rows).shape == (SIZE, len(PROMPTS) * SIZE, 3)  # one row of results
    assert set(losses) == {"val/loss", "val/loss_t0-333", "val/loss_t333-666", "val/loss_t666-1000"}
    assert losses == again  # fixed generators: validations are comparable
    assert all(math.isfinite(v) for v in losses.values())
    # rank 1 of 2 takes the odd held-out batches
    assert [i for i, _ in ValidationCallback(cfg, tmp_path).heldout_batches(1, 2)] == [1]


def test_timestep_buckets_cover_the_schedule() -> None:
    assert timestep_buckets(1000, 4) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert timestep_buckets(1000, 3) == [(0, 333), (333, 666), (666, 1000)]
    assert timestep_buckets(10, 0) == [(0, 10)]


def test_data_metrics_and_finding_the_loader(shards: dict[str, str], tmp_path: Path) -> None:
    from sdtrain.data.pipeline import LaionLoader

    stats = DataStats(seen=10, kept=6)
    stats.reject("size")
    stats.error("bad_image", "x/1", "truncated")
    assert data_metrics(stats) == {
        "data/seen": 10.0, "data/kept": 6.0, "data/rejected_size": 1.0,
        "data/errors_bad_image": 1.0,
    }  # fmt: skip
    loader = LaionLoader(experiment("tiny-base", shards, tmp_path).data)
    assert find_laion_loader(loader) is loader
    assert find_laion_loader({"a": [None, loader]}) is loader
    assert find_laion_loader([None]) is None
