"""DDIM / PLMS samplers and classifier-free guidance against closed-form expectations.

The oracles: for a point-mass data distribution the exact eps (or v) prediction is known, and a
deterministic DDIM / PLMS trajectory keeps eps constant, so every step's x0 prediction is exact.
For Gaussian data N(mu, s^2) the exact eps is linear in x_t, and the probability-flow ODE maps
noise to data by a known affine map that the samplers must approach as steps grow.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from sdtrain.diffusion import DiffusionConfig, NoiseSchedule
from sdtrain.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    KnownRegion,
    PLMSSampler,
    cfg_denoiser,
    sample,
    uniform_timesteps,
)


@pytest.fixture(scope="module")
def eps_schedule() -> NoiseSchedule:
    return NoiseSchedule(DiffusionConfig())


@pytest.fixture(scope="module")
def v_schedule() -> NoiseSchedule:
    return NoiseSchedule(DiffusionConfig(parameterization="v"))


def _ab(schedule: NoiseSchedule, t: Tensor, like: Tensor) -> Tensor:
    """alphas_cumprod[t] shaped (B, 1, ...) in ``like``'s dtype."""
    a = schedule.alphas_cumprod[t].to(like.dtype)
    return a.view(-1, *([1] * (like.ndim - 1)))


def point_mass_oracle(schedule: NoiseSchedule, x0_star: Tensor):
    """The exact model output when all data is ``x0_star``."""

    def model(x: Tensor, t: Tensor) -> Tensor:
        a = _ab(schedule, t, x)
        eps = (x - a.sqrt() * x0_star) / (1 - a).sqrt()
        if schedule.config.parameterization == "v":
            return a.sqrt() * eps - (1 - a).sqrt() * x0_star
        return eps

    return model


def step_tracker():
    """A callback recording (n, t, x, pred_x0) of every step."""
    seen: list[tuple[int, int, Tensor, Tensor]] = []

    def callback(n: int, t: int, x: Tensor, x0: Tensor) -> None:
        seen.append((n, t, x.clone(), x0.clone()))

    return seen, callback


# --- discretisation ---------------------------------------------------------------------------


def test_uniform_timesteps_as_original() -> None:
    assert uniform_timesteps(1000, 50).tolist() == list(range(1, 1000, 20))
    assert uniform_timesteps(1000, 50)[[0, 1, 2, -1]].tolist() == [1, 21, 41, 981]
    assert uniform_timesteps(1000, 1).tolist() == [1]
    # 7 does not divide 1000: stride 142 and, as in the original, 8 timesteps.
    assert uniform_timesteps(1000, 7).tolist() == [1, 143, 285, 427, 569, 711, 853, 995]


@pytest.mark.parametrize("steps", [1000, 333, 111, 3])
def test_uniform_timesteps_drop_what_the_original_cannot_index(steps: int) -> None:
    # The original's last timestep would be 1000 here (its stride divides 999) and index past
    # the 1000-entry schedule; we drop it.
    expected = [t for t in range(1, 1001, 1000 // steps) if t < 1000]
    assert uniform_timesteps(1000, steps).tolist() == expected
    assert len(expected) == min(steps, 999)
    assert uniform_timesteps(1000, 1000).tolist() == list(range(1, 1000))


def test_every_step_count_stays_inside_the_schedule() -> None:
    for steps in range(1, 1001):
        timesteps = uniform_timesteps(1000, steps)
        assert int(timesteps.max()) <= 999 and int(timesteps.min()) == 1
        original = torch.arange(0, 1000, 1000 // steps) + 1
        assert torch.equal(timesteps, original[original < 1000])


@pytest.mark.parametrize("steps", [0, -1, 1001])
def test_bad_step_counts_raise(steps: int) -> None:
    with pytest.raises(ValueError, match="steps"):
        uniform_timesteps(1000, steps)


def test_step_scalars(eps_schedule: NoiseSchedule) -> None:
    ab = eps_schedule.alphas_cumprod.double()
    sampler = DDIMSampler(eps_schedule, steps=50)
    ts = sampler.timesteps
    assert torch.equal(sampler.alphas, ab[ts])
    assert sampler.alphas_prev[0] == ab[0]  # not 1: the original's alphas_cumprod_prev
    assert torch.equal(sampler.alphas_prev[1:], ab[ts[:-1]])
    assert torch.all(sampler.sigmas == 0)
    # eta = 1 over consecutive timesteps is the DDPM posterior: sigma^2 = posterior variance
    # (to float32 rounding of alphas_cumprod: 1 - a_t / a_prev is ~1e-3).
    full = DDIMSampler(eps_schedule, steps=1000, eta=1.0)
    posterior = eps_schedule.posterior_variance[full.timesteps].double()
    torch.testing.assert_close(full.sigmas**2, posterior, rtol=2e-4, atol=0)


# --- oracles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("sampler", ["ddim", "plms"])
@pytest.mark.parametrize("steps", [10, 50])
def test_point_mass_oracle_is_exact(parameterization: str, sampler: str, steps: int) -> None:
    schedule = NoiseSchedule(DiffusionConfig(parameterization=parameterization))
    g = torch.Generator().manual_seed(0)
    x0_star = torch.randn(2, 4, 8, 8, generator=g)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    seen, callback = step_tracker()
    out = sample(
        schedule,
        point_mass_oracle(schedule, x0_star),
        x_T.shape,
        sampler=sampler,
        steps=steps,
        x_T=x_T,
        callback=callback,
    )
    timesteps = uniform_timesteps(1000, steps).flip(0).tolist()
    assert [(n, t) for n, t, _, _ in seen] == list(enumerate(timesteps))
    for _, _, _, pred_x0 in seen:
        torch.testing.assert_close(pred_x0, x0_star, rtol=0, atol=1e-4)
    # eps stays that of x_T; the last step lands on alphas_cumprod[0], as the original does.
    ab = schedule.alphas_cumprod.double()
    a_T, a_0 = ab[timesteps[0]], ab[0]
    eps_T = (x_T.double() - a_T.sqrt() * x0_star) / (1 - a_T).sqrt()
    expected = a_0.sqrt() * x0_star + (1 - a_0).sqrt() * eps_T
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(out, x0_star, rtol=0, atol=0.15)  # residual std sqrt(1 - a_0)


def gaussian_oracle(schedule: NoiseSchedule, mu: float, s: float):
    """E[eps | x_t] for data N(mu, s^2): sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)."""

    def model(x: Tensor, t: Tensor) -> Tensor:
        a = _ab(schedule, t, x)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

    return model


def probability_flow(schedule: NoiseSchedule, x_T: Tensor, t_T: int, mu: float, s: float):
    """The exact ODE map from x_T at alphas_cumprod[t_T] to alphas_cumprod[0] for N(mu, s^2)."""
    ab = schedule.alphas_cumprod.double()
    a_T, a_0 = ab[t_T], ab[0]
    z = (x_T.double() - a_T.sqrt() * mu) / (a_T * s**2 + 1 - a_T).sqrt()
    return a_0.sqrt() * mu + (a_0 * s**2 + 1 - a_0).sqrt() * z


@pytest.mark.parametrize("mu, s", [(0.5, 0.8), (-0.5, 1.5)])
def test_gaussian_oracle_moments(eps_schedule: NoiseSchedule, mu: float, s: float) -> None:
    g = torch.Generator().manual_seed(0)
    out = sample(eps_schedule, gaussian_oracle(eps_schedule, mu, s), (4096, 1), generator=g)
    # Start noise N(0, 1) is not quite the marginal at t = 981 (alpha_bar 0.006), hence 0.1 s.
    assert abs(out.mean().item() - mu) < 0.1 * s
    assert abs(out.std().item() / s - 1) < 0.05


# max |error| at 50 steps: DDIM is first order (~0.1 here), PLMS higher (~0.006).
@pytest.mark.parametrize("sampler, tol_50", [("ddim", 0.15), ("plms", 0.01)])
def test_gaussian_oracle_follows_the_probability_flow(sampler: str, tol_50: float) -> None:
    schedule = NoiseSchedule(DiffusionConfig(parameterization="eps"))
    mu, s = 1.5, 0.5
    x_T = torch.randn(4096, 1, generator=torch.Generator().manual_seed(1))
    errors = {}
    for steps in (50, 200):
        out = sample(
            schedule,
            gaussian_oracle(schedule, mu, s),
            x_T.shape,
            sampler=sampler,
            steps=steps,
            x_T=x_T,
        )
        t_T = int(uniform_timesteps(1000, steps)[-1])
        errors[steps] = (out.double() - probability_flow(schedule, x_T, t_T, mu, s)).abs().max()
    assert errors[50] < tol_50
    assert errors[200] < errors[50] / 3  # at least first-order convergence


# --- PLMS coefficients ------------------------------------------------------------------------


def float64_schedule(cfg: DiffusionConfig) -> NoiseSchedule:
    """A schedule whose buffers stay float64, so that rounding does not hide the maths."""
    schedule = NoiseSchedule(cfg)
    for name, value in NoiseSchedule.compute_float64(cfg).items():
        setattr(schedule, name, value)
    return schedule


@pytest.mark.parametrize("degree, first_checked", [(1, 0), (3, 3)])
def test_plms_integrates_polynomials_exactly(degree: int, first_checked: int) -> None:
    """Adams-Bashforth with k previous values is exact for polynomials of degree k; the first
    (improved Euler, trapezoid) step for degree 1. So the eps each step uses is the mean of
    f over the step, [t - c, t], from the 4th step on for a cubic and always for a line."""
    coeffs = [0.3, -2e-3, 4e-6, -3e-9][: degree + 1]

    def f(t: Tensor | float) -> Tensor | float:
        return sum(c * t**k for k, c in enumerate(coeffs))

    def antiderivative(t: float) -> float:
        return sum(c * t ** (k + 1) / (k + 1) for k, c in enumerate(coeffs))

    calls = []

    def model(x: Tensor, t: Tensor) -> Tensor:  # eps independent of x
        calls.append(int(t[0]))
        return f(t.double()).view(-1, 1) * torch.ones_like(x)

    eps_schedule = float64_schedule(DiffusionConfig())
    x_T = torch.randn(1, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen, callback = step_tracker()
    steps, c = 20, 50
    sample(eps_schedule, model, x_T.shape, sampler="plms", steps=steps, x_T=x_T, callback=callback)
    assert len(calls) == steps + 1  # the first step predicts twice
    ab = eps_schedule.alphas_cumprod.double()
    x_before = x_T
    for n, t, x_after, pred_x0 in seen:
        a = ab[t]
        used_eps = (x_before - a.sqrt() * pred_x0) / (1 - a).sqrt()
        if n >= first_checked:
            expected = (antiderivative(t) - antiderivative(t - c)) / c
            # a wrong coefficient (or order) is off by > 1e-4
            torch.testing.assert_close(
                used_eps, torch.full_like(used_eps, expected), rtol=0, atol=1e-9
            )
        x_before = x_after


# --- guidance ---------------------------------------------------------------------------------


class RecordingDenoiser:
    """A toy UNet: output depends on x, t and the context; records what each forward got."""

    def __init__(self, out_channels: int = 4) -> None:
        self.out_channels = out_channels
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        self.calls.append((x_t, t, cond))
        ctx = cond.mean(dim=(1, 2)).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        x = x_t[:, : self.out_channels] + x_t[:, self.out_channels :].sum(1, keepdim=True)
        return torch.tanh(x) * ctx + 1e-3 * t.view(-1, 1, 1, 1) + ctx**2


@pytest.fixture()
def guidance_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([981, 981])
    uncond = torch.randn(2, 77, 16, generator=g)
    cond = torch.randn(2, 77, 16, generator=g)
    return x, t, uncond, cond


def test_cfg_scale_one_is_one_conditional_forward(guidance_inputs) -> None:
    x, t, uncond, cond = guidance_inputs
    model = RecordingDenoiser()
    out = cfg_denoiser(model, uncond, cond, 1.0)(x, t)
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 2
    assert torch.equal(out, RecordingDenoiser()(x, t, cond))
    assert torch.equal(cfg_denoiser(RecordingDenoiser(), None, cond, 1.0)(x, t), out)


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_cfg_combines_one_batched_forward(guidance_inputs, scale: float) -> None:
    x, t, uncond, cond = guidance_inputs
    model = RecordingDenoiser()
    out = cfg_denoiser(model, uncond, cond, scale)(x, t)
    assert len(model.calls) == 1
    x_in, t_in, ctx_in = model.calls[0]
    assert torch.equal(x_in, torch.cat([x, x]))
    assert torch.equal(t_in, torch.cat([t, t]))
    assert torch.equal(ctx_in, torch.cat([uncond, cond]))
    reference = RecordingDenoiser()
    out_u, out_c = reference(x, t, uncond), reference(x, t, cond)
    torch.testing.assert_close(out, out_u + scale * (out_c - out_u), rtol=1e-6, atol=1e-6)


def test_cfg_concatenates_extra_channels_for_both_halves(guidance_inputs) -> None:
    x, t, uncond, cond = guidance_inputs
    extra = torch.randn(2, 5, 8, 8, generator=torch.Generator().manual_seed(1))  # mask + image
    model = RecordingDenoiser(out_channels=4)
    out = cfg_denoiser(model, uncond, cond, 5.0, extra=extra)(x, t)
    x_in = model.calls[0][0]
    assert x_in.shape == (4, 9, 8, 8) and out.shape == x.shape
    assert torch.equal(x_in, torch.cat([torch.cat([x, extra], 1)] * 2))
    unguided = cfg_denoiser(RecordingDenoiser(), uncond, cond, 1.0, extra=extra)(x, t)
    assert torch.equal(unguided, RecordingDenoiser()(torch.cat([x, extra], 1), t, cond))


def test_cfg_needs_uncond_to_guide(guidance_inputs) -> None:
    _, _, uncond, cond = guidance_inputs
    with pytest.raises(ValueError, match="unconditional"):
        cfg_denoiser(RecordingDenoiser(), None, cond, 7.5)
    with pytest.raises(ValueError, match="differ"):
        cfg_denoiser(RecordingDenoiser(), uncond[:1], cond, 7.5)


@pytest.mark.parametrize("sampler, forwards", [("ddim", 10), ("plms", 11)])
def test_guided_sampling_runs_one_forward_per_prediction(
    v_schedule: NoiseSchedule, guidance_inputs, sampler: str, forwards: int
) -> None:
    x, _, uncond, cond = guidance_inputs
    model = RecordingDenoiser()
    out = sample(
        v_schedule,
        cfg_denoiser(model, uncond, cond, 7.5),
        x.shape,
        sampler=sampler,
        steps=10,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert len(model.calls) == forwards
    assert all(x_in.shape[0] == 4 for x_in, _, _ in model.calls)


# --- randomness -------------------------------------------------------------------------------


def toy_model(x: Tensor, t: Tensor) -> Tensor:
    return torch.tanh(x) * (t.view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_generator_makes_sampling_deterministic(eps_schedule: NoiseSchedule, sampler: str) -> None:
    def run(seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return sample(eps_schedule, toy_model, (2, 4, 8, 8), sampler=sampler, steps=10, generator=g)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_eta_noise(eps_schedule: NoiseSchedule) -> None:
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(eta: float, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return sample(eps_schedule, toy_model, x_T.shape, steps=10, eta=eta, x_T=x_T, generator=g)

    assert torch.equal(run(0.0, 1), run(0.0, 2))  # eta = 0 draws no noise
    assert torch.equal(run(0.5, 1), run(0.5, 1))
    assert not torch.allclose(run(0.5, 1), run(0.5, 2))
    assert not torch.allclose(run(0.5, 1), run(0.0, 1))


def test_bad_arguments(eps_schedule: NoiseSchedule) -> None:
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(eps_schedule, steps=10, eta=0.5)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        DDIMSampler(eps_schedule, steps=10, eta=-1.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(eps_schedule, toy_model, (1, 4, 8, 8), sampler="euler")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x_T has shape"):
        sample(eps_schedule, toy_model, (1, 4, 8, 8), x_T=torch.zeros(1, 4, 4, 4))


# --- zero terminal SNR ------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, eta", [("ddim", 0.0), ("ddim", 1.0), ("plms", 0.0)])
def test_zero_terminal_snr_with_v_has_no_nan(sampler: str, eta: float) -> None:
    schedule = NoiseSchedule(DiffusionConfig(parameterization="v", zero_terminal_snr=True))
    assert schedule.alphas_cumprod[-1] == 0
    steps = 500  # stride 2: timesteps 1..999, so the first step is at alpha_bar = 0
    assert int(uniform_timesteps(1000, steps)[-1]) == 999
    g = torch.Generator().manual_seed(0)
    x0_star = torch.randn(1, 4, 4, 4, generator=g)
    x_T = torch.randn(1, 4, 4, 4, generator=g)
    out = sample(schedule, toy_model, x_T.shape, sampler=sampler, steps=steps, eta=eta, x_T=x_T)
    assert torch.isfinite(out).all()
    seen, callback = step_tracker()
    oracle = point_mass_oracle(schedule, x0_star)
    out = sample(
        schedule,
        oracle,
        x_T.shape,
        sampler=sampler,
        steps=steps,
        eta=eta,
        x_T=x_T,
        callback=callback,
    )
    assert torch.isfinite(out).all()
    # PLMS takes x0 from a combined eps, which amplifies float32 rounding by sqrt(1 / alpha_bar)
    # (~2000 at t = 997); DDIM takes the model's x0 from v directly.
    atol = 1e-3 if sampler == "plms" else 1e-4
    for _, _, _, pred_x0 in seen:
        torch.testing.assert_close(pred_x0, x0_star, rtol=0, atol=atol)
    if eta == 0:  # at alpha_bar = 0, eps = x_T exactly
        a_0 = schedule.alphas_cumprod[0].double()
        expected = a_0.sqrt() * x0_star + (1 - a_0).sqrt() * x_T
        torch.testing.assert_close(out.double(), expected.double(), rtol=0, atol=1e-4)


# --- known regions (the original DDIMSampler's mask / x0) ---------------------------------------


def half_known(z: Tensor) -> KnownRegion:
    keep = torch.zeros(1, 1, *z.shape[-2:])
    keep[..., : z.shape[-1] // 2] = 1.0
    return KnownRegion(z, keep)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_known_region_is_kept_exactly_and_nothing_else_changes(
    eps_schedule: NoiseSchedule, sampler: str
) -> None:
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))

    def mixing(x: Tensor, t: Tensor) -> Tensor:  # each output sees the whole row
        return toy_model(x, t) + 0.1 * x.mean(dim=-1, keepdim=True)

    def run(known: KnownRegion | None) -> Tensor:
        g = torch.Generator().manual_seed(0)
        return sample(eps_schedule, mixing, x_T.shape, sampler=sampler, steps=10, x_T=x_T,
                      generator=g, known=known)  # fmt: skip

    plain, kept = run(None), run(half_known(z))
    assert torch.equal(kept[..., :4], z.expand(2, -1, -1, -1)[..., :4])
    assert not torch.allclose(kept[..., 4:], plain[..., 4:])  # the rest saw the kept half
    nothing = KnownRegion(z, torch.zeros(1, 1, 8, 8))
    assert torch.allclose(run(nothing), plain, atol=1e-6)


def test_known_region_noised_per_step_stays_on_the_oracle_trajectory(
    eps_schedule: NoiseSchedule,
) -> None:
    """With all data equal to ``z``, a kept half noised to each step's timestep is a valid x_t of
    ``z``: the exact model still predicts ``z`` everywhere, so the unkept half lands on it too.
    (DDIM only: PLMS mixes eps of earlier steps, whose kept-region noise was drawn afresh.)"""
    sampler = "ddim"
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)).double()
    seen, callback = step_tracker()
    out = sample(
        eps_schedule, point_mass_oracle(eps_schedule, z), (2, 4, 8, 8), sampler=sampler,
        steps=20, generator=torch.Generator().manual_seed(6), callback=callback,
        known=half_known(z), x_T=torch.randn(2, 4, 8, 8).double(),
    )  # fmt: skip
    target = z.expand(2, -1, -1, -1)
    assert all(torch.allclose(x0, target, atol=1e-6) for *_, x0 in seen)
    assert torch.equal(out[..., :4], target[..., :4])
    # the last DDIM step ends at alphas_cumprod[0], not 1: sqrt(1 - 0.99915) x eps is left over
    assert torch.allclose(out[..., 4:], target[..., 4:], atol=0.2)
