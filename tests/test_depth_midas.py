"""``model.depth.source: midas``: the frozen MiDaS inside a depth model — training from shards
without depth maps, ``init_from`` a base file + a MiDaS file, and the original depth checkpoint's
``depth_model.*`` kept through a round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.diffusion.schedule import NoiseSchedule
from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.models.adapters.original import (
    build_original_state_dict,
    split_original_state_dict,
    write_checkpoint,
)
from sdtrain.models.conditioning import required_data
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
MODELS = ROOT / "configs" / "models"
MIDAS = ("model.depth.source=midas", "model.depth.estimator=tiny")


def test_midas_source_needs_no_depth_data_and_a_depth_model() -> None:
    cfg = load_config([EXPERIMENTS / "tiny-depth.yaml"], [*MIDAS, "data.depth.enabled=false",
                                                          "data.shards=[x]"])  # fmt: skip
    assert required_data(cfg.model.conditioning, cfg.model.depth) == ()
    with pytest.raises(ConfigError, match=r"depth\.source"):
        load_config([EXPERIMENTS / "tiny-base.yaml"], ["model.depth.source=midas"])
    with pytest.raises(ConfigError, match=r"data\.depth\.enabled"):
        load_config([EXPERIMENTS / "tiny-depth.yaml"], ["data.depth.enabled=false",
                                                        "data.shards=[x]"])  # fmt: skip


def test_round_trip_of_the_original_depth_checkpoint_keeps_every_key(reference_dir: Path) -> None:
    manifest = json.loads((reference_dir / "manifests" / "sd2-depth.json").read_text())
    want = [*manifest["keys"], *manifest["depth_model_keys"]]
    cfg = load_config([MODELS / "sd2-depth.yaml"], ["model.depth.source=midas"]).model
    with torch.device("meta"):
        model = StableDiffusion(cfg)
    model.schedule = NoiseSchedule(cfg.diffusion)  # computed, not stored: built for real
    written = build_original_state_dict(**model.original_parts())
    assert set(written) == set(want)
    assert list(written)[-368:] == list(manifest["depth_model_keys"])  # depth_model last
    # ... read back and loaded into a fresh model, it writes the same keys and shapes again.
    ckpt = split_original_state_dict(written)
    assert len(ckpt.depth) == 368 and not ckpt.other
    with torch.device("meta"):
        again = StableDiffusion(cfg)
    again.schedule = NoiseSchedule(cfg.diffusion)
    report = again.load_original(ckpt)
    assert "depth" in report.loaded
    rewritten = build_original_state_dict(**again.original_parts())
    assert {k: v.shape for k, v in rewritten.items()} == {k: v.shape for k, v in written.items()}


def test_init_from_a_base_file_and_a_midas_file(tmp_path: Path) -> None:
    from sdtrain.trainer.fit import build_module

    base_cfg = load_config([MODELS / "tiny-base.yaml"]).model
    torch.manual_seed(1)
    base = StableDiffusion(base_cfg)
    base_file = write_checkpoint(tmp_path / "base.ckpt", **base.original_parts())
    depth_cfg = load_config([EXPERIMENTS / "tiny-depth.yaml"], MIDAS).model
    torch.manual_seed(2)
    release = StableDiffusion(depth_cfg).depth_estimator
    assert release is not None
    # The MiDaS release file layout: DPTDepthModel's keys (pretrained.*, scratch.*).
    midas_file = tmp_path / "dpt_tiny-midas.pt"
    torch.save({k.removeprefix("model."): v for k, v in release.state_dict().items()}, midas_file)

    overrides = [*MIDAS, f"init_from={base_file}", "logging.wandb=false"]
    cfg = load_config(
        [EXPERIMENTS / "tiny-depth.yaml"], [*overrides, f"model.depth.weights={midas_file}"]
    )
    model = build_module(cfg).model
    conv = model.unet.state_dict()["input_blocks.0.0.weight"]
    base_conv = base.unet.state_dict()["input_blocks.0.0.weight"]
    assert torch.equal(conv[:, :4], base_conv) and torch.count_nonzero(conv[:, 4:]) == 0
    assert model.depth_estimator is not None
    for key, value in release.state_dict().items():
        assert torch.equal(model.depth_estimator.state_dict()[key], value), key
    # Without the MiDaS file: a clear error that says which file to pass.
    with pytest.raises(CheckpointError, match=r"base\.ckpt.*model\.depth\.weights="):
        build_module(load_config([EXPERIMENTS / "tiny-depth.yaml"], overrides))


@pytest.mark.slow
def test_tiny_depth_model_trains_with_midas_on_shards_without_depth(tmp_path: Path) -> None:
    from sdtrain.launch.export import export_run
    from sdtrain.models.adapters.original import read_checkpoint
    from sdtrain.trainer.fit import fit

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, SyntheticSpec(samples=16, per_shard=8, min_side=64))
    overrides = [
        *MIDAS, "data.depth.enabled=false", f"data.shards=[{shards}]",
        f"run.dir={tmp_path / 'run'}",
        "trainer.max_steps=3", "checkpoint.every_n_steps=3", "logging.wandb=false",
        "data.num_workers=0", "data.batch_size=2",
    ]  # fmt: skip
    run = fit(load_config([EXPERIMENTS / "tiny-depth.yaml"], overrides))
    exported = export_run(run, tmp_path / "depth.ckpt")
    ckpt = read_checkpoint(exported.path)
    assert len(ckpt.depth) == len(StableDiffusion(load_config(
        [EXPERIMENTS / "tiny-depth.yaml"], MIDAS).model).depth_estimator.state_dict())  # fmt: skip
