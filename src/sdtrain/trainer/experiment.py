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
    """EMA of the UNet."""
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
    resume: str = ""
    """``auto``: continue from the newest complete checkpoint in the run folder; or a path."""
    seed: int = 0
    """Global seed for weights initialisation, noise and data order."""

    def __post_init__(self) -> None:
        # Lightning's seed_everything replaces a seed outside [0, 2^32) by a random one.
        require_range(self, "seed", low=0, high=2**32 - 1)
        # Only a config that names training data must provide what the model conditions on.
        if not self.data.shards:
            return
        for section in required_data(self.model.conditioning):
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
