"""The SD 2 x4 upscaler: the UNet and the low-res noise augmentation against the original's
recorded outputs, the full-size model against the manifest (meta device), the original checkpoint
layout (``low_scale_model.*``), the ``upscale`` conditioning, bad inputs, and a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import load_gzipped_safetensors

from sdtrain.config.resolve import resolve_config_path
from sdtrain.data.degradation import DegradationConfig, degrade
from sdtrain.diffusion.schedule import SCHEDULE_BUFFERS
from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.models import build_unet
from sdtrain.models.adapters.original import (
    LOW_SCALE_PREFIX,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    read_checkpoint,
    write_checkpoint,
)
from sdtrain.models.conditioning import ConditioningInputs, conditioning_component
from sdtrain.models.sampling import sample_images
from sdtrain.models.stable_diffusion import StableDiffusion, build_stable_diffusion
from sdtrain.models.unet import timestep_embedding
from sdtrain.models.upscaling import LOW_SCALE_BUFFERS, LowResNoise, UpscaleConfig
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"
EXPERIMENTS = ROOT / "configs" / "experiments"
X4_PARAMS = dict(
    image_size=8, in_channels=7, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
    num_res_blocks=2, channel_mult=[1, 2], num_classes=1000, num_heads=8,
    use_spatial_transformer=True, transformer_depth=1, context_dim=24,
    use_linear_in_transformer=True, disable_self_attentions=[True, False],
    disable_middle_self_attn=False, legacy=False,
)  # fmt: skip


def tiny_x4(*overrides: str) -> StableDiffusion:
    torch.manual_seed(0)
    return StableDiffusion(load_config([MODELS / "tiny-x4-upscaler.yaml"], list(overrides)).model)


# --- the UNet against the original ------------------------------------------------------------


def load_x4_unet(reference_dir: Path):
    tiny = reference_dir / "tiny"
    weights = load_gzipped_safetensors(tiny / "unet_x4_weights.safetensors.gz")
    io = safetensors.torch.load_file(tiny / "unet_x4_io.safetensors")
    unet = build_unet(X4_PARAMS).eval()
    unet.load_state_dict({k.removeprefix(UNET_PREFIX): v for k, v in weights.items()})
    return unet, weights, io


def test_x4_unet_matches_original_outputs(reference_dir: Path) -> None:
    unet, weights, io = load_x4_unet(reference_dir)
    assert len(weights) == 435
    assert sum(v.numel() for v in weights.values()) == 1_660_612
    captured = {}
    unet.middle_block.register_forward_hook(lambda m, i, o: captured.update(mid=o))
    with torch.no_grad():
        out = unet(io["x"], io["timesteps"], io["context"], y=io["y"])
        emb_time = unet.time_embed(timestep_embedding(io["timesteps"], 32))
        emb_label = unet.label_emb(io["y"])
    assert torch.equal(timestep_embedding(io["timesteps"], 32), io["t_emb"])
    assert torch.equal(emb_label, io["emb_label"])
    torch.testing.assert_close(emb_time, io["emb_time"], atol=1e-5, rtol=0)
    torch.testing.assert_close(emb_time + emb_label, io["emb"], atol=1e-5, rtol=0)
    torch.testing.assert_close(captured["mid"], io["middle_block_out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out, io["out"], atol=1e-5, rtol=0)


def test_x4_unet_uses_the_label_and_the_disabled_self_attention(reference_dir: Path) -> None:
    unet, _, io = load_x4_unet(reference_dir)
    with torch.no_grad():
        shifted = unet(io["x"], io["timesteps"], io["context"], y=io["y"] + 1)
    assert (shifted - io["out"]).abs().max() > 1e-2  # README: y + 1 moves out by 4.3e-2
    block = unet.input_blocks[1][1].transformer_blocks[0]
    assert block.disable_self_attn and block.attn1.to_k.in_features == 24
    assert not unet.input_blocks[4][1].transformer_blocks[0].disable_self_attn
    with pytest.raises(ValueError, match="needs y"):
        unet(io["x"], io["timesteps"], io["context"])


def test_disable_self_attentions_needs_one_entry_per_level() -> None:
    with pytest.raises(ConfigError, match="disable_self_attentions"):
        build_unet({**X4_PARAMS, "disable_self_attentions": [True]})


# --- the noise augmentation against the original ----------------------------------------------


def test_noise_augmentation_matches_original(reference_dir: Path) -> None:
    io = safetensors.torch.load_file(reference_dir / "tiny" / "noise_aug_io.safetensors")
    noise = LowResNoise(UpscaleConfig())
    for name in LOW_SCALE_BUFFERS:
        assert torch.equal(getattr(noise, name), io[f"{name}.float32"]), name
    assert noise.alphas_cumprod[349].double().item() == pytest.approx(0.6425020799013953, 1e-7)
    out = noise(io["x"], io["noise_level"], io["noise"])
    torch.testing.assert_close(out, io["x_aug"], atol=1e-6, rtol=0)
    # Training draws levels in [0, 350): never 350.
    levels = noise.draw_levels(10_000, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert levels.min() == 0 and levels.max() == 349


def test_noise_level_outside_the_range_is_named() -> None:
    noise = LowResNoise(UpscaleConfig())
    x = torch.zeros(2, 3, 4, 4)
    with pytest.raises(ConfigError, match="noise level 351 is outside"):
        noise(x, torch.tensor([20, 351]), torch.zeros_like(x))
    with pytest.raises(ConfigError, match="noise level -1"):
        noise(x, torch.tensor([-1, 0]), torch.zeros_like(x))
    with pytest.raises(ConfigError, match="noise_level"):
        UpscaleConfig(noise_level=400)


# --- the full-size model against the manifest -------------------------------------------------


@pytest.fixture(scope="module")
def full_x4(reference_dir: Path):
    manifest = json.loads((reference_dir / "manifests" / "x4-upscaler.json").read_text())
    cfg = load_config([resolve_config_path("x4-upscaler")])  # the short name, as the CLI
    return manifest, cfg, build_stable_diffusion(cfg.model, device="meta")


def test_x4_keys_shapes_order_and_counts_match_the_manifest(full_x4) -> None:
    manifest, _, model = full_x4
    ours = {name: [1000] for name in SCHEDULE_BUFFERS}
    ours.update({UNET_PREFIX + k: list(v.shape) for k, v in model.unet.state_dict().items()})
    ours.update({VAE_PREFIX + k: list(v.shape) for k, v in model.autoencoder.state_dict().items()})
    text = model.text_encoder.original_state_dict()
    ours.update({TEXT_PREFIX + k: list(v.shape) for k, v in text.items()})
    low = model.low_scale_model.original_buffers()
    ours.update({LOW_SCALE_PREFIX + k: list(v.shape) for k, v in low.items()})
    assert list(ours) == list(manifest["keys"])
    assert ours == manifest["keys"]
    assert [LOW_SCALE_PREFIX + k for k in low] == [
        k for k in manifest["buffers"] if k.startswith(LOW_SCALE_PREFIX)
    ]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    params = manifest["params"]
    assert count(model.unet) == params["model.diffusion_model"] == 473_398_020
    assert count(model.autoencoder) == params["first_stage_model"]
    assert count(model.autoencoder.encoder) == params["first_stage_model.encoder"]
    assert count(model.autoencoder.decoder) == params["first_stage_model.decoder"]
    assert count(model.text_encoder) == params["cond_stage_model"]


def test_x4_config_matches_the_manifest_summary(full_x4) -> None:
    manifest, cfg, model = full_x4
    summary = manifest["config_summary"]
    m = cfg.model
    assert m.diffusion.parameterization == summary["parameterization"] == "v"
    assert m.autoencoder.scale_factor == summary["scale_factor"]
    assert (m.diffusion.linear_start, m.diffusion.linear_end) == (1e-4, 0.02)
    low = summary["low_scale_params"]
    assert m.upscale.max_noise_level == low["max_noise_level"]
    assert m.upscale.linear_start == low["noise_schedule_config"]["linear_start"]
    assert m.upscale.linear_end == low["noise_schedule_config"]["linear_end"]
    assert m.autoencoder.downsampling_factor == summary["first_stage_params"]["downsampling_factor"]
    for key, value in summary["unet_params"].items():
        if key in ("image_size", "legacy", "use_spatial_transformer"):
            continue
        assert getattr(m.unet, key) == value, key
    for name, spec in manifest["spatial_transformers"].items():
        module = model.unet.get_submodule(name.removeprefix(UNET_PREFIX))
        block = module.transformer_blocks[0]
        assert block.disable_self_attn == spec["self_attention_disabled"], name
        assert block.attn1.to_k.in_features == spec["attn1_kv_in_features"], name
        assert block.attn1.heads == spec["heads"], name
        assert block.attn1.to_q.out_features // block.attn1.heads == spec["dim_head"], name


# --- the original layout ----------------------------------------------------------------------


def test_original_layout_round_trip_keeps_the_low_scale_buffers(tmp_path: Path) -> None:
    model = tiny_x4()
    path = write_checkpoint(tmp_path / "x4.ckpt", **model.original_parts())
    ckpt = read_checkpoint(path)
    assert list(ckpt.low_scale) == list(LOW_SCALE_BUFFERS)
    assert torch.equal(ckpt.low_scale["betas"], ckpt.schedule["betas"])  # as the manifest
    other = tiny_x4("seed=1")
    torch.manual_seed(5)
    other = StableDiffusion(other.config)
    other.load_original(ckpt)
    for key, value in model.unet.state_dict().items():
        assert torch.equal(other.unet.state_dict()[key], value), key
    bad = dict(ckpt.low_scale, betas=ckpt.low_scale["betas"] * 2)
    ckpt.low_scale = bad
    with pytest.raises(CheckpointError, match=r"low_scale_model\.betas"):
        other.load_original(ckpt)


def test_a_base_checkpoint_given_as_an_upscaler_is_refused(tmp_path: Path) -> None:
    model = tiny_x4()
    unet = {k: v for k, v in model.unet.state_dict().items()}
    unet["input_blocks.0.0.weight"] = unet["input_blocks.0.0.weight"][:, :4]
    path = write_checkpoint(tmp_path / "base.ckpt", unet=unet)
    with pytest.raises(CheckpointError, match=r"4 input channels.*x4 upscaler model with 7"):
        model.load_original(read_checkpoint(path), parts=("unet",))


def test_model_config_rules() -> None:
    with pytest.raises(ConfigError, match=r"upscale\.factor"):
        load_config([MODELS / "tiny-x4-upscaler.yaml"], ["model.upscale.factor=8"])
    with pytest.raises(ConfigError, match="num_classes"):
        load_config([MODELS / "tiny-x4-upscaler.yaml"], ["model.unet.num_classes=null"])


# --- the conditioning -------------------------------------------------------------------------


def test_training_conditioning_is_drawn_from_the_step_generator() -> None:
    model = tiny_x4().eval()
    component = conditioning_component("upscale")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    latents = model.encode_images(images, sample=False)
    assert latents.shape[-2:] == (8, 8)
    first = component.from_batch(model, {}, images, latents, torch.Generator().manual_seed(7))
    again = component.from_batch(model, {}, images, latents, torch.Generator().manual_seed(7))
    assert first.concat.shape == (3, 3, 8, 8)
    assert torch.equal(first.concat, again.concat) and torch.equal(
        first.kwargs["y"], again.kwargs["y"]
    )
    # Independent expectation: the same draws by hand, in the documented order.
    g = torch.Generator().manual_seed(7)
    low = torch.nn.functional.interpolate(images, size=(8, 8), mode="bicubic", antialias=True)
    levels = torch.randint(0, 350, (3,), generator=g)
    noise = torch.randn(low.shape, generator=g)
    ab = model.low_scale_model.alphas_cumprod[levels].view(3, 1, 1, 1)
    expected = ab.sqrt() * low.clamp(-1, 1) + (1 - ab).sqrt() * noise
    assert torch.equal(first.kwargs["y"], levels)
    torch.testing.assert_close(first.concat, expected, atol=1e-5, rtol=0)
    assert component.unconditional(first).kwargs["y"] is first.kwargs["y"]
    context = model.text_encoder.encode(["a"] * 3)
    out = model.unet(first.unet_input(latents), torch.tensor([1, 2, 3]), context, **first.kwargs)
    assert out.shape == latents.shape


def test_degradation_options_change_the_input_and_stay_in_range() -> None:
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = degrade(images, 4)
    heavy = degrade(images, 4, DegradationConfig(blur_sigma=2.0, noise_std=0.1, jpeg_quality=30),
                    torch.Generator().manual_seed(0))  # fmt: skip
    assert plain.shape == heavy.shape == (2, 3, 8, 8)
    assert heavy.abs().max() <= 1 and (heavy - plain).abs().max() > 1e-2
    with pytest.raises(ConfigError, match="jpeg_quality"):
        DegradationConfig(jpeg_quality=99)


def test_sampling_upscales_4x_and_names_bad_inputs() -> None:
    model = tiny_x4().eval()
    with torch.no_grad():  # the zero-initialised output layers would hide every input
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    low = torch.rand(1, 3, 8, 8) * 2 - 1
    out = sample_images(model, ["a cat"], image=low, steps=2, seed=3)
    assert out.shape == (1, 3, 32, 32)
    again = sample_images(model, ["a cat"], image=low, steps=2, seed=3)
    assert torch.equal(out, again)
    other = sample_images(model, ["a cat"], image=low, steps=2, seed=3, noise_level=300)
    assert not torch.equal(out, other)
    with pytest.raises(ConfigError, match="noise level 351"):
        sample_images(model, ["a cat"], image=low, steps=2, noise_level=351)
    with pytest.raises(ConfigError, match="needs image"):
        sample_images(model, ["a cat"], steps=2)
    component = conditioning_component("upscale")
    with pytest.raises(ConfigError, match=r"low-res image is 8x8 .* needs 1/4 of it: 4x4"):
        component.from_inputs(model, ConditioningInputs(image=low), (4, 4))


# --- training ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_upscaler_trains_validates_and_exports(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
    from sdtrain.launch.export import export_run
    from sdtrain.trainer.fit import fit

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, SyntheticSpec(samples=16, per_shard=8, min_side=64))
    overrides = [
        f"data.shards=[{shards}]", f"run.dir={tmp_path / 'run'}", "trainer.max_steps=3",
        "checkpoint.every_n_steps=3", "logging.wandb=false", "data.num_workers=0",
        "data.batch_size=2", "validation.every_n_steps=3", f"validation.shards=[{shards}]",
        "validation.steps=2", "validation.samplers=[ddim]", "validation.prompts=[a,b]",
        "validation.loss_batches=1", "ema.enabled=true",
    ]  # fmt: skip
    run = fit(load_config([EXPERIMENTS / "tiny-x4-upscaler.yaml"], overrides))
    grids = sorted((tmp_path / "run").rglob("step=00000003-ddim*.png"))
    assert grids, "no validation grid written"
    with Image.open(grids[0]) as grid:  # 3 rows of 64 px: low-res | upscaled | target
        assert grid.height >= 3 * 64
    exported = export_run(run, tmp_path / "x4.ckpt")
    ckpt = read_checkpoint(exported.path)
    assert list(ckpt.low_scale) == list(LOW_SCALE_BUFFERS)
    assert ckpt.unet["input_blocks.0.0.weight"].shape[1] == 7 and "label_emb.weight" in ckpt.unet
    # sdtrain sample: 4x output from the exported original-layout file, clear usage errors.
    from sdtrain.launch.cli import EXIT_OK, EXIT_USAGE, main

    low = tmp_path / "low.png"
    Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(low)
    cfg = str(MODELS / "tiny-x4-upscaler.yaml")
    base = ["sample", "--checkpoint", str(exported.path), "--config", cfg, "--prompt", "a",
            "--image", str(low), "--steps", "2", "--seed", "1"]  # fmt: skip
    assert main([*base, "--noise-level", "20", "--out", str(tmp_path / "up.png")]) == EXIT_OK
    with Image.open(tmp_path / "up.png") as up:
        assert up.size == (64, 64)
    assert main([*base, "--noise-level", "351", "--out", str(tmp_path / "x.png")]) == EXIT_USAGE
    assert "noise level 351 is outside [0, 350]" in capsys.readouterr().err
    big = tmp_path / "big.png"
    Image.fromarray(torch.zeros(128, 128, 3).byte().numpy()).save(big)
    args = [*base[:-5], str(big), "--out", str(tmp_path / "y.png")]
    assert main(args) == EXIT_USAGE
    assert "at most 64 px (model.upscale.max_input_size)" in capsys.readouterr().err
