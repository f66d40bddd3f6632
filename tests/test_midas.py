"""MiDaS DPT-Hybrid against the original: key layout (manifest), the regenerated fixture
weights (checksums), raw depth and depth conditioning (``tiny/midas_dpt_hybrid_io``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sdtrain.errors import DataError
from sdtrain.models import build_midas, depth_conditioning
from sdtrain.models.midas import MIDAS_CONFIGS, midas_input, midas_input_size

FIXTURE = "tiny/midas_dpt_hybrid_io.safetensors"


def manifest_depth_keys(reference_dir: Path) -> list[tuple[str, list[int]]]:
    manifest = json.loads((reference_dir / "manifests" / "sd2-depth.json").read_text())
    return [(k.removeprefix("depth_model."), v) for k, v in manifest["depth_model_keys"].items()]


def test_dpt_hybrid_has_the_original_keys_in_order(reference_dir: Path) -> None:
    model = build_midas("dpt_hybrid", device="meta")
    state = model.state_dict()
    assert [(k, list(v.shape)) for k, v in state.items()] == manifest_depth_keys(reference_dir)
    assert len(state) == 368
    assert sum(v.numel() for v in state.values()) == 123_146_985
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.train().training  # frozen: stays in eval mode


def regenerate_fixture_weights(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The README's rule: one randn per state-dict entry in order, q = round(6.4 r) (half to
    even), q == 0 -> 1, 1 + q/128 for norm weights, else q/128."""
    norm_weights = {
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.GroupNorm | nn.LayerNorm | nn.BatchNorm2d)
    }
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        r = torch.randn(value.shape, generator=g, dtype=torch.float32)
        q = torch.round(128 * 0.05 * r)
        q[q == 0] = 1
        out[key] = 1 + q / 128 if key in norm_weights else q / 128
    return out


@pytest.fixture(scope="module")
def fixture_model(reference_dir: Path) -> tuple[nn.Module, dict[str, torch.Tensor], dict]:
    path = reference_dir / FIXTURE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    meta = safe_open(str(path), "pt").metadata()
    model = build_midas("dpt_hybrid")
    weights = regenerate_fixture_weights(model, int(meta["seed"]) + 1)
    model.load_state_dict(weights, strict=True)
    return model, load_file(str(path)), json.loads(meta["weight_checksums"])


def test_regenerated_weights_match_the_published_checksums(fixture_model) -> None:
    model, _, checksums = fixture_model
    values = list(model.state_dict().values())
    flat = torch.cat([v.flatten() for v in values]).double()
    assert flat.sum().item() == checksums["sum"]
    assert (flat**2).sum().item() == checksums["sum_of_squares"]
    digest = hashlib.sha256(b"".join(v.contiguous().numpy().tobytes() for v in values))
    assert digest.hexdigest() == checksums["sha256_float32_le_concat_in_key_order"]


def test_preprocessing_matches_add_midas(fixture_model) -> None:
    _, io, _ = fixture_model
    images = io["raw_image_u8"].permute(0, 3, 1, 2).float() / 127.5 - 1  # (2, 3, 360, 480)
    midas_in = midas_input(images)
    assert midas_in.shape == (2, 3, 384, 512)
    torch.testing.assert_close(midas_in, io["midas_in"], atol=2e-6, rtol=0)


def test_raw_depth_and_conditioning_match_the_original(fixture_model) -> None:
    model, io, _ = fixture_model
    depth = model(io["midas_in"])
    assert depth.shape == (2, 1, 384, 512)
    expected = io["depth"]
    rel = ((depth - expected).abs().max() / expected.abs().max()).item()
    print(f"raw depth max abs error / max = {rel:.3e}")
    assert rel <= 1e-4
    for name, hw, eps in (
        ("depth_cond", (48, 64), 1e-3),
        ("depth_cond_45x60", (45, 60), 1e-3),
        ("depth_cond_noeps", (48, 64), 0.0),
    ):
        cond = depth_conditioning(depth, hw, eps)
        err = (cond - io[name]).abs().max().item()
        print(f"{name} max abs error = {err:.3e}")
        torch.testing.assert_close(cond, io[name], atol=2e-4, rtol=0)
        # ... and computed from the fixture's own depth, the conditioning step alone is exact.
        torch.testing.assert_close(depth_conditioning(expected, hw, eps), io[name])


def test_input_size_keeps_aspect_and_reaches_the_net_size() -> None:
    assert midas_input_size(360, 480) == (384, 512)
    assert midas_input_size(512, 512) == (384, 384)
    assert midas_input_size(500, 1000) == (384, 768)
    assert midas_input_size(1000, 400) == (960, 384)
    with pytest.raises(DataError, match="too small"):
        midas_input_size(20, 480)


def test_tiny_estimator_conditioning_is_in_range() -> None:
    torch.manual_seed(0)
    model = build_midas("tiny")
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    images = torch.rand(2, 3, 32, 48) * 2 - 1
    cond = model.conditioning(images, (4, 6))
    assert cond.shape == (2, 1, 4, 6)
    assert cond.amin().item() == pytest.approx(-1.0, abs=1e-6)
    assert 0.99 < cond.amax().item() <= 1.0
    assert MIDAS_CONFIGS["tiny"].net_size == 64
