"""The original Stable Diffusion single-file layout (``.ckpt``, ``.safetensors``) as an adapter.

The original ``LatentDiffusion`` saves one flat state dict: the UNet under
``model.diffusion_model.``, the VAE under ``first_stage_model.``, the text tower under
``cond_stage_model.``, the EMA copy of the UNet under ``model_ema.`` with flattened names, and the
12 noise-schedule buffers (``diffusion.schedule.SCHEDULE_BUFFERS``) without a prefix; a depth model
(``LatentDepth2ImageDiffusion``) adds its frozen MiDaS under ``depth_model.``, the x4 upscaler
(``LatentUpscaleDiffusion``) the 8 buffers of its low-res noise schedule under
``low_scale_model.``. This module
turns such a file into plain
per-part tensor dicts (keys without prefix) and back, widens a UNet input conv for inpainting /
depth, loads parts strictly into modules and summarises a file. It knows nothing about our model
classes: they hand in and receive ``dict[str, Tensor]``. Files are opened and written only through
``sdtrain.utils.files`` (``weights_only=True``, atomic writes that respect the umask).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sdtrain.diffusion.schedule import SCHEDULE_BUFFERS
from sdtrain.errors import CheckpointError
from sdtrain.utils import files
from sdtrain.utils.files import PathLike

__all__ = [
    "DEPTH_PREFIX",
    "EMA_PREFIX",
    "SAFETENSORS_SUFFIX",
    "SCHEDULE_BUFFERS",
    "TEXT_PREFIX",
    "TORCH_SUFFIXES",
    "UNET_INPUT_CONV",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "OriginalCheckpoint",
    "build_original_state_dict",
    "deflatten_ema",
    "ema_name_map",
    "flatten_ema",
    "flatten_ema_key",
    "load_state_dict_strict",
    "read_checkpoint",
    "split_original_state_dict",
    "summarize",
    "widen_input_channels",
    "write_checkpoint",
    "write_weights_safetensors",
]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
DEPTH_PREFIX = "depth_model."
LOW_SCALE_PREFIX = "low_scale_model."
# LitEma names each shadow buffer after the parameter's full name inside `self.model`
# (a DiffusionWrapper), i.e. `diffusion_model.<unet key>`, with every dot removed.
EMA_UNET_STEM = "diffusion_model"
EMA_META_KEYS = ("decay", "num_updates")

UNET_INPUT_CONV = "input_blocks.0.0.weight"
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
# Reserved safetensors metadata keys: `format` is what the safetensors/diffusers tools expect,
# `global_step` carries the step the `.ckpt` keeps as a top-level field.
_FORMAT_KEY = "format"
_STEP_KEY = "global_step"
# Top-level `.ckpt` field for our string metadata (the resolved config), next to `state_dict`.
_CKPT_METADATA_KEY = "metadata"
_MAX_LISTED = 5


@dataclass
class OriginalCheckpoint:
    """One original-layout checkpoint split into its parts; every key is without its prefix."""

    path: Path | None
    unet: dict[str, Tensor] = field(default_factory=dict)
    """`model.diffusion_model.*`, e.g. `input_blocks.0.0.weight`."""
    vae: dict[str, Tensor] = field(default_factory=dict)
    """`first_stage_model.*`, e.g. `encoder.conv_in.weight`."""
    text: dict[str, Tensor] = field(default_factory=dict)
    """`cond_stage_model.*`: `transformer.text_model.*` (SD1) or `model.*` (SD2)."""
    ema: dict[str, Tensor] = field(default_factory=dict)
    """EMA copy of the UNet, de-flattened to UNet keys."""
    depth: dict[str, Tensor] = field(default_factory=dict)
    """`depth_model.*`: the MiDaS depth estimator of a depth model (`model.pretrained.*`)."""
    low_scale: dict[str, Tensor] = field(default_factory=dict)
    """`low_scale_model.*`: an x4 upscaler's low-res noise schedule buffers (`betas`, ...)."""
    ema_meta: dict[str, Tensor] = field(default_factory=dict)
    """`model_ema.decay` (float32 scalar) and `model_ema.num_updates` (int32 scalar)."""
    schedule: dict[str, Tensor] = field(default_factory=dict)
    """The noise-schedule buffers named in `SCHEDULE_BUFFERS`."""
    other: dict[str, Tensor] = field(default_factory=dict)
    """Anything else, under its full key (e.g. a stray non-persistent `lvlb_weights`)."""
    global_step: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    """safetensors header metadata, or the `metadata` field of a `.ckpt` written by us."""


# ---------------------------------------------------------------------------------------------
# EMA names
# ---------------------------------------------------------------------------------------------


def flatten_ema_key(unet_key: str) -> str:
    """LitEma buffer name for a UNet key, without `model_ema.`.

    `input_blocks.0.0.weight` -> `diffusion_modelinput_blocks00weight`.
    """
    return EMA_UNET_STEM + unet_key.replace(".", "")


def ema_name_map(unet_keys: Iterable[str]) -> dict[str, str]:
    """Map flattened EMA names back to UNet keys; two keys that flatten alike are an error.

    Removing dots loses information, so the inverse only exists relative to a known key list.
    """
    mapping: dict[str, str] = {}
    for key in unet_keys:
        flat = flatten_ema_key(key)
        if flat in mapping and mapping[flat] != key:
            raise CheckpointError(
                f"UNet keys {mapping[flat]!r} and {key!r} both flatten to the EMA name "
                f"{flat!r}, so EMA weights cannot be told apart"
            )
        mapping[flat] = key
    return mapping


def flatten_ema(ema: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """UNet-keyed EMA dict -> LitEma-named dict (without `model_ema.`)."""
    ema_name_map(ema)  # refuse keys that would overwrite each other on disk
    return {flatten_ema_key(key): value for key, value in ema.items()}


def deflatten_ema(flat: Mapping[str, Tensor], unet_keys: Iterable[str]) -> dict[str, Tensor]:
    """LitEma-named dict (without `model_ema.`) -> UNet-keyed dict, using ``unet_keys``."""
    mapping = ema_name_map(unet_keys)
    unknown = [name for name in flat if name not in mapping]
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} EMA name(s) match no UNet key: {_listed(unknown)}"
            + ("" if mapping else " (no UNet key list was available to de-flatten EMA names)")
        )
    return {mapping[name]: value for name, value in flat.items()}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_checkpoint(
    path: PathLike, *, unet_keys: Iterable[str] | None = None
) -> OriginalCheckpoint:
    """Read an original-layout `.ckpt`/`.pt`/`.pth` or `.safetensors` file into its parts.

    ``unet_keys`` helps de-flatten EMA names when the file holds EMA weights but no UNet;
    the file's own UNet keys are always used as well.
    """
    path = Path(path)
    files.check_readable(path)
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        state_dict, global_step, metadata = _read_torch(path)
    elif suffix == SAFETENSORS_SUFFIX:
        state_dict, metadata = files.read_safetensors(path)
        global_step = _parse_step(metadata.get(_STEP_KEY))
    else:
        raise CheckpointError(
            f"unknown checkpoint suffix {path.suffix!r}; expected one of "
            f"{', '.join((*TORCH_SUFFIXES, SAFETENSORS_SUFFIX))}",
            path,
        )
    try:
        return split_original_state_dict(
            state_dict,
            path=path,
            global_step=global_step,
            metadata=metadata,
            unet_keys=unet_keys,
        )
    except CheckpointError as err:
        raise err.at(path) from None


def split_original_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    path: Path | None = None,
    global_step: int | None = None,
    metadata: Mapping[str, str] | None = None,
    unet_keys: Iterable[str] | None = None,
) -> OriginalCheckpoint:
    """Split a flat original-layout state dict by prefix (see the module docstring)."""
    ckpt = OriginalCheckpoint(path=path, global_step=global_step, metadata=dict(metadata or {}))
    ema_flat: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"entry {key!r} is a {type(value).__name__}, not a tensor")
        if key.startswith(UNET_PREFIX):
            ckpt.unet[key.removeprefix(UNET_PREFIX)] = value
        elif key.startswith(VAE_PREFIX):
            ckpt.vae[key.removeprefix(VAE_PREFIX)] = value
        elif key.startswith(TEXT_PREFIX):
            ckpt.text[key.removeprefix(TEXT_PREFIX)] = value
        elif key.startswith(DEPTH_PREFIX):
            ckpt.depth[key.removeprefix(DEPTH_PREFIX)] = value
        elif key.startswith(LOW_SCALE_PREFIX):
            ckpt.low_scale[key.removeprefix(LOW_SCALE_PREFIX)] = value
        elif key.startswith(EMA_PREFIX):
            name = key.removeprefix(EMA_PREFIX)
            target = ckpt.ema_meta if name in EMA_META_KEYS else ema_flat
            target[name] = value
        elif key in SCHEDULE_BUFFERS:
            ckpt.schedule[key] = value
        else:
            ckpt.other[key] = value
    if ema_flat:
        known = [*ckpt.unet, *(unet_keys or ())]
        ckpt.ema = deflatten_ema(ema_flat, dict.fromkeys(known))
    return ckpt


def _read_torch(path: Path) -> tuple[dict[str, Tensor], int | None, dict[str, str]]:
    obj = files.load_torch(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        state_dict = dict(obj["state_dict"])
        global_step = _as_step(obj.get("global_step"))
        raw_meta = obj.get(_CKPT_METADATA_KEY)
        metadata = _string_dict(raw_meta) if isinstance(raw_meta, Mapping) else {}
        return state_dict, global_step, metadata
    if isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj), None, {}
    raise CheckpointError(
        f"holds a {type(obj).__name__} without a 'state_dict' entry and is not a flat dict of "
        "tensors, so it is not a Stable Diffusion checkpoint",
        path,
    )


def _parse_step(text: str | None) -> int | None:
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def _as_step(value: object) -> int | None:
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value.item())
    if isinstance(value, np.integer):
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _string_dict(raw: Mapping[object, object]) -> dict[str, str]:
    return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def build_original_state_dict(
    *,
    unet: Mapping[str, Tensor],
    vae: Mapping[str, Tensor] | None = None,
    text: Mapping[str, Tensor] | None = None,
    ema: Mapping[str, Tensor] | None = None,
    schedule: Mapping[str, Tensor] | None = None,
    ema_decay: float = 0.9999,
    ema_num_updates: int = 0,
    depth: Mapping[str, Tensor] | None = None,
    low_scale: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Join unprefixed parts into one flat original-layout state dict.

    The order is the one `LatentDiffusion.state_dict()` produces: schedule buffers (registered on
    the top module), then `model`, `model_ema`, `first_stage_model`, `cond_stage_model` and a
    depth model's `depth_model` (registered last by `LatentDepth2ImageDiffusion`) or an
    upscaler's `low_scale_model` (last in `LatentUpscaleDiffusion`).
    """
    schedule = schedule or {}
    unknown = [name for name in schedule if name not in SCHEDULE_BUFFERS]
    if unknown:
        raise CheckpointError(f"unknown schedule buffer name(s): {_listed(unknown)}")
    out: dict[str, Tensor] = {name: schedule[name] for name in SCHEDULE_BUFFERS if name in schedule}
    out.update(_prefixed(UNET_PREFIX, unet))
    if ema is not None:
        _check_ema_matches_unet(ema, unet)
        out[EMA_PREFIX + "decay"] = torch.tensor(ema_decay, dtype=torch.float32)
        out[EMA_PREFIX + "num_updates"] = torch.tensor(ema_num_updates, dtype=torch.int32)
        out.update(_prefixed(EMA_PREFIX, flatten_ema(ema)))
    out.update(_prefixed(VAE_PREFIX, vae or {}))
    out.update(_prefixed(TEXT_PREFIX, text or {}))
    out.update(_prefixed(DEPTH_PREFIX, depth or {}))
    out.update(_prefixed(LOW_SCALE_PREFIX, low_scale or {}))
    return out


def write_checkpoint(
    path: PathLike,
    *,
    unet: Mapping[str, Tensor],
    vae: Mapping[str, Tensor] | None = None,
    text: Mapping[str, Tensor] | None = None,
    ema: Mapping[str, Tensor] | None = None,
    schedule: Mapping[str, Tensor] | None = None,
    global_step: int | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    ema_decay: float = 0.9999,
    ema_num_updates: int = 0,
    depth: Mapping[str, Tensor] | None = None,
    low_scale: Mapping[str, Tensor] | None = None,
) -> Path:
    """Atomically write an original-layout checkpoint; the suffix picks `.ckpt` or safetensors.

    `.ckpt`/`.pt`/`.pth` hold `{"state_dict", "global_step", "metadata"}` with only tensors,
    ints and strings, so `torch.load(weights_only=True)` opens them. `.safetensors` is flat, with
    `global_step` and ``extra_metadata`` as string metadata.
    """
    path = Path(path)
    try:
        state_dict = build_original_state_dict(
            unet=unet,
            vae=vae,
            text=text,
            ema=ema,
            schedule=schedule,
            ema_decay=ema_decay,
            ema_num_updates=ema_num_updates,
            depth=depth,
            low_scale=low_scale,
        )
        metadata = _check_metadata(extra_metadata)
    except CheckpointError as err:
        raise err.at(path) from None
    suffix = path.suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        if global_step is not None:
            metadata[_STEP_KEY] = str(int(global_step))
        return write_weights_safetensors(path, state_dict, metadata)
    if suffix not in TORCH_SUFFIXES:
        raise CheckpointError(f"unknown checkpoint suffix {path.suffix!r}", path)
    payload: dict[str, object] = {"state_dict": files.writable_tensors(state_dict, path)}
    if global_step is not None:
        payload["global_step"] = int(global_step)
    if metadata:
        payload[_CKPT_METADATA_KEY] = metadata
    return files.save_torch(path, payload)


def write_weights_safetensors(
    path: PathLike, state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Atomically write a flat dict of tensors (keys kept as given) as `.safetensors`."""
    path = Path(path)
    try:
        header = {_FORMAT_KEY: "pt", **_check_metadata(metadata)}
    except CheckpointError as err:
        raise err.at(path) from None
    return files.write_safetensors(path, state_dict, header)


def _prefixed(prefix: str, part: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {prefix + key: value for key, value in part.items()}


def _check_ema_matches_unet(ema: Mapping[str, Tensor], unet: Mapping[str, Tensor]) -> None:
    # Reading de-flattens EMA names against the UNet keys, so anything else would not round-trip.
    ema_name_map(unet)
    orphans = [key for key in ema if key not in unet]
    if orphans:
        raise CheckpointError(f"EMA key(s) with no UNet counterpart: {_listed(orphans)}")
    wrong = [
        f"{key} ema {list(value.shape)} vs unet {list(unet[key].shape)}"
        for key, value in ema.items()
        if value.shape != unet[key].shape
    ]
    if wrong:
        raise CheckpointError(f"EMA shape(s) differ from the UNet: {_listed(wrong)}")


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(metadata or {})
    bad = [
        key for key, value in out.items() if not isinstance(key, str) or not isinstance(value, str)
    ]
    if bad:
        raise CheckpointError(f"metadata keys and values must be strings: {_listed(bad)}")
    return out


# ---------------------------------------------------------------------------------------------
# Adapting and loading
# ---------------------------------------------------------------------------------------------


def widen_input_channels(
    unet_sd: Mapping[str, Tensor], in_channels: int, key: str = UNET_INPUT_CONV
) -> dict[str, Tensor]:
    """Return a copy whose input conv takes ``in_channels``: old channels kept, new ones zero.

    Zero weights for the extra inputs (mask, masked image, depth) make the widened UNet compute
    exactly what the base UNet did, which is how the original inpainting model was initialised.
    Works the same on a UNet-keyed EMA dict.
    """
    if key not in unet_sd:
        raise CheckpointError(f"no {key!r} in the state dict to widen")
    weight = unet_sd[key]
    if weight.ndim != 4:
        raise CheckpointError(f"{key!r} has shape {list(weight.shape)}, expected a 4-D conv weight")
    old = weight.shape[1]
    if in_channels < old:
        raise CheckpointError(
            f"cannot narrow {key!r} from {old} to {in_channels} input channels: "
            "that would drop trained weights"
        )
    out = dict(unet_sd)
    if in_channels > old:
        wide = weight.new_zeros((weight.shape[0], in_channels, *weight.shape[2:]))
        wide[:, :old] = weight
        out[key] = wide
    return out


def load_state_dict_strict(
    module: nn.Module, sd: Mapping[str, Tensor], *, source: str, what: str
) -> None:
    """Load ``sd`` into ``module`` after checking every key and shape; never loads partially.

    Non-persistent buffers are not expected in ``sd``; if the file still has one (the SD1 text
    tower's legacy `position_ids`), that entry is dropped. A module on the meta device gets the
    file's tensors assigned instead of copied.
    """
    expected = module.state_dict()
    non_persistent = {name for name, _ in module.named_buffers()} - expected.keys()
    given = {k: v for k, v in sd.items() if k in expected or k not in non_persistent}
    problems = _mismatches(expected, given)
    if problems:
        raise CheckpointError(
            f"{what} weights do not match the model: {'; '.join(problems)}", source
        )
    on_meta = any(t.is_meta for t in expected.values())
    try:
        module.load_state_dict(given, strict=True, assign=on_meta)
    except RuntimeError as err:
        raise CheckpointError(f"{what} weights failed to load: {err}", source) from err


def _mismatches(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    wrong_keys = [k for k, v in given.items() if k in expected and v.shape != expected[k].shape]
    missing = [f"{k} {_shape(v)}" for k, v in expected.items() if k not in given]
    unexpected = [f"{k} {_shape(v)}" for k, v in given.items() if k not in expected]
    wrong = [f"{k} file {_shape(given[k])} vs model {_shape(expected[k])}" for k in wrong_keys]
    problems = [
        f"{len(items)} {label}: {_listed(items)}"
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with the wrong shape", wrong),
        )
        if items
    ]
    if any(k.endswith(UNET_INPUT_CONV) for k in wrong_keys):
        problems.append("a base UNet can feed an inpainting/depth one via widen_input_channels()")
    return problems


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def summarize(ckpt: OriginalCheckpoint) -> str:
    """A few lines per part (tensor and value counts, dtypes) for `sdtrain inspect`."""
    step = "" if ckpt.global_step is None else f"  global_step {ckpt.global_step}"
    lines = [f"{ckpt.path}{step}"]
    parts = {
        "unet": ckpt.unet,
        "vae": ckpt.vae,
        "text": ckpt.text,
        "depth": ckpt.depth,
        "low_scale": ckpt.low_scale,
        "ema": ckpt.ema,
        "ema_meta": ckpt.ema_meta,
        "schedule": ckpt.schedule,
        "other": ckpt.other,
    }
    for name, part in parts.items():
        numel = sum(t.numel() for t in part.values())
        dtypes = ",".join(sorted({str(t.dtype).removeprefix("torch.") for t in part.values()}))
        lines.append(f"  {name:<9}{len(part):>6} tensors {numel:>15,} values  {dtypes}")
    lines.extend(f"  {hint}" for hint in _hints(ckpt))
    return "\n".join(lines)


def _hints(ckpt: OriginalCheckpoint) -> list[str]:
    hints = []
    if UNET_INPUT_CONV in ckpt.unet and ckpt.unet[UNET_INPUT_CONV].ndim == 4:
        hints.append(f"unet in_channels: {ckpt.unet[UNET_INPUT_CONV].shape[1]}")
    if any(k.startswith("transformer.text_model.") for k in ckpt.text):
        hints.append("text tower: CLIP (SD1 layout)")
    elif any(k.startswith("model.") for k in ckpt.text):
        hints.append("text tower: OpenCLIP (SD2 layout)")
    for name, value in ckpt.ema_meta.items():
        if value.numel() == 1:
            hints.append(f"ema {name}: {value.item()}")
    if ckpt.other:
        hints.append(f"other keys: {_listed(list(ckpt.other))}")
    if ckpt.metadata:
        hints.append(f"metadata keys: {_listed(list(ckpt.metadata))}")
    return hints


def _shape(tensor: Tensor) -> str:
    return str(list(tensor.shape))


def _listed(items: list[str]) -> str:
    shown = ", ".join(str(item) for item in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return f"{shown} and {more} more" if more > 0 else shown
