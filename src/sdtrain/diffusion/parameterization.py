"""What the UNet predicts (the objective): noise ``eps`` or velocity ``v``, as one object each.

A parameterisation knows three things about its model output, and nothing else in sdtrain
branches on ``model.diffusion.parameterization``:

- ``target``: the regression target of training, from the clean latents and the noise;
- ``to_eps_and_x0``: the (eps, x0) a model output stands for, which is all a sampler needs;
- ``loss_weights``: how a per-sample weight meant in x0 space (min-SNR) reads in target space.

With ``x_t = a x0 + s eps`` (``a = sqrt(alpha_bar_t)``, ``s = sqrt(1 - alpha_bar_t)``,
``SNR = a^2 / s^2``): ``v = a eps - s x0``, ``|eps err|^2 = SNR |x0 err|^2`` and
``|v err|^2 = (SNR + 1) |x0 err|^2``. The per-timestep coefficients are the schedule's float32
buffers (``NoiseSchedule``'s conversions), so the arithmetic is exactly the original's.
This is the role of k-diffusion's ``Denoiser`` scalings and sgm's ``denoiser_scaling``.
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol

import torch
from torch import Tensor

ParameterizationName = Literal["eps", "v"]


class ForwardProcess(Protocol):
    """The forward-process conversions a parameterisation uses (``NoiseSchedule``'s)."""

    def v_target(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor: ...
    def x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor: ...
    def x0_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor: ...
    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor: ...


class Parameterization:
    """The objective of one kind of model output; subclasses are stateless."""

    name: ClassVar[str]
    defined_at_zero_snr: ClassVar[bool]
    """Whether the target stays finite where SNR is 0 (the last step under zero terminal SNR)."""

    def target(self, schedule: ForwardProcess, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """The training target for clean latents ``x0`` noised with ``noise`` to timestep ``t``."""
        raise NotImplementedError

    def to_eps_and_x0(
        self, schedule: ForwardProcess, x_t: Tensor, t: Tensor, output: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(eps, x0) predicted by the model ``output`` at ``(x_t, t)``."""
        raise NotImplementedError

    def loss_weights(self, x0_weights: Tensor, snr: Tensor) -> Tensor:
        """Per-sample weights (B,) in target space that equal ``x0_weights`` in x0 space."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsParameterization(Parameterization):
    """The UNet predicts the noise (SD1, SD2-base, the inpainting and depth models)."""

    name = "eps"
    defined_at_zero_snr = False  # x0 = (x_t - s eps) / a is undefined at a = 0

    def target(self, schedule: ForwardProcess, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return noise

    def to_eps_and_x0(
        self, schedule: ForwardProcess, x_t: Tensor, t: Tensor, output: Tensor
    ) -> tuple[Tensor, Tensor]:
        return output, schedule.x0_from_eps(x_t, t, output)

    def loss_weights(self, x0_weights: Tensor, snr: Tensor) -> Tensor:
        return x0_weights / snr.clamp(min=torch.finfo(snr.dtype).tiny)


class VParameterization(Parameterization):
    """The UNet predicts ``v = a eps - s x0`` (SD2 768-v; Salimans & Ho 2022)."""

    name = "v"
    defined_at_zero_snr = True

    def target(self, schedule: ForwardProcess, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return schedule.v_target(x0, t, noise)

    def to_eps_and_x0(
        self, schedule: ForwardProcess, x_t: Tensor, t: Tensor, output: Tensor
    ) -> tuple[Tensor, Tensor]:
        return schedule.eps_from_v(x_t, t, output), schedule.x0_from_v(x_t, t, output)

    def loss_weights(self, x0_weights: Tensor, snr: Tensor) -> Tensor:
        return x0_weights / (snr + 1.0)


PARAMETERIZATIONS: dict[str, Parameterization] = {
    p.name: p for p in (EpsParameterization(), VParameterization())
}


def get_parameterization(name: str) -> Parameterization:
    """The parameterisation called ``name`` (``model.diffusion.parameterization``)."""
    try:
        return PARAMETERIZATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown parameterization {name!r}; choose from {sorted(PARAMETERIZATIONS)}"
        ) from None
