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

The text encoder (``FrozenTextEncoder``) takes a LoRA the same way (``add_text_encoder_adapter``,
targets ``finetune.lora.text_encoder_targets`` over its own module paths
``model.transformer.resblocks.N.attn`` / ``.mlp.c_fc`` / ``.mlp.c_proj``, groups
``TEXT_ENCODER_GROUPS``). peft's LoRA on ``nn.MultiheadAttention`` adapts the fused q/k/v
``in_proj`` (one down shared by q, k and v, an up of 3 x width rows) and ``out_proj`` together,
so ``attn`` is one target. ``text_encoder_adapter_weights`` splits it exactly into the HF
modules LoRA files name (``text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj``,
``mlp.fc1`` / ``mlp.fc2``: q / k / v share the down, each takes its third of the up);
``load_text_encoder_adapter_weights`` is its inverse and refuses a file whose q / k / v downs
differ (kohya's sd-scripts trains three separate adapters), which a shared down cannot hold;
``apply_lora_file`` merges such a file exactly all the same. peft merges the attention adapter
into the weights for each forward, so ``dropout`` acts on the MLP adapters only. peft 0.21
applies that out_proj adapter twice (it merges it by hand and again through the wrapped
Linear's own merge, in the forward and in ``merge_adapter`` alike); the factor is measured once
(``_out_proj_factor``) and the file layouts get the delta the adapter really adds.
"""

from __future__ import annotations

import functools
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
    kohya_te_name,
    merge_into,
    merge_text_encoder_into,
    read_lora,
    read_lora_parts,
    read_text_encoder_lora,
)
from sdtrain.models.text_encoders import FrozenTextEncoder, TextEncoderConfig
from sdtrain.models.unet import UNetModel
from sdtrain.utils.checks import require_finite

__all__ = [
    "ADAPTER_NAME",
    "TARGET_GROUPS",
    "TEXT_ENCODER_GROUPS",
    "AdapterKind",
    "LoraConfig",
    "adaptable_modules",
    "adapter_state",
    "adapter_weights",
    "add_adapter",
    "add_text_encoder_adapter",
    "apply_lora_file",
    "check_text_encoder_targets",
    "has_adapter",
    "load_adapter_state",
    "load_adapter_weights",
    "load_text_encoder_adapter_weights",
    "merge_adapter",
    "resolve_targets",
    "scale_adapter",
    "text_encoder_adapter_weights",
    "text_encoder_modules",
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
# Named text-encoder target groups, over FrozenTextEncoder's module paths.
TEXT_ENCODER_GROUPS: dict[str, str] = {
    "attention": r"model\.transformer\.resblocks\.\d+\.attn",  # q, k, v and out_proj
    "mlp": r"model\.transformer\.resblocks\.\d+\.mlp\.c_(fc|proj)",  # HF fc1, fc2
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
    text_encoder_targets: list[str] = field(default_factory=lambda: ["attention"])
    """The text encoder's adapted modules (with ``finetune.train_text_encoder``; LoRA only):
    regexes (full match) over its module paths ``model.transformer.resblocks.N.attn`` (q, k, v
    and out_proj together), ``.mlp.c_fc`` / ``.mlp.c_proj`` (HF fc1 / fc2), or the groups
    ``attention`` and ``mlp``."""

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
        if not self.text_encoder_targets:
            raise ConfigError("name at least one target module pattern",
                              key="text_encoder_targets")  # fmt: skip
        for key, groups in (("targets", TARGET_GROUPS),
                            ("text_encoder_targets", TEXT_ENCODER_GROUPS)):  # fmt: skip
            for pattern in getattr(self, key):
                try:
                    re.compile(groups.get(pattern, pattern))
                except re.error as err:
                    raise ConfigError(f"{pattern!r} is not a regular expression: {err}",
                                      key=key) from None  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------


def adaptable_modules(unet: nn.Module) -> list[str]:
    """Module paths peft can adapt here: the UNet's linear and conv layers."""
    return [name for name, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def text_encoder_modules(te: FrozenTextEncoder) -> list[str]:
    """Module paths a text-encoder LoRA can adapt: ``attn`` (q/k/v + out_proj), ``mlp.c_fc``
    and ``mlp.c_proj`` of every block the encoder runs (SD 2's skipped last block is left out,
    as HF / kohya / diffusers leave it out)."""
    blocks = (f"model.transformer.resblocks.{n}." for n in range(te.num_active_blocks))
    return [block + name for block in blocks for name in ("attn", "mlp.c_fc", "mlp.c_proj")]


def resolve_targets(
    module_paths: Iterable[str],
    patterns: Iterable[str],
    groups: Mapping[str, str] = TARGET_GROUPS,
    what: str = "UNet",
    key: str = "finetune.lora.targets",
) -> list[str]:
    """The module paths matched by any pattern (or group name of ``groups``); a pattern
    matching nothing is a ConfigError (``key``) listing the paths there are."""
    paths = list(module_paths)
    chosen: set[str] = set()
    for pattern in patterns:
        regex = re.compile(groups.get(pattern, pattern))
        hits = [p for p in paths if regex.fullmatch(p)]
        if not hits:
            shown = ", ".join(paths[:_MAX_LISTED])
            more = f" and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
            raise ConfigError(
                f"the pattern {pattern!r} matches no {what} module (patterns are regular "
                f"expressions matched against the whole path, or one of the groups "
                f"{', '.join(groups)}); modules: {shown}{more}",
                key=key,
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


def apply_lora_file(
    unet: UNetModel,
    path: str,
    scale: float = 1.0,
    text_encoder: FrozenTextEncoder | None = None,
) -> int:
    """Merge a LoRA file into a plain UNet's weights and, for its text-encoder part
    (``lora_te_`` / ``text_encoder.`` keys), into ``text_encoder``'s (``sdtrain sample
    --lora``); returns the number of modules it changed. Keys that match no module or shapes
    that differ (a LoRA of another model) are a CheckpointError naming them; so is a file with
    a text-encoder part when no ``text_encoder`` is given (it would silently change less than
    the file says). Nothing is changed unless every part fits."""
    parts = read_lora_parts(path, adaptable_modules(unet), diffusers_module_path(unet.config))
    if parts.text_encoder and text_encoder is None:
        names = sorted(kohya_te_name(p) for p in parts.text_encoder)
        raise CheckpointError(
            f"holds a text-encoder LoRA ({len(names)} modules, {', '.join(names[:3])}, ...) "
            "but no text encoder was given to apply it to",
            path,
        )
    try:
        merged = merge_into(unet.state_dict(), parts.unet, scale)
        if parts.text_encoder:
            assert text_encoder is not None
            text = merge_text_encoder_into(
                text_encoder.original_state_dict(), parts.text_encoder, text_encoder.cfg.kind,
                scale,
            )  # fmt: skip
    except CheckpointError as err:
        raise err.at(path) from None
    unet.load_state_dict(merged)
    if parts.text_encoder:
        assert text_encoder is not None
        text_encoder.load_original_state_dict(text)
    return len(parts.unet) + len(parts.text_encoder)


# ---------------------------------------------------------------------------------------------
# The text encoder
# ---------------------------------------------------------------------------------------------


def check_text_encoder_targets(te_cfg: TextEncoderConfig, cfg: LoraConfig) -> list[str]:
    """Resolve ``cfg.text_encoder_targets`` on a text encoder of ``te_cfg`` built on the meta
    device (for config checks): a ConfigError when one matches nothing, or for LoHa / LoKr."""
    _require_lora_kind(cfg)
    with torch.device("meta"):
        te = FrozenTextEncoder(te_cfg)
    return _text_encoder_targets(te, cfg)


def _require_lora_kind(cfg: LoraConfig) -> None:
    if cfg.kind != "lora":
        raise ConfigError(
            f"a text-encoder adapter is a LoRA only (peft's {cfg.kind} does not wrap the fused "
            "attention of the CLIP text blocks): set finetune.lora.kind: lora or leave the text "
            "encoder untrained",
            key="finetune.lora.kind",
        )


def _text_encoder_targets(te: FrozenTextEncoder, cfg: LoraConfig) -> list[str]:
    return resolve_targets(
        text_encoder_modules(te), cfg.text_encoder_targets, TEXT_ENCODER_GROUPS,
        "text encoder", "finetune.lora.text_encoder_targets",
    )  # fmt: skip


def add_text_encoder_adapter(
    te: FrozenTextEncoder, cfg: LoraConfig, init_lora: str = ""
) -> list[str]:
    """Wrap the text encoder's target modules (``cfg.text_encoder_targets``) in peft LoRA
    layers and freeze every other parameter of it; returns the wrapped module paths. The
    adapter starts as the text-encoder part of ``init_lora`` when given (a UNet-only file
    leaves it as peft initialises it: the encoder's output unchanged). The encoder's train /
    eval mode is left to the caller (``FrozenTextEncoder`` stays in eval mode by default, which
    turns the adapter's dropout off)."""
    import peft

    _require_lora_kind(cfg)
    targets = _text_encoder_targets(te, cfg)
    config = peft.LoraConfig(
        target_modules=targets, r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout
    )
    peft.inject_adapter_in_model(config, te, adapter_name=ADAPTER_NAME)
    for layer in _tuner_layers(te).values():
        if hasattr(layer, "unload_and_optionally_merge_module"):  # peft's MultiheadAttention
            _keep_base_weights(layer)
    adapter = set(adapter_state(te))
    for name, param in te.named_parameters():
        param.requires_grad_(name in adapter)
    if init_lora:
        load_text_encoder_adapter_weights(te, read_text_encoder_lora(init_lora), init_lora)
    return targets


def _keep_base_weights(layer: nn.Module) -> None:
    """Put the frozen base weights of peft's attention LoRA back, bit for bit, after each
    forward. peft merges the adapter into ``in_proj_weight`` / ``out_proj.weight`` for the
    forward and subtracts it afterwards, into new Parameters: ``(W + d) - d`` is not ``W`` in
    floating point, so the frozen weights would drift a little every step (measured: ~1e-6
    after 50 forwards) and a resumed run, whose base comes fresh from ``init_from``, would not
    continue bit-identically."""
    saved: list[Tensor] = []

    def base_parts() -> tuple[nn.Module, nn.Module]:
        base = layer.get_base_layer()
        return base, base.out_proj.get_base_layer()

    def stash(_module: nn.Module, _args: object) -> None:
        base, out = base_parts()
        saved[:] = [base.in_proj_weight, out.weight]

    def restore(_module: nn.Module, _args: object, _output: object) -> None:
        base, out = base_parts()
        for owner, name, param in ((base, "in_proj_weight", saved[0]), (out, "weight", saved[1])):
            delattr(owner, name)
            owner.register_parameter(name, param)
        saved.clear()

    layer.register_forward_pre_hook(stash)
    layer.register_forward_hook(restore)


def _te_block(path: str) -> tuple[str, str]:
    """``model.transformer.resblocks.3.mlp.c_fc`` -> (``text_model.encoder.layers.3.``,
    ``mlp.c_fc``)."""
    m = re.fullmatch(r"model\.transformer\.resblocks\.(\d+)\.(.+)", path)
    assert m, path
    return f"text_model.encoder.layers.{m[1]}.", m[2]


_TE_MLP = {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


@functools.lru_cache(maxsize=1)
def _out_proj_factor() -> int:
    """How many times peft's LoRA on an ``nn.MultiheadAttention`` adds its out_proj delta
    (2 in peft 0.21.2, which merges it by hand and then through the wrapped Linear's merge),
    measured on a 2-wide attention with a delta of all ones."""
    import peft

    holder = nn.Module()
    holder.attn = nn.MultiheadAttention(2, 1, batch_first=True)
    config = peft.LoraConfig(target_modules=["attn"], r=1, lora_alpha=1)
    peft.inject_adapter_in_model(config, holder, adapter_name=ADAPTER_NAME)
    layer = holder.attn
    out = layer.base_layer.out_proj
    with torch.no_grad():
        out.lora_A[ADAPTER_NAME].weight.fill_(1.0)
        out.lora_B[ADAPTER_NAME].weight.fill_(1.0)
        before = out.get_base_layer().weight.detach().clone()
        layer.merge(adapter_names=[ADAPTER_NAME])
        change = out.get_base_layer().weight.detach() - before  # (2, 2), factor x ones
    factor = round(change.mean().item())
    if factor < 1 or not torch.allclose(change, torch.full_like(change, factor)):
        raise RuntimeError(f"peft's MultiheadAttention LoRA changes out_proj by {change}")
    return factor


_QKV = ("q_proj", "k_proj", "v_proj")  # the thirds of the fused in_proj, in order


def text_encoder_adapter_weights(
    te: nn.Module, state: Mapping[str, Tensor] | None = None
) -> dict[str, LoraWeights]:
    """The text encoder's LoRA as ``{HF module path: LoraWeights}`` (what LoRA files hold):
    each adapted ``attn`` gives ``self_attn.q_proj`` / ``k_proj`` / ``v_proj`` (the shared down,
    the first / second / third of the fused up) and ``self_attn.out_proj``; ``mlp.c_fc`` /
    ``c_proj`` give ``mlp.fc1`` / ``fc2``. ``state`` replaces adapter tensors (``adapter_state``
    names). The split is exact: the three modules' deltas stacked are the fused delta."""
    current = dict(adapter_state(te))
    current.update(state or {})

    def tensors(path: str) -> tuple[Tensor, Tensor]:
        down = current[f"{path}.lora_A.{ADAPTER_NAME}.weight"].detach().float()
        return down, current[f"{path}.lora_B.{ADAPTER_NAME}.weight"].detach().float()

    out: dict[str, LoraWeights] = {}
    for path, layer in _tuner_layers(te).items():
        if path.endswith(".attn.base_layer.out_proj"):
            continue  # taken with its attn below
        hf, sub = _te_block(path)
        alpha = float(layer.lora_alpha[ADAPTER_NAME])
        down, up = tensors(path)
        if sub == "attn":
            for name, third in zip(_QKV, up.chunk(3), strict=True):  # (width, r) each
                out[f"{hf}self_attn.{name}"] = LoraWeights(down, third, alpha)
            out_down, out_up = tensors(f"{path}.base_layer.out_proj")
            factor = _out_proj_factor()  # the delta the adapter really adds
            out[f"{hf}self_attn.out_proj"] = LoraWeights(out_down, out_up * factor, alpha)
        else:
            out[hf + _TE_MLP[sub]] = LoraWeights(down, up, alpha)
    return out


def load_text_encoder_adapter_weights(
    te: nn.Module, lora: Mapping[str, LoraWeights], source: str
) -> None:
    """Put a file's text-encoder LoRA (HF module paths) into the adapted text encoder
    (``init_lora=``), the inverse of ``text_encoder_adapter_weights``.

    Every file module must belong to an adapted module, with the configured rank; a different
    alpha is absorbed into ``up``. Of a block's q / k / v, those the file leaves out add
    nothing; those it has must share one down (a file from kohya's sd-scripts, which trains
    q, k and v separately, has three: a CheckpointError naming the module, since the fused
    adapter holds one down; ``apply_lora_file`` merges such a file exactly)."""
    layers = _tuner_layers(te)
    by_hf: dict[str, tuple[str, int | None]] = {}  # HF path -> (tuner path, third of in_proj)
    for path in layers:
        if path.endswith(".attn.base_layer.out_proj"):
            continue
        hf, sub = _te_block(path)
        if sub == "attn":
            by_hf.update({f"{hf}self_attn.{n}": (path, i) for i, n in enumerate(_QKV)})
            by_hf[f"{hf}self_attn.out_proj"] = (f"{path}.base_layer.out_proj", None)
        else:
            by_hf[hf + _TE_MLP[sub]] = (path, None)
    unknown = sorted(kohya_te_name(p) for p in lora if p not in by_hf)
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} text-encoder LoRA module(s) are not among the adapted modules "
            f"(finetune.lora.text_encoder_targets): {', '.join(unknown[:5])}",
            source,
        )
    problems, downs = [], {}
    for hf, weights in lora.items():
        path, third = by_hf[hf]
        layer = layers[path]
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        b_shape = (b.shape[0] // 3, b.shape[1]) if third is not None else tuple(b.shape)
        if weights.down.shape != a.shape or tuple(weights.up.shape) != b_shape:
            problems.append(
                f"{kohya_te_name(hf)}: file down {list(weights.down.shape)} / up "
                f"{list(weights.up.shape)} vs adapter {list(a.shape)} / {list(b_shape)}"
            )
        elif third is not None:
            first = downs.setdefault(path, (hf, weights.down))
            if not torch.equal(first[1], weights.down):
                raise CheckpointError(
                    f"{kohya_te_name(hf)} and {kohya_te_name(first[0])} have different "
                    "lora_down weights (separate q / k / v adapters, as kohya's sd-scripts "
                    "trains them); the adapter on the fused attention projection shares one "
                    "down, so init_lora cannot continue from this file exactly (sdtrain sample "
                    "--lora applies it exactly)",
                    source,
                )
    if problems:
        raise CheckpointError(
            f"text-encoder LoRA shapes differ from the configured adapter (rank, model): "
            f"{'; '.join(problems[:5])}",
            source,
        )
    with torch.no_grad():
        for path in {by_hf[hf][0] for hf in lora}:
            layers[path].lora_B[ADAPTER_NAME].weight.zero_()  # q / k / v left out add nothing
        for hf, weights in lora.items():
            path, third = by_hf[hf]
            layer = layers[path]
            ratio = weights.alpha / float(layer.lora_alpha[ADAPTER_NAME])
            if path.endswith(".attn.base_layer.out_proj"):
                ratio /= _out_proj_factor()
            layer.lora_A[ADAPTER_NAME].weight.copy_(weights.down)
            up = layer.lora_B[ADAPTER_NAME].weight
            rows = up.shape[0] // 3 if third is not None else up.shape[0]
            start = (third or 0) * rows
            up[start : start + rows].copy_(weights.up * ratio)


# ---------------------------------------------------------------------------------------------
# Any adapted module (UNet or text encoder)
# ---------------------------------------------------------------------------------------------


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
    """Fold every adapter into its base weight and put the base modules back (in place), so
    ``state_dict()`` / ``original_state_dict()`` have the original names again. Afterwards
    every parameter takes gradients again, except a text encoder's, which is frozen again."""
    done: list[str] = []
    for path, layer in _tuner_layers(unet).items():
        if any(path.startswith(parent + ".") for parent in done):
            continue  # the out_proj of an attention merged with it
        if hasattr(layer, "unload_and_optionally_merge_module"):
            # peft's MultiheadAttention: merges in_proj and out_proj and re-registers both as
            # parameters (a plain merge leaves the merged in_proj a tensor, out of state_dict)
            base = layer.unload_and_optionally_merge_module(True, False, [ADAPTER_NAME])
        else:
            layer.merge(adapter_names=[ADAPTER_NAME])
            base = layer.get_base_layer()
        parent_path, _, child = path.rpartition(".")
        parent = unet.get_submodule(parent_path) if parent_path else unet
        setattr(parent, child, base)
        done.append(path)
    unet.requires_grad_(not isinstance(unet, FrozenTextEncoder))
    return unet
