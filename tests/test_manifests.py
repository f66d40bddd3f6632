"""Every shipped full-size model config, built on the meta device, has exactly the original
checkpoint's keys, shapes, order and parameter counts recorded in the reference manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdtrain.diffusion.schedule import SCHEDULE_BUFFERS
from sdtrain.models.adapters.original import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from sdtrain.models.stable_diffusion import build_stable_diffusion
from sdtrain.trainer.experiment import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"
MODELS = ["sd15", "sd15-inpainting", "sd2-base", "sd2-v", "sd2-inpainting", "sd2-depth"]


@pytest.fixture(scope="module", params=MODELS)
def case(request, reference_dir: Path):
    name = request.param
    manifest = json.loads((reference_dir / "manifests" / f"{name}.json").read_text())
    cfg = load_config([CONFIGS / f"{name}.yaml"])
    return name, manifest, cfg, build_stable_diffusion(cfg.model, device="meta")


def _shapes(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {prefix + k: list(v.shape) for k, v in state.items()}


def test_keys_shapes_and_order_match_the_original(case) -> None:
    _, manifest, _, model = case
    ours = {name: [1000] for name in SCHEDULE_BUFFERS}
    ours.update(_shapes(UNET_PREFIX, model.unet.state_dict()))
    ours.update(_shapes(VAE_PREFIX, model.autoencoder.state_dict()))
    ours.update(_shapes(TEXT_PREFIX, model.text_encoder.original_state_dict()))
    assert list(ours) == list(manifest["keys"])
    assert ours == manifest["keys"]


def test_parameter_counts_match_the_original(case) -> None:
    _, manifest, _, model = case
    params = manifest["params"]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert count(model.unet) == params["model.diffusion_model"]
    assert count(model.autoencoder) == params["first_stage_model"]
    assert count(model.autoencoder.encoder) == params["first_stage_model.encoder"]
    assert count(model.autoencoder.decoder) == params["first_stage_model.decoder"]
    assert count(model.text_encoder) == params["cond_stage_model"]


def test_config_summary_matches_the_original(case) -> None:
    _, manifest, cfg, model = case
    summary = manifest["config_summary"]
    assert cfg.model.diffusion.parameterization == summary["parameterization"]
    assert cfg.model.autoencoder.scale_factor == summary["scale_factor"]
    expected_conditioning = {"crossattn": "txt2img", "hybrid": cfg.model.conditioning}
    assert cfg.model.conditioning == expected_conditioning[summary["conditioning_key"]]
    for key, value in summary["unet_params"].items():
        if key in ("use_fp16", "image_size", "legacy", "use_spatial_transformer"):
            continue  # accepted, changes nothing (see reference README)
        assert getattr(cfg.model.unet, key) == value, key
    for name, spec in manifest["spatial_transformers"].items():
        module = model.unet.get_submodule(name.removeprefix(UNET_PREFIX))
        block = module.transformer_blocks[0].attn1
        assert block.heads == spec["heads"]
        assert block.to_q.out_features // block.heads == spec["dim_head"]
        assert type(module.proj_in).__name__ == spec["proj_in"]
        assert module.transformer_blocks[0].attn2.to_k.in_features == spec["context_dim"]


def test_non_persistent_buffers_are_not_saved(case) -> None:
    _, manifest, _, model = case
    saved = set(model.unet.state_dict()) | set(model.text_encoder.original_state_dict())
    for key in manifest["non_persistent_buffers"]:
        assert key.removeprefix(TEXT_PREFIX) not in saved
