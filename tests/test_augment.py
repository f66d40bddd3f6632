"""``data.augment``: albumentations transforms at the output size, drawn from the sample's seed
(the same seed gives the same draw, in any process), moving the image, its mask and its depth
map together; bad entries are config errors naming the entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdtrain.data.augment import build_augment
from sdtrain.errors import ConfigError
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"


def square_scene(size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A white square on black (image), the same square as mask and as depth (1 inside)."""
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[20:40, 12:36] = True
    image = (inside * 255).to(torch.uint8).expand(3, size, size).contiguous()  # (3, H, W)
    return image, inside.to(torch.uint8)[None], inside.to(torch.float32)[None]


def test_the_same_seed_gives_the_same_draw_and_another_seed_another() -> None:
    entries = [{"name": "ColorJitter", "brightness": 0.4, "contrast": 0.4, "p": 1.0},
               {"name": "Affine", "scale": [0.8, 1.2], "rotate": [-30, 30], "p": 1.0},
               {"name": "GaussNoise", "p": 1.0}]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)
    _, mask, depth = square_scene()
    first = build_augment(entries, 64, 64)
    second = build_augment(entries, 64, 64)  # another instance: nothing carried between calls

    def run(augment, seed) -> list[torch.Tensor]:
        out_image, (out_mask,), out_depth = augment(image, np.random.default_rng(seed), [mask],
                                                    depth)  # fmt: skip
        return [out_image, out_mask, out_depth]

    a = run(first, [7, 1])
    run(first, [99])  # a draw in between changes nothing
    b = run(second, [7, 1])
    c = run(first, [7, 2])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert a[0].dtype == torch.uint8 and a[0].shape == (3, 64, 64) and a[0].is_contiguous()
    assert a[1].dtype == torch.uint8 and a[1].shape == (1, 64, 64)
    assert a[2].dtype == torch.float32 and a[2].shape == (1, 64, 64)
    assert not torch.equal(a[0], image)


def test_a_shift_moves_image_mask_and_depth_together() -> None:
    image, mask, depth = square_scene()
    shift = build_augment([{"name": "Affine", "translate_px": {"x": [5, 5], "y": [-3, -3]},
                            "p": 1.0}], 64, 64)  # fmt: skip
    out_image, (out_mask, out_loss_mask), out_depth = shift(
        image, np.random.default_rng(0), [mask, torch.ones_like(mask)], depth
    )
    expected = torch.zeros(64, 64, dtype=torch.uint8)
    expected[17:37, 17:41] = 1  # 3 px up, 5 px right, borders filled with 0
    assert torch.equal(out_mask[0], expected)
    assert torch.equal(out_depth[0], expected.float())
    kept = torch.zeros(64, 64, dtype=torch.uint8)  # a loss mask: the filled border counts 0
    kept[:61, 5:] = 1
    assert torch.equal(out_loss_mask[0], kept)
    assert torch.equal((out_image > 127).to(torch.uint8), expected.expand(3, 64, 64))


def test_random_geometry_keeps_the_mask_on_the_image_and_colour_leaves_it_alone() -> None:
    image, mask, depth = square_scene()
    entries = [{"name": "Affine", "scale": [0.8, 1.2], "rotate": [-40, 40],
                "translate_percent": [-0.1, 0.1], "p": 1.0},
               {"name": "ColorJitter", "brightness": 0.2, "p": 1.0}]  # fmt: skip
    augment = build_augment(entries, 64, 64)
    for seed in range(5):
        out_image, (out_mask,), out_depth = augment(image, np.random.default_rng(seed), [mask],
                                                    depth)  # fmt: skip
        assert not torch.equal(out_mask, mask)
        bright = out_image[0] > 100  # the square after a 0.8-1.2 brightness change
        agree = (bright == out_mask[0].bool()).float().mean()
        assert agree > 0.97, f"seed {seed}: the image and its mask disagree on {1 - agree:.1%}"
        assert torch.equal(out_depth[0] > 0.5, out_mask[0].bool())
    jitter = build_augment([{"name": "ColorJitter", "brightness": 0.5, "p": 1.0}], 64, 64)
    out_image, (out_mask,), out_depth = jitter(image, np.random.default_rng(1), [mask], depth)
    assert torch.equal(out_mask, mask) and torch.equal(out_depth, depth)
    assert not torch.equal(out_image, image)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{name: ColourJitter}", "unknown albumentations transform 'ColourJitter'; did you mean "
         "ColorJitter"),
        ("{name: Affine, scal: 1.1}", r"Affine: unknown parameter\(s\) \['scal'\]; Affine takes"),
        ("{name: Affine, scale: big}", "Affine cannot be built"),
        ("{name: RandomCrop, height: 32, width: 32}", r"RandomCrop changes the size \(64x64"),
        ("{name: BBoxSafeRandomCrop}", "BBoxSafeRandomCrop cannot be built or applied"),
        ("{brightness: 0.1}", "each entry is a mapping with the transform's class name"),
    ],
)  # fmt: skip
def test_bad_entries_are_config_errors_naming_the_entry(entry: str, message: str) -> None:
    overrides = ["data.image.size=64", f"data.augment=[{{name: HorizontalFlip}}, {entry}]"]
    with pytest.raises(ConfigError, match=message) as info:
        load_config([EXPERIMENTS / "tiny-base.yaml"], overrides)
    assert info.value.key == "data.augment[1]"
    assert info.value.source == "command line"


def test_off_by_default_and_the_shipped_folder_config_builds() -> None:
    assert load_config([EXPERIMENTS / "tiny-base.yaml"]).data.augment == []
    cfg = load_config([EXPERIMENTS / "tiny-lora-folder.yaml"])
    assert [entry["name"] for entry in cfg.data.augment] == ["ColorJitter", "Affine"]
    assert cfg.data.source == "folder" and cfg.data.repeats == 2
