"""The demo's LoRA stage (launch/demo_lora.py): the shape classifier on the scenes' geometry, and
the stage's mechanics on an untrained demo-sized model (a few steps: the rates of a trained base
are the demo's own measurement)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdtrain.data.synthetic import SCENE_COLOURS, Scene, SceneShape, draw_scene
from sdtrain.launch.demo_lora import KINDS, LoraPlan, classify_shape, run_lora_stage, stage_config


def test_the_classifier_names_each_drawn_shape() -> None:
    rng = np.random.default_rng(0)
    colours = list(SCENE_COLOURS)
    hits, total = 0, 0
    for i in range(160):
        kind = KINDS[i % 4]
        x, y = (float(v) for v in rng.uniform(0.35, 0.65, 2))
        shape = SceneShape(colours[(i // 4) % 4], kind, x, y, float(rng.uniform(0.2, 0.3)))
        hits += classify_shape(np.asarray(draw_scene(Scene((shape,), ""), 32))) == kind
        total += 1
    assert hits / total >= 0.95, f"{hits}/{total}"
    blank = np.full((32, 32, 3), 255, dtype=np.uint8)
    assert classify_shape(blank) is None


@pytest.fixture(scope="module")
def demo_base(tmp_path_factory) -> Path:
    """An untrained demo-sized model as an original-layout file (UNet perturbed so that the
    adapter gets gradients)."""
    from sdtrain.models.adapters.original import write_checkpoint
    from sdtrain.models.stable_diffusion import StableDiffusion

    cfg = stage_config([])
    torch.manual_seed(0)
    model = StableDiffusion(cfg.model)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return write_checkpoint(tmp_path_factory.mktemp("demo-base") / "demo-base.ckpt",
                            **model.original_parts())  # fmt: skip


def test_the_stage_trains_exports_and_measures(demo_base: Path, tmp_path: Path) -> None:
    from sdtrain.utils import files

    plan = LoraPlan(instances=2, steps=2, class_images=2, samples=3, sampling_steps=2)
    result = run_lora_stage(tmp_path, demo_base, 1.0, plan=plan, overrides=["prior.steps=2"])
    assert len(list((tmp_path / "lora" / "class_images").glob("*.png"))) == 2
    assert (tmp_path / "lora" / "checkpoints" / "step=00000002.ckpt").is_file()
    tensors, _ = files.read_safetensors(result.export)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert any(k.endswith(".lora_up.weight") for k in tensors)
    for name in ("before", "after"):
        assert result.grids[name].is_file()
        assert 0.0 <= result.star_rate[name] <= 1.0 and 0.0 <= result.class_rate[name] <= 1.0
    assert result.chance == 0.25 and result.samples == 3 and result.steps == 2
    quality = result.quality()
    assert any("sks" in key and "chance 1/4" in key for key in quality)
    assert result.to_json()["cpu_seconds"] > 0
