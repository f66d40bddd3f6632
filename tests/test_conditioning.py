"""The conditioning registry: every configurable mode has a component, its channels fit the shipped
UNets, training draws keep their order, the unconditional branch of guidance keeps the image
inputs, sampling goes through one entry point, and nothing outside the registries branches on a
mode or objective name."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import torch

from sdtrain.data.config import DataConfig
from sdtrain.data.transforms import masked_images, to_model_images
from sdtrain.diffusion.samplers import cfg_denoiser
from sdtrain.errors import ConfigError
from sdtrain.models.conditioning import (
    CONDITIONINGS,
    Conditioning,
    ConditioningInputs,
    UNetConditioning,
    box_mask,
    conditioning_component,
    extra_input_channels,
    required_data,
)
from sdtrain.models.config import ModelConfig
from sdtrain.models.stable_diffusion import build_stable_diffusion
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"
TINY = {"txt2img": "tiny-base", "inpainting": "tiny-inpainting", "depth": "tiny-depth"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> typing.Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(mode: str):
    model = build_stable_diffusion(load_config([MODELS / f"{TINY[mode]}.yaml"]).model).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # the zero-initialised output layers would hide what the UNet sees
        for p in model.unet.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def pictures(mode: str, batch: int = 2, size: int = 64) -> dict[str, torch.Tensor]:
    """A training batch as the loader makes it (uint8 images and masks, float depth)."""
    g = torch.Generator().manual_seed(1)
    out: dict[str, typing.Any] = {
        "image": torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8),
        "caption": ["a red circle"] * batch,
    }
    mask = torch.zeros(batch, 1, size, size, dtype=torch.uint8)
    mask[..., : size // 2, :] = 1
    out["mask"] = mask
    out["depth"] = torch.rand(batch, 1, size, size, generator=g) * 2 - 1
    return out


# --- the registry -----------------------------------------------------------------------------


def test_registry_covers_every_configurable_mode() -> None:
    modes = set(typing.get_args(Conditioning))
    assert modes == set(CONDITIONINGS) == {"txt2img", "inpainting", "depth", "upscale"}
    field_type = typing.get_type_hints(ModelConfig)["conditioning"]
    assert set(typing.get_args(field_type)) == modes
    for name, component in CONDITIONINGS.items():
        assert component.name == name
        assert conditioning_component(name) is component
    with pytest.raises(ConfigError, match="unknown conditioning 'superres'"):
        conditioning_component("superres")


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.yaml")), ids=lambda p: p.stem)
def test_channels_equal_the_configured_unet_inputs(path: Path) -> None:
    cfg = load_config([path]).model
    latent = cfg.autoencoder.embed_dim
    extra = conditioning_component(cfg.conditioning).extra_channels(latent)
    assert latent + extra == cfg.unet.in_channels
    assert extra_input_channels(cfg.conditioning, latent) == extra
    # The released layouts: 4 (base), 9 (inpainting), 5 (depth), 7 (x4 upscaler) input channels.
    expected = {"txt2img": 4, "inpainting": 9, "depth": 5, "upscale": 7}
    assert cfg.unet.in_channels == expected[cfg.conditioning]


def test_data_requirements_name_real_data_switches() -> None:
    assert required_data("txt2img") == ()
    assert required_data("inpainting") == ("masks",)
    assert required_data("depth") == ("depth",)
    data = DataConfig()
    for name in CONDITIONINGS:
        for section in required_data(name):
            assert isinstance(getattr(data, section).enabled, bool)
    with pytest.raises(ConfigError, match=r"data\.masks\.enabled"):
        load_config([ROOT / "configs/experiments/tiny-inpainting.yaml"],
                    ["data.shards=[x.tar]", "data.masks.enabled=false"])  # fmt: skip


# --- training / held-out batches --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["txt2img", "inpainting", "depth"])
def test_from_batch_fills_the_unet_input(mode: str) -> None:
    model = tiny(mode)
    batch = pictures(mode)
    images = to_model_images(batch["image"])
    g = torch.Generator().manual_seed(3)
    latents = model.encode_images(images, generator=g)  # (2, 4, 8, 8)
    cond = model.conditioning.from_batch(model, batch, images, latents, g)
    noisy = torch.randn_like(latents)
    unet_in = cond.unet_input(noisy)
    assert unet_in.shape == (2, model.config.unet.in_channels, 8, 8)
    assert torch.equal(unet_in[:, :4], noisy)
    assert cond.kwargs == {}
    out = model.unet(unet_in, torch.tensor([5, 900]), torch.zeros(2, 77, 32), **cond.kwargs)
    assert out.shape == latents.shape


def test_inpainting_batch_draws_its_posterior_sample_after_the_image_latents() -> None:
    model = tiny("inpainting")
    batch = pictures("inpainting")
    images = to_model_images(batch["image"])
    g = torch.Generator().manual_seed(3)
    latents = model.encode_images(images, generator=g)
    cond = model.conditioning.from_batch(model, batch, images, latents, g)
    after = torch.rand(1, generator=g)

    ref = torch.Generator().manual_seed(3)
    model.encode_images(images, generator=ref)  # the image latents first
    masked = model.encode_images(masked_images(images, batch["mask"]), generator=ref)
    assert torch.equal(cond.concat[:, 1:], masked)
    assert torch.equal(torch.rand(1, generator=ref), after)  # exactly one posterior draw
    # The mask channel: the top half repainted, nearest-resized to 8 x 8.
    assert torch.equal(cond.concat[:, 0, :4], torch.ones(2, 4, 8))
    assert cond.concat[:, 0, 4:].sum() == 0


def test_depth_batch_is_the_resized_depth_map() -> None:
    model = tiny("depth")
    batch = pictures("depth")
    images = to_model_images(batch["image"])
    latents = torch.zeros(2, 4, 8, 8)
    cond = model.conditioning.from_batch(model, batch, images, latents, None)
    expected = torch.nn.functional.interpolate(batch["depth"], size=(8, 8), mode="bicubic")
    assert torch.equal(cond.concat, expected)


# --- sampling inputs and guidance -------------------------------------------------------------


def test_sampling_inputs_are_checked_by_the_mode() -> None:
    image, mask = torch.zeros(1, 3, 64, 64), box_mask(1, 64)
    depth = torch.zeros(1, 1, 64, 64)
    for mode, ok, bad in [
        ("txt2img", ConditioningInputs(), ConditioningInputs(image=image, mask=mask)),
        ("inpainting", ConditioningInputs(image=image, mask=mask), ConditioningInputs(image=image)),
        ("depth", ConditioningInputs(image=image, depth=depth), ConditioningInputs(mask=mask)),
    ]:
        component = conditioning_component(mode)
        component.check_inputs(ok.given(), mode)
        with pytest.raises(ConfigError, match=f"is an? {component.description} model"):
            component.check_inputs(bad.given(), mode)


def test_inpainting_inputs_binarise_the_mask_and_encode_the_mode() -> None:
    model = tiny("inpainting")
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    soft = box_mask(1, 64) * 0.6  # >= 0.5: repaint
    cond = model.conditioning.from_inputs(model, ConditioningInputs(image, soft), (8, 8))
    binary = box_mask(1, 64)
    expected = model.encode_images(image * (1 - binary), sample=False)
    assert torch.equal(cond.concat[:, 1:], expected)
    assert set(cond.concat[:, 0].unique().tolist()) == {0.0, 1.0}


def test_unconditional_branch_keeps_the_image_channels_and_kwargs() -> None:
    concat, y = torch.randn(2, 5, 8, 8), torch.tensor([3, 4])
    cond = UNetConditioning(concat, {"y": y})
    for component in CONDITIONINGS.values():
        uncond = component.unconditional(cond)
        assert uncond.concat is concat and uncond.kwargs["y"] is y

    seen: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def denoiser(x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, **kw: torch.Tensor):
        seen.append((x, ctx, kw))
        return x[:, :4]

    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 10])
    text, empty = torch.ones(2, 3, 6), torch.zeros(2, 3, 6)
    cfg_denoiser(denoiser, empty, text, 7.5, extra=concat, kwargs={"y": y})(x_t, t)
    x, ctx, kw = seen[-1]
    assert torch.equal(x[:2, 4:], concat) and torch.equal(x[2:, 4:], concat)  # both halves
    assert torch.equal(ctx[:2], empty) and torch.equal(ctx[2:], text)
    assert torch.equal(kw["y"], torch.cat([y, y]))
    # A mode whose unconditional side differed would be honoured, on that half only.
    other, y0 = torch.zeros(2, 5, 8, 8), torch.tensor([0, 0])
    cfg_denoiser(
        denoiser, empty, text, 7.5, extra=concat, kwargs={"y": y},
        uncond_extra=other, uncond_kwargs={"y": y0},
    )(x_t, t)  # fmt: skip
    x, _, kw = seen[-1]
    assert torch.equal(x[:2, 4:], other) and torch.equal(x[2:, 4:], concat)
    assert torch.equal(kw["y"], torch.cat([y0, y]))


class Recorder(torch.nn.Module):
    """The UNet, recording the input of every call."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.inner = unet
        self.calls: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, **kw: torch.Tensor):
        self.calls.append(x)
        return self.inner(x, t, ctx, **kw)


def test_sample_images_guides_inpainting_with_the_same_inputs_on_both_sides() -> None:
    from sdtrain.launch.sample import sample_images as reexported
    from sdtrain.models.sampling import sample_images

    assert reexported is sample_images
    model = tiny("inpainting")
    recorder = Recorder(model.unet)
    model.unet = recorder  # type: ignore[assignment]
    calls = recorder.calls
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = sample_images(
        model, ["a", "b"], image=image, mask=box_mask(1, 64), steps=2, scale=3.0, size=64
    )
    assert out.shape == (2, 3, 64, 64)
    assert len(calls) == 2 and all(x.shape == (4, 9, 8, 8) for x in calls)
    for x in calls:  # (uncond a, uncond b, cond a, cond b): the same mask + masked latents
        assert torch.equal(x[:2, 4:], x[2:, 4:])
        assert torch.equal(x[0, 4:], x[1, 4:])  # one input image serves both prompts
    with pytest.raises(ConfigError, match="sampling needs image and mask"):
        sample_images(model, ["a"], steps=2, size=64)


def test_sample_images_in_chunks_matches_all_at_once_for_given_noise() -> None:
    from sdtrain.models.sampling import sample_images

    model = tiny("depth")
    depth = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(depth=depth, steps=2, scale=2.0, noise=noise)
    whole = sample_images(model, ["a", "b", "c"], **kw)
    parts = sample_images(model, ["a", "b", "c"], chunk=2, **kw)
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-5)
    first = sample_images(model, ["a"], **{**kw, "depth": depth[:1], "noise": noise[:1]})
    torch.testing.assert_close(whole[:1], first, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(whole[0], whole[1])  # each prompt had its own depth map and noise


# --- no branch on a mode outside the registries -----------------------------------------------

BRANCH = re.compile(
    r"conditioning\s*(==|!=|in\s*[(\[{])"  # conditioning == "x", conditioning in ("x", ...)
    r"|\[\s*[\w.]*conditioning\s*\]"  # {...}[cfg.model.conditioning]
    r"|(==|!=)\s*[\"'](txt2img|inpainting|depth)[\"']"  # kind == "inpainting"
    # parameterization == "v" / in ("eps", ...); comparing two configs' values is no branch
    r"|parameterization\s*((==|!=)\s*[\"']|in\s*[(\[{])|(==|!=)\s*[\"'](eps|v)[\"']"
)
REGISTRIES = {"models/conditioning.py", "diffusion/parameterization.py"}


def test_no_mode_or_objective_branch_outside_the_registries() -> None:
    src = ROOT / "src" / "sdtrain"
    hits = []
    for path in sorted(src.rglob("*.py")):
        if path.relative_to(src).as_posix() in REGISTRIES:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if BRANCH.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "branches on a mode / objective name outside the registries:\n" + "\n".join(
        hits
    )
    # The pattern does catch what it is for.
    assert BRANCH.search('if cfg.model.conditioning == "inpainting":')
    assert BRANCH.search("needs[self.model.conditioning]")
    assert BRANCH.search('if kind == "depth":')
    assert BRANCH.search('if self.config.parameterization == "v":')
    assert not BRANCH.search("if read.parameterization != ours:")
