"""The diffusers model-folder layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) as an adapter beside the original single-file one.

Reading turns a folder into the same ``OriginalCheckpoint`` the original adapter returns (parts
keyed like our modules, i.e. the original layout without prefixes), plus the ``ModelConfig`` the
folder's own ``config.json`` files describe; writing does the reverse. The key mapping is ours,
so sdtrain reads and writes these folders without diffusers installed (diffusers' own converter
goes one way only, original -> diffusers, and needs diffusers; the tests check our mapping against
it). The mapping is derived from the model config, per tensor:

- UNet (``UNet2DConditionModel``): ``input_blocks.N.M`` -> ``down_blocks.L.{resnets,attentions,
  downsamplers}.J``, ``middle_block`` -> ``mid_block``, ``output_blocks`` -> ``up_blocks``,
  ResBlock inner names (``in_layers.0`` -> ``norm1`` ...); spatial transformers keep their names.
- VAE (``AutoencoderKL``): ``encoder.down.L.block.J`` -> ``encoder.down_blocks.L.resnets.J``,
  the decoder's levels reversed, mid-block attention ``q/k/v/proj_out`` 1x1 convs <-> linear
  ``to_q/to_k/to_v/to_out.0``.
- Text (``CLIPTextModel``): SD1 is already the HF layout under ``transformer.``; SD2's open_clip
  tower maps to HF names with the fused ``in_proj`` split into q/k/v. A diffusers SD2 text encoder
  holds only the blocks that run (the penultimate-layer trick is a shorter model), so the skipped
  final block, ``text_projection`` and ``logit_scale`` go to ``text_encoder/sdtrain_extra
  .safetensors``; a folder from elsewhere has none, and those unused tensors read as zeros.
- EMA: ``unet_ema/`` (the diffusers training scripts' name), decay and step count in its config.
- Schedule: ``scheduler/scheduler_config.json`` (DDIM settings of the original sampler); the
  twelve original buffers are recomputed from it on reading.

Files are opened and written only through ``sdtrain.utils.files`` (``weights_only=True`` for
``.bin``, atomic writes, the whole folder renamed into place when complete).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdtrain.diffusion.schedule import DiffusionConfig, NoiseSchedule, make_betas
from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.models.adapters.original import OriginalCheckpoint
from sdtrain.models.autoencoder import AutoencoderConfig, AutoencoderKL, DDConfig
from sdtrain.models.conditioning import conditioning_component, extra_input_channels
from sdtrain.models.config import ModelConfig
from sdtrain.models.text_encoders import FrozenTextEncoder, TextEncoderConfig
from sdtrain.models.unet import UNetConfig, UNetModel
from sdtrain.utils import files
from sdtrain.utils.files import PathLike

__all__ = [
    "MODEL_INDEX",
    "DiffusersFolder",
    "folder_summary",
    "is_diffusers_folder",
    "read_diffusers",
    "read_model_weights",
    "write_diffusers",
]

log = logging.getLogger("sdtrain.models")

MODEL_INDEX = "model_index.json"
DIFFUSERS_VERSION = "0.30.0"
# Pipeline class -> conditioning; also the class written for each conditioning.
PIPELINES = {
    "StableDiffusionPipeline": "txt2img",
    "StableDiffusionImg2ImgPipeline": "txt2img",
    "StableDiffusionInpaintPipeline": "inpainting",
    "StableDiffusionDepth2ImgPipeline": "depth",
}
# component -> (library, accepted class names) and the weight file stem of that library.
_COMPONENTS = {
    "unet": ("diffusers", ("UNet2DConditionModel",)),
    "vae": ("diffusers", ("AutoencoderKL",)),
    "text_encoder": ("transformers", ("CLIPTextModel",)),
    "tokenizer": ("transformers", ("CLIPTokenizer", "CLIPTokenizerFast")),
    "scheduler": ("diffusers", None),  # any scheduler: it only chooses the sampler
}
_WEIGHT_STEM = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}
_BIN_NAME = {"diffusers": "diffusion_pytorch_model.bin", "transformers": "pytorch_model.bin"}
EMA_FOLDER = "unet_ema"
TEXT_EXTRA_FILE = "sdtrain_extra.safetensors"
_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
_MAX_LISTED = 5
# Fields the folder states that change neither weights nor outputs: taken only without a config.
_INFORMATIVE = ("autoencoder.ddconfig.resolution",)


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown


# ---------------------------------------------------------------------------------------------
# Key plans: one entry per original tensor
# ---------------------------------------------------------------------------------------------

# (original key, diffusers keys, how): "same" one tensor; "squeeze" a 1x1 conv stored as a linear
# weight; "split3" a fused q/k/v tensor stored as three; no diffusers keys = kept aside (SD2 text
# tensors a CLIPTextModel has no place for).
_Entry = tuple[str, tuple[str, ...], str]

_RES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_VAE_RES = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _sub(rest: str, names: Mapping[str, str]) -> str:
    for old, new in names.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _unet_name(key: str, cfg: UNetConfig) -> str:
    levels, n = len(cfg.channel_mult), cfg.num_res_blocks
    attn = [2**level in cfg.attention_resolutions for level in range(levels)]
    fixed = {
        "time_embed.0.": "time_embedding.linear_1.",
        "time_embed.2.": "time_embedding.linear_2.",
        "input_blocks.0.0.": "conv_in.",
        "out.0.": "conv_norm_out.",
        "out.2.": "conv_out.",
        "middle_block.1.": "mid_block.attentions.0.",
    }
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if m := re.match(r"middle_block\.([02])\.(.*)", key):
        return f"mid_block.resnets.{int(m[1]) // 2}.{_sub(m[2], _RES)}"
    if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key):
        level, pos = divmod(int(m[1]) - 1, n + 1)
        block = f"down_blocks.{level}"
        if pos == n and m[3].startswith("op."):
            return f"{block}.downsamplers.0.conv.{m[3][3:]}"
        if m[2] == "0":
            return f"{block}.resnets.{pos}.{_sub(m[3], _RES)}"
        return f"{block}.attentions.{pos}.{m[3]}"
    if m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key):
        up, pos = divmod(int(m[1]), n + 1)
        block = f"up_blocks.{up}"
        if m[2] == "0":
            return f"{block}.resnets.{pos}.{_sub(m[3], _RES)}"
        if m[2] == "1" and attn[levels - 1 - up]:
            return f"{block}.attentions.{pos}.{m[3]}"
        return f"{block}.upsamplers.0.{m[3]}"
    raise CheckpointError(f"UNet key {key!r} has no diffusers name")


def _vae_name(key: str, levels: int) -> str:
    if m := re.match(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)", key):
        inner = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}[m[2]]
        rest = _sub(m[3], _VAE_ATTN) if m[2] == "attn_1" else _sub(m[3], _VAE_RES)
        return f"{m[1]}.mid_block.{inner}.{rest}"
    if m := re.match(r"(encoder)\.down\.(\d+)\.(block|downsample)\.(.*)", key) or re.match(
        r"(decoder)\.up\.(\d+)\.(block|upsample)\.(.*)", key
    ):
        level = int(m[2]) if m[1] == "encoder" else levels - 1 - int(m[2])
        blocks = "down_blocks" if m[1] == "encoder" else "up_blocks"
        if m[3] in ("downsample", "upsample"):
            return f"{m[1]}.{blocks}.{level}.{m[3]}rs.0.{m[4]}"
        index, rest = m[4].split(".", 1)
        return f"{m[1]}.{blocks}.{level}.resnets.{index}.{_sub(rest, _VAE_RES)}"
    if m := re.match(r"(encoder|decoder)\.norm_out\.(.*)", key):
        return f"{m[1]}.conv_norm_out.{m[2]}"
    return key  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def _unet_plan(cfg: UNetConfig) -> list[_Entry]:
    return [(key, (_unet_name(key, cfg),), "same") for key in _shapes("unet", cfg)]


def _vae_plan(cfg: AutoencoderConfig) -> list[_Entry]:
    levels = len(cfg.ddconfig.ch_mult)
    plan = []
    for key, shape in _shapes("vae", cfg).items():
        squeeze = ".mid.attn_1." in key and key.endswith(".weight") and len(shape) == 4
        plan.append((key, (_vae_name(key, levels),), "squeeze" if squeeze else "same"))
    return plan


_SD2_BLOCK = {
    "ln_1": "layer_norm1",
    "attn.out_proj": "self_attn.out_proj",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _text_plan(cfg: TextEncoderConfig) -> list[_Entry]:
    plan: list[_Entry] = []
    active = cfg.layers - (1 if cfg.layer == "penultimate" else 0)
    for key in _shapes("text", cfg):
        if cfg.kind == "sd1-clip":
            if not key.endswith("embeddings.position_ids"):  # implied by order; not stored
                plan.append((key, (key.removeprefix("transformer."),), "same"))
            continue
        hf = "text_model."
        if m := re.match(r"model\.transformer\.resblocks\.(\d+)\.(.*)", key):
            if int(m[1]) >= active:
                plan.append((key, (), "extra"))
                continue
            layer = f"{hf}encoder.layers.{m[1]}."
            if m := re.match(r"attn\.in_proj_(weight|bias)", m[2]):
                names = tuple(f"{layer}self_attn.{p}_proj.{m[1]}" for p in "qkv")
                plan.append((key, names, "split3"))
            else:
                rest = key.split(".", 4)[4]
                plan.append((key, (layer + _sub(rest, _SD2_BLOCK),), "same"))
            continue
        names = {
            "model.token_embedding.weight": hf + "embeddings.token_embedding.weight",
            "model.positional_embedding": hf + "embeddings.position_embedding.weight",
            "model.ln_final.weight": hf + "final_layer_norm.weight",
            "model.ln_final.bias": hf + "final_layer_norm.bias",
        }
        plan.append((key, (names[key],), "same") if key in names else (key, (), "extra"))
    return plan


@functools.lru_cache(maxsize=16)
def _shapes_cached(part: str, cfg_json: str) -> dict[str, torch.Size]:
    raw = json.loads(cfg_json)
    with torch.device("meta"):
        if part == "unet":
            module_sd = UNetModel(UNetConfig(**raw)).state_dict()
        elif part == "vae":
            ae = AutoencoderConfig(**{**raw, "ddconfig": DDConfig(**raw["ddconfig"])})
            module_sd = AutoencoderKL(ae).state_dict()
        else:
            module_sd = FrozenTextEncoder(TextEncoderConfig(**raw)).original_state_dict()
    return {key: value.shape for key, value in module_sd.items()}


def _shapes(part: str, cfg: Any) -> dict[str, torch.Size]:
    """Original-layout keys and shapes of a part, from a meta-device build (allocates nothing)."""
    return _shapes_cached(part, json.dumps(dataclasses.asdict(cfg), sort_keys=True))


def _to_diffusers(
    plan: list[_Entry], sd: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    out: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    for key, names, how in plan:
        if key not in sd:
            raise CheckpointError(f"has no {key!r} to convert")
        tensor = sd[key]
        if how == "extra":
            extra[key] = tensor
        elif how == "split3":
            out.update(zip(names, (t.clone() for t in tensor.chunk(3)), strict=True))
        elif how == "squeeze":
            out[names[0]] = tensor.reshape(tensor.shape[:2])
        else:
            out[names[0]] = tensor
    return out, extra


def _expected_shapes(plan: list[_Entry], shapes: Mapping[str, torch.Size]) -> dict[str, list[int]]:
    expected: dict[str, list[int]] = {}
    for key, names, how in plan:
        shape = list(shapes[key])
        if how == "split3":
            shape = [shape[0] // 3, *shape[1:]]
        elif how == "squeeze":
            shape = shape[:2]
        expected.update(dict.fromkeys(names, shape))
    return expected


def _from_diffusers(
    plan: list[_Entry],
    shapes: Mapping[str, torch.Size],
    sd: Mapping[str, Tensor],
    extra: Mapping[str, Tensor],
    where: Path,
    ignore: tuple[str, ...] = (),
) -> dict[str, Tensor]:
    """Original-layout tensors from a diffusers state dict, after checking every key and shape."""
    expected = _expected_shapes(plan, shapes)
    given = {k: v for k, v in sd.items() if k not in ignore}
    missing = [f"{k} {s}" for k, s in expected.items() if k not in given]
    unexpected = [f"{k} {list(v.shape)}" for k, v in given.items() if k not in expected]
    wrong = [
        f"{k} file {list(v.shape)} vs config {expected[k]}"
        for k, v in given.items()
        if k in expected and list(v.shape) != expected[k]
    ]
    problems = [
        f"{len(items)} {label}: {_listed(items)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with the wrong shape", wrong),
        )
        if items
    ]
    if problems:
        raise CheckpointError(
            f"weights do not fit the folder's config.json: {'; '.join(problems)}", where
        )
    out: dict[str, Tensor] = {}
    for key, names, how in plan:
        if how == "extra":
            shape = shapes[key]
            value = extra.get(key)
            out[key] = value if value is not None and value.shape == shape else torch.zeros(shape)
        elif how == "split3":
            out[key] = torch.cat([given[name] for name in names], dim=0)
        elif how == "squeeze":
            out[key] = given[names[0]].reshape(shapes[key])
        else:
            out[key] = given[names[0]]
    return out


# ---------------------------------------------------------------------------------------------
# Configs: ModelConfig <-> the folder's config.json files
# ---------------------------------------------------------------------------------------------


def _heads(cfg: UNetConfig) -> list[int]:
    return [cfg.heads_and_width(cfg.model_channels * mult)[0] for mult in cfg.channel_mult]


def _unet_json(cfg: UNetConfig, sample_size: int) -> dict[str, Any]:
    levels = range(len(cfg.channel_mult))
    attn = [2**level in cfg.attention_resolutions for level in levels]
    heads = _heads(cfg)
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "block_out_channels": [cfg.model_channels * mult for mult in cfg.channel_mult],
        "center_input_sample": False,
        "cross_attention_dim": cfg.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": cfg.in_channels,
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": cfg.out_channels,
        "sample_size": sample_size,
        "transformer_layers_per_block": cfg.transformer_depth,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "use_linear_projection": cfg.use_linear_in_transformer,
    }


def _vae_json(cfg: AutoencoderConfig) -> dict[str, Any]:
    dd = cfg.ddconfig
    if dd.attn_resolutions:
        raise ConfigError(
            "the diffusers AutoencoderKL has attention only in its mid block; this autoencoder "
            "has more and cannot be written as a diffusers folder",
            key="autoencoder.ddconfig.attn_resolutions",
        )
    if cfg.embed_dim != dd.z_channels:
        raise ConfigError(
            f"the diffusers AutoencoderKL needs embed_dim == ddconfig.z_channels, got "
            f"{cfg.embed_dim} and {dd.z_channels}",
            key="autoencoder.embed_dim",
        )
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": [dd.ch * mult for mult in dd.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * len(dd.ch_mult),
        "in_channels": dd.in_channels,
        "latent_channels": dd.z_channels,
        "layers_per_block": dd.num_res_blocks,
        "norm_num_groups": 32,
        "out_channels": dd.out_ch,
        "sample_size": dd.resolution,
        "scaling_factor": cfg.scale_factor,
        "up_block_types": ["UpDecoderBlock2D"] * len(dd.ch_mult),
    }


def _text_json(cfg: TextEncoderConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "attention_dropout": 0.0,
        "bos_token_id": 49406,
        "dropout": 0.0,
        "eos_token_id": 49407,
        "hidden_act": "quick_gelu" if cfg.quick_gelu else "gelu",
        "hidden_size": cfg.width,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": int(cfg.width * cfg.mlp_ratio),
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": cfg.context_length,
        "num_attention_heads": cfg.heads,
        "num_hidden_layers": cfg.layers - (1 if cfg.layer == "penultimate" else 0),
        "pad_token_id": cfg.pad_id,
        "projection_dim": cfg.projection_dim or 512,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "vocab_size": cfg.vocab_size,
    }


def _scheduler_json(cfg: DiffusionConfig) -> dict[str, Any]:
    # The original DDIM sampler's settings: "leading" steps offset by one, the final step's
    # alpha is alphas_cumprod[0], no clipping.
    linear = cfg.schedule == "linear"
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": cfg.linear_end,
        "beta_schedule": "scaled_linear" if linear else "linear",
        "beta_start": cfg.linear_start,
        "clip_sample": False,
        "num_train_timesteps": cfg.timesteps,
        "prediction_type": _PREDICTION[cfg.parameterization],
        "rescale_betas_zero_snr": cfg.zero_terminal_snr,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None if linear else make_betas(cfg).tolist(),
    }


@dataclass
class _Field:
    """One ModelConfig field as the folder states it: its value and where it says so."""

    value: Any
    where: str


def _get(
    conf: Mapping[str, Any], key: str, file: str, default: Any = ..., kind: type | tuple = object
) -> Any:
    if key not in conf:
        if default is ...:
            raise CheckpointError(f"has no {key!r}", file)
        return default
    value = conf[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise CheckpointError(
            f"{key!r} is {value!r}, not a {getattr(kind, '__name__', kind)}", file
        )
    return value


def _require(conf: Mapping[str, Any], key: str, allowed: tuple, file: str, default: Any) -> None:
    value = conf.get(key, default)
    if value not in allowed:
        raise CheckpointError(
            f"{key!r} is {value!r}; sdtrain's Stable Diffusion models support {allowed[0]!r}", file
        )


def _folder_fields(configs: Mapping[str, Any], folder: Path) -> dict[str, _Field]:
    """Every ModelConfig field (dotted) that the folder's config files decide."""
    fields: dict[str, _Field] = {}

    def put(key: str, value: Any, where: str) -> None:
        fields[key] = _Field(value, where)

    u, uf = configs["unet"], str(folder / "unet" / "config.json")
    boc = _get(u, "block_out_channels", uf, kind=list)
    base = boc[0]
    if not boc or any(not isinstance(c, int) or c % base for c in boc):
        raise CheckpointError(f"'block_out_channels' {boc} are not multiples of the first", uf)
    for key, allowed, default in (
        ("act_fn", ("silu",), "silu"),
        ("norm_num_groups", (32,), 32),
        ("flip_sin_to_cos", (True,), True),
        ("freq_shift", (0,), 0),
        ("class_embed_type", (None,), None),
        ("addition_embed_type", (None,), None),
        ("time_embedding_type", ("positional",), "positional"),
        ("center_input_sample", (False,), False),
        ("downsample_padding", (1,), 1),
        ("mid_block_type", ("UNetMidBlock2DCrossAttn", None), None),
        ("encoder_hid_dim", (None,), None),
    ):
        _require(u, key, allowed, uf, default)
    down = _get(u, "down_block_types", uf, kind=list)
    up = _get(u, "up_block_types", uf, kind=list)
    attn_kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    if len(down) != len(boc) or any(t not in attn_kinds for t in down):
        raise CheckpointError(
            f"'down_block_types' {down} are not {len(boc)} of {list(attn_kinds)}", uf
        )
    attn = [attn_kinds[t] for t in down]
    want_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if up != want_up:
        raise CheckpointError(
            f"'up_block_types' {up} do not mirror 'down_block_types' ({want_up})", uf
        )
    depth = _get(u, "transformer_layers_per_block", uf, 1, (int, list))
    if isinstance(depth, list):
        if len(set(depth)) != 1:
            raise CheckpointError(f"'transformer_layers_per_block' {depth} differ per level", uf)
        depth = depth[0]
    heads = u.get("num_attention_heads") or _get(u, "attention_head_dim", uf, 8, (int, list))
    heads = heads if isinstance(heads, list) else [heads] * len(boc)
    put("unet.in_channels", _get(u, "in_channels", uf, kind=int), f"{uf} in_channels")
    put("unet.out_channels", _get(u, "out_channels", uf, kind=int), f"{uf} out_channels")
    put("unet.model_channels", base, f"{uf} block_out_channels")
    put("unet.channel_mult", [c // base for c in boc], f"{uf} block_out_channels")
    put("unet.num_res_blocks", _get(u, "layers_per_block", uf, kind=int), f"{uf} layers_per_block")
    put(
        "unet.attention_resolutions",
        [2**i for i, a in enumerate(attn) if a],
        f"{uf} down_block_types",
    )
    put("unet.transformer_depth", depth, f"{uf} transformer_layers_per_block")
    put(
        "unet.context_dim",
        _get(u, "cross_attention_dim", uf, kind=int),
        f"{uf} cross_attention_dim",
    )
    put(
        "unet.use_linear_in_transformer",
        bool(u.get("use_linear_projection", False)),
        f"{uf} use_linear_projection",
    )
    put("unet.heads", heads, f"{uf} attention_head_dim")

    v, vf = configs["vae"], str(folder / "vae" / "config.json")
    vboc = _get(v, "block_out_channels", vf, kind=list)
    for key, allowed, default in (
        ("act_fn", ("silu",), "silu"),
        ("norm_num_groups", (32,), 32),
        ("mid_block_add_attention", (True,), True),
        ("use_quant_conv", (True,), True),
        ("use_post_quant_conv", (True,), True),
    ):
        _require(v, key, allowed, vf, default)
    for key, kind in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        types = _get(v, key, vf, kind=list)
        if types != [kind] * len(vboc):
            raise CheckpointError(f"{key!r} {types} are not {len(vboc)} x {kind}", vf)
    latent = _get(v, "latent_channels", vf, kind=int)
    put("autoencoder.embed_dim", latent, f"{vf} latent_channels")
    put("autoencoder.ddconfig.z_channels", latent, f"{vf} latent_channels")
    put(
        "autoencoder.scale_factor",
        float(_get(v, "scaling_factor", vf, 0.18215, (int, float))),
        f"{vf} scaling_factor",
    )
    put("autoencoder.ddconfig.in_channels", _get(v, "in_channels", vf, 3, int), f"{vf} in_channels")
    put("autoencoder.ddconfig.out_ch", _get(v, "out_channels", vf, 3, int), f"{vf} out_channels")
    put("autoencoder.ddconfig.ch", vboc[0], f"{vf} block_out_channels")
    put("autoencoder.ddconfig.ch_mult", [c // vboc[0] for c in vboc], f"{vf} block_out_channels")
    put(
        "autoencoder.ddconfig.num_res_blocks",
        _get(v, "layers_per_block", vf, kind=int),
        f"{vf} layers_per_block",
    )
    resolution = _get(v, "sample_size", vf, 256, int)
    put("autoencoder.ddconfig.resolution", resolution, f"{vf} sample_size")
    put("autoencoder.ddconfig.attn_resolutions", [], f"{vf} (attention only in the mid block)")

    t, tf = configs["text_encoder"], str(folder / "text_encoder" / "config.json")
    act = _get(t, "hidden_act", tf, "quick_gelu", str)
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(
            f"'hidden_act' is {act!r}; CLIP text towers use quick_gelu or gelu", tf
        )
    sd1 = act == "quick_gelu"  # OpenAI CLIP ViT-L/14 (SD1) vs OpenCLIP ViT-H/14 (SD2)
    width = _get(t, "hidden_size", tf, kind=int)
    layers = _get(t, "num_hidden_layers", tf, kind=int)
    put("text_encoder.kind", "sd1-clip" if sd1 else "sd2-openclip", f"{tf} hidden_act")
    put("text_encoder.quick_gelu", sd1, f"{tf} hidden_act")
    put("text_encoder.layer", "last" if sd1 else "penultimate", f"{tf} hidden_act")
    put("text_encoder.width", width, f"{tf} hidden_size")
    put("text_encoder.layers", layers + (0 if sd1 else 1), f"{tf} num_hidden_layers")
    put(
        "text_encoder.heads",
        _get(t, "num_attention_heads", tf, kind=int),
        f"{tf} num_attention_heads",
    )
    put(
        "text_encoder.context_length",
        _get(t, "max_position_embeddings", tf, kind=int),
        f"{tf} max_position_embeddings",
    )
    put("text_encoder.vocab_size", _get(t, "vocab_size", tf, kind=int), f"{tf} vocab_size")
    put(
        "text_encoder.mlp_ratio",
        _get(t, "intermediate_size", tf, kind=int) / width,
        f"{tf} intermediate_size",
    )
    put("text_encoder.pad_id", configs["pad_id"], str(folder / "tokenizer") + " pad_token")

    s, sf = configs["scheduler"], str(folder / "scheduler" / "scheduler_config.json")
    prediction = _get(s, "prediction_type", sf, "epsilon", str)
    by_name = {name: ours for ours, name in _PREDICTION.items()}
    if prediction not in by_name:
        raise CheckpointError(f"'prediction_type' {prediction!r} is not one of {list(by_name)}", sf)
    put("diffusion.parameterization", by_name[prediction], f"{sf} prediction_type")
    put(
        "diffusion.timesteps",
        _get(s, "num_train_timesteps", sf, 1000, int),
        f"{sf} num_train_timesteps",
    )
    put(
        "diffusion.zero_terminal_snr",
        bool(s.get("rescale_betas_zero_snr", False)),
        f"{sf} rescale_betas_zero_snr",
    )
    betas = s.get("trained_betas")
    schedule = _get(s, "beta_schedule", sf, "linear", str)
    if betas is None:
        if schedule != "scaled_linear":
            raise CheckpointError(
                f"'beta_schedule' {schedule!r}: only 'scaled_linear' (the original linear "
                "schedule) or explicit 'trained_betas' can be matched to model.diffusion",
                sf,
            )
        put("diffusion.schedule", "linear", f"{sf} beta_schedule")
        put(
            "diffusion.linear_start",
            float(_get(s, "beta_start", sf, kind=(int, float))),
            f"{sf} beta_start",
        )
        put(
            "diffusion.linear_end",
            float(_get(s, "beta_end", sf, kind=(int, float))),
            f"{sf} beta_end",
        )
    else:
        put("diffusion.trained_betas", [float(b) for b in betas], f"{sf} trained_betas")
    return fields


def _consistency(
    fields: Mapping[str, _Field], conditioning: str, pipeline: str, folder: Path
) -> None:
    """Components that contradict each other, named by their files."""
    pairs = [
        ("unet.context_dim", "text_encoder.width"),
        ("unet.out_channels", "autoencoder.embed_dim"),
    ]
    for a, b in pairs:
        fa, fb = fields[a], fields[b]
        if fa.value != fb.value:
            raise CheckpointError(
                f"the components contradict each other: {fa.where} is {fa.value} but "
                f"{fb.where} is {fb.value}; they must be equal",
                folder,
            )
    latent = fields["autoencoder.embed_dim"].value
    need = latent + extra_input_channels(conditioning, latent)
    have = fields["unet.in_channels"].value
    if have != need and not (have == latent and conditioning_component(conditioning).widens_base):
        raise CheckpointError(
            f"{fields['unet.in_channels'].where} is {have} but a {pipeline} with {latent} latent "
            f"channels needs {need}",
            folder,
        )


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[part]
    tree[last] = value


def _build_config(tree: dict[str, Any]) -> ModelConfig:
    ae = tree["autoencoder"]
    return ModelConfig(
        name=tree["name"],
        conditioning=tree["conditioning"],
        unet=UNetConfig(**tree["unet"]),
        autoencoder=AutoencoderConfig(**{**ae, "ddconfig": DDConfig(**ae["ddconfig"])}),
        text_encoder=TextEncoderConfig(**tree["text_encoder"]),
        diffusion=DiffusionConfig(**tree["diffusion"]),
    )


def _heads_config(heads: list[int], cfg: UNetConfig) -> dict[str, int]:
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    if len(set(heads)) == 1:
        return {"num_heads": heads[0], "num_head_channels": -1}
    dims = {w // h for w, h in zip(widths, heads, strict=True)}
    if len(dims) == 1 and all(w % h == 0 for w, h in zip(widths, heads, strict=True)):
        return {"num_heads": -1, "num_head_channels": dims.pop()}
    raise CheckpointError(f"attention heads {heads} per level are neither fixed nor of fixed width")


def model_config_from_folder(
    fields: Mapping[str, _Field],
    conditioning: str,
    name: str,
    base: ModelConfig | None,
    folder: Path,
) -> tuple[ModelConfig, list[str]]:
    """The ModelConfig the folder describes (fields it does not state come from ``base`` or the
    defaults of its text-tower kind) and, given ``base``, its differences from it: one line per
    field, naming both sides. ``in_channels`` narrower than ``base`` (widening) is no difference."""
    if base is None:
        sd1 = fields["text_encoder.kind"].value == "sd1-clip"
        width = fields["text_encoder.width"].value
        tree = dataclasses.asdict(ModelConfig())
        tree["text_encoder"]["projection_dim"] = 0 if sd1 else width
    else:
        tree = dataclasses.asdict(base)
    tree["name"], tree["conditioning"] = name, conditioning
    differences: list[str] = []
    for key, f in fields.items():
        if key in ("unet.heads", "diffusion.trained_betas"):
            continue
        if key in _INFORMATIVE and base is not None:
            continue  # e.g. SD 1.5's VAE says 512 where the original config says 256
        if base is not None:
            ours = functools.reduce(lambda node, part: node[part], key.split("."), tree)
            widening = key == "unet.in_channels" and f.value < ours
            if ours != f.value and not widening and key != "diffusion.parameterization":
                differences.append(
                    f"model.{key} is {ours!r} in the config but {f.where} says {f.value!r}"
                )
        _set(tree, key, f.value)
    if "diffusion.trained_betas" in fields:
        tree["diffusion"]["schedule"] = "cosine" if base is None else tree["diffusion"]["schedule"]
    unet = UNetConfig(**tree["unet"])
    heads = fields["unet.heads"]
    if base is not None and _heads(unet) != heads.value[: len(unet.channel_mult)]:
        differences.append(
            f"model.unet.num_heads/num_head_channels give {_heads(unet)} heads per "
            f"level in the config but {heads.where} says {heads.value}"
        )
    elif base is None:
        tree["unet"].update(_heads_config(heads.value, unet))
    try:
        cfg = _build_config(tree)
    except ConfigError as err:
        raise CheckpointError(f"its config files describe no valid model: {err}", folder) from None
    if "diffusion.trained_betas" in fields:
        given = torch.tensor(fields["diffusion.trained_betas"].value, dtype=torch.float64)
        ours_b = make_betas(cfg.diffusion)
        if given.shape != ours_b.shape or not torch.allclose(given, ours_b, rtol=1e-6):
            differences.append(
                f"model.diffusion gives other betas than {fields['diffusion.trained_betas'].where}"
            )
    return cfg, differences


# ---------------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _bpe() -> Any:
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def tokenizer_files(cfg: TextEncoderConfig) -> dict[str, str]:
    """``CLIPTokenizer`` files with the vocabulary and merges of the BPE bundled in open_clip."""
    bpe = _bpe()
    # open_clip names the two special tokens <start_of_text> / <end_of_text>; HF uses these.
    names = {49406: _BOS, 49407: _EOS}
    vocab = {names.get(i, token): i for token, i in bpe.encoder.items() if i < 49408}
    merges = sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])
    decoder = {i: token for token, i in vocab.items()}
    special = {
        "bos_token": _BOS,
        "eos_token": _EOS,
        "unk_token": _EOS,
        "pad_token": decoder[cfg.pad_id],
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": cfg.context_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def _pad_id(tokenizer_dir: Path) -> int:
    """The pad id the folder's tokenizer uses (SD1: <|endoftext|> 49407, SD2: ! 0)."""
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = tokenizer_dir / name
        if path.is_file():
            conf = files.read_json(path)
            pad = conf.get("pad_token") if isinstance(conf, dict) else None
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if isinstance(pad, str):
                vocab_path = tokenizer_dir / "vocab.json"
                vocab = files.read_json(vocab_path) if vocab_path.is_file() else {}
                vocab = vocab if isinstance(vocab, dict) else {}
                vocab.setdefault(_EOS, 49407)
                if pad not in vocab:
                    raise CheckpointError(f"pad_token {pad!r} is not in the vocabulary", path)
                return int(vocab[pad])
    raise CheckpointError(
        "has no special_tokens_map.json or tokenizer_config.json naming the pad_token",
        tokenizer_dir,
    )


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


@dataclass
class DiffusersFolder:
    """A diffusers folder read into original-layout parts, with the model config it describes."""

    checkpoint: OriginalCheckpoint
    config: ModelConfig
    """The folder's own model (fields it does not state: from the config given, if any)."""
    pipeline: str
    """``_class_name`` of ``model_index.json``."""
    differences: list[str] = field(default_factory=list)
    """Fields where the folder differs from the model config given to ``read_diffusers``."""
    parameterization: str = "eps"
    """What the scheduler's ``prediction_type`` says the UNet predicts."""
    sample_size: int = 512
    """Default image side: the UNet config's ``sample_size`` x the latent downsampling."""


def is_diffusers_folder(path: PathLike) -> bool:
    """A folder with a ``model_index.json``."""
    path = Path(path)
    return path.is_dir() and (path / MODEL_INDEX).is_file()


def _weights_file(component: Path, library: str, variant: str | None) -> Path:
    stem = _WEIGHT_STEM[library]
    bin_stem = _BIN_NAME[library].removesuffix(".bin")
    if variant:
        names = [f"{stem}.{variant}.safetensors", f"{bin_stem}.{variant}.bin"]
    else:
        names = [f"{stem}.safetensors", f"{bin_stem}.bin"]
    for name in names:
        if (component / name).is_file():
            return component / name
    if variant is None:  # only a half-precision variant present (e.g. *.fp16.safetensors)
        found = sorted(component.glob(f"{stem}.*.safetensors")) or sorted(component.glob("*.bin"))
        if len(found) == 1:
            return found[0]
    raise CheckpointError(f"has no weights file (looked for {', '.join(names)})", component)


def _read_weights(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.suffix == ".safetensors":
        return files.read_safetensors(path)
    obj = files.load_torch(path)
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError("is not a flat dict of tensors", path)
    return dict(obj), {}


def read_diffusers(
    folder: PathLike, model: ModelConfig | None = None, variant: str | None = None
) -> DiffusersFolder:
    """Read a diffusers folder; ``model``: the config the weights must fit (differences are
    reported in ``DiffusersFolder.differences``, not raised). ``variant`` picks
    ``*.{variant}.safetensors`` files (default: the plain ones, else the only variant)."""
    folder = Path(folder)
    index_path = folder / MODEL_INDEX
    index = files.read_json(index_path)
    if not isinstance(index, dict):
        raise CheckpointError("is not a JSON object", index_path)
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINES:
        raise CheckpointError(
            f"_class_name {pipeline!r} is not a pipeline sdtrain knows ({', '.join(PIPELINES)})",
            index_path,
        )
    for name, (library, classes) in _COMPONENTS.items():
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1] is not None):
            raise CheckpointError(
                f"has no {name!r} component (a [library, class] pair)", index_path
            )
        if entry[0] != library or (classes is not None and entry[1] not in classes):
            want = f"[{library!r}, {' or '.join(map(repr, classes or ('a scheduler',)))}]"
            raise CheckpointError(f"{name!r} is {entry}, expected {want}", index_path)
    for name in _COMPONENTS:
        if not (folder / name).is_dir():
            raise CheckpointError(
                f"component folder {name}/ is missing (model_index.json names it)", folder
            )
    configs: dict[str, Any] = {}
    for name, file in (
        ("unet", "config.json"),
        ("vae", "config.json"),
        ("text_encoder", "config.json"),
        ("scheduler", "scheduler_config.json"),
    ):
        conf = files.read_json(folder / name / file)
        if not isinstance(conf, dict):
            raise CheckpointError("is not a JSON object", folder / name / file)
        configs[name] = conf
    configs["pad_id"] = _pad_id(folder / "tokenizer")
    fields = _folder_fields(configs, folder)
    conditioning = PIPELINES[pipeline]
    _consistency(fields, conditioning, pipeline, folder)
    cfg, differences = model_config_from_folder(fields, conditioning, folder.name, model, folder)
    # Weights in the folder's own shapes (a 4-channel UNet stays 4 channels: loading widens).
    own = dataclasses.replace(cfg.unet, in_channels=fields["unet.in_channels"].value)
    ckpt = OriginalCheckpoint(path=folder)
    unet_file = _weights_file(folder / "unet", "diffusers", variant)
    unet_sd, metadata = _read_weights(unet_file)
    ckpt.unet = _from_diffusers(_unet_plan(own), _shapes("unet", own), unet_sd, {}, unet_file)
    step = metadata.get("global_step")
    ckpt.global_step = int(step) if step and step.isdigit() else None
    ckpt.metadata = {k: v for k, v in metadata.items() if k not in ("format", "global_step")}
    vae_file = _weights_file(folder / "vae", "diffusers", variant)
    ckpt.vae = _from_diffusers(
        _vae_plan(cfg.autoencoder),
        _shapes("vae", cfg.autoencoder),
        _read_weights(vae_file)[0],
        {},
        vae_file,
    )
    text_file = _weights_file(folder / "text_encoder", "transformers", variant)
    extra_file = folder / "text_encoder" / TEXT_EXTRA_FILE
    extra = files.read_safetensors(extra_file)[0] if extra_file.is_file() else {}
    position_ids = "text_model.embeddings.position_ids"  # saved by transformers <= 4.30
    text = _from_diffusers(
        _text_plan(cfg.text_encoder),
        _shapes("text", cfg.text_encoder),
        _read_weights(text_file)[0],
        extra,
        text_file,
        ignore=(position_ids,),
    )
    if cfg.text_encoder.kind == "sd1-clip":
        positions = torch.arange(cfg.text_encoder.context_length).unsqueeze(0)
        text["transformer.text_model.embeddings.position_ids"] = positions
    ckpt.text = {key: text[key] for key in _shapes("text", cfg.text_encoder)}  # original order
    ema_dir = folder / EMA_FOLDER
    if ema_dir.is_dir():
        ema_file = _weights_file(ema_dir, "diffusers", variant)
        ckpt.ema = _from_diffusers(
            _unet_plan(own), _shapes("unet", own), _read_weights(ema_file)[0], {}, ema_file
        )
        ema_conf = files.read_json(ema_dir / "config.json")
        ema_conf = ema_conf if isinstance(ema_conf, dict) else {}
        ckpt.ema_meta = {
            "decay": torch.tensor(float(ema_conf.get("decay", 0.9999)), dtype=torch.float32),
            "num_updates": torch.tensor(
                int(ema_conf.get("optimization_step", 0)), dtype=torch.int32
            ),
        }
    ckpt.schedule = NoiseSchedule(cfg.diffusion).original_buffers()
    objective = fields["diffusion.parameterization"].value
    size = (
        _get(configs["unet"], "sample_size", "unet/config.json", 64, int) * cfg.latent_downsampling
    )
    return DiffusersFolder(ckpt, cfg, pipeline, differences, objective, size)


def read_model_weights(
    path: PathLike, model: ModelConfig, *, same_objective: bool = False
) -> OriginalCheckpoint:
    """Weights for ``model`` from an original-layout file or a diffusers folder, as one
    ``OriginalCheckpoint`` (``StableDiffusion.load_original`` widens and loads it strictly).

    A folder whose config files differ from ``model`` is refused, each difference named; its
    scheduler's ``prediction_type`` must equal ``model.diffusion.parameterization`` when
    ``same_objective`` (sampling), else a differing one is logged (fine-tuning eps -> v).
    """
    from sdtrain.models.adapters.original import read_checkpoint

    if not is_diffusers_folder(path):
        if Path(path).is_dir():
            raise CheckpointError(
                f"is a folder without {MODEL_INDEX}, so not a diffusers model folder", path
            )
        return read_checkpoint(path)
    read = read_diffusers(path, model)
    differences = list(read.differences)
    ours = model.diffusion.parameterization
    if read.parameterization != ours:
        line = (
            f"model.diffusion.parameterization is {ours!r} in the config but "
            f"{Path(path) / 'scheduler' / 'scheduler_config.json'} prediction_type says "
            f"{_PREDICTION[read.parameterization]!r}"
        )
        if same_objective:
            differences.append(line)
        else:
            log.warning("%s: training the configured objective from these weights", line)
    if differences:
        raise CheckpointError(
            f"does not fit the model config {model.name!r}: " + "; ".join(differences), path
        )
    return read.checkpoint


def folder_summary(read: DiffusersFolder) -> str:
    """A few lines for ``sdtrain checkpoint inspect`` on a diffusers folder."""
    from sdtrain.models.adapters.original import summarize

    c = read.config
    lines = [
        summarize(read.checkpoint),
        f"  diffusers pipeline: {read.pipeline} ({c.conditioning}, "
        f"{read.parameterization} objective)",
        f"  text tower: {c.text_encoder.kind}, width {c.text_encoder.width}, "
        f"{c.text_encoder.layers} layers",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _cast(sd: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    if dtype is None:
        return dict(sd)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def write_diffusers(
    out: PathLike,
    cfg: ModelConfig,
    *,
    unet: Mapping[str, Tensor],
    vae: Mapping[str, Tensor],
    text: Mapping[str, Tensor],
    ema: Mapping[str, Tensor] | None = None,
    ema_decay: float = 0.9999,
    ema_num_updates: int = 0,
    global_step: int | None = None,
    dtype: str | None = None,
    sample_size: int | None = None,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a diffusers folder that ``StableDiffusionPipeline`` (inpainting: the inpaint
    pipeline, depth: the depth-to-image pipeline) loads with ``from_pretrained(out)``.

    Parts are original-layout dicts without prefixes (``StableDiffusion.original_parts()``);
    ``dtype`` ``fp16|bf16|fp32`` casts the floating-point weights (default: as given);
    ``sample_size`` is the UNet's default latent size (default: the autoencoder resolution / f).
    """
    out = Path(out)
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype] if dtype else None
    try:
        unet_d, _ = _to_diffusers(_unet_plan(cfg.unet), unet)
        ema_d = _to_diffusers(_unet_plan(cfg.unet), ema)[0] if ema is not None else None
        vae_d, _ = _to_diffusers(_vae_plan(cfg.autoencoder), vae)
        text_d, text_extra = _to_diffusers(_text_plan(cfg.text_encoder), text)
    except CheckpointError as err:
        raise CheckpointError(
            f"cannot be written as a diffusers folder: {err.message}", out
        ) from None
    size = sample_size or cfg.autoencoder.ddconfig.resolution // cfg.latent_downsampling
    written_dtype = torch_dtype or next(iter(unet_d.values())).dtype
    pipeline = conditioning_component(cfg.conditioning).diffusers_pipeline
    if pipeline not in PIPELINES:
        raise CheckpointError(
            f"a {cfg.conditioning!r} model cannot be written as a diffusers folder yet "
            f"({pipeline} folders are not supported); export the original layout",
            out,
        )
    index: dict[str, Any] = {
        "_class_name": pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if pipeline == "StableDiffusionDepth2ImgPipeline":
        index = {
            k: v for k, v in index.items() if k not in ("safety_checker", "requires_safety_checker")
        }
        index["depth_estimator"] = [None, None]
    metadata = {"format": "pt", **dict(extra_metadata or {})}
    if global_step is not None:
        metadata["global_step"] = str(int(global_step))
    unet_json = _unet_json(cfg.unet, size)
    vae_json = _vae_json(cfg.autoencoder)

    def fill(tmp: Path) -> None:
        files.write_json(tmp / MODEL_INDEX, index)
        for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            (tmp / name).mkdir()
        files.write_json(tmp / "unet" / "config.json", unet_json)
        files.write_safetensors(
            tmp / "unet" / "diffusion_pytorch_model.safetensors",
            _cast(unet_d, torch_dtype),
            metadata,
        )
        files.write_json(tmp / "vae" / "config.json", vae_json)
        files.write_safetensors(
            tmp / "vae" / "diffusion_pytorch_model.safetensors",
            _cast(vae_d, torch_dtype),
            {"format": "pt"},
        )
        files.write_json(
            tmp / "text_encoder" / "config.json", _text_json(cfg.text_encoder, written_dtype)
        )
        files.write_safetensors(
            tmp / "text_encoder" / "model.safetensors", _cast(text_d, torch_dtype), {"format": "pt"}
        )
        if text_extra:
            files.write_safetensors(
                tmp / "text_encoder" / TEXT_EXTRA_FILE,
                _cast(text_extra, torch_dtype),
                {"format": "pt"},
            )
        for name, text_file in tokenizer_files(cfg.text_encoder).items():
            files.write_text(tmp / "tokenizer" / name, text_file)
        files.write_json(
            tmp / "scheduler" / "scheduler_config.json", _scheduler_json(cfg.diffusion)
        )
        if ema_d is not None:
            (tmp / EMA_FOLDER).mkdir()
            ema_json = {
                **unet_json,
                "decay": float(ema_decay),
                "optimization_step": int(ema_num_updates),
            }
            files.write_json(tmp / EMA_FOLDER / "config.json", ema_json)
            files.write_safetensors(
                tmp / EMA_FOLDER / "diffusion_pytorch_model.safetensors",
                _cast(ema_d, torch_dtype),
                {"format": "pt"},
            )

    return files.write_folder_atomic(out, fill)
