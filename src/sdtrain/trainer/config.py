"""Typed configuration of training: optimiser and LR warm-up, trainer, checkpoints, validation,
logging and the run folder. The experiment root composes these with the model and data configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from sdtrain.errors import ConfigError
from sdtrain.models.lora import LoraConfig
from sdtrain.utils.checks import require_finite, require_range


@dataclass
class OptimConfig:
    """AdamW with the original linear LR warm-up (``LambdaLinearScheduler``), then constant."""

    lr: float = 1e-4
    """Base learning rate (per sample when ``scale_lr``)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    warmup_steps: int = 10000
    """Steps of linear warm-up from ``warmup_start`` x lr to lr (the seeds: 10,000)."""
    warmup_start: float = 1e-6
    """LR multiplier at step 0 (the original ``f_start``)."""
    scale_lr: bool = False
    """The original ``scale_lr``: lr x global batch (nodes x devices x accumulation x batch)."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """``adamw8bit``: bitsandbytes' 8-bit AdamW (CUDA only; bitsandbytes is not a dependency:
    ``pip install bitsandbytes``). Optimiser state in 8 bits: a quarter of AdamW's memory."""

    def __post_init__(self) -> None:
        require_finite(self)
        if not self.lr > 0:
            raise ConfigError("must be > 0", key="lr")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("needs two values in [0, 1)", key="betas")
        require_range(self, "eps", low=0, low_open=True)
        require_range(self, "weight_decay", low=0, note="0 = none")
        if self.warmup_steps < 0:
            raise ConfigError("must be >= 0", key="warmup_steps")
        require_range(self, "warmup_start", low=0, high=1, note="a multiplier of lr")

    def lr_multiplier(self, step: int) -> float:
        """The LR factor at optimiser step ``step`` (0-based)."""
        if step >= self.warmup_steps:
            return 1.0
        return self.warmup_start + (1.0 - self.warmup_start) * step / self.warmup_steps


@dataclass
class FSDPConfig:
    """PyTorch FSDP (``trainer.strategy: fsdp``): the UNet is wrapped per block, the frozen
    autoencoder and text encoder stay whole on every rank."""

    sharding_strategy: Literal["SHARD_GRAD_OP", "FULL_SHARD"] = "SHARD_GRAD_OP"
    """``SHARD_GRAD_OP`` (MosaicML's choice for SD 2): gradients and AdamW state sharded,
    weights gathered once per step; ``FULL_SHARD``: weights sharded too (gathered per block in
    forward and again in backward)."""


@dataclass
class TrainerConfig:
    """How the UNet is trained: steps, precision, distribution, memory savers."""

    max_steps: int = 1000
    """Optimiser steps to train (the run ends there)."""
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    """Mixed precision; ``16-mixed`` uses loss scaling."""
    accumulate_grad_batches: int = 1
    """Batches per optimiser step."""
    gradient_clip_val: float = 0.0
    """Clip the global gradient norm to this (0 = off)."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    """Where to train."""
    devices: int = 1
    """Devices (processes) per node."""
    num_nodes: int = 1
    """Nodes."""
    strategy: Literal["auto", "ddp", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp"] = "auto"
    """Distribution: DDP by default with several devices, DeepSpeed ZeRO stage 2 / 3, or
    PyTorch FSDP (``trainer.fsdp``; docs/distributed.md says which to choose)."""
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    """FSDP options (used with ``strategy: fsdp``)."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass."""
    channels_last: bool = False
    """UNet weights and inputs in channels-last memory format (faster convs on GPUs)."""
    compile: bool = False
    """``torch.compile`` the UNet."""
    deterministic: bool = False
    """Deterministic algorithms (exact resumption tests; slower on GPU)."""
    text_dropout: float = 0.1
    """Probability of replacing a caption by the empty prompt (classifier-free guidance)."""
    max_nonfinite_steps: int = 20
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    log_every_n_steps: int = 10
    """Logging interval."""

    def __post_init__(self) -> None:
        require_finite(self)
        for key in ("max_steps", "accumulate_grad_batches", "devices", "num_nodes"):
            if getattr(self, key) < 1:
                raise ConfigError("must be >= 1", key=key)
        require_range(self, "max_nonfinite_steps", "log_every_n_steps", low=1)
        if not 0 <= self.text_dropout <= 1:
            raise ConfigError("must be a probability in [0, 1]", key="text_dropout")
        if self.gradient_clip_val < 0:
            raise ConfigError("must be >= 0 (0 = off)", key="gradient_clip_val")
        if self.strategy.startswith("deepspeed") and self.precision == "16-mixed":
            raise ConfigError("DeepSpeed runs here in 32 or bf16-mixed only", key="precision")
        if self.strategy == "fsdp" and self.gradient_clip_val:
            raise ConfigError(
                "gradient clipping is not available with strategy fsdp (Lightning's FSDP "
                "precision plugin refuses clip-by-norm); set trainer.gradient_clip_val=0 or use "
                "ddp / deepspeed_stage_2",
                key="gradient_clip_val",
            )


@dataclass
class CheckpointConfig:
    """Training-state checkpoints in the run folder."""

    every_n_steps: int = 1000
    """Save every N optimiser steps (and at the end)."""
    keep_last: int = 3
    """Keep the newest K step checkpoints."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 1:
            raise ConfigError("must be >= 1", key="every_n_steps")
        if self.keep_last < 1:
            raise ConfigError("must be >= 1", key="keep_last")


@dataclass
class RunConfig:
    """Where a run's files go."""

    root: str = "runs"
    """Folder holding runs."""
    name: str = ""
    """Run name (default: the model name); the folder is ``root/name``."""
    dir: str = ""
    """Explicit run folder (overrides root/name)."""


@dataclass
class LoggingConfig:
    """Loggers: wandb (online or offline) and CSV in the run folder."""

    wandb: bool = True
    """Log to Weights & Biases (``WANDB_MODE=offline`` works without network)."""
    wandb_project: str = "sdtrain"
    """wandb project."""
    csv: bool = True
    """Write ``metrics.csv`` in the run folder."""


@dataclass
class ValidationConfig:
    """Periodic validation: sample grids for fixed prompts (and image + mask pairs for
    inpainting) and the loss on held-out shards, per timestep bucket."""

    every_n_steps: int = 0
    """Validate every N optimiser steps (0 = never)."""
    prompts: list[str] = field(
        default_factory=lambda: [
            "a photograph of an astronaut riding a horse",
            "a red circle above a blue square on a white background",
            "a painting of a lighthouse at sunset",
            "",
        ]
    )
    """Fixed prompts sampled at every validation."""
    samplers: list[str] = field(default_factory=lambda: ["ddim", "plms"])
    """Samplers to run (each gives one grid)."""
    steps: int = 50
    """Sampling steps."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale."""
    seed: int = 0
    """Seed of the initial noise (the same every validation, so grids are comparable)."""
    use_ema: bool = True
    """Sample with the EMA weights (when EMA is on)."""
    image_size: int = 0
    """Sample resolution in pixels (0 = data.image.size)."""
    shards: list[str] = field(default_factory=list)
    """Held-out shards for the validation loss (empty = no validation loss)."""
    loss_batches: int = 4
    """Batches of held-out data per validation."""
    loss_buckets: int = 4
    """Timestep buckets the validation loss is reported in (equal ranges of [0, T))."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise ConfigError("must be >= 0 (0 = off)", key="every_n_steps")
        if self.steps < 1:
            raise ConfigError("must be >= 1", key="steps")
        require_finite(self)
        require_range(self, "guidance_scale", low=0, note="1 = no guidance")
        require_range(self, "seed", low=0, high=2**32 - 1)
        require_range(self, "loss_batches", "loss_buckets", low=1)
        if self.image_size < 0 or self.image_size % 8:
            raise ConfigError(
                f"must be 0 (= data.image.size) or a positive multiple of 8, got {self.image_size}",
                key="image_size",
            )
        unknown = [s for s in self.samplers if s not in ("ddim", "plms")]
        if unknown:
            raise ConfigError(f"unknown sampler(s) {unknown}; choose ddim, plms", key="samplers")


@dataclass
class FinetuneConfig:
    """What training changes: the whole UNet, or a low-rank adapter on it."""

    method: Literal["full", "lora"] = "full"
    """``full``: every UNet weight trains; ``lora``: only an adapter (``lora``) trains and the
    training checkpoints hold only the adapter (the base weights come from ``init_from``)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter (used with ``method: lora``)."""
    train_text_encoder: bool = False
    """Train the text encoder too: with ``method: full`` its weights (a second AdamW parameter
    group, same warm-up), with ``method: lora`` an adapter on it. Captions are then encoded with
    gradients every step (no cached ``data.text_embeddings``); dropped captions are the empty
    prompt encoded by the current encoder. The training checkpoints hold the trained text
    encoder weights (the adapter's with LoRA); exports write them under ``cond_stage_model.*``
    (LoRA: ``lora_te_*`` / ``text_encoder.*`` keys). The EMA covers the UNet (or its adapter)
    only: the text encoder is exported as trained. It is held in float32 whatever
    ``model.frozen_dtype`` says."""
    text_encoder_lr: float = 0.0
    """The text encoder's learning rate (with ``train_text_encoder``); 0 = ``optim.lr``. Scaled
    by the global batch like ``optim.lr`` when ``optim.scale_lr``; may change on resume."""

    def __post_init__(self) -> None:
        require_finite(self)
        require_range(self, "text_encoder_lr", low=0, note="0 = optim.lr")
        if self.text_encoder_lr and not self.train_text_encoder:
            raise ConfigError(
                "is the text encoder's learning rate: it needs finetune.train_text_encoder: true",
                key="text_encoder_lr",
            )
