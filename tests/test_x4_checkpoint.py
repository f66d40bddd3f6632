"""The x4 upscaler's original layout through ``sdtrain checkpoint convert`` and ``export``: the 8
``low_scale_model.*`` buffers (the low-res noise schedule) are carried, so a round trip of an
``x4-upscaling-ema.ckpt``-layout file keeps every key of the manifest, in its order; the
``fit --dry-run`` contract prints the parameter counts of the three parts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdtrain.config.resolve import resolve_config_path
from sdtrain.launch import export as export_module
from sdtrain.launch.cli import EXIT_OK, main
from sdtrain.launch.export import convert_checkpoint
from sdtrain.models.adapters.original import (
    build_original_state_dict,
    read_checkpoint,
    split_original_state_dict,
    write_checkpoint,
)
from sdtrain.models.stable_diffusion import StableDiffusion, build_stable_diffusion
from sdtrain.models.upscaling import LOW_SCALE_BUFFERS
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_X4 = ROOT / "configs" / "models" / "tiny-x4-upscaler.yaml"


@pytest.fixture(scope="module")
def manifest(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "manifests" / "x4-upscaler.json").read_text())


@pytest.fixture
def x4_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny x4 upscaler in the original layout, with the flat state dict it holds."""
    torch.manual_seed(0)
    model = StableDiffusion(load_config([TINY_X4]).model)
    parts = model.original_parts()
    return write_checkpoint(tmp_path / "x4.ckpt", **parts), build_original_state_dict(**parts)


def test_convert_keeps_the_low_scale_buffers(x4_file, tmp_path: Path) -> None:
    src, flat = x4_file
    low = {k.removeprefix("low_scale_model."): v for k, v in flat.items()
           if k.startswith("low_scale_model.")}  # fmt: skip
    assert list(low) == list(LOW_SCALE_BUFFERS)
    # .ckpt -> .ckpt keeps keys and order; via .safetensors (whose keys are stored sorted
    # within the file) the same keys; every tensor unchanged either way.
    convert_checkpoint(src, tmp_path / "x4.safetensors")
    for name, ordered in (("x4.safetensors", False), ("x4.ckpt", True)):
        source = tmp_path / name if name.endswith("safetensors") else src
        message = convert_checkpoint(source, tmp_path / "back.ckpt")
        assert "left out" not in message
        back = read_checkpoint(tmp_path / "back.ckpt")
        again = build_original_state_dict(
            unet=back.unet, vae=back.vae, text=back.text, schedule=back.schedule,
            low_scale=back.low_scale,
        )  # fmt: skip
        assert list(again) == list(flat) if ordered else set(again) == set(flat)
        assert all(torch.equal(again[k], v) for k, v in flat.items())
    # fp16 halves the weights; both noise schedules stay float32 (their values unchanged).
    convert_checkpoint(src, tmp_path / "half.ckpt", dtype="fp16")
    half = read_checkpoint(tmp_path / "half.ckpt")
    assert half.unet["input_blocks.0.0.weight"].dtype == torch.float16
    for name, value in low.items():
        assert half.low_scale[name].dtype == torch.float32 and torch.equal(
            half.low_scale[name], value
        ), name
    assert half.schedule["betas"].dtype == torch.float32
    # The CLI says what it wrote and reads back the same.
    assert main(["checkpoint", "convert", str(src), str(tmp_path / "cli.ckpt")]) == EXIT_OK
    assert list(read_checkpoint(tmp_path / "cli.ckpt").low_scale) == list(LOW_SCALE_BUFFERS)


def test_convert_of_a_real_size_x4_file_keeps_every_manifest_key(manifest, monkeypatch) -> None:
    """The full-size layout without 3.5 GB of tensors: the file read is the manifest's key list
    as meta tensors; what convert hands to the writer must flatten to the same list."""
    meta = {key: torch.empty(shape, device="meta") for key, shape in manifest["keys"].items()}
    monkeypatch.setattr(
        export_module, "read_checkpoint",
        lambda path: split_original_state_dict(meta, path=Path(path)),
    )  # fmt: skip
    written: dict[str, torch.Tensor] = {}

    def capture(path, **parts):
        parts = {k: v for k, v in parts.items() if k in _STATE_DICT_PARTS}
        written.update(build_original_state_dict(**parts))
        return Path(path)

    monkeypatch.setattr(export_module, "write_checkpoint", capture)
    convert_checkpoint("x4-upscaling-ema.ckpt", "out.safetensors")
    assert list(written) == list(manifest["keys"])
    assert {k: list(v.shape) for k, v in written.items()} == manifest["keys"]


_STATE_DICT_PARTS = ("unet", "vae", "text", "ema", "schedule", "depth", "low_scale")


def test_export_parts_of_the_real_size_model_are_the_manifest(manifest) -> None:
    """What ``export`` writes (``original_parts``) for the full-size x4, built on meta."""
    model = build_stable_diffusion(load_config([resolve_config_path("x4-upscaler")]).model, "meta")
    model.schedule.to_empty(device="cpu")  # 12 x 1000 numbers; their shapes are what counts
    flat = build_original_state_dict(**model.original_parts())
    assert {k: list(v.shape) for k, v in flat.items()} == manifest["keys"]
    assert list(flat) == list(manifest["keys"])
    assert len(flat) == manifest["num_keys"] == 1205


def test_fit_dry_run_prints_the_x4_parameter_counts(manifest, tmp_path: Path, capsys) -> None:
    """Contract: ``sdtrain fit --config x4-upscaler --dry-run data.shards=...``."""
    from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards

    write_synthetic_shards(tmp_path / "shards", SyntheticSpec(samples=2, per_shard=2, min_side=64))
    shards, run = tmp_path / "shards", tmp_path / "run"
    code = main(["fit", "--config", "x4-upscaler", "--dry-run", f"data.shards=[{shards}]",
                 f"run.dir={run}"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == EXIT_OK
    params = manifest["params"]
    assert (
        f"UNet {params['model.diffusion_model']:,} (trained), autoencoder "
        f"{params['first_stage_model']:,}, text encoder {params['cond_stage_model']:,}"
    ) in out
    assert not (tmp_path / "run").exists()
