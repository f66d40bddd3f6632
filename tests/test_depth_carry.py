"""``model.depth.source: shard`` (no estimator in the model): an original depth checkpoint's
``depth_model.*`` go through ``sdtrain checkpoint convert`` and through ``init_from`` + ``fit`` +
``export`` unchanged (issue 18: a round trip of ``512-depth-ema.ckpt`` keeps every tensor)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.launch.export import convert_checkpoint
from sdtrain.models.adapters.original import read_checkpoint, write_checkpoint
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_DEPTH = ROOT / "configs" / "experiments" / "tiny-depth.yaml"
MIDAS = ("model.depth.source=midas", "model.depth.estimator=tiny")


@pytest.fixture
def depth_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny original depth checkpoint with a tiny estimator's ``depth_model.*``."""
    torch.manual_seed(3)
    model = StableDiffusion(load_config([TINY_DEPTH], MIDAS).model)
    parts = model.original_parts()
    # Non-trivial values, so "kept" cannot be confused with "re-initialised the same way".
    depth = {k: v + torch.randn_like(v) if v.is_floating_point() else v
             for k, v in parts["depth"].items()}  # fmt: skip
    parts["depth"] = depth
    return write_checkpoint(tmp_path / "depth-src.ckpt", **parts), depth


def _assert_same_depth(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], ordered: bool = True
) -> None:
    # A .ckpt keeps the key order; safetensors files list their keys sorted.
    assert list(got) == list(want) if ordered else set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key


def test_convert_keeps_depth_model(depth_file: tuple[Path, dict], tmp_path: Path) -> None:
    src, depth = depth_file
    assert len(depth) > 10
    for name in ("out.ckpt", "out.safetensors"):
        message = convert_checkpoint(src, tmp_path / name)
        assert "left out" not in message
        _assert_same_depth(read_checkpoint(tmp_path / name).depth, depth, name.endswith("ckpt"))
    # fp16 conversion halves them like every other part, keys unchanged.
    convert_checkpoint(src, tmp_path / "half.ckpt", dtype="fp16")
    half = read_checkpoint(tmp_path / "half.ckpt").depth
    assert list(half) == list(depth)
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())


def test_shard_model_carries_depth_model_from_its_file(depth_file: tuple[Path, dict]) -> None:
    src, depth = depth_file
    model = StableDiffusion(load_config([TINY_DEPTH]).model)  # source: shard
    assert model.depth_estimator is None
    assert "depth" not in model.original_parts()
    report = model.load_original(read_checkpoint(src))
    assert "depth" not in report.loaded
    assert not any(k.startswith("carried") for k in model.state_dict())
    _assert_same_depth(model.original_parts()["depth"], depth)


@pytest.mark.slow
def test_fit_from_a_depth_file_and_export_keep_depth_model(
    depth_file: tuple[Path, dict], tmp_path: Path
) -> None:
    from sdtrain.launch.export import export_run
    from sdtrain.trainer.fit import fit

    src, depth = depth_file
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, SyntheticSpec(samples=8, per_shard=8, min_side=64, depth=True))
    overrides = [
        f"init_from={src}", f"data.shards=[{shards}]", f"run.dir={tmp_path / 'run'}",
        "trainer.max_steps=2", "checkpoint.every_n_steps=2", "logging.wandb=false",
        "data.num_workers=0", "data.batch_size=2",
    ]  # fmt: skip
    cfg = load_config([TINY_DEPTH], overrides)
    assert cfg.model.depth.source == "shard"
    run = fit(cfg)
    exported = export_run(run, tmp_path / "depth.ckpt")
    out = read_checkpoint(exported.path)
    _assert_same_depth(out.depth, depth)
    # The UNet did train: the carried part is the only one expected unchanged.
    before = read_checkpoint(src).unet
    assert any(not torch.equal(out.unet[k], before[k]) for k in before)
