"""First-stage (autoencoder) training and the captioned scene shards ``sdtrain demo`` trains on:
the captions say what is drawn, the filters drop what the shards mean them to drop, the
autoencoder learns to reconstruct, and its file is an original-layout checkpoint a UNet run can
start from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtrain.config.errors import ConfigError
from sdtrain.data.pipeline import LaionLoader
from sdtrain.data.shards import expand_shards, iter_samples
from sdtrain.data.synthetic import (
    REJECT_REASONS,
    SCENE_COLOURS,
    SCENE_PLACES,
    SceneSpec,
    random_scene,
    write_scene_shards,
)
from sdtrain.data.transforms import to_model_images
from sdtrain.models.adapters.original import read_checkpoint
from sdtrain.models.autoencoder import AutoencoderKL
from sdtrain.trainer.experiment import load_config
from sdtrain.trainer.first_stage import FirstStageLoss, measure, train_first_stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    write_scene_shards(out, SceneSpec(samples=240, per_shard=80, seed=3))
    return out


def first_stage_config(shards: Path, run: Path, *overrides: str):
    return load_config(
        [ROOT / "configs" / "demo" / "first-stage.yaml"],
        [f"data.shards={shards}", f"run.dir={run}", "logging.wandb=false", *overrides],
    )


# ---------------------------------------------------------------------------------------------
# Scenes
# ---------------------------------------------------------------------------------------------


def test_lone_shape_captions_name_where_the_shape_is() -> None:
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        scene = random_scene(rng, pair_p=0.0)
        (shape,) = scene.shapes
        place = next(p for p in SCENE_PLACES if p in scene.caption)
        x, y = SCENE_PLACES[place]
        assert abs(shape.x - x) <= 0.04 and abs(shape.y - y) <= 0.04, scene
        assert f"{shape.colour} {shape.kind}" in scene.caption
        assert ("large" in scene.caption) == (shape.radius >= 0.2)
        seen.add((shape.colour, place))
    assert len(seen) == len(SCENE_COLOURS) * len(SCENE_PLACES)


def test_pair_captions_put_the_first_shape_where_the_relation_says() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = random_scene(rng, pair_p=1.0)
        first, second = scene.shapes
        assert scene.caption.startswith(f"a {first.colour} {first.kind} ")
        assert f" a {second.colour} {second.kind} on a white background" in scene.caption
        assert first.colour != second.colour
        dx, dy = first.x - second.x, first.y - second.y
        if " above " in scene.caption:
            assert dy < -0.3 and abs(dx) < 0.1
        elif " below " in scene.caption:
            assert dy > 0.3 and abs(dx) < 0.1
        elif " to the left of " in scene.caption:
            assert dx < -0.3 and abs(dy) < 0.1
        else:
            assert " to the right of " in scene.caption and dx > 0.3 and abs(dy) < 0.1


def test_scene_shards_carry_what_each_filter_drops(scenes: Path) -> None:
    metas = [
        json.loads(sample.members["json"])
        for url in expand_shards(str(scenes))
        for sample in iter_samples(url)
    ]
    assert len(metas) == 240
    low = sum(m["AESTHETIC_SCORE"] < 5 for m in metas)
    marked = sum(m["pwatermark"] >= 0.5 for m in metas)
    unsafe = sum(m["punsafe"] >= 0.1 for m in metas)
    small = sum(m["width"] < 64 for m in metas)
    assert min(low, marked, unsafe, small) > 0
    assert 0.08 < (low + marked + unsafe + small) / len(metas) < 0.3
    assert {"caption", "url", "key", "similarity", "scene"} <= metas[0].keys()
    assert len(REJECT_REASONS) == 4


# ---------------------------------------------------------------------------------------------
# First-stage training
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(scenes: Path, tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("first-stage") / "run"
    cfg = first_stage_config(scenes, run, "trainer.max_steps=60", "data.batch_size=8")
    untrained = AutoencoderKL(cfg.model.autoencoder).eval()
    _, l1_before = measure(untrained, cfg, 4)
    result = train_first_stage(cfg, FirstStageLoss(reconstruction="l2"))
    return cfg, result, l1_before


def test_first_stage_training_learns_to_reconstruct(trained) -> None:
    _, result, l1_before = trained
    assert result.l1 < 0.5 * l1_before, (result.l1, l1_before)
    losses = (result.run_dir / "logs").glob("version_*/metrics.csv")
    assert any("train/kl" in path.read_text() for path in losses)


def test_first_stage_file_is_original_layout_with_the_measured_scale(trained) -> None:
    cfg, result, _ = trained
    ckpt = read_checkpoint(result.checkpoint)
    assert ckpt.vae and ckpt.text and not ckpt.unet
    assert all(not k.startswith(("first_stage_model.", "cond_stage_model.")) for k in ckpt.vae)
    assert float(ckpt.metadata["sdtrain_scale_factor"]) == pytest.approx(result.scale_factor)

    # the scale is 1 / std of posterior samples of the training images, as scale_by_std
    autoencoder = AutoencoderKL(cfg.model.autoencoder).eval()
    autoencoder.load_state_dict(ckpt.vae)
    data = dataclasses.replace(cfg.data, num_workers=0)
    g = torch.Generator().manual_seed(cfg.seed)
    latents = []
    with torch.no_grad():
        for i, batch in enumerate(LaionLoader(data)):
            if i == 4:
                break
            latents.append(autoencoder.encode(to_model_images(batch["image"])).sample(g).flatten())
    assert result.scale_factor == pytest.approx(1 / torch.cat(latents).std().item(), rel=1e-5)


def test_a_unet_run_starts_from_the_first_stage_file(trained, scenes: Path, tmp_path) -> None:
    from sdtrain.trainer.fit import build_module

    _, result, _ = trained
    cfg = load_config(
        [ROOT / "configs" / "demo" / "base.yaml"],
        [f"data.shards={scenes}", f"run.dir={tmp_path}", f"init_from={result.checkpoint}"],
    )
    model = build_module(cfg).model
    ckpt = read_checkpoint(result.checkpoint)
    vae = model.autoencoder.state_dict()
    for key, value in ckpt.vae.items():
        assert torch.equal(vae[key], value), key
    text = model.text_encoder.original_state_dict()
    for key, value in ckpt.text.items():
        assert torch.equal(text[key], value), key


def test_masked_inputs_need_masks(scenes: Path, tmp_path: Path) -> None:
    cfg = first_stage_config(scenes, tmp_path / "run", "trainer.max_steps=1")
    with pytest.raises(ConfigError, match=r"data\.masks\.enabled"):
        train_first_stage(cfg, FirstStageLoss(masked_fraction=0.5))
