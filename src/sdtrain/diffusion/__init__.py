"""Diffusion maths: the noise schedule, eps / v parameterisations, loss weighting, samplers.

No Lightning imports here: everything is plain torch and can be used from any trainer or script.
A component: imports only the ground floor (config, utils, errors), never ``data`` or above.
"""

from sdtrain.diffusion.loss import diffusion_loss, min_snr_weights, sample_noise
from sdtrain.diffusion.parameterization import (
    PARAMETERIZATIONS,
    Parameterization,
    get_parameterization,
)
from sdtrain.diffusion.samplers import (
    SAMPLERS,
    DDIMSampler,
    Denoiser,
    PLMSSampler,
    cfg_denoiser,
    sample,
    uniform_timesteps,
)
from sdtrain.diffusion.schedule import (
    SCHEDULE_BUFFERS,
    DiffusionConfig,
    NoiseSchedule,
    make_betas,
    rescale_zero_terminal_snr,
)

__all__ = [
    "PARAMETERIZATIONS",
    "SAMPLERS",
    "SCHEDULE_BUFFERS",
    "DDIMSampler",
    "Denoiser",
    "DiffusionConfig",
    "NoiseSchedule",
    "PLMSSampler",
    "Parameterization",
    "cfg_denoiser",
    "diffusion_loss",
    "get_parameterization",
    "make_betas",
    "min_snr_weights",
    "rescale_zero_terminal_snr",
    "sample",
    "sample_noise",
    "uniform_timesteps",
]
