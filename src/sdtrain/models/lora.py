"""Low-rank adapters on the UNet through peft: LoRA, LoHa and LoKr (``finetune.lora``).

``add_adapter`` wraps the UNet's target layers in peft adapter layers (``inject_adapter_in_model``,
no hand-written LoRA layers) and freezes everything else, so the optimiser, the EMA and the
training checkpoints see the adapter parameters only (``<module path>.lora_A.default.weight`` ...).
``adapter_weights`` gives a LoRA back as ``{module path: LoraWeights}`` for the file layouts in
``models.adapters.lora``; ``load_adapter_weights`` puts one in (``init_lora=``);
``merge_adapter`` folds every adapter into its base weight and removes the wrappers, leaving a
plain ``UNetModel`` whose ``state_dict()`` is the original layout again.

Targets are regular expressions over the UNet's module paths (the original ones,
``input_blocks.1.1.transformer_blocks.0.attn1.to_q``), matched in full, or the names of the
groups in ``TARGET_GROUPS``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.models.adapters.lora import (
    LoraWeights,
    diffusers_module_path,
    kohya_name,
    merge_into,
    read_lora,
)
from sdtrain.models.unet import UNetModel
from sdtrain.utils.checks import require_finite

__all__ = [
    "ADAPTER_NAME",
    "TARGET_GROUPS",
    "AdapterKind",
    "LoraConfig",
    "adaptable_modules",
    "adapter_state",
    "adapter_weights",
    "add_adapter",
    "apply_lora_file",
    "load_adapter_state",
    "load_adapter_weights",
    "merge_adapter",
    "resolve_targets",
    "scale_adapter",
]

ADAPTER_NAME = "default"
AdapterKind = Literal["lora", "loha", "lokr"]
# Named target groups (module path regexes, matched in full).
TARGET_GROUPS: dict[str, str] = {
    "attention": r".*transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)",
    "proj": r".*\.proj_(in|out)",
    "feedforward": r".*transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
    "resblock": r".*\.(in_layers\.2|out_layers\.3|skip_connection|emb_layers\.1)",
}
_MAX_LISTED = 12


@dataclass
class LoraConfig:
    """A low-rank adapter on the UNet (``finetune.method: lora``)."""

    kind: AdapterKind = "lora"
    """``lora`` (low-rank up @ down), ``loha`` (Hadamard product of two) or ``lokr`` (Kronecker
    product), all from peft."""
    rank: int = 8
    """The rank r of each adapter."""
    alpha: float = 8.0
    """The scale numerator: the adapter adds ``(alpha / rank) * up @ down``."""
    dropout: float = 0.0
    """Dropout inside the adapter (LoRA: on its input; LoHa / LoKr: module dropout)."""
    targets: list[str] = field(default_factory=lambda: ["attention"])
    """Module path regexes (full match) or group names: ``attention`` (to_q/to_k/to_v/to_out.0
    of every transformer block), ``proj`` (proj_in/proj_out), ``feedforward``, ``resblock``
    (the ResBlock convs and time projection)."""

    def __post_init__(self) -> None:
        require_finite(self)
        if not 1 <= self.rank <= 1024:
            raise ConfigError(f"must be in [1, 1024], got {self.rank}", key="rank")
        if not (self.alpha > 0 and self.alpha < float("inf")):
            raise ConfigError(f"must be a finite number > 0, got {self.alpha}", key="alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"must be in [0, 1), got {self.dropout}", key="dropout")
        if not self.targets:
            raise ConfigError("name at least one target module pattern", key="targets")
        for pattern in self.targets:
            try:
                re.compile(TARGET_GROUPS.get(pattern, pattern))
            except re.error as err:
                raise ConfigError(f"{pattern!r} is not a regular expression: {err}",
                                  key="targets") from None  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def adaptable_modules(unet: nn.Module) -> list[str]:
    """Module paths peft can adapt here: the UNet's linear and conv layers."""
    return [name for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def resolve_targets(module_paths: Iterable[str], patterns: Iterable[str]) -> list[str]:
    """The module paths matched by any pattern; a pattern matching nothing is a ConfigError
    (key ``finetune.lora.targets``) listing the paths there are."""
    paths = list(module_paths)
    chosen: set[str] = set()
    for pattern in patterns:
        regex = re.compile(TARGET_GROUPS.get(pattern, pattern))
        hits = [p for p in paths if regex.fullmatch(p)]
        if not hits:
            shown = ", ".join(paths[:_MAX_LISTED])
            more = f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
            raise ConfigError(
                f"the pattern {pattern!r} matches no UNet module (patterns are regular "
                f"expressions matched against the whole path, or one of the groups "
                f"{', '.join(TARGET_GROUPS)}); modules: {shown}{more}",
                key="finetune.lora.targets",
            )
        chosen.update(hits)
    return [p for p in paths if p in chosen]


# ---------------------------------------------------------------------------------------------
# Adding, reading and merging adapters
# ---------------------------------------------------------------------------------------------


def _peft_config(cfg: LoraConfig, targets: list[str]):  # -> peft.PeftConfig
    import peft

    # A full path as target: peft matches `key == target or key.endswith("." + target)`, and
    # every module path is unique, so exactly the resolved modules are wrapped.
    common = {"target_modules": targets, "r": cfg.rank}
    if cfg.kind == "lora":
        return peft.LoraConfig(**common, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout)
    if cfg.kind == "loha":
        return peft.LoHaConfig(**common, alpha=cfg.alpha, module_dropout=cfg.dropout)
    return peft.LoKrConfig(**common, alpha=cfg.alpha, module_dropout=cfg.dropout)


def add_adapter(unet: UNetModel, cfg: LoraConfig, init_lora: str = "") -> list[str]:
    """Wrap the target modules in peft adapters and freeze every other parameter; returns the
    wrapped module paths. The adapter starts as ``init_lora`` (a LoRA file) when given, else
    as peft initialises it (the UNet's output unchanged)."""
    import peft

    paths = adaptable_modules(unet)
    targets = resolve_targets(paths, cfg.targets)
    peft.inject_adapter_in_model(_peft_config(cfg, targets), unet, adapter_name=ADAPTER_NAME)
    adapter = set(adapter_state(unet))
    for name, param in unet.named_parameters():
        param.requires_grad_(name in adapter)
    if init_lora:
        lora = read_lora(init_lora, paths, diffusers_module_path(unet.config))
        load_adapter_weights(unet, lora, init_lora)
    return targets


def apply_lora_file(unet: UNetModel, path: str, scale: float = 1.0) -> int:
    """Merge a LoRA file into a plain UNet's weights (``sdtrain sample --lora``); returns the
    number of modules it changed. Keys that match no module or shapes that differ (a LoRA of
    another model) are a CheckpointError naming them."""
    lora = read_lora(path, adaptable_modules(unet), diffusers_module_path(unet.config))
    try:
        merged = merge_into(unet.state_dict(), lora, scale)
    except CheckpointError as err:
        raise err.at(path) from None
    unet.load_state_dict(merged)
    return len(lora)


def _tuner_layers(unet: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, BaseTunerLayer)}


def has_adapter(unet: nn.Module) -> bool:
    return bool(_tuner_layers(unet))


def adapter_state(unet: nn.Module) -> dict[str, Tensor]:
    """The adapter parameters by their names in ``unet`` (what training checkpoints store)."""
    layers = _tuner_layers(unet)
    out = {}
    for path, layer in layers.items():
        for name, param in layer.named_parameters():
            if not name.startswith("base_layer.") and ADAPTER_NAME in name.split("."):
                out[f"{path}.{name}"] = param
    return out


def adapter_weights(
    unet: nn.Module, state: Mapping[str, Tensor] | None = None
) -> dict[str, LoraWeights]:
    """A LoRA adapter as ``{module path: LoraWeights}``; ``state`` (e.g. the EMA) replaces the
    module's own adapter tensors (same names as ``adapter_state``)."""
    current = dict(adapter_state(unet))
    current.update(state or {})
    out = {}
    for path, layer in _tuner_layers(unet).items():
        if not hasattr(layer, "lora_A"):
            raise ConfigError(
                "only a LoRA (finetune.lora.kind: lora) has the up/down layout of LoRA files"
            )
        down = current[f"{path}.lora_A.{ADAPTER_NAME}.weight"].detach()
        up = current[f"{path}.lora_B.{ADAPTER_NAME}.weight"].detach()
        out[path] = LoraWeights(down.float(), up.float(), float(layer.lora_alpha[ADAPTER_NAME]))
    return out


def lycoris_state(unet: nn.Module, state: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """A LoHa adapter in the LyCORIS naming (``lora_unet_<path>.hada_w1_a`` ..., ``.alpha``)."""
    current = dict(adapter_state(unet))
    current.update(state or {})
    out: dict[str, Tensor] = {}
    for path, layer in _tuner_layers(unet).items():
        if not hasattr(layer, "hada_w1_a"):
            raise ConfigError("LyCORIS files are written for LoHa adapters only")
        name = kohya_name(path)
        for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            out[f"{name}.{part}"] = current[f"{path}.{part}.{ADAPTER_NAME}"].detach().float()
        out[f"{name}.alpha"] = torch.tensor(float(layer.alpha[ADAPTER_NAME]), dtype=torch.float32)
    return out


def load_adapter_weights(unet: nn.Module, lora: Mapping[str, LoraWeights], source: str) -> None:
    """Put a LoRA file's weights into the wrapped UNet (``init_lora=``).

    Every file module must be one of the adapted modules, with the configured rank; a different
    alpha is absorbed into ``up`` so the adapter computes what the file's does.
    """
    layers = _tuner_layers(unet)
    unknown = sorted(kohya_name(p) for p in lora if p not in layers)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} LoRA module(s) are not among the adapted modules "
            f"(finetune.lora.targets): {', '.join(unknown[:5])}",
            source,
        )
    problems = []
    for path, weights in lora.items():
        layer = layers[path]
        if not hasattr(layer, "lora_A"):
            raise CheckpointError("init_lora needs finetune.lora.kind: lora", source)
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        if weights.down.shape != a.shape or weights.up.shape != b.shape:
            problems.append(
                f"{kohya_name(path)}: file down {list(weights.down.shape)} / up "
                f"{list(weights.up.shape)} vs adapter {list(a.shape)} / {list(b.shape)}"
            )
    if problems:
        raise CheckpointError(
            f"LoRA shapes differ from the configured adapter (rank, model): "
            f"{'; '.join(problems[:5])}",
            source,
        )
    with torch.no_grad():
        for path, weights in lora.items():
            layer = layers[path]
            ratio = weights.alpha / float(layer.lora_alpha[ADAPTER_NAME])
            layer.lora_A[ADAPTER_NAME].weight.copy_(weights.down)
            layer.lora_B[ADAPTER_NAME].weight.copy_(weights.up * ratio)


def load_adapter_state(unet: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Load a training checkpoint's adapter tensors (``adapter_state`` names) strictly."""
    own = adapter_state(unet)
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {label}: {', '.join(v[:5])}" for label, v in
                 (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong))
                 if v]  # fmt: skip
        raise CheckpointError(f"adapter weights do not match the model: {'; '.join(parts)}",
                              source)  # fmt: skip
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(state[name])


def scale_adapter(unet: nn.Module, scale: float) -> None:
    """Multiply every adapter's contribution by ``scale`` (before merging, for sampling)."""
    for layer in _tuner_layers(unet).values():
        layer.scaling[ADAPTER_NAME] *= scale


@torch.no_grad()
def merge_adapter(unet: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the base modules back (in place)."""
    for path, layer in _tuner_layers(unet).items():
        layer.merge(adapter_names=[ADAPTER_NAME])
        parent_path, _, child = path.rpartition(".")
        parent = unet.get_submodule(parent_path) if parent_path else unet
        setattr(parent, child, layer.get_base_layer())
    for param in unet.parameters():
        param.requires_grad_(True)
    return unet
