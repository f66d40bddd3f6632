"""The demo's eval stage (``launch/demo_eval.py``) on a tiny random model and scene shards: one row
per stage and scale, random features named and never called FID, the colour accuracy counted per
scale over every chunk, and the colour-accuracy figure itself on drawn scenes."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sdtrain.data.synthetic import Scene, SceneShape, SceneSpec, draw_scene, write_scene_shards
from sdtrain.errors import ConfigError
from sdtrain.launch.demo_eval import colour_accuracy, run_demo_eval
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scene(colour: str, kind: str = "circle", size: int = 32) -> torch.Tensor:
    image = draw_scene(Scene((SceneShape(colour, kind, 0.5, 0.5, 0.3),), ""), size)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, S, S) uint8


def test_colour_accuracy_counts_prompts_naming_one_colour() -> None:
    images = torch.stack([scene("red"), scene("blue"), scene("green"), scene("yellow")])
    prompts = [
        "a large red circle in the middle on a white background",  # hit
        "a large green square on the left on a white background",  # miss: it is blue
        "a red circle above a blue square on a white background",  # two colours: not counted
        "a small yellow square at the top on a white background",  # hit
    ]
    assert colour_accuracy(images, prompts) == (2, 3)


def write_tiny_base(path: Path, seed: int = 0):
    """A tiny random text-to-image model whose zero-initialised output layers are perturbed, so
    that the guidance scale changes its samples."""
    from sdtrain.models.adapters.original import write_checkpoint
    from sdtrain.models.stable_diffusion import build_stable_diffusion

    cfg = load_config([ROOT / "configs/models/tiny-base.yaml"])
    torch.manual_seed(seed)
    model = build_stable_diffusion(cfg.model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return write_checkpoint(path, **model.original_parts()), cfg


def test_demo_eval_table_on_tiny_models(tmp_path: Path) -> None:
    base, cfg = write_tiny_base(tmp_path / "base.ckpt")
    shards = tmp_path / "shards"
    write_scene_shards(shards, SceneSpec(samples=24, per_shard=12, corrupt_fraction=0.1))
    prompts = [
        "a large red circle in the middle on a white background",
        "a large blue square on the left on a white background",
        "a red circle above a green square on a white background",
    ]
    seen: list[tuple[int, int]] = []

    def every_image(images: torch.Tensor, part: list[str]) -> tuple[int, int]:
        seen.append((len(images), len(part)))
        return len(images), len(images) + 1  # counted over every chunk: hits = counted - chunks

    out = tmp_path / "eval"
    table = run_demo_eval({"base": base}, {"base": cfg}, prompts, shards, out, scales=(1.0, 5.0),
                          steps=2, reference_num=8, colour_accuracy_fn=every_image)  # fmt: skip
    assert [(r.stage, r.scale) for r in table.rows] == [("base", 1.0), ("base", 5.0)]
    # 3 prompts in one chunk of 3 per scale
    assert seen == [(3, 3), (3, 3)]
    assert [(r.colour_hits, r.colour_counted) for r in table.rows] == [(3, 4), (3, 4)]
    assert table.rows[0].distance != table.rows[1].distance  # the scale changes the samples
    assert all(np.isfinite(r.distance) and r.distance >= 0 for r in table.rows)
    assert "random features (seed 0, 64-d; not FID)" in table.features
    md = table.markdown()
    assert "random-feature FD" in md and "| FID" not in md and "colour accuracy" in md
    assert (out / "eval-table.md").read_text().strip() == md
    assert json.loads((out / "eval-table.json").read_text())["rows"][1]["scale"] == 5.0
    with (out / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["features"] for r in rows] == [table.features] * 2
    assert all(r["reference_num"] == "8" for r in rows)
    assert (out / "cache").is_dir()  # the reference features stay inside the demo's folder


def test_demo_eval_refuses_a_model_that_is_not_text_to_image(tmp_path: Path) -> None:
    cfg = load_config([ROOT / "configs/models/tiny-inpainting.yaml"])
    from sdtrain.models.adapters.original import write_checkpoint
    from sdtrain.models.stable_diffusion import build_stable_diffusion

    path = write_checkpoint(tmp_path / "inpaint.ckpt",
                            **build_stable_diffusion(cfg.model).original_parts())  # fmt: skip
    with pytest.raises(
        ConfigError,
        match=r"inpaint\.ckpt \(inpainting\) is an inpainting model "
        r"\(model.conditioning: inpainting.*text-to-image",
    ):
        run_demo_eval({"inpainting": path}, {"inpainting": cfg}, ["a", "b"], tmp_path,
                      tmp_path / "out")  # fmt: skip
