"""AutoencoderKL (f=8, 4 latent channels): the first stage of Stable Diffusion.

The module tree mirrors the original ``ldm.models.autoencoder.AutoencoderKL`` and its
``Encoder`` / ``Decoder``, so ``state_dict()`` has the original keys without the
``first_stage_model.`` prefix (``encoder.down.N.block.M...``, ``decoder.up...``, ``quant_conv``,
``post_quant_conv``). ``encode`` returns a diagonal Gaussian posterior with logvar clamped to
[-30, 20]; latents fed to the UNet are ``posterior.sample() * scale_factor``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sdtrain.errors import ConfigError
from sdtrain.utils.checks import require_finite, require_range

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class DDConfig:
    """The original ``ddconfig`` (encoder / decoder shape), under the original names."""

    double_z: bool = True
    """The encoder predicts mean and logvar (2 x z_channels); always true for AutoencoderKL."""
    z_channels: int = 4
    """Channels at the bottleneck, before ``quant_conv``."""
    resolution: int = 256
    """Nominal training resolution; only used to place ``attn_resolutions``."""
    in_channels: int = 3
    """Image channels in."""
    out_ch: int = 3
    """Image channels out."""
    ch: int = 128
    """Width of the first level."""
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    """Width multiplier per level; ``len(ch_mult) - 1`` halvings (f=8 for four levels)."""
    num_res_blocks: int = 2
    """ResNet blocks per encoder level (decoder: one more)."""
    attn_resolutions: list[int] = field(default_factory=list)
    """Resolutions (in pixels of ``resolution``) that get an attention block; empty for SD."""
    dropout: float = 0.0
    """Dropout inside ResNet blocks."""

    def __post_init__(self) -> None:
        require_finite(self)
        if not self.double_z:
            raise ConfigError(
                "AutoencoderKL needs double_z: true (mean and logvar)", key="double_z"
            )
        if not self.ch_mult:
            raise ConfigError("needs at least one level", key="ch_mult")
        require_range(self, "ch", "ch_mult", "attn_resolutions", low=1)
        require_range(self, "dropout", low=0, high=1, high_open=True)
        for mult in self.ch_mult:
            if (self.ch * mult) % 32:
                raise ConfigError(
                    f"level width {self.ch * mult} is not a multiple of 32 (GroupNorm: 32 groups)",
                    key="ch_mult",
                )
        for key in ("z_channels", "in_channels", "out_ch", "num_res_blocks", "resolution"):
            if getattr(self, key) < 1:
                raise ConfigError("must be >= 1", key=key)


@dataclass
class AutoencoderConfig:
    """The first-stage model: ``ddconfig``, ``embed_dim`` and the latent scale factor."""

    embed_dim: int = 4
    """Latent channels the diffusion model sees (after ``quant_conv``)."""
    scale_factor: float = 0.18215
    """Latents are multiplied by this before diffusion (0.18215 for SD1 and SD2)."""
    ddconfig: DDConfig = field(default_factory=DDConfig)
    """Encoder / decoder shape."""

    @property
    def downsampling_factor(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.ddconfig.ch_mult) - 1)

    def __post_init__(self) -> None:
        require_finite(self)
        if self.embed_dim < 1:
            raise ConfigError("must be >= 1", key="embed_dim")
        if not self.scale_factor > 0:
            raise ConfigError("must be > 0", key="scale_factor")


# ---------------------------------------------------------------------------------------------
# Posterior
# ---------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """The encoder's posterior ``N(mean, exp(logvar))`` with logvar clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, z, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """``mean + std * noise``: what training encodes images to (before the scale factor)."""
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        """The mean, for deterministic encoding."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL to the standard normal, summed over C, H, W: shape (B,)."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def swish(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)`` written out as the original does: ``F.silu`` differs in the last bits."""
    return x * torch.sigmoid(x)


def normalize(channels: int) -> nn.GroupNorm:
    """The VAE's GroupNorm: 32 groups, eps 1e-6."""
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm-swish-conv, norm-swish-dropout-conv, + (1x1 ``nin_shortcut`` when widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, 1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over H*W with 1x1-conv q, k, v and ``proj_out``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C), scale C^-0.5
        h = h[:, 0].transpose(1, 2).unflatten(2, (height, width))  # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Pad (0, 1, 0, 1) then a stride-2 3x3 conv without padding, as the original."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class Level(nn.Module):
    """One resolution level: ``block`` (ResNet blocks) each followed by its ``attn`` if any."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if self.attn:
                h = self.attn[i](h)
        return h


class DownLevel(Level):
    """An encoder level; ``downsample`` halves the resolution except at the last level."""

    def __init__(self) -> None:
        super().__init__()
        self.downsample: nn.Module = nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.run_blocks(h))


class UpLevel(Level):
    """A decoder level; ``upsample`` doubles the resolution except at the first level."""

    def __init__(self) -> None:
        super().__init__()
        self.upsample: nn.Module = nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.run_blocks(h))


class MidBlock(nn.Module):
    """ResNet block, attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2 z, H/f, W/f)."""

    def __init__(self, cfg: DDConfig) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res = cfg.resolution
        width = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            down = DownLevel()
            for _ in range(cfg.num_res_blocks):
                down.block.append(ResnetBlock(width, cfg.ch * mult, cfg.dropout))
                width = cfg.ch * mult
                if res in cfg.attn_resolutions:
                    down.attn.append(AttnBlock(width))
            if level != len(cfg.ch_mult) - 1:
                down.downsample = Downsample(width)
                res //= 2
            self.down.append(down)
        self.mid = MidBlock(width, cfg.dropout)
        self.norm_out = normalize(width)
        self.conv_out = nn.Conv2d(width, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for down in self.down:
            h = down(h)
        h = self.mid(h)  # (B, C_max, H/f, W/f)
        return self.conv_out(swish(self.norm_out(h)))  # (B, 2 z, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, h f, w f)."""

    def __init__(self, cfg: DDConfig) -> None:
        super().__init__()
        width = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, width, 3, padding=1)
        self.mid = MidBlock(width, cfg.dropout)
        levels: list[UpLevel] = []
        for level in reversed(range(len(cfg.ch_mult))):
            up = UpLevel()
            for _ in range(cfg.num_res_blocks + 1):
                up.block.append(ResnetBlock(width, cfg.ch * cfg.ch_mult[level], cfg.dropout))
                width = cfg.ch * cfg.ch_mult[level]
                if res in cfg.attn_resolutions:
                    up.attn.append(AttnBlock(width))
            if level != 0:
                up.upsample = Upsample(width)
                res *= 2
            levels.insert(0, up)
        # Stored lowest level first, as the original, but run from the deepest level up.
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(width)
        self.conv_out = nn.Conv2d(width, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))  # (B, C_max, h, w)
        for up in reversed(self.up):
            h = up(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_ch, h f, w f)


# ---------------------------------------------------------------------------------------------
# AutoencoderKL
# ---------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """``encode(x) -> DiagonalGaussian``, ``decode(z) -> image``; images in [-1, 1]."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        self.config = cfg
        dd = cfg.ddconfig
        self.encoder = Encoder(dd)
        self.decoder = Decoder(dd)
        self.quant_conv = nn.Conv2d(2 * dd.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, dd.z_channels, 1)

    @property
    def scale_factor(self) -> float:
        return self.config.scale_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1] -> posterior over (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w) unscaled latents -> (B, 3, h f, w f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruction from a posterior sample, and the posterior (for first-stage training)."""
        posterior = self.encode(x)
        return self.decode(posterior.sample()), posterior


def build_autoencoder(
    ddconfig: Mapping | DDConfig, embed_dim: int, **kwargs: float
) -> AutoencoderKL:
    """Build AutoencoderKL from the original ``ddconfig`` names and ``embed_dim``.

    ``kwargs`` may carry ``scale_factor``. Unknown ``ddconfig`` keys are an error naming the key.
    """
    if not isinstance(ddconfig, DDConfig):
        known = {f.name for f in dataclasses.fields(DDConfig)}
        unknown = sorted(set(ddconfig) - known)
        if unknown:
            raise ConfigError(f"unknown ddconfig key(s) {unknown}", key=f"ddconfig.{unknown[0]}")
        ddconfig = DDConfig(
            **{k: list(v) if isinstance(v, tuple) else v for k, v in ddconfig.items()}
        )
    return AutoencoderKL(AutoencoderConfig(embed_dim=embed_dim, ddconfig=ddconfig, **kwargs))
