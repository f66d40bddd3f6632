"""The experiment schema and its loader: ``ExperimentConfig`` composes the component configs
(model, data, trainer, optimiser, EMA, checkpoints, validation, run folder, logging) into the root
that experiment files and ``key=value`` overrides merge into; ``load_config`` reads it.

It sits in ``trainer/`` because it composes configs from every layer below (``models``, ``data``,
``diffusion`` through ``ModelConfig``) and the trainer's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sdtrain.config.loader import load_dataclass
from sdtrain.data.config import DataConfig
from sdtrain.errors import ConfigError
from sdtrain.models.conditioning import required_data
from sdtrain.models.config import ModelConfig
from sdtrain.trainer.config import (
    CheckpointConfig,
    FinetuneConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    TrainerConfig,
    ValidationConfig,
)
from sdtrain.trainer.ema import EMAConfig
from sdtrain.utils.checks import require_range


@dataclass
class ExperimentConfig:
    """The root of every config file."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model to build or fine-tune."""
    data: DataConfig = field(default_factory=DataConfig)
    """The training data (LAION-style WebDataset shards)."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Steps, precision, distribution."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and the LR warm-up."""
    ema: EMAConfig = field(default_factory=EMAConfig)
    """EMA of the UNet (of the adapter weights with ``finetune.method: lora``)."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """Full fine-tuning or a LoRA / LoHa / LoKr adapter."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Training-state checkpoints."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Sample grids and held-out loss during training."""
    run: RunConfig = field(default_factory=RunConfig)
    """The run folder."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """wandb and CSV logging."""
    init_from: str = ""
    """An original-layout checkpoint (.ckpt / .safetensors) to start from (UNet, VAE, text
    encoder; a 4-channel UNet is widened to the configured input channels)."""
    init_lora: str = ""
    """A LoRA file (kohya / A1111 or diffusers layout, ``.safetensors``) the adapter starts from
    (``finetune.method: lora``, ``kind: lora``; used only when the run starts, not on resume)."""
    resume: str = ""
    """``auto``: continue from the newest complete checkpoint in the run folder; or a path."""
    seed: int = 0
    """Global seed for weights initialisation, noise and data order."""

    def __post_init__(self) -> None:
        # Lightning's seed_everything replaces a seed outside [0, 2^32) by a random one.
        require_range(self, "seed", low=0, high=2**32 - 1)
        if self.finetune.method == "lora":
            _check_lora_targets(self)
        elif self.init_lora:
            raise ConfigError("needs finetune.method: lora", key="init_lora")
        # Only a config that names training data must provide what the model conditions on.
        if not self.data.shards:
            return
        for section in required_data(self.model.conditioning, self.model.depth):
            if not getattr(self.data, section).enabled:
                key = f"data.{section}.enabled"
                raise ConfigError(
                    f"a '{self.model.conditioning}' model trains on {section}: set {key}: true",
                    key=key,
                )


def load_config(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Merge experiment files ``paths`` in order (each with its ``include:`` files), apply
    ``overrides`` (``a.b=value``); return the checked ``ExperimentConfig``."""
    return load_dataclass(ExperimentConfig, paths, overrides)


def _check_lora_targets(cfg: ExperimentConfig) -> None:
    """Every target pattern must match a module of this UNet (built on the meta device)."""
    import torch

    from sdtrain.models.lora import adaptable_modules, resolve_targets
    from sdtrain.models.unet import UNetModel

    if cfg.init_lora and cfg.finetune.lora.kind != "lora":
        raise ConfigError("reads LoRA files only: set finetune.lora.kind: lora", key="init_lora")
    with torch.device("meta"):
        unet = UNetModel(cfg.model.unet)
    resolve_targets(adaptable_modules(unet), cfg.finetune.lora.targets)
