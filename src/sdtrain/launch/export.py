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
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor

from sdtrain.config.loader import build_dataclass
from sdtrain.errors import ConfigError
from sdtrain.models.checkpoint import (
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    CheckpointError,
    PathLike,
    data_only_globals,
    load_state_dict_strict,
    write_checkpoint,
)
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import ExperimentConfig

Weights = Literal["ema", "raw"]
TRAINING_UNET_PREFIX = "model.unet."
# A run trained with trainer.compile=true saves the UNet from inside its OptimizedModule.
COMPILED_PREFIX = "_orig_mod."


class NotATrainingCheckpoint(CheckpointError):
    """A readable torch file that was not written by ``sdtrain fit`` (e.g. an original .ckpt)."""


# ---------------------------------------------------------------------------------------------
# Reading training checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingCheckpoint:
    """What export and sampling need from one ``step=NNNNNNNN.ckpt``."""

    path: Path
    global_step: int | None
    config: ExperimentConfig
    """The resolved config the run trained with."""
    unet: dict[str, Tensor]
    """Raw UNet weights, keyed like ``UNetModel.state_dict()``."""
    ema: dict[str, Tensor] | None
    """The EMA shadow (same keys, float32), or None when the run kept no EMA."""
    ema_decay: float = 0.9999
    ema_num_updates: int = 0

    def pick(self, use_ema: bool | None, with_ema: bool = False) -> Weights:
        """Which weights become the UNet: EMA by default when there is one (see module doc)."""
        if use_ema and with_ema:
            raise ConfigError(
                "--with-ema keeps the raw weights as the UNet and adds the EMA as model_ema.*; "
                "it cannot be combined with --ema"
            )
        if (use_ema or with_ema) and self.ema is None:
            raise CheckpointError(
                "holds no EMA weights (the run had ema.enabled=false); export with --no-ema",
                self.path,
            )
        if use_ema is None:
            use_ema = self.ema is not None and not with_ema
        return "ema" if use_ema else "raw"

    def unet_weights(self, weights: Weights) -> dict[str, Tensor]:
        """The UNet state dict for ``weights``; EMA covers the trainable parameters only, any
        other entry keeps its raw value."""
        if weights == "raw":
            return dict(self.unet)
        assert self.ema is not None
        return {**self.unet, **self.ema}


def newest_checkpoint(src: PathLike) -> Path:
    """``src`` itself if it is a file, else the newest complete step checkpoint of a run folder
    (``RUN/checkpoints/step=*.ckpt``, or the ``checkpoints`` folder itself)."""
    from sdtrain.trainer.fit import step_checkpoints

    path = Path(src)
    if path.is_file():
        return path
    if not path.exists():
        raise CheckpointError("no such run folder or checkpoint file", path)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = step_checkpoints(folder)
    if not found:
        raise CheckpointError(
            f"no complete step checkpoint (step=NNNNNNNN.ckpt) in {folder}; "
            "has the run saved one yet (checkpoint.every_n_steps)?",
            path,
        )
    return found[-1][1]


def read_training_checkpoint(src: PathLike) -> TrainingCheckpoint:
    """Read a step checkpoint (or a run folder's newest) without running pickled code."""
    path = newest_checkpoint(src)
    if path.suffix.lower() not in TORCH_SUFFIXES:
        raise NotATrainingCheckpoint(
            "is not a training checkpoint (those are step=NNNNNNNN.ckpt torch files)", path
        )
    obj = _torch_load(path)
    extra = obj.get("sdtrain") if isinstance(obj, Mapping) else None
    if not isinstance(extra, Mapping) or not isinstance(extra.get("config"), str):
        raise NotATrainingCheckpoint(
            "is not an sdtrain training checkpoint (no 'sdtrain' entry with the run's config); "
            "an original-layout file needs its model config instead",
            path,
        )
    state = obj.get("state_dict")
    unet = {
        key.removeprefix(TRAINING_UNET_PREFIX).removeprefix(COMPILED_PREFIX): value
        for key, value in (state or {}).items()
        if key.startswith(TRAINING_UNET_PREFIX)
    }
    if not unet:
        raise CheckpointError(f"holds no UNet weights ({TRAINING_UNET_PREFIX}*)", path)
    ema_state = extra.get("ema")
    step = obj.get("global_step")
    return TrainingCheckpoint(
        path=path,
        global_step=int(step) if step is not None else None,
        config=config_from_yaml(extra["config"], path),
        unet=unet,
        ema=dict(ema_state["shadow"]) if ema_state else None,
        ema_decay=float(ema_state["decay"]) if ema_state else 0.9999,
        ema_num_updates=int(ema_state["num_updates"]) if ema_state else 0,
    )


def _torch_load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(data_only_globals()):
            return torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
    except Exception as err:  # corruption surfaces as RuntimeError, EOFError, UnpicklingError...
        first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        raise CheckpointError(
            f"cannot be read, the file is truncated, corrupt or not a torch checkpoint "
            f"({type(err).__name__}: {first})",
            path,
        ) from err


def config_from_yaml(text: str, path: PathLike) -> ExperimentConfig:
    """The ``ExperimentConfig`` stored in a checkpoint, checked against today's schema."""
    source = f"{path} (stored config)"
    try:
        node = OmegaConf.create(text)
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), node)
        return build_dataclass(ExperimentConfig, merged, "", [(source, node)])  # type: ignore[arg-type]
    except (OmegaConfBaseException, ConfigError) as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"its stored config does not load: {first}", path) from None


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
    ckpt = read_training_checkpoint(src)
    weights = ckpt.pick(use_ema, with_ema)
    model = rebuild_model(ckpt, weights)
    parts = model.original_parts(ema=ckpt.ema if with_ema else None)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = write_checkpoint(
        out,
        **parts,
        global_step=ckpt.global_step,
        extra_metadata={"sdtrain_model": ckpt.config.model.name, "sdtrain_unet_weights": weights},
        ema_decay=ckpt.ema_decay,
        ema_num_updates=ckpt.ema_num_updates,
    )
    return Exported(path, ckpt.path, ckpt.global_step, weights, with_ema, ckpt.config.model.name)
