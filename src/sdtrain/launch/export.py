"""``sdtrain export``: a training checkpoint -> one original-layout ``.ckpt`` / ``.safetensors``,
or a diffusers model folder (``--format diffusers``, ``models.adapters.diffusers``).

A step checkpoint written by ``sdtrain fit`` holds the trainable UNet (``model.unet.*``), its EMA
shadow and the resolved config, but not the frozen autoencoder and text encoder: those are what
the config's ``init_from`` file holds, or the random initialisation seeded by ``seed`` when the run
started from scratch. The export rebuilds the model exactly as ``fit`` did (same seed, same
``build_module``) so those parts are the ones training saw, puts the chosen UNet weights in and
writes every part in the original layout (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.*``, the twelve schedule buffers; an x4 upscaler's ``low_scale_model.*``; a
depth model's ``depth_model.*``: its estimator, or with ``model.depth.source: shard`` the
``init_from`` file's, unchanged), readable by ``read_checkpoint`` and by the tools that read
released Stable Diffusion files.

With ``finetune.train_text_encoder`` the checkpoint also holds the trained text encoder
(``model.text_encoder.*``; a LoRA run: its adapter), which replaces the rebuilt one, so
``cond_stage_model.*`` (diffusers: ``text_encoder/``) is the text encoder as trained.

EMA: released files (``512-base-ema.ckpt`` ...) carry the EMA weights *as* the UNet. That is the
default here whenever the run kept an EMA; ``use_ema=False`` exports the raw weights and
``with_ema=True`` stores raw weights as the UNet plus the EMA under ``model_ema.*``. The EMA
covers the UNet (or its adapter) only: a trained text encoder is exported as trained.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.models.adapters.diffusers import (
    MODEL_INDEX,
    is_diffusers_folder,
    read_diffusers,
    write_diffusers,
)
from sdtrain.models.adapters.original import (
    SAFETENSORS_SUFFIX,
    TORCH_SUFFIXES,
    load_state_dict_strict,
    read_checkpoint,
    widen_input_channels,
    write_checkpoint,
)
from sdtrain.models.config import ModelConfig
from sdtrain.models.lora import has_adapter, load_adapter_state, merge_adapter
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

ExportFormat = Literal["original", "diffusers"]
EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Reading training checkpoints moved to sdtrain.trainer.checkpoints; these names stay importable.
__all__ = [
    "Exported",
    "NotATrainingCheckpoint",
    "TrainingCheckpoint",
    "Weights",
    "config_from_yaml",
    "convert_checkpoint",
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
    """The run's model as training built it, with the chosen UNet weights (and a trained text
    encoder's weights, never an EMA); in eval mode, CPU."""
    from sdtrain.trainer.fit import build_module

    cfg = ckpt.config
    # No torch.compile: its wrapper renames the UNet's keys and buys nothing here.
    cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, compile=False))
    # The adapter comes from the checkpoint: the file it started from is not needed again.
    cfg = dataclasses.replace(cfg, init_lora="")
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
    if cfg.finetune.train_text_encoder and not ckpt.text_encoder:
        raise CheckpointError(
            "holds no text encoder weights (model.text_encoder.*) although its run trained the "
            "text encoder (finetune.train_text_encoder: true)",
            ckpt.path,
        )
    if ckpt.is_adapter:
        load_adapter_state(model.unet, ckpt.unet_weights(weights), source=str(ckpt.path))
        if ckpt.text_encoder:
            load_adapter_state(model.text_encoder, ckpt.text_encoder, source=str(ckpt.path))
        return model.eval()
    load_state_dict_strict(
        model.unet, ckpt.unet_weights(weights), source=str(ckpt.path), what="UNet"
    )
    if ckpt.text_encoder:
        load_state_dict_strict(model.text_encoder, ckpt.text_encoder, source=str(ckpt.path),
                               what="text encoder")  # fmt: skip
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
    src: PathLike,
    out: PathLike,
    use_ema: bool | None = None,
    with_ema: bool = False,
    *,
    format: ExportFormat = "original",
    dtype: str | None = None,
    merge: bool = False,
) -> Exported:
    """Export a run folder's newest step checkpoint (or a given one) to ``out``.

    ``use_ema``: None = the EMA when the run has one; ``with_ema`` adds the EMA as
    ``model_ema.*`` (diffusers: ``unet_ema/``) next to the raw UNet. ``format`` ``original``: the
    suffix of ``out`` picks .ckpt or .safetensors; ``diffusers``: ``out`` is a new folder with
    ``model_index.json``. ``dtype`` (``fp16|bf16|fp32``) casts the weights; default as trained.
    ``merge``: a LoRA run's adapter is folded into the base UNet (``W + (alpha / r) up @ down``),
    a text-encoder adapter into ``cond_stage_model.*``; the adapter alone is
    ``launch.export_lora.export_lora``.
    """
    out = Path(out)
    if format not in ("original", "diffusers"):
        raise ConfigError(f"--format must be original or diffusers, got {format!r}")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    diffusers = format == "diffusers"
    if diffusers and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"output {out} exists and is not an empty folder; choose a new folder")
    if not diffusers and out.suffix.lower() not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ConfigError(
            f"output {out} must end in .ckpt or .safetensors (the suffix picks the format); "
            "for a diffusers folder pass --format diffusers"
        )
    problem = files.cannot_write(out / MODEL_INDEX if diffusers else out)
    if problem:
        raise ConfigError(f"{problem}; choose another output path")
    ckpt = read_training_checkpoint(src)
    check_merge(ckpt, merge, with_ema)
    weights = ckpt.pick(use_ema, with_ema)
    model = rebuild_model(ckpt, weights)
    if merge:
        merge_adapter(model.unet)
        if has_adapter(model.text_encoder):  # finetune.train_text_encoder: its adapter too
            merge_adapter(model.text_encoder)
    parts = model.original_parts(ema=ckpt.ema if with_ema else None)
    metadata = {"sdtrain_model": ckpt.config.model.name, "sdtrain_unet_weights": weights}
    if diffusers:
        if out.is_dir():
            out.rmdir()  # the empty folder cannot_write may have created; written whole below
        path = write_diffusers(
            out, ckpt.config.model, **{k: v for k, v in parts.items() if k in _DIFFUSERS_PARTS},
            ema_decay=ckpt.ema_decay, ema_num_updates=ckpt.ema_num_updates,
            global_step=ckpt.global_step, dtype=dtype, sample_size=_latent_size(ckpt),
            extra_metadata=metadata,
        )  # fmt: skip
    else:
        if dtype is not None:
            parts = {name: _cast(part, name, EXPORT_DTYPES[dtype]) for name, part in parts.items()}
        path = write_checkpoint(
            out,
            **parts,
            global_step=ckpt.global_step,
            extra_metadata=metadata,
            ema_decay=ckpt.ema_decay,
            ema_num_updates=ckpt.ema_num_updates,
        )
    return Exported(path, ckpt.path, ckpt.global_step, weights,
                    with_ema, ckpt.config.model.name)  # fmt: skip


# A diffusers folder takes these; its scheduler config holds the schedules, and a depth
# pipeline's estimator (DPTForDepthEstimation) is another layout, not written here.
_DIFFUSERS_PARTS = ("unet", "vae", "text", "ema")


def check_merge(ckpt: TrainingCheckpoint, merge: bool, with_ema: bool) -> None:
    """A LoRA run exports as the adapter alone (--lora) or merged (--merge); nothing else."""
    if merge and not ckpt.is_adapter:
        raise ConfigError(
            f"--merge folds a LoRA into its base model, but {ckpt.path} is from a full "
            "fine-tuning run (finetune.method: full): export it without --merge"
        )
    if ckpt.is_adapter and not merge:
        raise ConfigError(
            f"{ckpt.path} is from a LoRA run (only the adapter was trained): pass --lora for "
            "the adapter alone (kohya / A1111 layout; --lora-format diffusers) or --merge for a "
            "full checkpoint with the adapter merged into the base weights"
        )
    if merge and with_ema:
        raise ConfigError(
            "--with-ema cannot be combined with --merge; pick the adapter weights with --ema "
            "or --no-ema"
        )


def _latent_size(ckpt: TrainingCheckpoint) -> int:
    return ckpt.config.data.image.size // ckpt.config.model.latent_downsampling


# Noise-schedule buffers (the main one and an upscaler's low-res one) stay float32, as in
# released half-precision files: they are numbers of the schedule, not weights.
_FLOAT32_PARTS = ("schedule", "low_scale")


def _cast(part: dict, name: str, dtype: torch.dtype) -> dict:
    if name in _FLOAT32_PARTS:
        return part
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in part.items()}


# ---------------------------------------------------------------------------------------------
# Converting between the layouts (sdtrain checkpoint convert)
# ---------------------------------------------------------------------------------------------


def convert_checkpoint(
    src: PathLike,
    dst: PathLike,
    *,
    to: ExportFormat | None = None,
    model: ModelConfig | None = None,
    in_channels: int = 0,
    ema: bool = True,
    dtype: str | None = None,
) -> str:
    """Rewrite an original-layout file or a diffusers folder as either layout; returns what was
    written, in words. ``to`` None: a ``.ckpt`` / ``.safetensors`` ``dst`` is original, anything
    else a diffusers folder. An original file carries no architecture, so writing it as a
    diffusers folder needs ``model``; a folder's own config is checked against ``model`` if given.
    """
    dst = Path(dst)
    to = to or (
        "original" if dst.suffix.lower() in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX) else "diffusers"
    )
    if to not in ("original", "diffusers"):
        raise ConfigError(f"--to must be original or diffusers, got {to!r}")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if is_diffusers_folder(src):
        read = read_diffusers(src, model)
        if read.differences:
            raise CheckpointError("does not fit --config: " + "; ".join(read.differences), src)
        ckpt, cfg = read.checkpoint, model or read.config
    else:
        ckpt, cfg = read_checkpoint(src), model
    if not ckpt.unet:
        raise ConfigError(f"{src} holds no UNet weights (model.diffusion_model.*)")
    unet, ema_sd = ckpt.unet, (ckpt.ema or None) if ema else None
    if to == "diffusers":
        if cfg is None:
            raise ConfigError(
                f"{src} is an original-layout file, which does not say its architecture: pass "
                "--config with its model config (e.g. --config sd15) to write a diffusers folder"
            )
        in_channels = in_channels or cfg.unet.in_channels
    if in_channels:
        unet = widen_input_channels(unet, in_channels)
        ema_sd = widen_input_channels(ema_sd, in_channels) if ema_sd else None
    decay = ckpt.ema_meta.get("decay")
    updates = ckpt.ema_meta.get("num_updates")
    ema_args = {"ema_decay": float(decay) if decay is not None else 0.9999,
                "ema_num_updates": int(updates) if updates is not None else 0}  # fmt: skip
    parts = {"unet": unet, "vae": ckpt.vae, "text": ckpt.text, "ema": ema_sd}
    if to == "original":
        parts["depth"] = ckpt.depth  # a depth model's MiDaS (depth_model.*), carried through
        parts["low_scale"] = ckpt.low_scale  # an x4 upscaler's low-res schedule buffers
    if dtype is not None:
        cast = EXPORT_DTYPES[dtype]
        parts = {k: _cast(v, k, cast) if v is not None else None for k, v in parts.items()}
    if to == "original":
        parts = {k: v or None for k, v in parts.items()}
        out = write_checkpoint(dst, **parts, schedule=ckpt.schedule or None,
                               global_step=ckpt.global_step, **ema_args)  # fmt: skip
    else:
        assert cfg is not None
        if not ckpt.vae or not ckpt.text:
            raise CheckpointError(
                "has no autoencoder or no text encoder weights; a diffusers folder needs both", src
            )
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise ConfigError(f"{dst} exists and is not an empty folder; choose a new folder")
        out = write_diffusers(dst, cfg, **parts, global_step=ckpt.global_step, **ema_args)
    left = f"; left out {len(ckpt.other)} other key(s)" if ckpt.other else ""
    if to == "diffusers" and ckpt.depth:
        left += f"; left out {len(ckpt.depth)} depth_model.* tensor(s) (the MiDaS estimator)"
    if to == "diffusers" and ckpt.low_scale:
        left += (
            f"; left out {len(ckpt.low_scale)} low_scale_model.* buffer(s) (the folder's "
            "low_res_scheduler holds that schedule)"
        )
    return f"wrote {out} ({to} layout{', EMA included' if parts['ema'] else ''}){left}"
