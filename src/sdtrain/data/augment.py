"""Optional augmentations for small data sets (``data.augment``), built through albumentations.

Each entry of ``data.augment`` names an albumentations transform class and its parameters
(``{name: Affine, scale: [0.95, 1.05], p: 0.5}``); the list becomes one ``A.Compose``. Names and
parameters are checked when the config loads: an unknown transform, an unknown parameter, a value
albumentations refuses, or a transform that cannot run on an image with its mask and depth map
at the output size (it needs boxes, or it changes the size) is a ``ConfigError`` naming the entry.

Where: after the loader's crop, on the uint8 (H, W) image the model sees, with the sample's masks
(inpainting, loss) and depth map as albumentations *mask* targets. Geometric transforms move them
together (masks and depth maps nearest-interpolated, borders filled with 0: keep for an
inpainting mask, not counted for a loss mask), pixel transforms (colour, blur, noise) touch the
image only. The crop-first fast path (decode at
reduced size, resize only the window) stays as it is, and with an empty list nothing runs.

Determinism: albumentations draws from generators of its own (one per transform, plus the
Compose's). ``Compose.set_random_seed`` reseeds all of them, and the loader does so for every
sample with a seed drawn from the sample's own generator (a function of ``data.seed`` and the
sample's identity), so the draws do not depend on workers or restarts and resumption stays exact.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch

from sdtrain.errors import ConfigError

# albumentations asks PyPI for a newer version on import unless told not to: training nodes
# often have no network, and a data loader must not make requests.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

_DEPTH_TARGET = "depth"


def _albumentations() -> Any:
    import albumentations

    return albumentations


def _transform_names(A: Any) -> list[str]:
    """The single transforms albumentations offers (not Compose / OneOf / the base classes)."""
    names = []
    for name in dir(A):
        value = getattr(A, name)
        if (
            inspect.isclass(value)
            and issubclass(value, A.BasicTransform)
            and not inspect.isabstract(value)
            and name not in ("BasicTransform", "DualTransform", "ImageOnlyTransform", "NoOp")
        ):
            names.append(name)
    return names


def _parameters(cls: type) -> list[str]:
    signature = inspect.signature(cls.__init__)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in signature.parameters.values() if p.kind in kinds and p.name != "self"]


def _build_one(A: Any, index: int, entry: Any, height: int, width: int) -> Any:
    key = f"augment[{index}]"
    if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
        raise ConfigError(
            "each entry is a mapping with the transform's class name under 'name', e.g. "
            "{name: ColorJitter, brightness: 0.1}",
            key=key,
        )
    name = entry["name"]
    params = {k: v for k, v in entry.items() if k != "name"}
    names = _transform_names(A)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown albumentations transform {name!r}{hint}", key=key)
    cls = getattr(A, name)
    accepted = _parameters(cls)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{name}: unknown parameter(s) {unknown}; {name} takes {accepted}", key=key
        )
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}
    try:
        transform = cls(**params)
        # A trial run at the output size, forced to apply, with both mask targets.
        trial = A.Compose([cls(**{**params, "p": 1.0})], additional_targets={_DEPTH_TARGET: "mask"})
        trial.set_random_seed(0)
        out = trial(
            image=np.zeros((height, width, 3), np.uint8),
            masks=[np.zeros((height, width), np.uint8)],
            **{_DEPTH_TARGET: np.zeros((height, width), np.float32)},
        )
    except Exception as exc:  # pydantic's ValidationError, TypeError, a missing target...
        lines = [line for line in str(exc).splitlines() if "errors.pydantic.dev" not in line]
        first = " ".join(" ".join(lines).split())[:400]
        raise ConfigError(
            f"{name} cannot be built or applied to a {height}x{width} image with its mask and "
            f"depth map: {type(exc).__name__}: {first}",
            key=key,
        ) from None
    shapes = (out["image"].shape, out["masks"][0].shape, out[_DEPTH_TARGET].shape)
    if shapes != ((height, width, 3), (height, width), (height, width)):
        raise ConfigError(
            f"{name} changes the size ({height}x{width} -> {shapes[0][0]}x{shapes[0][1]}); "
            "augmentations run at the output size, which the crop already fixed (data.image)",
            key=key,
        )
    return transform


class Augment:
    """The configured transforms as one callable on a loader sample's tensors."""

    def __init__(self, compose: Any) -> None:
        self.compose = compose

    def __call__(
        self,
        image: torch.Tensor,
        rng: np.random.Generator,
        masks: Sequence[torch.Tensor] = (),
        depth: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """``image`` (3, H, W) uint8, ``masks`` each (1, H, W) uint8 (inpainting, loss masks),
        ``depth`` (1, H, W) float32 -> the same, augmented together; every draw is seeded from
        one number drawn from ``rng``."""
        self.compose.set_random_seed(int(rng.integers(2**32)))
        # cv2 moves between planar and interleaved uint8 ~10x faster than numpy or torch copies
        inputs: dict[str, Any] = {"image": cv2.merge(list(image.numpy()))}  # (H, W, 3)
        if masks:
            inputs["masks"] = [mask[0].numpy() for mask in masks]  # each (H, W)
        if depth is not None:
            inputs[_DEPTH_TARGET] = depth[0].numpy()  # (H, W)
        out = self.compose(**inputs)
        image = torch.from_numpy(np.stack(cv2.split(out["image"])))  # (3, H, W) uint8
        moved = [torch.from_numpy(np.ascontiguousarray(m))[None] for m in out.get("masks", [])]
        if depth is not None:
            depth = torch.from_numpy(np.ascontiguousarray(out[_DEPTH_TARGET]))[None]
        return image, moved, depth


def build_augment(entries: Sequence[Any], height: int, width: int) -> Augment:
    """``data.augment`` as an ``Augment``, every entry checked (``ConfigError`` naming it)."""
    A = _albumentations()
    transforms = [_build_one(A, i, entry, height, width) for i, entry in enumerate(entries)]
    compose = A.Compose(transforms, additional_targets={_DEPTH_TARGET: "mask"}, seed=0)
    return Augment(compose)
