"""DDIM and PLMS samplers over the original Stable Diffusion timestep discretisation, and guidance.

The pieces, each small and separately testable:

- ``uniform_timesteps``: the original DDIM "uniform" discretisation (``arange(0, N, N // S) + 1``).
- ``Denoiser``: the UNet as a callable ``model(x_t, t, cond) -> model_output`` in the configured
  parameterisation (eps or v).
- ``cfg_denoiser``: classifier-free guidance, binding the conditioning and returning
  ``model(x_t, t) -> model_output``; guidance is applied on the model output (eps or v), which the
  sampler then converts with the schedule's ``Parameterization``, as the SD2 code does for v.
- ``DDIMSampler`` / ``PLMSSampler``: one ``step`` each, and a loop from noise to latents.
- ``sample``: the entry point, picking a sampler by name from ``SAMPLERS``.

As in the original, the last step lands on ``alphas_cumprod[0]`` (not on 1): the result is the
latent at the first training step, whose residual noise (std ~0.03 for SD) the VAE ignores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from sdtrain.diffusion.schedule import NoiseSchedule

# A model already bound to its conditioning: model(x_t, t) -> model output (eps or v).
BoundModel = Callable[[Tensor, Tensor], Tensor]
# callback(i, t, x, pred_x0) after every step: i counts steps taken (0 first), t the timestep used.
StepCallback = Callable[[int, int, Tensor, Tensor], None]


class Denoiser(Protocol):
    """The UNet as the samplers see it: ``(x_t, t, cond) -> model_output``.

    ``x_t`` is (B, C, H, W) and already carries any concatenated channels (inpainting mask and
    masked image, depth), ``t`` is (B,) long, ``cond`` the cross-attention context (B, L, D);
    ``kwargs`` are further per-sample inputs of the mode (an upscaler's noise level ``y``).
    The output is in the schedule's parameterisation (eps or v), shaped like the latent.
    """

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor, **kwargs: Tensor) -> Tensor: ...


# --- discretisation ---------------------------------------------------------------------------


def uniform_timesteps(num_train_timesteps: int, steps: int) -> Tensor:
    """The original DDIM "uniform" timesteps, ascending: ``arange(0, N, N // steps) + 1``.

    50 of 1000 gives 1, 21, ..., 981. As in the original the count is ``ceil(N / (N // steps))``,
    which can exceed ``steps`` when it does not divide N (7 of 1000 gives 8 timesteps).
    Where the original would index past the schedule (its last timestep is N whenever
    ``N // steps`` divides N - 1, e.g. 1000, 333 or 3 steps of 1000) and crash, that timestep
    is dropped: 1000 steps of 1000 gives 1..999.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    stride = num_train_timesteps // steps
    timesteps = torch.arange(0, num_train_timesteps, stride) + 1
    return timesteps[timesteps < num_train_timesteps]


# --- guidance ---------------------------------------------------------------------------------


def cfg_denoiser(
    model: Denoiser,
    uncond: Tensor | None,
    cond: Tensor,
    scale: float,
    *,
    extra: Tensor | None = None,
    kwargs: Mapping[str, Tensor] | None = None,
    uncond_extra: Tensor | None = None,
    uncond_kwargs: Mapping[str, Tensor] | None = None,
) -> BoundModel:
    """Bind ``model`` to its conditioning, with classifier-free guidance of strength ``scale``.

    The returned ``guided(x_t, t)`` concatenates ``extra`` (B, C', H, W) to ``x_t`` along channels
    when given (inpainting / depth inputs) and passes ``kwargs`` (batch-first tensors, e.g. an
    upscaler's noise level ``y``) to the model; the unconditional half sees ``uncond_extra`` and
    ``uncond_kwargs`` instead where given, else the same. It runs ONE forward over
    ``cat([x_uncond, x_cond])`` with contexts ``cat([uncond, cond])`` and returns
    ``out_uncond + scale * (out_cond - out_uncond)`` in the model-output space (eps or v).
    With ``scale == 1`` it runs a single conditional forward and ``uncond`` may be None.
    """
    if scale != 1.0 and uncond is None:
        raise ValueError("classifier-free guidance with scale != 1 needs an unconditional context")
    if uncond is not None and uncond.shape != cond.shape:
        raise ValueError(f"uncond {tuple(uncond.shape)} and cond {tuple(cond.shape)} differ")
    kwargs = dict(kwargs or {})
    uncond_kwargs = {**kwargs, **(uncond_kwargs or {})}

    def guided(x_t: Tensor, t: Tensor) -> Tensor:
        x_in = x_t if extra is None else torch.cat([x_t, extra], dim=1)  # (B, C + C', H, W)
        if scale == 1.0:
            return model(x_in, t, cond, **kwargs)
        assert uncond is not None
        x_un = x_in if uncond_extra is None else torch.cat([x_t, uncond_extra], dim=1)
        both = {k: torch.cat([uncond_kwargs[k], v]) for k, v in kwargs.items()}
        out = model(
            torch.cat([x_un, x_in]),  # (2B, C + C', H, W)
            torch.cat([t, t]),  # (2B,)
            torch.cat([uncond, cond]),  # (2B, L, D)
            **both,
        )
        out_uncond, out_cond = out.chunk(2)  # (B, C, H, W) each
        return out_uncond + scale * (out_cond - out_uncond)

    return guided


# --- samplers ---------------------------------------------------------------------------------


def _noise(
    shape: tuple[int, ...] | torch.Size,
    device: torch.device | str,
    generator: torch.Generator | None,
) -> Tensor:
    """Standard normal float32 noise on ``device``, drawn on the generator's device."""
    on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=on).to(device)


@dataclass
class KnownRegion:
    """Latents to keep where ``keep`` is 1, as the original ``DDIMSampler``'s ``mask`` / ``x0``:
    before every model call the kept region of ``x_t`` is replaced by ``q_sample(latents, t)``
    (fresh noise each time) and the final sample takes ``latents`` there, so the model generates
    the rest consistently with what is kept. ``latents`` (1 or B, C, H, W), ``keep`` (1 or B, 1,
    H, W) in {0, 1}."""

    latents: Tensor
    keep: Tensor

    def blend(
        self, schedule: NoiseSchedule, x: Tensor, t: int | None, generator: torch.Generator | None
    ) -> Tensor:
        """``x`` with the kept region noised to timestep ``t`` (None: the clean latents)."""
        z = self.latents.to(x.dtype).expand_as(x)
        if t is not None:
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            z = schedule.q_sample(z, t_batch, _noise(x.shape, x.device, generator).to(x.dtype))
        keep = self.keep.to(x.dtype)
        return keep * z + (1 - keep) * x


class UniformSampler:
    """What DDIM and PLMS share: the discretisation, one model prediction, the DDIM update.

    Per-step scalars are taken from the schedule's float32 ``alphas_cumprod`` (as the original
    does) and kept in float64: ``alphas[i]``, ``alphas_prev[i]`` (``alphas_cumprod[0]`` for the
    first timestep) and ``sigmas[i] = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))``.
    Index ``i`` runs over the ascending ``timesteps``; sampling goes from the last to the first.
    """

    def __init__(self, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.schedule = schedule
        self.eta = eta
        self.timesteps = uniform_timesteps(schedule.num_timesteps, steps)
        ab = schedule.alphas_cumprod.detach().cpu().double()
        self.alphas = ab[self.timesteps]
        self.alphas_prev = torch.cat([ab[:1], ab[self.timesteps[:-1]]])
        a, a_prev = self.alphas, self.alphas_prev
        self.sigmas = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()

    def predict(self, model: BoundModel, x: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(eps, x0) from one model call at timestep ``t``."""
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        output = model(x, t_batch)  # (B, C, H, W) in the model's parameterisation
        return self.schedule.parameterization.to_eps_and_x0(self.schedule, x, t_batch, output)

    def update(
        self, x: Tensor, i: int, eps: Tensor, x0: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z (DDIM eq. 12)."""
        a_prev, sigma = float(self.alphas_prev[i]), float(self.sigmas[i])
        x_prev = a_prev**0.5 * x0 + max(1.0 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x_prev = x_prev + sigma * _noise(x.shape, x.device, generator).to(x.dtype)
        return x_prev

    def advance(
        self,
        model: BoundModel,
        x: Tensor,
        i: int,
        generator: torch.Generator | None,
        history: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        """One step down from ``timesteps[i]``: (x_prev, pred_x0); ``history`` is the sampler's
        own memory across steps (PLMS: earlier eps predictions)."""
        raise NotImplementedError

    def __call__(
        self,
        model: BoundModel,
        x_T: Tensor,
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
        known: KnownRegion | None = None,
    ) -> Tensor:
        """Sample down every timestep from ``x_T``; ``known`` holds a region (``KnownRegion``)."""
        x, history = x_T, []
        for n, i in enumerate(reversed(range(len(self.timesteps)))):
            t = int(self.timesteps[i])
            if known is not None:
                x = known.blend(self.schedule, x, t, generator)
            x, x0 = self.advance(model, x, i, generator, history)
            if callback is not None:
                callback(n, t, x, x0)
        return x if known is None else known.blend(self.schedule, x, None, generator)


class DDIMSampler(UniformSampler):
    """DDIM (Song et al. 2021) as the original ``DDIMSampler``; ``eta = 0`` is deterministic."""

    def step(
        self, model: BoundModel, x: Tensor, i: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """One step down from ``timesteps[i]``: (x_prev, pred_x0)."""
        eps, x0 = self.predict(model, x, int(self.timesteps[i]))
        return self.update(x, i, eps, x0, generator), x0

    def advance(
        self,
        model: BoundModel,
        x: Tensor,
        i: int,
        generator: torch.Generator | None,
        history: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        return self.step(model, x, i, generator)

    def encode(self, x0: Tensor, i: int, noise: Tensor) -> Tensor:
        """``x0`` noised to ``timesteps[i]``: sqrt(a) x0 + sqrt(1 - a) noise (the original
        ``DDIMSampler.stochastic_encode`` over the DDIM steps)."""
        a = float(self.alphas[i])
        return a**0.5 * x0 + (1.0 - a) ** 0.5 * noise.to(x0.dtype)

    def decode(
        self, model: BoundModel, x: Tensor, t_start: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """Steps ``t_start - 1`` down to 0 from ``x`` (the original ``DDIMSampler.decode``)."""
        for i in reversed(range(t_start)):
            x, _ = self.step(model, x, i, generator)
        return x


class PLMSSampler(UniformSampler):
    """Pseudo linear multistep (Liu et al. 2022, PNDM) as the original ``PLMSSampler``.

    The eps fed to the DDIM update is an Adams-Bashforth combination of the current and up to
    three previous eps predictions; the first step is the 2nd-order pseudo improved Euler
    (predict, step, re-predict at the next timestep, average). Deterministic only (eta = 0).
    """

    def __init__(self, schedule: NoiseSchedule, steps: int = 50, eta: float = 0.0) -> None:
        if eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {eta}")
        super().__init__(schedule, steps, eta)

    def step(
        self, model: BoundModel, x: Tensor, i: int, old_eps: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step down from ``timesteps[i]`` given the earlier eps predictions (oldest first):
        (x_prev, pred_x0, eps_t), with eps_t this step's own prediction for the history."""
        eps, x0_model = self.predict(model, x, int(self.timesteps[i]))
        if not old_eps:
            x_next = self.update(x, i, eps, x0_model, None)
            eps_next, _ = self.predict(model, x_next, int(self.timesteps[max(i - 1, 0)]))
            eps_prime = (eps + eps_next) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        # x0 = (x - sqrt(1 - a) eps') / sqrt(a), written as a correction to the model's own x0
        # so that a v model keeps its stable x0 near zero SNR. At a = 0 (zero terminal SNR) x_t
        # is pure noise and carries no x0 to correct: the model's x0 is used as it is.
        a = float(self.alphas[i])
        x0 = x0_model - (1 / a - 1) ** 0.5 * (eps_prime - eps) if a > 0 else x0_model
        return self.update(x, i, eps_prime, x0, None), x0, eps

    def advance(
        self,
        model: BoundModel,
        x: Tensor,
        i: int,
        generator: torch.Generator | None,
        history: list[Tensor],
    ) -> tuple[Tensor, Tensor]:
        x, x0, eps = self.step(model, x, i, history)
        history[:] = [*history[-2:], eps]
        return x, x0


SamplerName = Literal["ddim", "plms"]
SAMPLERS: dict[str, type[DDIMSampler] | type[PLMSSampler]] = {
    "ddim": DDIMSampler,
    "plms": PLMSSampler,
}


@torch.no_grad()
def sample(
    schedule: NoiseSchedule,
    model: BoundModel,
    shape: tuple[int, ...] | torch.Size,
    *,
    sampler: SamplerName = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    x_T: Tensor | None = None,
    device: torch.device | str | None = None,
    callback: StepCallback | None = None,
    known: KnownRegion | None = None,
) -> Tensor:
    """Latents x_0 of ``shape`` (B, C, H, W) sampled with ``model(x_t, t) -> model_output``.

    ``model`` is already bound to its conditioning (see ``cfg_denoiser``). The start noise is
    ``x_T`` if given, else ``randn(shape)`` from ``generator``; ``generator`` also draws the
    per-step noise when ``eta > 0`` (DDIM only). ``device`` defaults to that of ``x_T``, else to
    the schedule's. ``known`` keeps a region of given latents (see ``KnownRegion``); its noise
    comes from ``generator`` too.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    if device is None:
        device = x_T.device if x_T is not None else schedule.alphas_cumprod.device
    if x_T is None:
        x_T = _noise(tuple(shape), device, generator)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
    run = SAMPLERS[sampler](schedule, steps, eta)
    return run(model, x_T.to(device), generator, callback, known)
