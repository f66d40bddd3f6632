"""The Stable Diffusion 1.x / 2.x latent UNet, key-for-key compatible with the original checkpoints.

The module tree mirrors the original ``openaimodel.UNetModel``, so ``state_dict()`` has exactly
the original keys without the ``model.diffusion_model.`` prefix (``input_blocks.N.M...``,
``middle_block``, ``output_blocks``, ``time_embed``, ``out``). SD1 and SD2 differ only in config:
conv vs linear ``proj_in`` / ``proj_out``, ``num_heads`` vs ``num_head_channels`` and the context
width. Base, inpainting (9 channels) and depth (5 channels) differ only in ``in_channels``. The x4
upscaler (7 channels) adds a class-label embedding (``num_classes``; ``label_emb`` fed the noise
level ``y``, added to the timestep embedding) and per-level ``disable_self_attentions``: there
``attn1`` attends to the text context instead of the tokens themselves, as the original.

Every block takes ``(x, emb, context)`` so that a block list is a plain loop, with no dispatch on
layer type; each block uses what it needs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdtrain.errors import ConfigError
from sdtrain.utils.checks import require_finite, require_range

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class UNetConfig:
    """The original ``unet_config.params``, under the original names."""

    in_channels: int = 4
    """4 for base models, 9 for inpainting (latent, mask, masked-image latent), 5 for depth."""
    out_channels: int = 4
    """Latent channels predicted (eps or v)."""
    model_channels: int = 320
    """Channel count of the first level; level ``i`` has ``model_channels * channel_mult[i]``."""
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2, 1])
    """Downsampling factors (1, 2, 4, ...) at which spatial transformers are inserted."""
    num_res_blocks: int = 2
    """ResBlocks per level on the way down (one more on the way up)."""
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    """Channel multiplier per resolution level."""
    num_heads: int = 8
    """Fixed head count (SD1: 8); ignored when ``num_head_channels`` is set (SD2 sets -1)."""
    num_head_channels: int = -1
    """Fixed head width (SD2: 64); -1 = use ``num_heads``. Takes precedence, as in the original."""
    transformer_depth: int = 1
    """Transformer blocks per spatial transformer."""
    context_dim: int = 768
    """Width of the text-encoder states fed to cross-attention (SD1: 768, SD2: 1024)."""
    use_linear_in_transformer: bool = False
    """SD2: linear ``proj_in`` / ``proj_out`` on tokens; SD1: 1x1 convs before flattening."""
    use_checkpoint: bool = False
    """Gradient checkpointing of every ResBlock and spatial transformer while training."""
    dropout: float = 0.0
    """Dropout inside ResBlocks and feed-forwards."""
    num_classes: int | None = None
    """Class-label embedding ``label_emb`` (x4 upscaler: 1000, fed the noise level as ``y``);
    None = no labels (every other SD model)."""
    disable_self_attentions: list[bool] | None = None
    """Per level (``channel_mult`` position): True makes that level's transformers' ``attn1``
    attend to the text context instead of the tokens (x4 upscaler: [T, T, T, F]); None = never."""
    disable_middle_self_attn: bool = False
    """The same for the middle block's transformer."""
    # Keys the original configs carry that change neither the keys nor the maths here.
    image_size: int | None = None
    """Only informative (the original used it for nothing at these settings)."""
    use_fp16: bool = False
    """Only changed the input dtype in the original; use mixed precision instead."""
    legacy: bool = False
    """Changes neither keys nor outputs when spatial transformers are used."""
    use_spatial_transformer: bool = True
    """Always true for Stable Diffusion; false is not supported."""
    num_heads_upsample: int = -1
    """Unused by spatial-transformer UNets."""
    conv_resample: bool = True
    """Learned 3x3 convs when down/upsampling (all SD configs)."""
    dims: int = 2
    """Only 2-D UNets are supported."""
    use_scale_shift_norm: bool = False
    """FiLM-style timestep conditioning; not used by Stable Diffusion, not supported."""
    resblock_updown: bool = False
    """ResBlock-based resampling; not used by Stable Diffusion, not supported."""

    def __post_init__(self) -> None:
        require_finite(self)
        unsupported = {
            "use_spatial_transformer": (self.use_spatial_transformer, True),
            "conv_resample": (self.conv_resample, True),
            "dims": (self.dims, 2),
            "use_scale_shift_norm": (self.use_scale_shift_norm, False),
            "resblock_updown": (self.resblock_updown, False),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise ConfigError(f"only {supported!r} is supported, got {value!r}", key=key)
        if self.num_heads < 1 and self.num_head_channels < 1:
            raise ConfigError(
                "set num_heads (SD1: 8) or num_head_channels (SD2: 64); both are unset",
                key="num_heads",
            )
        if not self.channel_mult:
            raise ConfigError("needs at least one level", key="channel_mult")
        for key in ("num_heads", "num_head_channels", "num_heads_upsample"):
            if getattr(self, key) < 1 and getattr(self, key) != -1:
                raise ConfigError(f"must be >= 1 or -1 (unset), got {getattr(self, key)}", key=key)
        require_range(self, "channel_mult", "context_dim", low=1)
        if self.num_classes is not None and self.num_classes < 1:
            raise ConfigError(f"must be >= 1 or null, got {self.num_classes}", key="num_classes")
        if self.disable_self_attentions is not None and len(self.disable_self_attentions) != len(
            self.channel_mult
        ):
            raise ConfigError(
                f"has {len(self.disable_self_attentions)} entries but channel_mult has "
                f"{len(self.channel_mult)} levels",
                key="disable_self_attentions",
            )
        require_range(self, "dropout", low=0, high=1, high_open=True)
        if self.image_size is not None:
            require_range(self, "image_size", low=1, note="informative only; or null")
        if self.model_channels < 32 or self.model_channels % 32:
            raise ConfigError(
                f"{self.model_channels} is not a multiple of 32 (GroupNorm uses 32 groups)",
                key="model_channels",
            )
        for mult in self.channel_mult:
            channels = self.model_channels * mult
            by_width = self.num_head_channels > 0
            divisor = self.num_head_channels if by_width else self.num_heads
            if channels % divisor:
                raise ConfigError(
                    f"level width {channels} is not divisible by {divisor}",
                    key="num_head_channels" if by_width else "num_heads",
                )
        levels = {2**i for i in range(len(self.channel_mult))}
        for res in self.attention_resolutions:
            if res not in levels:
                raise ConfigError(
                    f"{res} is not a downsampling factor of this UNet ({sorted(levels)})",
                    key="attention_resolutions",
                )
        for key in ("in_channels", "out_channels", "num_res_blocks", "transformer_depth"):
            if getattr(self, key) < 1:
                raise ConfigError("must be >= 1", key=key)

    def self_attention_disabled(self, level: int) -> bool:
        """Whether the transformers of ``level`` attend to the context in ``attn1``."""
        return bool(self.disable_self_attentions and self.disable_self_attentions[level])

    def heads_and_width(self, channels: int) -> tuple[int, int]:
        """(heads, dim_head) of a spatial transformer at ``channels``, derived as the original."""
        if self.num_head_channels > 0:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


# ---------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as the original ``GroupNorm32``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding ``cat([cos(t f), sin(t f)])``, ``f_i = max_period^(-i / half)``."""
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * steps / half)  # (half,)
    args = timesteps[:, None].float() * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2*half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class InputConv(nn.Conv2d):
    """``input_blocks.0.0``: the 3x3 conv from latent (+ conditioning) channels to model width."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (``op``), padding 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.op(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv (``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class ResBlock(nn.Module):
    """norm-SiLU-conv, + projected timestep embedding, norm-SiLU-dropout-conv, + skip."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(32, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            GroupNorm32(32, out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]  # per-channel timestep bias
        h = self.out_layers(h)  # (B, C_out, H, W)
        return self.skip_connection(x) + h


class Attention(nn.Module):
    """Multi-head attention with the original ``to_q/to_k/to_v/to_out.0`` layout, through SDPA."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int, dropout: float):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N|L, inner)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v
        )  # (B, heads, N, dim_head), scale dim_head^-0.5
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, query_dim)


class GEGLU(nn.Module):
    """``proj`` to 2x inner width, split into (x, gate) in that order, ``x * gelu(gate)``."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """``net = [GEGLU, Dropout, Linear]`` with inner width 4 x dim."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(dropout), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention on the text context, GEGLU feed-forward.

    With ``disable_self_attn`` the first attention attends to the text context too (x4 upscaler).
    """

    def __init__(
        self, dim: int, heads: int, dim_head: int, context_dim: int, dropout: float,
        disable_self_attn: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = Attention(dim, context_dim if disable_self_attn else dim, heads, dim_head,
                               dropout)  # fmt: skip
        self.ff = FeedForward(dim, dropout)
        self.attn2 = Attention(dim, context_dim, heads, dim_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, ``proj_in``, transformer blocks over the H*W tokens, ``proj_out``, + input."""

    def __init__(
        self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
        linear: bool, dropout: float, disable_self_attn: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        # Registration order matches the original so state_dict() lists keys in the same order.
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout, disable_self_attn)
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        _, _, height, width = x.shape
        h = self.norm(x)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_in(h)  # (B, inner, H, W)
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C|inner)
        if self.linear:
            h = self.proj_in(h)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)  # (B, HW, C)
        # (B, HW, C) -> (B, C, H, W) is a view with channels-last strides; copy it to plain
        # NCHW, or every later op (``+ x``, cat, convs, GroupNorm) inherits channels-last and runs
        # its slower CPU kernels for the rest of the UNet.
        h = h.transpose(1, 2).unflatten(2, (height, width)).contiguous()  # (B, C|inner, H, W)
        if not self.linear:
            h = self.proj_out(h)  # (B, C, H, W)
        return h + x


class TimestepEmbedSequential(nn.ModuleList):
    """A block of the UNet: its layers applied in turn, each given ``(x, emb, context)``."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, checkpointed: bool = False
    ) -> torch.Tensor:
        for layer in self:
            if checkpointed and isinstance(layer, (ResBlock, SpatialTransformer)):
                x = checkpoint(layer, x, emb, context, use_reentrant=False)
            else:
                x = layer(x, emb, context)
        return x


# ---------------------------------------------------------------------------------------------
# The UNet
# ---------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """``forward(x, timesteps, context) -> eps or v prediction`` with the original module tree."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = cfg.use_checkpoint
        mc = cfg.model_channels
        emb_dim = 4 * mc

        def transformer(channels: int, disable_self_attn: bool) -> SpatialTransformer:
            heads, dim_head = cfg.heads_and_width(channels)
            return SpatialTransformer(
                channels, heads, dim_head, cfg.transformer_depth, cfg.context_dim,
                cfg.use_linear_in_transformer, cfg.dropout, disable_self_attn,
            )  # fmt: skip

        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.label_emb = (
            nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes is not None else None
        )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential([InputConv(cfg.in_channels, mc, 3, padding=1)])]
        )
        skip_channels = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * mc, cfg.dropout)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, cfg.self_attention_disabled(level)))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            [
                ResBlock(ch, emb_dim, ch, cfg.dropout),
                transformer(ch, cfg.disable_middle_self_attn),
                ResBlock(ch, emb_dim, ch, cfg.dropout),
            ]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mc * mult, cfg.dropout)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch, cfg.self_attention_disabled(level)))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(
            GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
        )
        self.init_weights()

    def init_weights(self) -> None:
        """Zero the layers the original zero-initialises, so that every residual branch starts as
        the identity: ResBlock ``out_layers.3``, spatial-transformer ``proj_out`` and ``out.2``."""
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero_(module.out_layers[3])
            elif isinstance(module, SpatialTransformer):
                zero_(module.proj_out)
        zero_(self.out[2])

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute ResBlocks and spatial transformers in the backward pass to save memory."""
        self.gradient_checkpointing = enabled

    def blocks(self) -> Iterator[TimestepEmbedSequential]:
        """All blocks in execution order (input, middle, output)."""
        yield from self.input_blocks
        yield self.middle_block
        yield from self.output_blocks

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, in_channels, h, w) latents (+ conditioning); timesteps (B,); context (B, L, D);
        y (B,) int64 class labels (x4 upscaler: the noise level), only with ``num_classes``."""
        checkpointed = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        t_emb = timestep_embedding(timesteps, self.config.model_channels)  # (B, mc)
        emb = self.time_embed(t_emb.to(self.time_embed[0].weight.dtype))  # (B, 4 mc)
        if self.label_emb is not None:
            if y is None:
                raise ValueError(
                    f"this UNet has a class-label embedding (num_classes "
                    f"{self.config.num_classes}) and needs y (the x4 upscaler's noise level)"
                )
            emb = emb + self.label_emb(y)  # (B, 4 mc)
        elif y is not None:
            raise ValueError("y was given but this UNet has no class labels (num_classes: null)")
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context, checkpointed)
            skips.append(h)
        h = self.middle_block(h, emb, context, checkpointed)  # (B, C_max, h/2^L, w/2^L)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context, checkpointed)
        return self.out(h)  # (B, out_channels, h, w)


def zero_(module: nn.Module) -> None:
    """Set all parameters of ``module`` to zero in place."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()


def unet_config_from_params(params: Mapping | UNetConfig) -> UNetConfig:
    """Turn an original ``unet_config.params`` mapping into a checked ``UNetConfig``."""
    if isinstance(params, UNetConfig):
        return params
    known = {f.name for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(
            f"unknown UNet parameter(s) {unknown}; known: {sorted(known)}", key=unknown[0]
        )
    values = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in params.items()}
    return UNetConfig(**values)


def build_unet(params: Mapping | UNetConfig) -> UNetModel:
    """Build the UNet from the original ``unet_config.params`` names (or a ``UNetConfig``)."""
    return UNetModel(unet_config_from_params(params))
