"""AutoencoderKL against the original implementation's recorded outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import load_gzipped_safetensors

from sdtrain.config.errors import ConfigError
from sdtrain.models import build_autoencoder

DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
    num_res_blocks=1, attn_resolutions=[], dropout=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def fixture(reference_dir: Path):
    raw = load_gzipped_safetensors(reference_dir / "tiny" / "vae_weights.safetensors.gz")
    weights = {k.removeprefix("first_stage_model."): v for k, v in raw.items()}
    io = safetensors.torch.load_file(reference_dir / "tiny" / "vae_io.safetensors")
    vae = build_autoencoder(DDCONFIG, embed_dim=4).eval()
    vae.load_state_dict(weights)
    return vae, io


def test_encoder_and_posterior_match_original(fixture) -> None:
    vae, io = fixture
    with torch.no_grad():
        torch.testing.assert_close(vae.encoder(io["x"]), io["encoder_out"], atol=1e-5, rtol=0)
        posterior = vae.encode(io["x"])
    for name in ("mean", "logvar", "std", "var"):
        torch.testing.assert_close(getattr(posterior, name), io[name], atol=1e-5, rtol=0)
    torch.testing.assert_close(posterior.kl(), io["kl"], rtol=1e-6, atol=0)


def test_logvar_clamp_is_exercised(fixture) -> None:
    _, io = fixture
    assert io["logvar_raw"].max() > 20 and io["logvar_raw"].min() < -30
    vae, _ = fixture
    with torch.no_grad():
        logvar = vae.encode(io["x"]).logvar
    assert logvar.max() == 20 and logvar.min() == -30


def test_sample_is_mean_plus_std_times_noise(fixture) -> None:
    vae, io = fixture
    with torch.no_grad():
        posterior = vae.encode(io["x"])
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
    sample = posterior.sample(generator)
    torch.testing.assert_close(sample, posterior.mean + posterior.std * noise)
    torch.testing.assert_close(
        posterior.mean + posterior.std * io["noise"].to(posterior.mean),
        io["z_sample"],
        atol=1e-5,
        rtol=0,
    )


def test_decoder_matches_original(fixture) -> None:
    """decode(posterior.mode()). The fixture's own float32 rounding (made on another CPU) is
    1.0e-5 from a float64 evaluation of the same weights; ours must be at least as close to the
    float64 result, and within 2e-5 (about 2e-6 relative to the output scale) of the fixture."""
    vae, io = fixture
    with torch.no_grad():
        ours = vae.decode(io["mean"])
        exact = vae.double().decode(io["mean"].double())
    vae.float()
    fixture_error = (io["dec_mean"].double() - exact).abs().max()
    assert (ours.double() - exact).abs().max() <= max(fixture_error, 1e-5)
    torch.testing.assert_close(ours, io["dec_mean"], atol=2e-5, rtol=0)
    torch.testing.assert_close(exact.float(), io["dec_mean"], atol=1.1e-5, rtol=0)


def test_weights_keys_and_count(fixture) -> None:
    vae, _ = fixture
    assert len(vae.state_dict()) == 124
    assert sum(p.numel() for p in vae.parameters()) == 658_375


def test_shapes_downsampling_factor_and_errors() -> None:
    vae = build_autoencoder({**DDCONFIG, "ch_mult": [1, 1, 2, 2]}, embed_dim=4, scale_factor=0.5)
    assert vae.config.downsampling_factor == 8 and vae.scale_factor == 0.5
    with torch.no_grad():
        posterior = vae.encode(torch.zeros(1, 3, 48, 64))
        assert posterior.mean.shape == (1, 4, 6, 8)
        assert vae.decode(posterior.mode()).shape == (1, 3, 48, 64)
    with pytest.raises(ConfigError, match=r"ddconfig\.chmult"):
        build_autoencoder({**DDCONFIG, "chmult": [1]}, embed_dim=4)
    with pytest.raises(ConfigError, match="double_z"):
        build_autoencoder({**DDCONFIG, "double_z": False}, embed_dim=4)
