"""The assembled model: original checkpoints in and out, widening, conditioning channels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtrain.errors import CheckpointError
from sdtrain.models.adapters.original import read_checkpoint, write_checkpoint
from sdtrain.models.stable_diffusion import build_stable_diffusion
from sdtrain.trainer.experiment import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


def tiny(kind: str = "base", *overrides: str):
    return build_stable_diffusion(load_config([CONFIGS / f"tiny-{kind}.yaml"], overrides).model)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-zero weights everywhere, so zero-initialised layers cannot hide a wrong load."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def inputs(channels: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, channels, 8, 8, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 77, 32, generator=g),
    )


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_original_checkpoint_round_trip(tmp_path: Path, suffix: str) -> None:
    source = tiny("base")
    randomize(source.unet, 1)
    randomize(source.autoencoder, 2)
    ema = {k: v + 1 for k, v in source.unet.state_dict().items()}
    path = write_checkpoint(
        tmp_path / f"model{suffix}", **source.original_parts(ema), global_step=7
    )

    ckpt = read_checkpoint(path)
    assert ckpt.global_step == 7
    target = tiny("base")
    report = target.load_original(ckpt)
    assert report.loaded == ["unet", "vae", "text"] and report.widened_from is None
    for a, b in ((source.unet, target.unet), (source.autoencoder, target.autoencoder)):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(x, y), name
    text_a, text_b = (
        source.text_encoder.original_state_dict(),
        target.text_encoder.original_state_dict(),
    )
    assert all(torch.equal(text_a[k], text_b[k]) for k in text_a)
    assert all(torch.equal(report.ema[k], v) for k, v in ema.items())
    x, t, c = inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(target.unet(x, t, c), source.unet(x, t, c), rtol=0, atol=0)


def test_base_checkpoint_widens_to_inpainting_with_zero_channels(tmp_path: Path) -> None:
    base = tiny("base")
    randomize(base.unet, 3)
    ema = {k: v * 2 for k, v in base.unet.state_dict().items()}
    path = write_checkpoint(tmp_path / "base.ckpt", **base.original_parts(ema))
    inpaint = tiny("inpainting")
    report = inpaint.load_original(read_checkpoint(path))
    assert report.widened_from == 4
    weight = inpaint.unet.input_blocks[0][0].weight
    assert weight.shape[1] == 9 and torch.count_nonzero(weight[:, 4:]) == 0
    assert report.ema["input_blocks.0.0.weight"].shape[1] == 9
    assert torch.count_nonzero(report.ema["input_blocks.0.0.weight"][:, 4:]) == 0
    # zero extra channels: whatever mask and masked image, the output is the base model's
    x, t, c = inputs(9)
    with torch.no_grad():
        torch.testing.assert_close(inpaint.unet(x, t, c), base.unet(x[:, :4], t, c))


def test_mismatched_checkpoint_names_file_and_keys(tmp_path: Path) -> None:
    model = tiny("base")
    parts = model.original_parts()
    parts["unet"] = {k: v for k, v in parts["unet"].items() if "middle_block" not in k}
    path = write_checkpoint(tmp_path / "partial.safetensors", **parts)
    with pytest.raises(CheckpointError, match=r"partial\.safetensors") as info:
        tiny("base").load_original(read_checkpoint(path))
    assert "middle_block" in str(info.value)


def test_other_schedule_is_refused(tmp_path: Path) -> None:
    model = tiny("base", "model.diffusion.schedule=cosine")
    path = write_checkpoint(tmp_path / "cosine.ckpt", **model.original_parts())
    with pytest.raises(CheckpointError, match="noise schedule"):
        tiny("base").load_original(read_checkpoint(path))


def test_checkpoint_layout_matches_manifest_naming(tmp_path: Path, reference_dir: Path) -> None:
    """The written file carries exactly the original prefixes and the 12 schedule buffers."""
    model = tiny("inpainting")
    path = write_checkpoint(tmp_path / "m.ckpt", **model.original_parts())
    state = torch.load(path, weights_only=True)["state_dict"]
    prefixes = {k.split(".")[0] for k in state if "." in k}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in state
    assert state["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    assert len([k for k in state if "." not in k]) == 12


def test_conditioning_channels() -> None:
    model = tiny("inpainting")
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :] = 1
    latents = torch.randn(1, 4, 8, 8)
    cond = model.conditioning_channels((8, 8), mask=mask, masked_image_latents=latents)
    assert cond.shape == (1, 5, 8, 8)
    assert torch.equal(cond[:, 0, :4], torch.ones(1, 4, 8)) and cond[:, 0, 4:].sum() == 0
    assert torch.equal(cond[:, 1:], latents)
    assert model.unet_input(torch.zeros(1, 4, 8, 8), cond).shape == (1, 9, 8, 8)
    with pytest.raises(ValueError, match="mask"):
        model.conditioning_channels((8, 8))
    assert tiny("base").conditioning_channels((8, 8)) is None


def test_only_the_unet_trains() -> None:
    model = tiny("base").train()
    assert model.unet.training
    assert not model.autoencoder.training and not model.text_encoder.training
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"unet"}


def test_encode_decode_shapes_and_scale() -> None:
    model = tiny("base")
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    mean_latents = model.encode_images(images, sample=False)
    posterior = model.autoencoder.encode(images)
    torch.testing.assert_close(mean_latents, posterior.mean * 0.18215)
    assert model.decode_latents(mean_latents).shape == (2, 3, 64, 64)
