"""The eps / v objective objects: registry, targets against closed forms computed here in float64,
round trips between model output, eps and x0, and x0-space loss weights."""

from __future__ import annotations

import typing

import pytest
import torch

from sdtrain.diffusion.parameterization import (
    PARAMETERIZATIONS,
    EpsParameterization,
    VParameterization,
    get_parameterization,
)
from sdtrain.diffusion.schedule import DiffusionConfig, NoiseSchedule
from sdtrain.errors import ConfigError


def schedule(parameterization: str, **kw: object) -> NoiseSchedule:
    return NoiseSchedule(DiffusionConfig(parameterization=parameterization, **kw))  # type: ignore[arg-type]


def example(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    return x0, noise, t


def coefficients(s: NoiseSchedule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) in float64 from the schedule's own formulas."""
    ab = NoiseSchedule.compute_float64(s.config)["alphas_cumprod"][t].reshape(-1, 1, 1, 1)
    return ab.sqrt(), (1 - ab).sqrt()


def test_registry_covers_every_configurable_name() -> None:
    hints = typing.get_type_hints(DiffusionConfig)
    assert set(typing.get_args(hints["parameterization"])) == set(PARAMETERIZATIONS)
    for name, objective in PARAMETERIZATIONS.items():
        assert objective.name == name
        assert get_parameterization(name) is objective
        assert schedule(name).parameterization is objective
    with pytest.raises(ValueError, match="unknown parameterization 'x0'"):
        get_parameterization("x0")


def test_eps_target_is_the_noise_and_v_target_the_closed_form() -> None:
    x0, noise, t = example()
    eps_s, v_s = schedule("eps"), schedule("v")
    assert torch.equal(EpsParameterization().target(eps_s, x0, t, noise), noise)
    a, s = coefficients(v_s, t)
    expected = a * noise - s * x0
    torch.testing.assert_close(v_s.target(x0, t, noise), expected, rtol=1e-6, atol=1e-6)
    # The schedule's wrapper and the object agree exactly.
    assert torch.equal(VParameterization().target(v_s, x0, t, noise), v_s.target(x0, t, noise))


@pytest.mark.parametrize("name", ["eps", "v"])
def test_target_round_trips_to_the_true_noise_and_latents(name: str) -> None:
    x0, noise, t = example(1)
    s = schedule(name)
    x_t = s.q_sample(x0, t, noise)
    eps, x0_hat = s.parameterization.to_eps_and_x0(s, x_t, t, s.target(x0, t, noise))
    # eps -> x0 is ill-conditioned at t = 0 (x0 = (x_t - s eps) / a with s ~ 0.03): float32
    # coefficients, so a relative tolerance.
    torch.testing.assert_close(eps, noise, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-3)


def test_eps_x0_eps_round_trip() -> None:
    x0, noise, t = example(2)
    s = schedule("eps")
    x_t = s.q_sample(x0, t, noise)
    _, x0_hat = s.parameterization.to_eps_and_x0(s, x_t, t, noise)
    torch.testing.assert_close(s.eps_from_x0(x_t, t, x0_hat), noise, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["eps", "v"])
def test_loss_weights_equal_x0_space_weights(name: str) -> None:
    """w_target * |target error|^2 == w_x0 * |x0 error|^2 for any prediction error."""
    x0, noise, t = example(3)
    s = schedule(name)
    objective = s.parameterization
    x_t = s.q_sample(x0, t, noise)
    target = s.target(x0, t, noise)
    prediction = target + 0.1 * torch.randn(
        target.shape, generator=torch.Generator().manual_seed(4)
    )
    _, x0_pred = objective.to_eps_and_x0(s, x_t, t, prediction)
    x0_weights = torch.linspace(0.5, 2.0, len(t), dtype=torch.float64)
    snr = s.snr(t).double()
    target_space = objective.loss_weights(x0_weights, snr) * (prediction - target).pow(2).sum(
        (1, 2, 3)
    )
    x0_space = x0_weights * (x0_pred - x0).pow(2).sum((1, 2, 3))
    torch.testing.assert_close(target_space, x0_space, rtol=1e-3, atol=0)


def test_zero_terminal_snr_needs_an_objective_defined_there() -> None:
    assert not get_parameterization("eps").defined_at_zero_snr
    assert get_parameterization("v").defined_at_zero_snr
    with pytest.raises(ConfigError, match="zero_terminal_snr makes the eps target undefined"):
        DiffusionConfig(parameterization="eps", zero_terminal_snr=True)
    s = schedule("v", zero_terminal_snr=True)
    x0, noise, t = example(5)
    assert torch.isfinite(s.target(x0, t, noise)).all()
