"""The feature extractors: InceptionV3 (FID, KID) and an open_clip model (CLIP score).

Both are built through one code path whatever their weights: the standard files, or seeded
random weights (``extractor_seed``: tests and demos only; the figures are then "random
features", not FID). Nothing is ever downloaded:

- InceptionV3 is torch-fidelity's ``FeatureExtractorInceptionV3`` as torchmetrics wraps it
  (``NoTrainInceptionV3``, 2048-d pool features): the ``pt_inception-2015-12-05`` weights
  (``weights-inception-2015-12-05-6726825d.pth``) come from ``--inception-weights`` or from the
  file torch-fidelity would itself have cached (``<torch hub dir>/checkpoints/``). torch-fidelity
  downloads when given no path and unpickles a path with ``weights_only=False``; neither happens
  here: the weights are read by ``utils.files.load_torch`` (``weights_only=True``) and handed to the
  constructor in place of its download function.
- CLIP is ``open_clip.create_model(name)`` (no pretrained tag, so no download) with the weights
  of ``--clip-weights`` (a state dict, ``.safetensors`` or torch file) loaded strictly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import Tensor, nn

from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.utils import files

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_FEATURES = (64, 192, 768, 2048)
"""torch-fidelity's feature layers (torchmetrics' ``feature=``); 2048 (pool3) is FID's."""
DEFAULT_CLIP = "ViT-L-14"


def inception_cache_path() -> Path:
    """Where torch-fidelity keeps the weights it downloads (torch hub's checkpoint folder)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


@dataclass(frozen=True)
class ExtractorConfig:
    """Where the extractors' weights come from."""

    inception_weights: str | None = None
    """The ``pt_inception-2015-12-05`` file; None: torch-fidelity's cache folder."""
    clip_model: str = DEFAULT_CLIP
    """An open_clip architecture name: ViT-L-14 (the SD model cards), ViT-H-14 (MLPerf)."""
    clip_weights: str | None = None
    """The CLIP state dict (``.safetensors`` / torch file) for ``clip_model``."""
    seed: int | None = None
    """Seeded random weights for both (tests and demos only)."""
    antialias: bool = False
    """Resize to 299 px with antialiasing (torchmetrics' default) instead of TF1's bilinear
    (torch-fidelity, the original TTUR FID); see docs/evaluation.md."""
    inception_features: int = 2048
    """The Inception layer whose features are compared: 2048 (pool3, the published FID) or
    torch-fidelity's earlier 64 / 192 / 768 (cheaper: the network stops there and the Frechet
    distance works on a smaller covariance; figures are not comparable with 2048's)."""

    def __post_init__(self) -> None:
        if self.inception_features not in INCEPTION_FEATURES:
            raise ConfigError(
                f"--inception-features must be one of {', '.join(map(str, INCEPTION_FEATURES))}"
                f", got {self.inception_features}"
            )

    @property
    def random(self) -> bool:
        return self.seed is not None

    def describe(self) -> str:
        """What the features are, for tables and plots."""
        layer = "" if self.inception_features == 2048 else f", {self.inception_features}-d"
        if self.random:
            return f"random features (seed {self.seed}{layer}; not FID)"
        return f"InceptionV3 pt_inception-2015-12-05{layer}, CLIP {self.clip_model}"

    def inception_id(self) -> str:
        """Names the Inception features in cache keys: weights and resize."""
        weights = f"random-{self.seed}" if self.random else "pt_inception-2015-12-05"
        layer = "" if self.inception_features == 2048 else f":{self.inception_features}"
        return f"inception-v3:{weights}:antialias={self.antialias}{layer}"


# ---------------------------------------------------------------------------------------------
# InceptionV3
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Seeded:
    """Stands for a state dict: seeded random weights."""

    seed: int


def _inception_class() -> type[nn.Module]:
    from torchmetrics.image.fid import NoTrainInceptionV3

    class Inception(NoTrainInceptionV3):
        """Pool features (2048-d, or the chosen earlier layer) of uint8 (B, 3, H, W) images."""

        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
            if isinstance(state_dict, _Seeded):
                return _seeded_init(self, state_dict.seed)
            return super().load_state_dict(state_dict, strict=True, assign=assign)

        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x).reshape(x.shape[0], -1)  # (B, F)

    return Inception


def _seeded_init(module: nn.Module, seed: int) -> None:
    """He-normal weights, zero biases, BatchNorm at identity: deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in module.named_parameters():
            if param.dim() > 1:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) * math.sqrt(2 / fan_in))
            elif _name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()


def build_inception(cfg: ExtractorConfig) -> nn.Module:
    """The InceptionV3 of FID, in eval mode on the CPU; a clear error when its weights are missing
    or are not InceptionV3's."""
    from torch_fidelity import feature_extractor_inceptionv3 as fidelity

    path: Path | None = None
    if cfg.random:
        state: Any = _Seeded(int(cfg.seed))  # type: ignore[arg-type]
    else:
        path = Path(cfg.inception_weights) if cfg.inception_weights else inception_cache_path()
        if not path.exists():
            raise ConfigError(
                f"no InceptionV3 weights at {path}: pass --inception-weights FILE (the "
                f"pt_inception-2015-12-05 weights, torch-fidelity's {INCEPTION_FILE}) or put that "
                f"file at {inception_cache_path()}; sdtrain never downloads weights"
            )
        state = files.load_torch(path, verify=False)
        if not isinstance(state, dict):
            raise CheckpointError("does not hold a state dict of InceptionV3 weights", path)

    def supply(*args: object, **kwargs: object) -> Any:
        return state

    try:
        with mock.patch.object(fidelity, "load_state_dict_from_url", supply):
            model = _inception_class()(
                name="inception-v3-compat", features_list=[str(cfg.inception_features)],
                antialias=cfg.antialias,
            )  # fmt: skip
    except RuntimeError as err:
        raise CheckpointError(
            f"does not hold InceptionV3 pt_inception-2015-12-05 weights ({_first_line(err)})",
            path,
        ) from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------


class ClipModel(nn.Module):
    """An open_clip model with its tokenizer and image normalisation."""

    def __init__(self, name: str, model: nn.Module) -> None:
        import open_clip

        super().__init__()
        self.name = name
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(name)
        pre = open_clip.get_model_preprocess_cfg(model)
        size = pre.get("size", 224)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean", torch.tensor(pre["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre["std"]).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """uint8 (B, 3, H, W) square images -> (B, D) embeddings (bicubic resize, normalised)."""
        x = images.to(self.mean.device, torch.float32) / 255.0
        x = nn.functional.interpolate(x, size=self.image_size, mode="bicubic", antialias=True)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return self.model.encode_image(x).float()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> Tensor:
        """Prompts -> (B, D) embeddings (truncated to the tokenizer's context, 77 tokens)."""
        tokens = self.tokenizer(texts).to(self.mean.device)
        return self.model.encode_text(tokens).float()


def build_clip(cfg: ExtractorConfig) -> ClipModel:
    """The open_clip model ``cfg.clip_model`` with its weights, on the CPU in eval mode."""
    import open_clip

    if cfg.clip_model not in open_clip.list_models():
        raise ConfigError(
            f"--clip-model {cfg.clip_model!r} is not an open_clip architecture "
            "(e.g. ViT-L-14, ViT-H-14; open_clip.list_models() lists them)"
        )
    if cfg.random:
        with _seeded(int(cfg.seed)):  # type: ignore[arg-type]
            model = open_clip.create_model(cfg.clip_model, pretrained=None)
        return ClipModel(cfg.clip_model, model).eval()
    if not cfg.clip_weights:
        raise ConfigError(
            f"no CLIP weights: pass --clip-weights FILE with the open_clip {cfg.clip_model} state "
            "dict (.safetensors or torch file, e.g. open_clip_pytorch_model.bin of the model "
            "you evaluate against); sdtrain never downloads weights"
        )
    path = Path(cfg.clip_weights)
    state = _read_state_dict(path)
    model = open_clip.create_model(cfg.clip_model, pretrained=None)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"does not hold open_clip {cfg.clip_model} weights ({_first_line(err)}); "
            "pass the matching --clip-model",
            path,
        ) from None
    return ClipModel(cfg.clip_model, model).eval()


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        state, _ = files.read_safetensors(path)
    else:
        loaded = files.load_torch(path, verify=False)
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict):
            raise CheckpointError("does not hold a state dict of CLIP weights", path)
        state = loaded
    return {k.removeprefix("module."): v for k, v in state.items()}


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    detail = " ".join(line.strip() for line in text[:3])
    return detail if len(detail) < 400 else detail[:400] + "..."
