"""Models key-for-key compatible with the original Stable Diffusion checkpoints: UNet,
autoencoder, text encoders, ``ModelConfig`` (``config.py``), the conditioning registry
(``conditioning.py``), the one ``sample_images`` (``sampling.py``) and the state-dict adapters of
external weight layouts (``adapters/original.py``). A component above ``data`` and ``diffusion``
(it may use both); never imports ``trainer`` or ``launch``.

Public API relied on by outside checks: ``build_unet(params)`` and
``build_autoencoder(ddconfig, embed_dim)``, both taking the original config names;
``build_midas("dpt_hybrid")`` (the SD 2 depth estimator, original ``depth_model.*`` layout) and
``depth_conditioning(depth, (h, w))``.
"""

from sdtrain.errors import CheckpointError
from sdtrain.models.adapters.original import (
    OriginalCheckpoint,
    read_checkpoint,
    widen_input_channels,
    write_checkpoint,
    write_weights_safetensors,
)
from sdtrain.models.autoencoder import AutoencoderConfig, AutoencoderKL, DDConfig, build_autoencoder
from sdtrain.models.midas import MiDaS, build_midas, depth_conditioning, midas_input
from sdtrain.models.stable_diffusion import StableDiffusion, build_stable_diffusion
from sdtrain.models.text_encoders import FrozenTextEncoder, TextEncoderConfig, build_text_encoder
from sdtrain.models.unet import UNetConfig, UNetModel, build_unet

__all__ = [
    "AutoencoderConfig",
    "AutoencoderKL",
    "CheckpointError",
    "DDConfig",
    "FrozenTextEncoder",
    "MiDaS",
    "OriginalCheckpoint",
    "StableDiffusion",
    "TextEncoderConfig",
    "UNetConfig",
    "UNetModel",
    "build_autoencoder",
    "build_midas",
    "build_stable_diffusion",
    "build_text_encoder",
    "build_unet",
    "depth_conditioning",
    "midas_input",
    "read_checkpoint",
    "widen_input_channels",
    "write_checkpoint",
    "write_weights_safetensors",
]
