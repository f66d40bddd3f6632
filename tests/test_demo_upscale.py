"""The demo's x4 upscaler stage (launch/demo_upscale.py): its figures against hand-computed
values and its mechanics on an untrained first stage (a few steps).

Whether the trained stage beats bicubic is the demo's own measurement (``result.beats_bicubic``
after ``sdtrain demo``): it needs the demo's trained first stage and a few hundred UNet steps
(docs/upscaler.md has the figures), more than a unit test can spend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.data.synthetic import SceneSpec, write_scene_shards
from sdtrain.launch.demo_upscale import (
    GRID_ROWS,
    TARGET,
    held_out_scenes,
    run_upscaler_stage,
    scores,
    stage_config,
)
from sdtrain.models.adapters.original import read_checkpoint, write_checkpoint
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.models.upscaling import LOW_SCALE_BUFFERS


def test_scores_are_psnr_and_mean_abs_error_of_the_saved_pixels() -> None:
    truth = torch.zeros(2, 3, 4, 4)  # 0 in [-1, 1] is 127.5 -> saved as 128 (round half up)
    off = truth + 10 / 127.5  # 10 pixel values brighter
    psnr, mae = scores(off, truth)
    assert mae == pytest.approx(10, abs=0.51)
    assert psnr == pytest.approx(10 * np.log10(255**2 / mae**2), abs=1e-6)
    assert scores(truth, truth)[1] == 0


def test_held_out_scenes_are_fixed_and_not_the_shards(tmp_path: Path) -> None:
    images, captions = held_out_scenes(4, seed=0)
    again, _ = held_out_scenes(4, seed=0)
    assert images.shape == (4, 3, TARGET, TARGET) and torch.equal(images, again)
    assert images.min() >= -1 and images.max() <= 1 and all("background" in c for c in captions)
    # The shards' scenes come from default_rng(seed): their first captions differ.
    write_scene_shards(tmp_path, SceneSpec(samples=4, per_shard=4, reject_fraction=0.0,
                                           corrupt_fraction=0.0))  # fmt: skip
    import tarfile

    with tarfile.open(next(tmp_path.glob("*.tar"))) as tar:
        shard_captions = [tar.extractfile(m).read().decode() for m in tar if m.name.endswith("txt")]
    assert shard_captions and not set(shard_captions) & set(captions)


@pytest.fixture(scope="module")
def scene_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("upscale-scenes")
    write_scene_shards(out, SceneSpec(samples=40, per_shard=20, seed=0))
    return out


def test_stage_mechanics_on_an_untrained_first_stage(scene_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    torch.manual_seed(0)
    base = StableDiffusion(stage_config("base", []).model)  # the demo's f=4 VAE + text encoder
    parts = base.original_parts()
    first = write_checkpoint(tmp_path / "first_stage.ckpt", vae=parts["vae"], text=parts["text"],
                             unet={}, extra_metadata={"sdtrain_scale_factor": "0.5"})  # fmt: skip
    result = run_upscaler_stage(
        scene_shards, tmp_path / "out", first_stage_file=first, steps=2, images=3,
        sampling_steps=2, overrides=("logging.wandb=false", "data.batch_size=4"),
    )  # fmt: skip
    assert result.steps == 2 and result.first_stage == first
    exported = read_checkpoint(result.export)
    assert list(exported.low_scale) == list(LOW_SCALE_BUFFERS)
    assert exported.unet["input_blocks.0.0.weight"].shape[1] == 7
    assert exported.metadata["sdtrain_model"] == "demo-upscaler"
    # The frozen parts are the first stage's, unchanged; the scale came from its metadata.
    assert all(torch.equal(exported.vae[k], v) for k, v in parts["vae"].items())
    config = (tmp_path / "out" / "upscaler" / "config.yaml").read_text()
    assert "scale_factor: 0.5" in config
    with Image.open(result.grid) as grid:  # 4 rows x 3 scenes of 32 px, zoomed 3x
        assert grid.size[1] == len(GRID_ROWS) * TARGET * 3
        assert grid.size[0] == 3 * TARGET * 3
    assert set(result.psnr) == set(result.mean_abs_error) == {"bicubic", "sdtrain x4"}
    assert result.psnr["bicubic"] > 15  # bicubic of a 4x downscale is close; noise is not
    text = result.markdown(tmp_path / "out")
    assert "| bicubic |" in text and "(samples/upscaler.png)" in text
    assert result.cpu_seconds > 0 and result.wall_seconds > 0
