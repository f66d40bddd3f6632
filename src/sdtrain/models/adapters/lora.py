"""LoRA files as an adapter: the kohya / A1111 layout, the diffusers layout, and merging.

In memory a LoRA is ``dict[module path, LoraWeights]``, keyed by the *original* UNet module path
(``input_blocks.1.1.transformer_blocks.0.attn1.to_q``) with ``down`` (``r x in`` or a conv
``r x in x kh x kw``), ``up`` (``out x r`` or ``out x r x 1 x 1``) and ``alpha``; the change it
makes to the module's weight is ``(alpha / r) * up @ down`` (``delta``). This module turns that
into file layouts and back, and merges it into a UNet state dict. It never opens files itself:
``read_lora`` / ``write_lora`` go through ``sdtrain.utils.files``.

Layouts:

- ``kohya`` (what ComfyUI and A1111 read): ``lora_unet_<module path, '.' -> '_'>.lora_down.weight``,
  ``.lora_up.weight``, ``.alpha`` (a float32 scalar). The underscores make the name ambiguous, so
  reading resolves it against the module paths the model actually has.
- ``diffusers`` (what ``StableDiffusionPipeline.load_lora_weights`` reads, the peft naming):
  ``unet.<diffusers module path>.lora_A.weight`` / ``.lora_B.weight``. diffusers reads the alpha
  from the ``lora_adapter_metadata`` header when there is one and otherwise takes ``alpha = r``,
  so ``lora_B`` is written pre-multiplied by ``alpha / r`` and the header says ``alpha = r``:
  every diffusers version then computes the same ``delta``.
- LoHa adapters (``kind: loha``) are written in the LyCORIS naming
  (``lora_unet_<path>.hada_w1_a`` ... ``.alpha``); only LoRA files are read back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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
    "KOHYA_PREFIX",
    "LoraFormat",
    "LoraWeights",
    "detect_layout",
    "diffusers_module_path",
    "from_diffusers",
    "from_kohya",
    "kohya_name",
    "merge_into",
    "read_lora",
    "to_diffusers",
    "to_kohya",
    "write_lora",
]

KOHYA_PREFIX = "lora_unet_"
DIFFUSERS_PREFIX = "unet."
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


def kohya_name(path: str) -> str:
    """``input_blocks.1.1.proj_in`` -> ``lora_unet_input_blocks_1_1_proj_in``."""
    return KOHYA_PREFIX + path.replace(".", "_")


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def to_kohya(lora: Mapping[str, LoraWeights]) -> dict[str, Tensor]:
    """The kohya / A1111 key layout (contiguous float tensors; alpha as a float32 scalar)."""
    out: dict[str, Tensor] = {}
    for path, weights in lora.items():
        name = kohya_name(path)
        out[f"{name}.lora_down.weight"] = weights.down.detach().contiguous()
        out[f"{name}.lora_up.weight"] = weights.up.detach().contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(weights.alpha), dtype=torch.float32)
    return out


def from_kohya(sd: Mapping[str, Tensor], module_paths: Iterable[str]) -> dict[str, LoraWeights]:
    """Read the kohya layout; names are resolved against ``module_paths`` (the model's)."""
    by_name = {kohya_name(path): path for path in module_paths}
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        grouped.setdefault(name, {})[part] = value
    unknown = sorted(name for name in grouped if name not in by_name)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} LoRA module name(s) match no module of this UNet: "
            f"{_listed(unknown)} (is it a LoRA for another model, or for the text encoder?)"
        )
    out = {}
    for name, parts in grouped.items():
        down, up = parts.get("lora_down.weight"), parts.get("lora_up.weight")
        if down is None or up is None:
            raise CheckpointError(
                f"{name} has {sorted(parts)}, not lora_down.weight + lora_up.weight "
                "(only LoRA files are read, not LoHa / LoKr)"
            )
        alpha = parts.get("alpha")
        rank = int(down.shape[0])
        out[by_name[name]] = LoraWeights(
            down, up, float(alpha.item()) if alpha is not None else rank
        )
    return out


def to_diffusers(
    lora: Mapping[str, LoraWeights], diffusers_path: Callable[[str], str]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The diffusers (peft) layout and its header; ``diffusers_path`` maps a module path."""
    out: dict[str, Tensor] = {}
    ranks = {weights.rank for weights in lora.values()}
    for path, weights in lora.items():
        name = DIFFUSERS_PREFIX + diffusers_path(path)
        out[f"{name}.lora_A.weight"] = weights.down.detach().contiguous()
        up = weights.up.detach() * (weights.alpha / weights.rank)
        out[f"{name}.lora_B.weight"] = up.contiguous()
    rank = ranks.pop() if len(ranks) == 1 else max(ranks, default=0)
    targets = sorted({diffusers_path(path) for path in lora})
    config = {"r": rank, "lora_alpha": rank, "target_modules": targets, "init_lora_weights": True}
    # One rank per file here, so rank_pattern / alpha_pattern stay empty.
    header = {METADATA_KEY: json.dumps({f"unet.{k}": v for k, v in config.items()})}
    return out, header


def from_diffusers(
    sd: Mapping[str, Tensor], metadata: Mapping[str, str], original_path: Mapping[str, str]
) -> dict[str, LoraWeights]:
    """Read the diffusers layout; ``original_path`` maps diffusers module paths back to ours."""
    alpha_over_rank = _diffusers_scale(metadata)
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        if not key.startswith(DIFFUSERS_PREFIX):
            raise CheckpointError(
                f"key {key!r} is not under {DIFFUSERS_PREFIX!r} (only UNet LoRAs are read)"
            )
        stem = key.removeprefix(DIFFUSERS_PREFIX)
        for part in ("lora_A.weight", "lora_B.weight"):
            if stem.endswith("." + part):
                grouped.setdefault(stem[: -len(part) - 1], {})[part] = value
                break
        else:
            raise CheckpointError(f"key {key!r} is neither a lora_A nor a lora_B weight")
    unknown = sorted(name for name in grouped if name not in original_path)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} LoRA module name(s) match no module of this UNet: {_listed(unknown)}"
        )
    out = {}
    for name, parts in grouped.items():
        if len(parts) != 2:
            raise CheckpointError(f"{name} lacks its lora_A or lora_B weight")
        down, up = parts["lora_A.weight"], parts["lora_B.weight"]
        rank = int(down.shape[0])
        out[original_path[name]] = LoraWeights(down, up, rank * alpha_over_rank.get(name, 1.0))
    return out


def _diffusers_scale(metadata: Mapping[str, str]) -> dict[str, float]:
    """alpha / r per diffusers module from the header (empty: diffusers' default, 1)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
        rank, alpha = config.get("unet.r"), config.get("unet.lora_alpha")
        targets = config.get("unet.target_modules") or []
    except (ValueError, AttributeError):
        raise CheckpointError(f"its {METADATA_KEY} header is not a JSON object") from None
    if not rank or alpha is None or isinstance(targets, str):
        return {}
    return {name: float(alpha) / float(rank) for name in targets}


def detect_layout(sd: Mapping[str, Tensor]) -> LoraFormat:
    """Which layout a LoRA state dict is in (a CheckpointError when neither)."""
    keys = list(sd)
    if keys and all(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    if keys and all(k.startswith(DIFFUSERS_PREFIX) for k in keys):
        return "diffusers"
    sample = _listed(keys) if keys else "no tensors at all"
    raise CheckpointError(
        f"is not a UNet LoRA file: expected keys starting with {KOHYA_PREFIX!r} (kohya / A1111) "
        f"or {DIFFUSERS_PREFIX!r} (diffusers); found {sample}"
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
    """Read a kohya- or diffusers-layout ``.safetensors`` LoRA, keyed by our module paths."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise CheckpointError("LoRA files are read as .safetensors only", path)
    files.check_readable(path)
    sd, metadata = files.read_safetensors(path)
    paths = list(module_paths)
    try:
        if detect_layout(sd) == "kohya":
            return from_kohya(sd, paths)
        if diffusers_path is None:
            raise CheckpointError("is in the diffusers layout, which this model cannot map")
        return from_diffusers(sd, metadata, {diffusers_path(p): p for p in paths})
    except CheckpointError as err:
        raise err.at(path) from None


def write_lora(
    path: PathLike,
    lora: Mapping[str, LoraWeights],
    layout: LoraFormat = "kohya",
    diffusers_path: Callable[[str], str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Atomically write ``lora`` as ``.safetensors`` in ``layout`` (umask respected)."""
    path = Path(path)
    if layout == "kohya":
        sd, header = to_kohya(lora), {}
    else:
        assert diffusers_path is not None
        sd, header = to_diffusers(lora, diffusers_path)
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


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown
