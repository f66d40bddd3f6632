"""MiDaS DPT-Hybrid, the frozen depth estimator of SD 2 depth, with the original key layout.

The original ``LatentDepth2ImageDiffusion`` holds ``MiDaSInference("dpt_hybrid")`` as
``depth_model``: a DPT (dense prediction transformer) on timm's ViT-B/16 with a ResNet-50 stem
(``vit_base_resnet50_384``, now ``vit_base_r50_s16_384``). The backbone is timm's own
``VisionTransformer`` + ``HybridEmbed`` + ``ResNetV2``; this file adds only the DPT parts:

- reassemble: ResNet stages 1 and 2 (strides 4 and 8) as they are; the tokens of ViT blocks 8
  and 11 with the class token projected in (``ProjectReadout``), laid back onto the 1/16 grid and
  convolved (block 11's to 1/32);
- fusion: four ``FusionBlock``s (residual conv units, x2 bilinear upsampling), coarse to fine;
- head: convs to one non-negative channel at full resolution.

``MiDaS.state_dict()`` has exactly the keys of ``MiDaSInference.state_dict()`` in the same order
(the ``depth_model.*`` keys of ``512-depth-ema.ckpt`` without the prefix, and the keys of the MiDaS
release file ``dpt_hybrid-midas-501f0c75.pt`` with ``model.`` in front). Some ``nn.Sequential``s
keep parameter-free placeholders so their children keep the original indices.

``midas_input`` is the original ``AddMiDaS`` preprocessing and ``depth_conditioning`` the depth
channel ``LatentDepth2ImageDiffusion.get_input`` builds from the raw depth.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import GroupNormAct, StdConv2dSame
from timm.layers.hybrid_embed import HybridEmbed
from timm.models._features import FeatureInfo
from timm.models.resnetv2 import ResNetV2
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sdtrain.errors import CheckpointError, ConfigError, DataError
from sdtrain.utils import files

__all__ = [
    "MIDAS_CONFIGS",
    "MiDaS",
    "MidasConfig",
    "build_midas",
    "depth_conditioning",
    "midas_input",
    "midas_input_size",
    "read_midas_weights",
]

TRAINING_EPS = 1e-3
"""The ``+ 0.001`` in ``get_input``'s per-sample scaling (the depth2img scripts use 0)."""
SCRIPT_EPS = 0.0
"""The depth2img scripts (``scripts/gradio|streamlit/depth2img.py``) scale with no epsilon."""


@dataclass(frozen=True)
class MidasConfig:
    """One DPT-Hybrid size: the timm backbone, the DPT widths and the network input size."""

    layers: tuple[int, ...] = (3, 4, 9)
    """ResNetV2 bottleneck blocks per stage (3 stages: strides 4, 8, 16)."""
    channels: tuple[int, ...] = (256, 512, 1024)
    """ResNetV2 stage output channels; stages 1 and 2 are the two finest DPT inputs."""
    stem_channels: int = 64
    norm_groups: int = 32
    """GroupNorm groups in the ResNet (timm's default 32)."""
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    num_classes: int = 1000
    """The (unused) ImageNet head of the timm ViT, kept because checkpoints hold it."""
    hooks: tuple[int, int] = (8, 11)
    """The ViT blocks whose tokens become the two coarsest DPT inputs."""
    features: int = 256
    """Width of the fusion path."""
    head_channels: int = 32
    net_size: int = 384
    """The estimator's nominal input side (the position embedding grid is net_size / 16)."""
    multiple_of: int = 32
    """Network inputs are resized to sides that are multiples of this."""

    @property
    def reassemble_channels(self) -> tuple[int, int, int, int]:
        return (self.channels[0], self.channels[1], self.embed_dim, self.embed_dim)


MIDAS_CONFIGS: dict[str, MidasConfig] = {
    "dpt_hybrid": MidasConfig(),
    # The same module family, small enough for CPU tests and the demo.
    "tiny": MidasConfig(
        layers=(1, 1, 1),
        channels=(32, 64, 128),
        stem_channels=16,
        norm_groups=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=10,
        hooks=(0, 1),
        features=16,
        head_channels=8,
        net_size=64,
    ),
}

PATCH = 16  # the ResNet stem + 3 stages reduce by 16; the ViT's patches are 1x1 on that grid


# ---------------------------------------------------------------------------------------------
# Backbone and reassembly
# ---------------------------------------------------------------------------------------------


class ProjectReadout(nn.Module):
    """Each patch token concatenated with the class token, projected back: (B, N, D)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: Tensor) -> Tensor:
        patches = tokens[:, 1:]  # (B, N, D)
        readout = tokens[:, :1].expand_as(patches)  # (B, N, D)
        return self.project(torch.cat([patches, readout], dim=-1))  # (B, N, D)


def _reassemble(dim: int, out: int, downsample: bool) -> nn.Sequential:
    # Indices 1 and 2 were the original's Transpose / Unflatten; the grid is laid out in
    # Backbone.forward (it depends on the input size), the placeholders keep the key indices.
    layers: list[nn.Module] = [ProjectReadout(dim), nn.Identity(), nn.Identity()]
    layers.append(nn.Conv2d(dim, out, kernel_size=1))
    if downsample:
        layers.append(nn.Conv2d(out, out, kernel_size=3, stride=2, padding=1))
    return nn.Sequential(*layers)


def _vit_hybrid(cfg: MidasConfig) -> VisionTransformer:
    """timm's R50+ViT hybrid as ``vit_base_r50_s16_384`` builds it, sized by ``cfg``."""
    resnet = ResNetV2(
        layers=list(cfg.layers),
        channels=cfg.channels,
        stem_chs=cfg.stem_channels,
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
        norm_layer=partial(GroupNormAct, num_groups=cfg.norm_groups),
    )
    grid = cfg.net_size // PATCH
    # feature_size given: HybridEmbed would otherwise run the ResNet once (impossible on meta);
    # it then reads the width from a FeatureInfo (ResNetV2 keeps the same records as a list).
    resnet.feature_info = FeatureInfo(resnet.feature_info, tuple(range(len(resnet.feature_info))))
    embed = partial(HybridEmbed, backbone=resnet, feature_size=grid, feature_ratio=PATCH)
    return VisionTransformer(
        img_size=cfg.net_size,
        patch_size=1,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        num_classes=cfg.num_classes,
        embed_layer=embed,
    )


class Backbone(nn.Module):
    """The ViT hybrid and the reassembly of its four feature maps (original ``pretrained``)."""

    def __init__(self, cfg: MidasConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _vit_hybrid(cfg)
        dim, (_, _, c3, c4) = cfg.embed_dim, cfg.reassemble_channels
        self.act_postprocess3 = _reassemble(dim, c3, downsample=False)
        self.act_postprocess4 = _reassemble(dim, c4, downsample=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        vit = self.model
        b, _, h, w = x.shape
        grid = (h // PATCH, w // PATCH)
        resnet = vit.patch_embed.backbone
        feats = resnet.stem(x)  # (B, stem, H/4, W/4)
        stage_outs = []
        for stage in resnet.stages:
            feats = stage(feats)
            stage_outs.append(feats)
        layer_1, layer_2 = stage_outs[0], stage_outs[1]  # (B, c0, H/4, W/4), (B, c1, H/8, W/8)
        feats = resnet.norm(feats)  # (B, c2, H/16, W/16)
        tokens = vit.patch_embed.proj(feats).flatten(2).transpose(1, 2)  # (B, N, D)
        tokens = torch.cat([vit.cls_token.expand(b, -1, -1), tokens], dim=1)  # (B, 1 + N, D)
        tokens = vit.pos_drop(tokens + self._pos_embed(grid))
        hooked = []
        for i, block in enumerate(vit.blocks[: self.cfg.hooks[1] + 1]):
            tokens = block(tokens)
            if i in self.cfg.hooks:
                hooked.append(tokens)
        layer_3 = self._to_grid(self.act_postprocess3, hooked[0], grid)  # (B, c3, H/16, W/16)
        layer_4 = self._to_grid(self.act_postprocess4, hooked[1], grid)  # (B, c4, H/32, W/32)
        return layer_1, layer_2, layer_3, layer_4

    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        """The position embedding resized bilinear to the token grid: (1, 1 + N, D)."""
        pos = self.model.pos_embed  # (1, 1 + G*G, D)
        cls_pos, grid_pos = pos[:, :1], pos[0, 1:]
        old = int(math.sqrt(len(grid_pos)))
        grid_pos = grid_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, G, G)
        grid_pos = F.interpolate(grid_pos, size=grid, mode="bilinear")  # (1, D, gh, gw)
        grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        return torch.cat([cls_pos, grid_pos], dim=1)

    @staticmethod
    def _to_grid(post: nn.Sequential, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        patches = post[0](tokens)  # (B, N, D)
        maps = patches.transpose(1, 2).unflatten(2, grid)  # (B, D, gh, gw)
        return post[3:](maps)


# ---------------------------------------------------------------------------------------------
# Fusion and head
# ---------------------------------------------------------------------------------------------


class ResidualConvUnit(nn.Module):
    """x + conv(relu(conv(relu(x))))."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(x))
        return self.conv2(F.relu(out)) + x


class FusionBlock(nn.Module):
    """(coarser path + refined skip) -> refined, x2 bilinear (align_corners), 1x1 conv."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, path: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            path = path + self.resConfUnit1(skip)
        out = self.resConfUnit2(path)
        out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(out)  # (B, F, 2h, 2w)


class Scratch(nn.Module):
    """Per-level 3x3 convs to the fusion width, the fusion blocks and the depth head."""

    def __init__(self, cfg: MidasConfig) -> None:
        super().__init__()
        f = cfg.features
        for i, c in enumerate(cfg.reassemble_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(c, f, kernel_size=3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FusionBlock(f))
        self.output_conv = nn.Sequential(
            nn.Conv2d(f, f // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(f // 2, cfg.head_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(cfg.head_channels, 1, kernel_size=1),
            nn.ReLU(),  # non-negative depth
        )

    def forward(self, layers: tuple[Tensor, Tensor, Tensor, Tensor]) -> Tensor:
        rn = [getattr(self, f"layer{i}_rn")(x) for i, x in enumerate(layers, start=1)]
        path = self.refinenet4(rn[3])  # (B, F, H/16, W/16)
        path = self.refinenet3(path, rn[2])  # (B, F, H/8, W/8)
        path = self.refinenet2(path, rn[1])  # (B, F, H/4, W/4)
        path = self.refinenet1(path, rn[0])  # (B, F, H/2, W/2)
        return self.output_conv(path)  # (B, 1, H, W)


class DPTDepth(nn.Module):
    """Backbone + scratch: the original ``DPTDepthModel``."""

    def __init__(self, cfg: MidasConfig) -> None:
        super().__init__()
        self.pretrained = Backbone(cfg)
        self.scratch = Scratch(cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.scratch(self.pretrained(x))  # (B, 1, H, W)


class MiDaS(nn.Module):
    """The frozen depth estimator: normalised image (B, 3, H, W) -> raw depth (B, 1, H, W)."""

    def __init__(self, cfg: MidasConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = DPTDepth(cfg)

    def forward(self, midas_in: Tensor) -> Tensor:
        """As ``MiDaSInference.forward``: relative inverse depth, >= 0, at the input size."""
        h, w = midas_in.shape[-2:]
        if h % PATCH or w % PATCH:
            raise ValueError(f"MiDaS input sides must be multiples of {PATCH}, got {h}x{w}")
        with torch.no_grad():
            depth = self.model(midas_in)  # (B, 1, H, W)
            return F.interpolate(depth, size=(h, w), mode="bicubic", align_corners=False)

    @torch.no_grad()
    def conditioning(
        self, images: Tensor, latent_hw: tuple[int, int], eps: float = TRAINING_EPS
    ) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> the depth channel (B, 1, h, w) in [-1, 1]."""
        midas_in = midas_input(images, self.cfg)
        param = next(self.parameters())
        if param.device.type == "cuda" and param.dtype == torch.float32:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                depth = self(midas_in.to(param.device))
        else:
            depth = self(midas_in.to(param.device, param.dtype))
        return depth_conditioning(depth.float(), latent_hw, eps)

    def train(self, mode: bool = True) -> MiDaS:
        """Always eval mode: the estimator is frozen."""
        return super().train(False)


def build_midas(name: str = "dpt_hybrid", device: torch.device | str | None = None) -> MiDaS:
    """The estimator ``name`` (``dpt_hybrid`` or ``tiny``), randomly initialised, frozen, eval;
    ``device="meta"`` allocates nothing."""
    try:
        cfg = MIDAS_CONFIGS[name]
    except KeyError:
        raise ConfigError(
            f"unknown depth estimator {name!r}; choose from {', '.join(MIDAS_CONFIGS)}",
            key="depth.estimator",
        ) from None
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = MiDaS(cfg)
    model.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Pre- and post-processing, as the original
# ---------------------------------------------------------------------------------------------


def midas_input_size(height: int, width: int, cfg: MidasConfig = MIDAS_CONFIGS["dpt_hybrid"]):
    """``AddMiDaS``' resize: keep the aspect ratio, scale as little as possible so that both
    sides reach ``net_size``, round to a multiple of ``multiple_of``: (H', W')."""
    m, net = cfg.multiple_of, cfg.net_size
    if min(height, width) < m:
        raise DataError(
            f"an image of {width}x{height} px is too small for the depth estimator "
            f"(it needs at least {m} px a side)"
        )
    scale_h, scale_w = net / height, net / width
    if abs(1 - scale_w) < abs(1 - scale_h):
        scale_h = scale_w
    else:
        scale_w = scale_h

    def fit(x: float) -> int:
        y = int(round(x / m) * m)
        return y if y >= net else int(math.ceil(x / m) * m)

    return fit(scale_h * height), fit(scale_w * width)


def midas_input(images: Tensor, cfg: MidasConfig = MIDAS_CONFIGS["dpt_hybrid"]) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> the estimator's input (B, 3, H', W'), as ``AddMiDaS``:
    to [0, 1], bicubic resize (``midas_input_size``), normalised with mean = std = 0.5."""
    size = midas_input_size(int(images.shape[-2]), int(images.shape[-1]), cfg)
    x = (images.float() + 1.0) * 0.5  # (B, 3, H, W) in [0, 1]
    if tuple(x.shape[-2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return (x - 0.5) / 0.5


def depth_conditioning(
    depth: Tensor, latent_hw: tuple[int, int], eps: float = TRAINING_EPS
) -> Tensor:
    """Raw depth (B, 1, H, W) -> (B, 1, h, w) in [-1, 1], as ``LatentDepth2ImageDiffusion.
    get_input``: bicubic resize to the latent size, then per sample
    ``2 (d - min) / (max - min + eps) - 1`` (``eps=0`` as the depth2img scripts)."""
    small = F.interpolate(depth, size=tuple(latent_hw), mode="bicubic", align_corners=False)
    low = torch.amin(small, dim=(1, 2, 3), keepdim=True)
    high = torch.amax(small, dim=(1, 2, 3), keepdim=True)
    return 2.0 * (small - low) / (high - low + eps) - 1.0


# ---------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------


def read_midas_weights(path: files.PathLike) -> dict[str, Tensor]:
    """The estimator's state dict (``model.pretrained.*`` keys) from a MiDaS release file
    (``dpt_hybrid-midas-501f0c75.pt``: ``pretrained.*`` / ``scratch.*``, possibly under
    ``model`` with an ``optimizer``), a depth checkpoint (``depth_model.*``) or a ``.safetensors``
    of either; read with ``weights_only``."""
    path = Path(path)
    files.check_readable(path)
    if path.suffix.lower() == ".safetensors":
        raw: object = files.read_safetensors(path)[0]
    else:
        raw = files.load_torch(path)
    if isinstance(raw, Mapping) and "optimizer" in raw and isinstance(raw.get("model"), Mapping):
        raw = raw["model"]
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"holds a {type(raw).__name__}, not MiDaS weights", path)
    out: dict[str, Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            continue
        if key.startswith("depth_model."):
            out[key.removeprefix("depth_model.")] = value
        elif key.startswith(("pretrained.", "scratch.")):
            out["model." + key] = value
        elif key.startswith(("model.pretrained.", "model.scratch.")):
            out[key] = value
    if not out:
        raise CheckpointError(
            "has no MiDaS weights (no depth_model.*, pretrained.* or scratch.* tensors)", path
        )
    return out
