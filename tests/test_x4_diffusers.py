"""The x4 upscaler in diffusers: an original-layout tiny upscaler (the file ``sdtrain export``
writes) loads through diffusers' own single-file conversion
(``StableDiffusionUpscalePipeline.from_single_file`` with an original config, offline), and the
pipeline's upscaled image equals ``sdtrain sample --image`` with the same seed.

What is passed in by hand, and why (docs/upscaler.md, "diffusers"): the text encoder and
tokenizer (single-file loading fetches their configs from the Hub otherwise; the text encoder is
converted with diffusers' own ``convert_open_clip_checkpoint``) and the DDIM scheduler (diffusers'
legacy single-file scheduler of an ``upscale`` file is epsilon, the x4 is v). The low-res
noise schedule is diffusers' fixed ``low_res_scheduler``; its values are checked against ours.
Skips without diffusers / transformers (the optional ``bench`` extra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sdtrain.launch.cli import EXIT_OK, main
from sdtrain.models.adapters.diffusers import tokenizer_files
from sdtrain.models.adapters.original import build_original_state_dict, write_checkpoint
from sdtrain.models.config import ModelConfig
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_X4 = ROOT / "configs" / "models" / "tiny-x4-upscaler.yaml"
pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("diffusers", "transformers")),
    reason="diffusers and transformers are not installed (pip install .[bench])",
)


def original_config(cfg: ModelConfig) -> dict:
    """The original ``configs/stable-diffusion/x4-upscaling.yaml`` written for ``cfg`` (what
    diffusers reads of it: the schedule, the UNet and first-stage params, the scale factor)."""
    u, ae = cfg.unet, cfg.autoencoder
    dd = ae.ddconfig
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentUpscaleDiffusion",
        "params": {
            "parameterization": cfg.diffusion.parameterization,
            "low_scale_key": "lr", "linear_start": cfg.diffusion.linear_start,
            "linear_end": cfg.diffusion.linear_end, "timesteps": cfg.diffusion.timesteps,
            "scale_factor": ae.scale_factor, "conditioning_key": "hybrid-adm",
            "low_scale_config": {
                "target": "ldm.modules.diffusionmodules.upscaling.ImageConcatWithNoiseAugmentation",
                "params": {"noise_schedule_config": {"linear_start": cfg.upscale.linear_start,
                                                     "linear_end": cfg.upscale.linear_end},
                           "max_noise_level": cfg.upscale.max_noise_level}},
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                            "params": {
                "num_classes": u.num_classes, "image_size": 128, "in_channels": u.in_channels,
                "out_channels": u.out_channels, "model_channels": u.model_channels,
                "attention_resolutions": list(u.attention_resolutions),
                "num_res_blocks": u.num_res_blocks, "channel_mult": list(u.channel_mult),
                "num_heads": u.num_heads, "use_spatial_transformer": True,
                "use_linear_in_transformer": u.use_linear_in_transformer,
                "transformer_depth": u.transformer_depth, "context_dim": u.context_dim,
                "disable_self_attentions": list(u.disable_self_attentions),
                "disable_middle_self_attn": u.disable_middle_self_attn, "legacy": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                   "params": {"embed_dim": ae.embed_dim, "ddconfig": {
                "double_z": dd.double_z, "z_channels": dd.z_channels, "resolution": dd.resolution,
                "in_channels": dd.in_channels, "out_ch": dd.out_ch, "ch": dd.ch,
                "ch_mult": list(dd.ch_mult), "num_res_blocks": dd.num_res_blocks,
                "attn_resolutions": list(dd.attn_resolutions), "dropout": dd.dropout}}},
        },
    }}  # fmt: skip


def text_components(cfg: ModelConfig, flat: dict[str, torch.Tensor], folder: Path):
    """A CLIPTextModel converted by diffusers' own OpenCLIP converter, and the tokenizer."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    t = cfg.text_encoder
    active = t.layers - 1  # penultimate layer: the final block never runs
    config = CLIPTextConfig(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
        num_hidden_layers=active, num_attention_heads=t.heads, hidden_act="gelu",
        max_position_embeddings=t.context_length, pad_token_id=t.pad_id,
        projection_dim=t.projection_dim, bos_token_id=49406, eos_token_id=49407,
    )  # fmt: skip
    text = CLIPTextModel(config).eval()
    converted = convert_open_clip_checkpoint(text, flat)
    # diffusers drops ViT-H's unused 24th block by name (resblocks.23); here it is block 1.
    skipped = f"text_model.encoder.layers.{active}."
    converted = {k: v for k, v in converted.items() if not k.startswith(skipped)}
    if not any(k.startswith("text_model.") for k in text.state_dict()):  # transformers >= 5
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = text.load_state_dict(converted, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), missing
    folder.mkdir()
    for name, content in tokenizer_files(t).items():
        (folder / name).write_text(content)
    return text, CLIPTokenizer.from_pretrained(folder)


@pytest.mark.slow
def test_single_file_upscale_pipeline_equals_sdtrain_sample(tmp_path, monkeypatch, capsys):
    from diffusers import DDIMScheduler, StableDiffusionUpscalePipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the network
    cfg = load_config([TINY_X4]).model
    torch.manual_seed(0)
    model = StableDiffusion(cfg).eval()
    with torch.no_grad():  # the zero-initialised output layers would hide every input
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    parts = model.original_parts()
    ckpt = write_checkpoint(tmp_path / "x4.safetensors", **parts)
    config_file = tmp_path / "x4-upscaling.yaml"
    config_file.write_text(yaml.safe_dump(original_config(cfg)))
    text, tokenizer = text_components(cfg, build_original_state_dict(**parts), tmp_path / "tok")
    d = cfg.diffusion
    scheduler = DDIMScheduler(
        num_train_timesteps=d.timesteps, beta_start=d.linear_start, beta_end=d.linear_end,
        beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    pipe = StableDiffusionUpscalePipeline.from_single_file(
        str(ckpt), original_config=str(config_file), text_encoder=text, tokenizer=tokenizer,
        scheduler=scheduler, local_files_only=True, safety_checker=None, feature_extractor=None,
        watermarker=None,
    )  # fmt: skip
    # diffusers' own conversion of our file: the UNet knows the label and the disabled attention.
    assert pipe.unet.config.in_channels == 7 and pipe.unet.config.num_class_embeds == 1000
    assert list(pipe.unet.config.only_cross_attention) == [True, False]
    assert pipe.vae.config.scaling_factor == cfg.autoencoder.scale_factor
    assert pipe.config.max_noise_level == cfg.upscale.max_noise_level
    # The low-res noise schedule: diffusers' fixed DDPMScheduler (scaled_linear = the original's
    # "linear", linear in sqrt(beta)) against the file's low_scale_model.* buffers.
    ours = parts["low_scale"]["alphas_cumprod"]
    theirs = pipe.low_res_scheduler.alphas_cumprod
    gap = float((ours - theirs).abs().max())
    print(f"low-res alphas_cumprod: max difference {gap:.2e}")
    assert gap < 1e-6

    low = tmp_path / "low.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(low)
    out = tmp_path / "up.png"
    argv = ["sample", "--checkpoint", str(ckpt), "--config", str(TINY_X4), "--image", str(low),
            "--prompt", "a red circle", "--steps", "4", "--scale", "7.5", "--seed", "3",
            "--noise-level", "20", "--out", str(out)]  # fmt: skip
    assert main(argv) == EXIT_OK, capsys.readouterr().err
    ours_png = np.asarray(Image.open(out)).astype(int)
    # One generator, the same order of draws as sdtrain: the low-res noise, then the latents.
    with Image.open(low) as image:
        result = pipe(
            "a red circle", image=image.convert("RGB"), num_inference_steps=4,
            guidance_scale=7.5, noise_level=20, eta=0.0,
            generator=torch.Generator().manual_seed(3), output_type="np",
        ).images[0]  # fmt: skip
    theirs_png = (result * 255).round().astype(int)
    assert theirs_png.shape == ours_png.shape == (32, 32, 3)
    diff = np.abs(theirs_png - ours_png)
    print(f"upscale pipeline vs sdtrain sample: max difference {diff.max()} of 255, "
          f"mean {diff.mean():.3f}")  # fmt: skip
    assert diff.max() <= 2
    assert ours_png.std() > 5  # a picture, not a constant (which would match trivially)
