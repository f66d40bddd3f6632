"""The ``eval:`` section of an experiment: FID / KID / CLIP score during training (off by default).

Every ``eval.every_n_steps`` optimiser steps the trainer's ``EvalCallback``
(``trainer/eval_callback.py``) runs :func:`sdtrain.evaluation.run.evaluate` on the current weights
with the settings here: a small prompt set at one or two guidance scales. This module holds the
config and what turns it into the :class:`EvalConfig` of one eval; it knows nothing of Lightning.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sdtrain.errors import ConfigError
from sdtrain.evaluation.extractors import INCEPTION_FEATURES, ExtractorConfig, inception_cache_path
from sdtrain.evaluation.run import EvalConfig, check_model
from sdtrain.models.config import ModelConfig
from sdtrain.utils.checks import require_finite, require_range

SHARDED_STRATEGIES = ("deepspeed_stage_3", "fsdp")


@dataclass
class TrainingEvalConfig:
    """FID / KID / CLIP score of the current weights every N steps, logged next to the loss
    (``eval/fid_scale<S>``, ``eval/kid_scale<S>``, ``eval/clip_score_scale<S>``) and written to
    ``RUN/eval/metrics.csv``. Runs on rank 0 (the other ranks wait at the next step)."""

    every_n_steps: int = 0
    """Evaluate every N optimiser steps (0 = never)."""
    prompts: str = ""
    """A .txt file, a COCO captions .json or a shard spec (as ``sdtrain eval --prompts``)."""
    reference: str = ""
    """Real images: a folder or shard spec; their features are computed once per run."""
    num: int = 64
    """Images per scale (the first ``num`` prompts; COCO: drawn with ``seed``)."""
    scales: list[float] = field(default_factory=lambda: [2.0, 7.5])
    """Guidance scales (one or two keep it cheap)."""
    sampler: Literal["plms", "ddim"] = "plms"
    steps: int = 50
    """Sampling steps."""
    size: int = 0
    """Sample size in pixels (0 = data.image.size)."""
    batch: int = 8
    """Images sampled together (classifier-free guidance batched)."""
    seed: int = 0
    """Prompt draw and sampling seed: the same prompts and start noise at every eval."""
    use_ema: bool = True
    """Evaluate the EMA weights (when EMA is on)."""
    reference_num: int = 0
    """Reference images used (0 = all)."""
    inception_weights: str = ""
    """The pt_inception-2015-12-05 weights ("" = torch-fidelity's cache folder)."""
    inception_features: int = 2048
    """Inception layer compared: 2048 (FID) or a cheaper 64 / 192 / 768."""
    clip_model: str = "ViT-L-14"
    """open_clip architecture of the CLIP score."""
    clip_weights: str = ""
    """Its state dict (.safetensors or torch file)."""
    extractor_seed: int = -1
    """>= 0: seeded random Inception / CLIP weights (tests only; the figures are not FID)."""
    cache_dir: str = ""
    """Reference-feature cache ("" = RUN/eval/cache)."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 0:
            raise ConfigError("must be >= 0 (0 = off)", key="every_n_steps")
        require_finite(self)
        require_range(self, "steps", "batch", low=1)
        require_range(self, "num", low=2, note="FID and KID need 2 images")
        require_range(self, "size", "reference_num", low=0)
        require_range(self, "seed", low=0, high=2**32 - 1)
        require_range(self, "extractor_seed", low=-1, high=2**32 - 1, note="-1 = real weights")
        if not self.scales or any(s < 0 for s in self.scales):
            raise ConfigError("name at least one guidance scale, each >= 0", key="scales")
        if self.inception_features not in INCEPTION_FEATURES:
            raise ConfigError(f"must be one of {list(INCEPTION_FEATURES)}",
                              key="inception_features")  # fmt: skip
        if not self.every_n_steps:
            return
        for key in ("prompts", "reference"):
            if not getattr(self, key):
                raise ConfigError("is needed when eval.every_n_steps > 0", key=key)
        if self.extractor_seed < 0 and not self.clip_weights:
            raise ConfigError(f"set it to the open_clip {self.clip_model} state dict file",
                              key="clip_weights")  # fmt: skip

    def check_files(self) -> None:
        """The weights files are there (checked when training starts, not when a config loads:
        a run's config is loaded again to sample or export it, maybe on another machine)."""
        if not self.every_n_steps or self.extractor_seed >= 0:
            return
        inception = Path(self.inception_weights or inception_cache_path())
        for key, path in (("eval.inception_weights", inception),
                          ("eval.clip_weights", Path(self.clip_weights))):  # fmt: skip
            if not path.is_file():
                raise ConfigError(
                    f"no file at {path}: set {key} to the "
                    f"{'pt_inception-2015-12-05' if 'inception' in key else self.clip_model} "
                    "weights (sdtrain never downloads weights)",
                    key=key,
                )

    def check_against(self, model: ModelConfig, data_size: int, strategy: str) -> None:
        """Cross-section rules (called by ``ExperimentConfig``): a text-to-image model, a sample
        size that model accepts, a strategy whose model fits on rank 0 alone."""
        if not self.every_n_steps:
            return
        try:
            check_model(model, f"model {model.name}", self.size or data_size, self.steps)
        except ConfigError as err:
            raise ConfigError(f"eval during training: {err}", key="eval.every_n_steps") from None
        if strategy in SHARDED_STRATEGIES:
            raise ConfigError(
                f"eval during training samples on rank 0 alone, which trainer.strategy={strategy} "
                "does not allow (every rank holds a shard of the UNet); set eval.every_n_steps=0 "
                "and evaluate exported checkpoints with sdtrain eval",
                key="eval.every_n_steps",
            )

    def eval_config(self, data_size: int, cache_dir: Path) -> EvalConfig:
        """The settings of one eval (``cache_dir`` unless ``eval.cache_dir`` is set)."""
        extractors = ExtractorConfig(
            inception_weights=self.inception_weights or None, clip_model=self.clip_model,
            clip_weights=self.clip_weights or None,
            seed=self.extractor_seed if self.extractor_seed >= 0 else None,
            inception_features=self.inception_features,
        )  # fmt: skip
        return EvalConfig(
            prompts=self.prompts, reference=self.reference, scales=tuple(self.scales),
            sampler=self.sampler, steps=self.steps, size=self.size or data_size, num=self.num,
            seed=self.seed, batch=self.batch, reference_num=self.reference_num or None,
            extractors=extractors, cache_dir=self.cache_dir or str(cache_dir),
            grid_images=min(self.num, 16),
        )  # fmt: skip


def settings_tag(cfg: EvalConfig) -> str:
    """A short name for a set of eval settings: evals with other settings use another folder."""
    text = json.dumps({**cfg.settings(), "reference": cfg.reference}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]
