"""The noise schedule against the original's recorded buffers, and the objective's closed forms."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sdtrain.diffusion import (
    SCHEDULE_BUFFERS,
    DiffusionConfig,
    NoiseSchedule,
    diffusion_loss,
    min_snr_weights,
    sample_noise,
)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule(DiffusionConfig())


def test_buffers_match_original_exactly(reference_dir: Path, schedule: NoiseSchedule) -> None:
    ref = safetensors.torch.load_file(
        reference_dir / "schedule" / "schedule_linear_1000.safetensors"
    )
    ours64 = NoiseSchedule.compute_float64(schedule.config)
    buffers = schedule.original_buffers()
    assert list(buffers) == list(SCHEDULE_BUFFERS)
    for name in SCHEDULE_BUFFERS:
        assert buffers[name].dtype == torch.float32
        assert torch.equal(buffers[name], ref[f"{name}.float32"]), name
        torch.testing.assert_close(ours64[name], ref[f"{name}.float64"], rtol=1e-12, atol=1e-15)


def test_spot_values(schedule: NoiseSchedule) -> None:
    ab = NoiseSchedule.compute_float64(schedule.config)["alphas_cumprod"]
    assert ab[0].item() == pytest.approx(0.99915, abs=1e-15)
    assert ab[999].item() == pytest.approx(0.004660098513077238, abs=1e-15)


def test_q_sample_and_conversions_match_original(reference_dir: Path, schedule) -> None:
    ex = safetensors.torch.load_file(reference_dir / "schedule" / "qsample_example.safetensors")
    x0, noise, t, x_t, v = ex["x0"], ex["noise"], ex["t"], ex["x_t"], ex["v_target"]
    assert torch.equal(schedule.q_sample(x0, t, noise), x_t)
    assert torch.equal(schedule.v_target(x0, t, noise), v)
    assert torch.equal(schedule.x0_from_v(x_t, t, v), ex["x0_from_v"])
    assert torch.equal(schedule.eps_from_v(x_t, t, v), ex["eps_from_v"])
    assert torch.equal(schedule.x0_from_eps(x_t, t, noise), ex["x0_from_eps"])
    assert torch.equal(schedule.target(x0, t, noise), ex["eps_target"])


def test_conversions_are_mutually_consistent(schedule: NoiseSchedule) -> None:
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    t = torch.tensor([1, 400, 900])
    x_t = schedule.q_sample(x0, t, noise)
    v_schedule = NoiseSchedule(DiffusionConfig(parameterization="v"))
    eps, x0_hat = v_schedule.to_eps_and_x0(x_t, t, v_schedule.target(x0, t, noise))
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_hat, x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(schedule.eps_from_x0(x_t, t, x0), noise, atol=2e-3, rtol=1e-3)


def test_cosine_schedule_closed_form() -> None:
    s = NoiseSchedule(DiffusionConfig(schedule="cosine"))
    ab = NoiseSchedule.compute_float64(s.config)["alphas_cumprod"]
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 500, 750):
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert s.betas.max() <= 0.999


def test_zero_terminal_snr() -> None:
    base = NoiseSchedule.compute_float64(DiffusionConfig())
    zt = NoiseSchedule.compute_float64(
        DiffusionConfig(parameterization="v", zero_terminal_snr=True)
    )
    assert zt["alphas_cumprod"][-1] == 0
    torch.testing.assert_close(zt["alphas_cumprod"][0], base["alphas_cumprod"][0])
    assert torch.all(zt["alphas_cumprod"][1:] < zt["alphas_cumprod"][:-1])
    # x_T is pure noise: the v target there is -x0 and q_sample ignores x0
    s = NoiseSchedule(DiffusionConfig(parameterization="v", zero_terminal_snr=True))
    x0, noise, t = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.tensor([999])
    torch.testing.assert_close(s.q_sample(x0, t, noise), noise)
    torch.testing.assert_close(s.v_target(x0, t, noise), -x0)


def test_offset_noise_statistics() -> None:
    g = torch.Generator().manual_seed(1)
    like = torch.empty(512, 4, 16, 16)
    plain = sample_noise(like, 0.0, g)
    offset = sample_noise(like, 0.5, g)
    # per-(sample, channel) means: variance 1/256 without offset, 0.25 + 1/256 with
    assert plain.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 256, rel=0.15)
    assert offset.mean(dim=(2, 3)).var().item() == pytest.approx(0.25 + 1 / 256, rel=0.1)
    assert offset.var().item() == pytest.approx(1.25, rel=0.05)


def test_min_snr_weights_closed_form() -> None:
    t = torch.tensor([0, 300, 999])
    for param in ("eps", "v"):
        s = NoiseSchedule(DiffusionConfig(parameterization=param, min_snr_gamma=5.0))
        ab = s.alphas_cumprod[t].double()
        snr = ab / (1 - ab)
        denominator = snr if param == "eps" else snr + 1
        expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / denominator
        torch.testing.assert_close(min_snr_weights(s, t, 5.0).double(), expected, rtol=1e-5, atol=0)


def test_loss_is_batch_mean_of_per_sample_mse_and_weighted_when_asked() -> None:
    t = torch.tensor([10, 900])
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    target[1] *= 3
    plain = NoiseSchedule(DiffusionConfig())
    assert diffusion_loss(plain, pred, target, t).item() == pytest.approx((1 + 9) / 2)
    weighted = NoiseSchedule(DiffusionConfig(min_snr_gamma=5.0))
    w = min_snr_weights(weighted, t, 5.0)
    expected = (w[0] * 1 + w[1] * 9) / 2
    assert diffusion_loss(weighted, pred, target, t).item() == pytest.approx(expected.item())
    assert w[0] < 1 and w[1] == pytest.approx(1.0)
