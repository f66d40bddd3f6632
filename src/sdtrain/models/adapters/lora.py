"""LoRA files as an adapter: the kohya / A1111 layout, the diffusers layout, and merging.

In memory a LoRA is ``dict[module path, LoraWeights]``, keyed by the *original* UNet module path
(``input_blocks.1.1.transformer_blocks.0.attn1.to_q``) with ``down`` (``r x in`` or a conv
``r x in x kh x kw``), ``up`` (``out x r`` or ``out x r x 1 x 1``) and ``alpha``; the change it
makes to the module's weight is ``(alpha / r) * up @ down`` (``delta``). This module turns that
into file layouts and back, and merges it into a UNet state dict. It never opens files itself:
``read_lora`` / ``write_lora`` go through ``sdtrain.utils.files``.

A file may also hold a LoRA of the text encoder (``LoraParts.text_encoder``). Its modules are
named by their Hugging Face ``CLIPTextModel`` path for both text encoders
(``text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj``, ``.mlp.fc1`` / ``.mlp.fc2``): that
is how kohya's sd-scripts, A1111, ComfyUI and diffusers name them, SD 2's OpenCLIP tower
included (its fused ``in_proj`` is three of these modules, q / k / v in that order).
``merge_text_encoder_into`` maps them onto the original ``cond_stage_model`` layout of either.

Layouts:

- ``kohya`` (what ComfyUI and A1111 read): ``lora_unet_<module path, '.' -> '_'>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha`` (a float32 scalar). The underscores make the name ambiguous, so
  reading resolves it against the module paths the model actually has.
- ``diffusers`` (what ``StableDiffusionPipeline.load_lora_weights`` reads, the peft naming):
  ``unet.<diffusers module path>.lora_A.weight`` / ``.lora_B.weight``. diffusers reads the alpha
  from the ``lora_adapter_metadata`` header when there is one and otherwise takes ``alpha = r``,
  so ``lora_B`` is written pre-multiplied by ``alpha / r`` and the header says ``alpha = r``:
  every diffusers version then computes the same ``delta``.
- Text-encoder parts: ``lora_te_<HF path, '.' -> '_'>.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha`` (kohya) and ``text_encoder.<HF path>.lora_A.weight`` / ``.lora_B.weight`` (diffusers,
  its header's ``text_encoder.*`` entries written like the UNet's; read with or without the
  ``text_model.`` that newer transformers leave out).
- LoHa adapters (``kind: loha``) are written in the LyCORIS naming
  (``lora_unet_<path>.hada_w1_a`` ... ``.alpha``); only LoRA files are read back.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from sdtrain.errors import CheckpointError
from sdtrain.models.unet import UNetConfig
from sdtrain.utils import files
from sdtrain.utils.files import PathLike

__all__ = [
    "DIFFUSERS_PREFIX",
    "DIFFUSERS_TE_PREFIX",
    "KOHYA_PREFIX",
    "KOHYA_TE_PREFIX",
    "LoraFormat",
    "LoraParts",
    "LoraWeights",
    "detect_layout",
    "diffusers_module_path",
    "from_diffusers",
    "from_diffusers_text_encoder",
    "from_kohya",
    "from_kohya_text_encoder",
    "kohya_name",
    "kohya_te_name",
    "lora_file_parts",
    "merge_into",
    "merge_text_encoder_into",
    "read_lora",
    "read_lora_parts",
    "read_text_encoder_lora",
    "split_parts",
    "text_encoder_lora_paths",
    "to_diffusers",
    "to_kohya",
    "write_lora",
]

KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "unet."
KOHYA_TE_PREFIX = "lora_te_"
DIFFUSERS_TE_PREFIX = "text_encoder."
# The modules of one CLIP text block a text-encoder LoRA may name (HF CLIPTextModel paths).
TE_BLOCK_MODULES = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "mlp.fc1", "mlp.fc2",
)  # fmt: skip
_TE_PATH = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.[qkv]_proj|"
                      r"self_attn\.out_proj|mlp\.fc[12])")  # fmt: skip
_TE_SUBMODULE = {m.replace(".", "_"): m for m in TE_BLOCK_MODULES}
_KOHYA_TE_NAME = re.compile(r"lora_te_text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|"
                            r"self_attn_out_proj|mlp_fc[12])")  # fmt: skip
METADATA_KEY = "lora_adapter_metadata"  # diffusers' header key for the peft LoraConfig
LoraFormat = Literal["kohya", "diffusers"]
_MAX_LISTED = 5


@dataclass
class LoraWeights:
    """One module's LoRA: ``delta W = (alpha / rank) * up @ down``."""

    down: Tensor
    """(r, in) for a linear layer, (r, in, kh, kw) for a conv."""
    up: Tensor
    """(out, r) for a linear layer, (out, r, 1, 1) for a conv."""
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float = 1.0) -> Tensor:
        """The change to the module's weight, in the weight's shape, float32."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)  # (out, r), (r, in*k)
        product = (up @ down).reshape(self.up.shape[0], *self.down.shape[1:])
        return product * (scale * self.alpha / self.rank)


@dataclass
class LoraParts:
    """What one LoRA file holds: a UNet part and a text-encoder part (either may be empty)."""

    unet: dict[str, LoraWeights] = field(default_factory=dict)
    """By original UNet module path."""
    text_encoder: dict[str, LoraWeights] = field(default_factory=dict)
    """By HF ``CLIPTextModel`` module path (``text_model.encoder.layers.0.self_attn.q_proj``)."""


def kohya_name(path: str) -> str:
    """``input_blocks.1.1.proj_in`` -> ``lora_unet_input_blocks_1_1_proj_in``."""
    return KOHYA_PREFIX + path.replace(".", "_")


def kohya_te_name(path: str) -> str:
    """``text_model.encoder.layers.0.mlp.fc1`` ->
    ``lora_te_text_model_encoder_layers_0_mlp_fc1``."""
    return KOHYA_TE_PREFIX + path.replace(".", "_")


def text_encoder_lora_paths(layers: int) -> list[str]:
    """The HF module paths a text-encoder LoRA of ``layers`` (run) blocks may name."""
    return [f"text_model.encoder.layers.{n}.{m}" for n in range(layers) for m in TE_BLOCK_MODULES]


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def to_kohya(
    lora: Mapping[str, LoraWeights], text_encoder: Mapping[str, LoraWeights] | None = None
) -> dict[str, Tensor]:
    """The kohya / A1111 key layout (contiguous float tensors; alpha as a float32 scalar); the
    text-encoder part, when given, under ``lora_te_``."""
    _check_te_paths(text_encoder or {})
    named = [(kohya_name(p), w) for p, w in lora.items()]
    named += [(kohya_te_name(p), w) for p, w in (text_encoder or {}).items()]
    out: dict[str, Tensor] = {}
    for name, weights in named:
        out[f"{name}.lora_down.weight"] = weights.down.detach().contiguous()
        out[f"{name}.lora_up.weight"] = weights.up.detach().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(weights.alpha), dtype=torch.float32)
    return out


def split_parts(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A LoRA state dict's UNet keys, and its text-encoder keys (``lora_te_`` or
    ``text_encoder.``)."""
    te_prefixes = (KOHYA_TE_PREFIX, DIFFUSERS_TE_PREFIX)
    unet = {k: v for k, v in sd.items() if not k.startswith(te_prefixes)}
    return unet, {k: v for k, v in sd.items() if k.startswith(te_prefixes)}


def from_kohya(sd: Mapping[str, Tensor], module_paths: Iterable[str]) -> dict[str, LoraWeights]:
    """Read the kohya layout; names are resolved against ``module_paths`` (the model's)."""
    by_name = {kohya_name(path): path for path in module_paths}
    grouped = _kohya_groups(sd)
    unknown = sorted(name for name in grouped if name not in by_name)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} LoRA module name(s) match no module of this UNet: "
            f"{_listed(unknown)} (is it a LoRA for another model, or for the text encoder?)"
        )
    return {by_name[name]: _kohya_weights(name, parts) for name, parts in grouped.items()}


def from_kohya_text_encoder(sd: Mapping[str, Tensor]) -> dict[str, LoraWeights]:
    """Read the ``lora_te_`` keys, keyed by HF module path (the names parse unambiguously)."""
    grouped = _kohya_groups(sd)
    out = {}
    for name, parts in grouped.items():
        m = _KOHYA_TE_NAME.fullmatch(name)
        if not m:
            raise CheckpointError(
                f"text-encoder LoRA module {name!r} is none of the CLIP text block's "
                "lora_te_text_model_encoder_layers_<N>_{self_attn_q/k/v/out_proj, mlp_fc1/fc2}"
                " (an SDXL file's lora_te1_ / lora_te2_ or a LoRA on other layers is not read)"
            )
        path = f"text_model.encoder.layers.{m[1]}.{_TE_SUBMODULE[m[2]]}"
        out[path] = _kohya_weights(name, parts)
    return out


def _kohya_groups(sd: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        grouped.setdefault(name, {})[part] = value
    return grouped


def _kohya_weights(name: str, parts: Mapping[str, Tensor]) -> LoraWeights:
    down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
    if down is None or up is None:
        raise CheckpointError(
            f"{name} has {sorted(parts)}, not lora_down.weight + lora_up.weight "
            "(only LoRA files are read, not LoHa / LoKr)"
        )
    alpha = parts.get("alpha")
    rank = int(down.shape[0])
    return LoraWeights(down, up, float(alpha.item()) if alpha is not None else rank)


def to_diffusers(
    lora: Mapping[str, LoraWeights],
    diffusers_path: Callable[[str], str],
    text_encoder: Mapping[str, LoraWeights] | None = None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The diffusers (peft) layout and its header; ``diffusers_path`` maps a module path. The
    text-encoder part, when given, goes under ``text_encoder.`` with its own header entries
    (diffusers builds the text encoder's peft config from them whenever the header exists)."""
    text_encoder = text_encoder or {}
    _check_te_paths(text_encoder)
    out: dict[str, Tensor] = {}
    config: dict[str, object] = {}
    parts = (("unet", DIFFUSERS_PREFIX, lora, diffusers_path),
             ("text_encoder", DIFFUSERS_TE_PREFIX, text_encoder, lambda p: p))  # fmt: skip
    for part, prefix, weights_by_path, to_name in parts:
        if not weights_by_path:
            continue
        for path, weights in weights_by_path.items():
            name = prefix + to_name(path)
            out[f"{name}.lora_A.weight"] = weights.down.detach().contiguous()
            up = weights.up.detach() * (weights.alpha / weights.rank)
            out[f"{name}.lora_B.weight"] = up.contiguous()
        ranks = {weights.rank for weights in weights_by_path.values()}
        rank = ranks.pop() if len(ranks) == 1 else max(ranks, default=0)
        # Newer transformers flatten CLIPTextModel (no ``text_model.``): a target without it
        # matches either, as peft matches a target as the end of a module path.
        targets = sorted({to_name(path).removeprefix("text_model.") for path in weights_by_path})
        part_config = {"r": rank, "lora_alpha": rank, "target_modules": targets,
                       "init_lora_weights": True}  # fmt: skip
        # One rank per part here, so rank_pattern / alpha_pattern stay empty.
        config.update({f"{part}.{k}": v for k, v in part_config.items()})
    return out, {METADATA_KEY: json.dumps(config)}


def from_diffusers(
    sd: Mapping[str, Tensor], metadata: Mapping[str, str], original_path: Mapping[str, str]
) -> dict[str, LoraWeights]:
    """Read the diffusers layout; ``original_path`` maps diffusers module paths back to ours."""
    alpha_over_rank = _diffusers_scale(metadata)
    grouped = _diffusers_groups(sd, DIFFUSERS_PREFIX)
    unknown = sorted(name for name in grouped if name not in original_path)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} LoRA module name(s) match no module of this UNet: {_listed(unknown)}"
        )
    return {original_path[name]: _diffusers_weights(name, parts, alpha_over_rank.get(name, 1.0))
            for name, parts in grouped.items()}  # fmt: skip


def from_diffusers_text_encoder(
    sd: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> dict[str, LoraWeights]:
    """Read the ``text_encoder.`` keys, keyed by HF module path (``text_model.`` optional)."""
    alpha_over_rank = _diffusers_scale(metadata, "text_encoder")
    out = {}
    for name, parts in _diffusers_groups(sd, DIFFUSERS_TE_PREFIX).items():
        path = name if name.startswith("text_model.") else "text_model." + name
        if not _TE_PATH.fullmatch(path):
            raise CheckpointError(
                f"text-encoder LoRA module {DIFFUSERS_TE_PREFIX}{name} is none of the CLIP text "
                "block's text_model.encoder.layers.<N>.{self_attn.q/k/v/out_proj, mlp.fc1/fc2}"
            )
        scale = alpha_over_rank.get(path.removeprefix("text_model."), 1.0)
        out[path] = _diffusers_weights(name, parts, scale)
    return out


def _diffusers_groups(sd: Mapping[str, Tensor], prefix: str) -> dict[str, dict[str, Tensor]]:
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            raise CheckpointError(f"key {key!r} is not under {prefix!r}")
        stem = key.removeprefix(prefix)
        for part in ("lora_A.weight", "lora_B.weight"):
            if stem.endswith("." + part):
                grouped.setdefault(stem[: -len(part) - 1], {})[part] = value
                break
        else:
            raise CheckpointError(f"key {key!r} is neither a lora_A nor a lora_B weight")
    return grouped


def _diffusers_weights(name: str, parts: Mapping[str, Tensor], alpha_over_rank: float):
    if len(parts) != 2:
        raise CheckpointError(f"{name} lacks its lora_A or lora_B weight")
    down, up = parts["lora_A.weight"], parts["lora_B.weight"]
    return LoraWeights(down, up, int(down.shape[0]) * alpha_over_rank)


def _diffusers_scale(metadata: Mapping[str, str], part: str = "unet") -> dict[str, float]:
    """alpha / r per diffusers module of ``part`` from the header (empty: diffusers' default, 1);
    text-encoder targets are keyed without ``text_model.``."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
        rank, alpha = config.get(f"{part}.r"), config.get(f"{part}.lora_alpha")
        targets = config.get(f"{part}.target_modules") or []
    except (ValueError, AttributeError):
        raise CheckpointError(f"its {METADATA_KEY} header is not a JSON object") from None
    if not rank or alpha is None or isinstance(targets, str):
        return {}
    return {name.removeprefix("text_model."): float(alpha) / float(rank) for name in targets}


def detect_layout(sd: Mapping[str, Tensor]) -> LoraFormat:
    """Which layout a LoRA state dict (UNet and / or text-encoder keys) is in (a
    CheckpointError when neither)."""
    keys = list(sd)
    if keys and all(k.startswith((KOHYA_PREFIX, KOHYA_TE_PREFIX)) for k in keys):
        return "kohya"
    if keys and all(k.startswith((DIFFUSERS_PREFIX, DIFFUSERS_TE_PREFIX)) for k in keys):
        return "diffusers"
    sample = _listed(keys) if keys else "no tensors at all"
    raise CheckpointError(
        f"is not a UNet LoRA file (nor a text-encoder one): expected keys starting with "
        f"{KOHYA_PREFIX!r} / {KOHYA_TE_PREFIX!r} (kohya / A1111) or {DIFFUSERS_PREFIX!r} / "
        f"{DIFFUSERS_TE_PREFIX!r} (diffusers, not mixed with kohya keys); found {sample}"
    )


def diffusers_module_path(unet_cfg: UNetConfig) -> Callable[[str], str]:
    """Original UNet module path -> diffusers ``UNet2DConditionModel`` module path, by the
    diffusers folder adapter's key mapping (``input_blocks.1.1.proj_in`` ->
    ``down_blocks.0.attentions.0.proj_in``)."""
    from sdtrain.models.adapters.diffusers import _unet_name

    return lambda path: _unet_name(f"{path}.weight", unet_cfg).removesuffix(".weight")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def read_lora(
    path: PathLike,
    module_paths: Iterable[str],
    diffusers_path: Callable[[str], str] | None = None,
) -> dict[str, LoraWeights]:
    """Read a kohya- or diffusers-layout ``.safetensors`` LoRA's UNet part, keyed by our module
    paths (a text-encoder part is left to ``read_lora_parts``)."""
    return read_lora_parts(path, module_paths, diffusers_path).unet


def read_lora_parts(
    path: PathLike,
    module_paths: Iterable[str],
    diffusers_path: Callable[[str], str] | None = None,
) -> LoraParts:
    """Read a kohya- or diffusers-layout ``.safetensors`` LoRA: its UNet part keyed by our
    module paths and its text-encoder part keyed by HF module path."""
    path = Path(path)
    sd, metadata = _read_file(path)
    paths = list(module_paths)
    try:
        layout = detect_layout(sd)
        unet_sd, te_sd = split_parts(sd)
        if layout == "kohya":
            return LoraParts(from_kohya(unet_sd, paths), from_kohya_text_encoder(te_sd))
        if diffusers_path is None and unet_sd:
            raise CheckpointError("is in the diffusers layout, which this model cannot map")
        unet = {}
        if unet_sd:
            assert diffusers_path is not None
            unet = from_diffusers(unet_sd, metadata, {diffusers_path(p): p for p in paths})
        return LoraParts(unet, from_diffusers_text_encoder(te_sd, metadata))
    except CheckpointError as err:
        raise err.at(path) from None


def read_text_encoder_lora(path: PathLike) -> dict[str, LoraWeights]:
    """Read only a LoRA file's text-encoder part (empty when it has none), by HF module path."""
    path = Path(path)
    sd, metadata = _read_file(path)
    try:
        layout = detect_layout(sd)
        te_sd = split_parts(sd)[1]
        if layout == "kohya":
            return from_kohya_text_encoder(te_sd)
        return from_diffusers_text_encoder(te_sd, metadata)
    except CheckpointError as err:
        raise err.at(path) from None


def lora_file_parts(path: PathLike) -> frozenset[str]:
    """Which parts a LoRA file holds: a subset of ``{"unet", "text_encoder"}`` (read from its
    key names only; a file in neither layout is a CheckpointError)."""
    path = Path(path)
    sd, _ = _read_file(path)
    try:
        detect_layout(sd)
    except CheckpointError as err:
        raise err.at(path) from None
    unet, te = split_parts(sd)
    return frozenset(name for name, part in (("unet", unet), ("text_encoder", te)) if part)


def _read_file(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError("LoRA files are read as .safetensors only", path)
    files.check_readable(path)
    return files.read_safetensors(path)


def write_lora(
    path: PathLike,
    lora: Mapping[str, LoraWeights],
    layout: LoraFormat = "kohya",
    diffusers_path: Callable[[str], str] | None = None,
    metadata: Mapping[str, str] | None = None,
    text_encoder: Mapping[str, LoraWeights] | None = None,
) -> Path:
    """Atomically write ``lora`` (and the text-encoder part ``text_encoder``, by HF module path)
    as ``.safetensors`` in ``layout`` (umask respected)."""
    path = Path(path)
    if layout == "kohya":
        sd, header = to_kohya(lora, text_encoder), {}
    else:
        assert diffusers_path is not None or not lora
        sd, header = to_diffusers(lora, diffusers_path or (lambda p: p), text_encoder)
    return files.write_safetensors(path, sd, {"format": "pt", **header, **(metadata or {})})


# ---------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------


def check_shapes(lora: Mapping[str, LoraWeights], weights: Mapping[str, Tensor]) -> None:
    """Every LoRA module must name a weight ``<path>.weight`` of the shape its delta has."""
    missing = sorted(path for path in lora if f"{path}.weight" not in weights)
    if missing:
        raise CheckpointError(
            f"{len(missing)} LoRA module(s) name no weight of this UNet: {_listed(missing)}"
        )
    wrong = []
    for path, lw in lora.items():
        target = weights[f"{path}.weight"].shape
        out_in = (lw.up.shape[0], *lw.down.shape[1:])
        if lw.up.shape[1] != lw.rank or tuple(out_in) != tuple(target):
            wrong.append(
                f"{kohya_name(path)}: up {list(lw.up.shape)} @ down {list(lw.down.shape)} vs "
                f"weight {list(target)}"
            )
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} LoRA module(s) do not fit this UNet's shapes ({_listed(wrong)}); "
            "is the LoRA for another model (e.g. SD 2 on SD 1.5)?"
        )


def merge_into(
    unet: Mapping[str, Tensor], lora: Mapping[str, LoraWeights], scale: float = 1.0
) -> dict[str, Tensor]:
    """A copy of ``unet`` with ``W + scale * (alpha / r) * up @ down`` for every LoRA module."""
    check_shapes(lora, unet)
    out = dict(unet)
    for path, weights in lora.items():
        key = f"{path}.weight"
        base = unet[key]
        out[key] = (base.float() + weights.delta(scale).to(base.device)).to(base.dtype)
    return out


def merge_text_encoder_into(
    text: Mapping[str, Tensor],
    lora: Mapping[str, LoraWeights],
    kind: str,
    scale: float = 1.0,
) -> dict[str, Tensor]:
    """A copy of the original-layout text-encoder tensors ``text`` (keys without
    ``cond_stage_model.``, as ``FrozenTextEncoder.original_state_dict()``) with a text-encoder
    LoRA (HF module paths) merged as ``W + scale * (alpha / r) * up @ down``.

    ``kind`` is the text encoder's (``sd1-clip``: the HF keys themselves under
    ``transformer.``; ``sd2-openclip``: q / k / v are the first / second / third rows of the
    block's fused ``attn.in_proj_weight``, out_proj / fc1 / fc2 its ``attn.out_proj`` /
    ``mlp.c_fc`` / ``mlp.c_proj``). A module naming no weight, or whose delta has another shape
    (a LoRA of another text encoder), is a CheckpointError naming it."""
    _check_te_paths(lora)
    targets = {path: _original_te_target(path, kind) for path in lora}
    missing = sorted(kohya_te_name(p) for p, (key, _) in targets.items() if key not in text)
    if missing:
        raise CheckpointError(
            f"{len(missing)} text-encoder LoRA module(s) name no weight of this {kind} text "
            f"encoder: {_listed(missing)}; is the LoRA for another model (e.g. SD 2 on SD 1.5)?"
        )
    wrong = []
    for path, lw in lora.items():
        key, third = targets[path]
        shape = tuple(text[key].shape)
        if third is not None:
            shape = (shape[0] // 3, *shape[1:])
        if lw.up.shape[1] != lw.rank or (lw.up.shape[0], *lw.down.shape[1:]) != shape:
            wrong.append(f"{kohya_te_name(path)}: up {list(lw.up.shape)} @ down "
                         f"{list(lw.down.shape)} vs weight {list(shape)}")  # fmt: skip
    if wrong:
        raise CheckpointError(
            f"{len(wrong)} text-encoder LoRA module(s) do not fit this {kind} text encoder's "
            f"shapes ({_listed(wrong)}); is the LoRA for another model (e.g. SD 2 on SD 1.5)?"
        )
    out = dict(text)
    for path, weights in lora.items():
        key, third = targets[path]
        base = out[key]
        delta = weights.delta(scale).to(base.device)
        if third is None:
            out[key] = (base.float() + delta).to(base.dtype)
        else:
            rows = base.shape[0] // 3
            merged = base.float().clone()
            merged[third * rows : (third + 1) * rows] += delta
            out[key] = merged.to(base.dtype)
    return out


_SD2_TE_TARGET = {
    "self_attn.q_proj": ("attn.in_proj_weight", 0),
    "self_attn.k_proj": ("attn.in_proj_weight", 1),
    "self_attn.v_proj": ("attn.in_proj_weight", 2),
    "self_attn.out_proj": ("attn.out_proj.weight", None),
    "mlp.fc1": ("mlp.c_fc.weight", None),
    "mlp.fc2": ("mlp.c_proj.weight", None),
}


def _original_te_target(path: str, kind: str) -> tuple[str, int | None]:
    """The original-layout key of a text-encoder LoRA module, and which third of it."""
    if kind == "sd1-clip":
        return f"transformer.{path}.weight", None
    m = _TE_PATH.fullmatch(path)
    assert m, path  # _check_te_paths ran
    key, third = _SD2_TE_TARGET[m[2]]
    return f"model.transformer.resblocks.{m[1]}.{key}", third


def _check_te_paths(lora: Mapping[str, LoraWeights]) -> None:
    bad = sorted(path for path in lora if not _TE_PATH.fullmatch(path))
    if bad:
        raise CheckpointError(
            f"{len(bad)} text-encoder LoRA module path(s) are not HF CLIPTextModel paths "
            f"text_model.encoder.layers.<N>.<{'|'.join(TE_BLOCK_MODULES)}>: {_listed(bad)}"
        )


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown
