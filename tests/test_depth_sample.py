"""``sdtrain sample --image`` on a depth model: depth-to-image as the original depth2img script
(depth from the checkpoint's MiDaS or ``--depth``, latents noised to ``--strength``, DDIM)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdtrain.diffusion.samplers import DDIMSampler
from sdtrain.launch.cli import EXIT_OK, EXIT_USAGE, main
from sdtrain.models.adapters.original import write_checkpoint
from sdtrain.models.conditioning import ConditioningInputs
from sdtrain.models.midas import midas_input
from sdtrain.models.sampling import image_to_image
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
DEPTH_CFG = ROOT / "configs" / "models" / "tiny-depth.yaml"
TINY = ["model.depth.estimator=tiny"]


def tiny_depth_model(seed: int = 0) -> StableDiffusion:
    cfg = load_config([DEPTH_CFG], ["model.depth.source=midas", *TINY]).model
    torch.manual_seed(seed)
    model = StableDiffusion(cfg).eval()
    assert model.depth_estimator is not None
    for p in model.depth_estimator.parameters():  # a random estimator whose depth varies
        p.data.normal_(0, 0.2)
    for p in model.unet.parameters():  # the zero-initialised output conv would hide the input
        if not p.any():
            p.data.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("depth2img")
    model = tiny_depth_model()
    with_midas = write_checkpoint(tmp / "depth.ckpt", **model.original_parts())
    parts = model.original_parts()
    parts.pop("depth")
    without = write_checkpoint(tmp / "no-midas.ckpt", **parts)
    rng = np.random.default_rng(0)
    image = tmp / "in.png"
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(image)
    depth16 = tmp / "depth16.png"
    ramp = np.tile(np.linspace(0, 65535, 56), (40, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(depth16)
    wrong = tmp / "wrong.png"
    Image.fromarray(ramp[:32, :32].copy()).save(wrong)
    small = tmp / "small.png"
    Image.fromarray(rng.integers(0, 256, (20, 56, 3), dtype=np.uint8)).save(small)
    return {"ckpt": with_midas, "no_midas": without, "image": image, "depth16": depth16,
            "wrong": wrong, "small": small, "dir": tmp}  # fmt: skip


def sample(files: dict[str, Path], ckpt: Path, out: Path, *extra: str) -> int:
    args = ["sample", "--checkpoint", str(ckpt), "--config", str(DEPTH_CFG), *TINY]
    return main([*args, "--prompt", "a room", "--image", str(files["image"]), "--steps", "4",
                 "--seed", "3", "--out", str(out), *extra])  # fmt: skip


def test_depth_conditioning_from_the_image_is_the_scripts() -> None:
    """MiDaS on the image, bicubic to latent size, min-max to [-1, 1] with no epsilon."""
    model = tiny_depth_model()
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    cond = model.conditioning.from_inputs(model, ConditioningInputs(image=image), (8, 12))
    raw = model.depth_estimator(midas_input(image, model.depth_estimator.cfg))
    small = F.interpolate(raw, size=(8, 12), mode="bicubic", align_corners=False)
    expected = 2 * (small - small.min()) / (small.max() - small.min()) - 1
    torch.testing.assert_close(cond.concat, expected)
    assert cond.concat.min().item() == -1.0 and cond.concat.max().item() == pytest.approx(1.0)


def test_low_strength_is_the_noised_latents_decoded() -> None:
    """strength < 1 / steps: t_enc = 0, no DDIM step; the result is the decoded
    sqrt(a) z + sqrt(1 - a) noise, with z and the noise drawn from the seed in that order."""
    model = tiny_depth_model()
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    got = image_to_image(model, ["x"], image, strength=0.05, steps=10, seed=5)
    g = torch.Generator().manual_seed(5)
    z = model.encode_images(image, g)
    noise = torch.randn(z.shape, generator=g)
    a = float(model.schedule.alphas_cumprod[DDIMSampler(model.schedule, 10).timesteps[0]])
    expected = model.decode_latents(a**0.5 * z + (1 - a) ** 0.5 * noise)
    torch.testing.assert_close(got, expected)


def test_depth_to_image_through_the_cli(files: dict[str, Path], tmp_path: Path) -> None:
    first, again = tmp_path / "a.png", tmp_path / "b.png"
    assert sample(files, files["ckpt"], first) == EXIT_OK
    assert sample(files, files["ckpt"], again) == EXIT_OK
    # The image's own size padded to the UNet's multiple (16 for tiny-depth, at least 2 of it).
    assert Image.open(first).size == (64, 48)
    assert first.read_bytes() == again.read_bytes()  # seeded
    given = tmp_path / "given.png"
    assert sample(files, files["ckpt"], given, "--depth", str(files["depth16"])) == EXIT_OK
    assert given.read_bytes() != first.read_bytes()
    # A file without depth_model.* samples with --depth.
    bare = tmp_path / "bare.png"
    assert sample(files, files["no_midas"], bare, "--depth", str(files["depth16"])) == EXIT_OK
    stronger = tmp_path / "strong.png"
    assert sample(files, files["ckpt"], stronger, "--strength", "1.0") == EXIT_OK
    assert stronger.read_bytes() != first.read_bytes()


def test_bad_depth_to_image_input_is_named(files: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.png"
    cases = [
        (files["no_midas"], [], "no-midas.ckpt holds no depth estimator"),
        (files["no_midas"], [], "--depth depth.png"),
        (files["ckpt"], ["--depth", str(files["wrong"])], "wrong.png is 32x32 but --image"),
        (files["ckpt"], ["--strength", "1.5"], "--strength must be in [0, 1]"),
        (files["ckpt"], ["--sampler", "plms"], "DDIM"),
    ]
    for ckpt, extra, message in cases:
        assert sample(files, ckpt, out, *extra) == EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    small = ["--image", str(files["small"])]
    assert sample(files, files["ckpt"], out, *small) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "small.png is 56x20 px: too small for the depth estimator" in err
    assert not out.exists()
