"""The UNet against the original implementation's recorded outputs, and its invariants."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import load_gzipped_safetensors

from sdtrain.config.errors import ConfigError
from sdtrain.models import build_unet
from sdtrain.models.unet import UNetConfig, timestep_embedding

SD1_PARAMS = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
    num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True,
    transformer_depth=1, context_dim=32, use_linear_in_transformer=False, legacy=False,
)  # fmt: skip
SD2_INPAINT_PARAMS = dict(
    image_size=8, in_channels=9, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
    num_res_blocks=1, channel_mult=[1, 2], num_heads=-1, num_head_channels=16,
    use_spatial_transformer=True, transformer_depth=1, context_dim=32,
    use_linear_in_transformer=True, legacy=False,
)  # fmt: skip
FIXTURES = {"unet_sd1": SD1_PARAMS, "unet_sd2_inpaint": SD2_INPAINT_PARAMS}


def load_fixture(reference_dir: Path, name: str):
    weights = load_gzipped_safetensors(reference_dir / "tiny" / f"{name}_weights.safetensors.gz")
    io = safetensors.torch.load_file(reference_dir / "tiny" / f"{name}_io.safetensors")
    unet = build_unet(FIXTURES[name]).eval()
    unet.load_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in weights.items()})
    return unet, io


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_matches_original_outputs(reference_dir: Path, name: str) -> None:
    unet, io = load_fixture(reference_dir, name)
    captured = {}
    unet.middle_block.register_forward_hook(lambda m, i, o: captured.update(mid=o))
    with torch.no_grad():
        out = unet(io["x"], io["timesteps"], io["context"])
        emb = unet.time_embed(timestep_embedding(io["timesteps"], 32))
    assert torch.equal(timestep_embedding(io["timesteps"], 32), io["t_emb"])
    torch.testing.assert_close(emb, io["emb"], atol=1e-5, rtol=0)
    torch.testing.assert_close(captured["mid"], io["middle_block_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out, io["out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_matches_original_in_channels_last(reference_dir: Path, name: str) -> None:
    unet, io = load_fixture(reference_dir, name)
    unet = unet.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = unet(io["x"].to(memory_format=torch.channels_last), io["timesteps"], io["context"])
    torch.testing.assert_close(out, io["out"], atol=1e-5, rtol=0)


def test_state_dict_keys_have_no_prefix_and_original_count(reference_dir: Path) -> None:
    unet, _ = load_fixture(reference_dir, "unet_sd1")
    assert len(unet.state_dict()) == 286
    assert sum(p.numel() for p in unet.parameters()) == 1_055_044


def test_gradient_checkpointing_gives_the_same_gradients(reference_dir: Path) -> None:
    unet, io = load_fixture(reference_dir, "unet_sd2_inpaint")
    unet.train()
    grads = []
    for enabled in (False, True):
        unet.zero_grad()
        unet.set_gradient_checkpointing(enabled)
        unet(io["x"], io["timesteps"], io["context"]).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_fresh_unet_is_identity_at_init_on_residual_branches() -> None:
    """The original zero-initialises out.2, ResBlock out_layers.3 and proj_out."""
    unet = build_unet(SD1_PARAMS)
    assert torch.count_nonzero(unet.out[2].weight) == 0
    assert torch.count_nonzero(unet.input_blocks[1][0].out_layers[3].weight) == 0
    assert torch.count_nonzero(unet.input_blocks[1][1].proj_out.weight) == 0
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 32))
    assert torch.count_nonzero(out) == 0


def test_timestep_embedding_closed_form() -> None:
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 6)
    freqs = torch.tensor([10000 ** (-i / 3) for i in range(3)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 7).shape == (3, 7)


def test_bf16_autocast_forward_close_to_float32(reference_dir: Path) -> None:
    unet, io = load_fixture(reference_dir, "unet_sd1")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(io["x"], io["timesteps"], io["context"])
    assert out.dtype == torch.bfloat16
    scale = io["out"].abs().max()
    assert (out.float() - io["out"]).abs().max() < 0.05 * scale


def test_accepts_original_only_keys_and_rejects_unknown_ones() -> None:
    build_unet({**SD1_PARAMS, "use_fp16": True, "use_checkpoint": True})
    with pytest.raises(ConfigError, match="attention_typo"):
        build_unet({**SD1_PARAMS, "attention_typo": 1})
    with pytest.raises(ConfigError, match="use_scale_shift_norm"):
        UNetConfig(**{**SD1_PARAMS, "use_scale_shift_norm": True})
    with pytest.raises(ConfigError, match="num_heads"):
        UNetConfig(**{**SD1_PARAMS, "num_heads": -1})
    with pytest.raises(ConfigError, match="attention_resolutions"):
        UNetConfig(**{**SD1_PARAMS, "attention_resolutions": [8]})


def test_num_head_channels_takes_precedence_like_the_original() -> None:
    cfg = UNetConfig(**{**SD2_INPAINT_PARAMS, "num_heads": 8})
    assert cfg.heads_and_width(64) == (4, 16)
    assert UNetConfig(**SD1_PARAMS).heads_and_width(64) == (2, 32)
