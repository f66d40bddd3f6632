"""``sdtrain export``: a training checkpoint -> one original-layout ``.ckpt`` / ``.safetensors``.

A step checkpoint written by ``sdtrain fit`` holds the trainable UNet (``model.unet.*``), its EMA
shadow and the resolved config, but not the frozen autoencoder and text encoder: those are what
the config's ``init_from`` file holds, or the random initialisation seeded by ``seed`` when the run
started from scratch. The export rebuilds the model exactly as ``fit`` did (same seed, same
``build_module``) so those parts are the ones training saw, puts the chosen UNet weights in and
writes every part in the original layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*``, the twelve schedule buffers), readable by ``read_checkpoint`` and by the
tools that read released Stable Diffusion files.

EMA: released files (``512-base-ema.ckpt`` ...) carry the EMA weights *as* the UNet. That is the
default here whenever the run kept an EMA; ``use_ema=False`` exports the raw weights and
``with_ema=True`` stores raw weights as the UNet plus the EMA under ``model_ema.*``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.models.adapters.original import (
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    load_state_dict_strict,
    write_checkpoint,
)
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.checkpoints import (
    NotATrainingCheckpoint,
    TrainingCheckpoint,
    Weights,
    config_from_yaml,
    newest_checkpoint,
    read_training_checkpoint,
)
from sdtrain.utils import files
from sdtrain.utils.files import PathLike

# Reading training checkpoints moved to sdtrain.trainer.checkpoints; these names stay importable.
__all__ = [
    "Exported",
    "NotATrainingCheckpoint",
    "TrainingCheckpoint",
    "Weights",
    "config_from_yaml",
    "export_run",
    "newest_checkpoint",
    "read_training_checkpoint",
    "rebuild_model",
    "training_seed",
]


# ---------------------------------------------------------------------------------------------
# Rebuilding the model training used
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def training_seed(seed: int) -> Iterator[None]:
    """``pl.seed_everything(seed)`` as ``fit`` calls it, restoring the caller's RNG states."""
    import pytorch_lightning as pl

    states = random.getstate(), np.random.get_state()
    env = {name: os.environ.get(name) for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    try:
        with torch.random.fork_rng():
            pl.seed_everything(seed, workers=True, verbose=False)
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def rebuild_model(ckpt: TrainingCheckpoint, weights: Weights) -> StableDiffusion:
    """The run's model as training built it, with the chosen UNet weights; in eval mode, CPU."""
    from sdtrain.trainer.fit import build_module

    cfg = ckpt.config
    # No torch.compile: its wrapper renames the UNet's keys and buys nothing here.
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, compile=False))
    try:
        # The same seed, then the same construction order as `fit`: equal frozen weights.
        with training_seed(cfg.seed):
            model = build_module(cfg).model
    except CheckpointError as err:
        raise CheckpointError(
            f"rebuilding the run's frozen autoencoder and text encoder from its init_from "
            f"failed: {err}",
            ckpt.path,
        ) from err
    load_state_dict_strict(
        model.unet, ckpt.unet_weights(weights), source=str(ckpt.path), what="UNet"
    )
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


@dataclass
class Exported:
    """What ``export_run`` wrote."""

    path: Path
    source: Path
    global_step: int | None
    weights: Weights
    """Which weights are the UNet (``model.diffusion_model.*``)."""
    with_ema: bool
    """Whether the EMA is also stored as ``model_ema.*``."""
    model_name: str

    def summary(self) -> str:
        unet = "EMA weights" if self.weights == "ema" else "raw (non-EMA) weights"
        also = " + EMA as model_ema.*" if self.with_ema else ""
        return (
            f"wrote {self.path}: {self.model_name}, step {self.global_step}, UNet = {unet}{also}; "
            f"autoencoder, text encoder and schedule from the run (source {self.source})"
        )


def export_run(
    src: PathLike, out: PathLike, use_ema: bool | None = None, with_ema: bool = False
) -> Exported:
    """Export a run folder's newest step checkpoint (or a given one) to ``out``.

    ``use_ema``: None = the EMA when the run has one; ``with_ema`` adds the EMA as
    ``model_ema.*`` next to the raw UNet. The suffix of ``out`` picks .ckpt or .safetensors.
    """
    out = Path(out)
    if out.suffix.lower() not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ConfigError(
            f"output {out} must end in .ckpt or .safetensors (the suffix picks the format)"
        )
    problem = files.cannot_write(out)
    if problem:
        raise ConfigError(f"{problem}; choose another output path")
    ckpt = read_training_checkpoint(src)
    weights = ckpt.pick(use_ema, with_ema)
    model = rebuild_model(ckpt, weights)
    parts = model.original_parts(ema=ckpt.ema if with_ema else None)
    path = write_checkpoint(
        out,
        **parts,
        global_step=ckpt.global_step,
        extra_metadata={"sdtrain_model": ckpt.config.model.name, "sdtrain_unet_weights": weights},
        ema_decay=ckpt.ema_decay,
        ema_num_updates=ckpt.ema_num_updates,
    )
    return Exported(path, ckpt.path, ckpt.global_step, weights, with_ema, ckpt.config.model.name)
