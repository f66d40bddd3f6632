"""Deprecated import path, kept for one release: use ``sdtrain.models.adapters.original`` (the
original-layout adapter), ``sdtrain.utils.files`` (reading and writing files) and
``sdtrain.errors.CheckpointError``."""

from __future__ import annotations

import warnings

from sdtrain.errors import CheckpointError
from sdtrain.models.adapters.original import (
    EMA_META_KEYS,
    EMA_PREFIX,
    EMA_UNET_STEM,
    SAFETENSORS_SUFFIX,
    SCHEDULE_BUFFERS,
    TEXT_PREFIX,
    TORCH_SUFFIXES,
    UNET_INPUT_CONV,
    UNET_PREFIX,
    VAE_PREFIX,
    OriginalCheckpoint,
    build_original_state_dict,
    deflatten_ema,
    ema_name_map,
    flatten_ema,
    flatten_ema_key,
    load_state_dict_strict,
    read_checkpoint,
    split_original_state_dict,
    summarize,
    widen_input_channels,
    write_checkpoint,
    write_weights_safetensors,
)
from sdtrain.utils.files import InertLightningClass, PathLike, data_only_globals

warnings.warn(
    "sdtrain.models.checkpoint is deprecated: import from sdtrain.models.adapters.original, "
    "sdtrain.utils.files or sdtrain.errors",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "EMA_META_KEYS",
    "EMA_PREFIX",
    "EMA_UNET_STEM",
    "SAFETENSORS_SUFFIX",
    "SCHEDULE_BUFFERS",
    "TEXT_PREFIX",
    "TORCH_SUFFIXES",
    "UNET_INPUT_CONV",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "CheckpointError",
    "InertLightningClass",
    "OriginalCheckpoint",
    "PathLike",
    "build_original_state_dict",
    "data_only_globals",
    "deflatten_ema",
    "ema_name_map",
    "flatten_ema",
    "flatten_ema_key",
    "load_state_dict_strict",
    "read_checkpoint",
    "split_original_state_dict",
    "summarize",
    "widen_input_channels",
    "write_checkpoint",
    "write_weights_safetensors",
]
