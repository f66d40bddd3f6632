"""A folder of images as training data (``data.source: folder``): small sets without making shards.

Every image file under ``data.folder`` (recursively, sorted; the suffixes of ``data.image_keys``)
is one sample. Its sidecars share its path without the suffix, as ``make-shards`` reads them:
``<name>.txt`` (the caption, ``data.caption_key``), ``<name>.json`` (metadata for the filters),
``<name>.mask.png`` (an inpainting mask, white = repaint, used instead of a generated one) and
``<name>.depth.png`` / ``<name>.depth.npy`` (``data.depth.keys``). A sample becomes the same
``RawSample`` a shard yields (members ``jpg`` / ``txt`` / ``json`` / ``mask.png`` ...), so the
filters, transforms, masks, depth maps and bad-input counting are the shard path's own.

For the loader each image is a "shard" of one sample: the seeded per-epoch permutation of the
file list (``data.repeats`` copies of it) is dealt to the (rank, worker) streams, and a stream's
position in its share of the shuffled list is its ``(epoch, shard_pos)``. Exact resumption, the
split across ranks and workers and the shuffle buffer therefore work as they do for shards.

Metadata as ``make-shards`` writes it: the ``.json`` sidecar (if any) plus ``width`` / ``height``
of the image from its header (upright) and ``original_width`` / ``original_height`` unless the
sidecar has them, so ``data.filters.min_size`` applies to every image and the LAION score filters
apply where the sidecar holds scores. An image whose header cannot be read is counted as
``bad_image`` and skipped (before the filters), as is one whose pixels do not decode.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdtrain.data.config import DataConfig
from sdtrain.data.shards import RawSample, ShardReadError
from sdtrain.data.transforms import CropInfo, ImageDecodeError, apply_geometry
from sdtrain.errors import ConfigError

MASK_MEMBER = "mask.png"
"""The member (sidecar suffix) of a mask file: ``<name>.mask.png``."""
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that exchange width and height


_HEADER_ERROR = "__bad_image__"
"""Member holding why an image's header could not be read (never a sidecar's name)."""


class ImageHeaderError(ValueError):
    """An image file whose header cannot be read."""


def sidecar_members(cfg: DataConfig) -> tuple[str, ...]:
    """The members read from sidecar files besides the image: caption, json, mask, depth."""
    return tuple(dict.fromkeys([cfg.caption_key, "json", MASK_MEMBER, *cfg.depth.keys]))


def list_folder(cfg: DataConfig) -> list[str]:
    """The image files under ``cfg.folder`` (recursively, sorted, hidden files and folders
    left out, sidecars such as ``x.mask.png`` not counted as images); a ``ConfigError`` naming
    the folder and the suffixes looked for when there is none."""
    if not cfg.folder:
        raise ConfigError(
            "data.source is folder but no folder is set: point data.folder at a folder of "
            "images with same-named .txt captions",
            key="data.folder",
        )
    root = Path(cfg.folder).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"{root} {what}", key="data.folder")
    suffixes = {"." + key.lower().lstrip(".") for key in cfg.image_keys}
    sidecars = tuple("." + member.lower() for member in sidecar_members(cfg))
    files = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        name = path.name.lower()
        if (
            path.suffix.lower() in suffixes
            and not name.endswith(sidecars)
            and not any(part.startswith(".") for part in relative.parts)
            and path.is_file()
        ):
            files.append(str(path))
    if not files:
        looked = ", ".join(f"*{suffix}" for suffix in sorted(suffixes))
        raise ConfigError(
            f"{root} holds no images (looked for {looked}, recursively; the suffixes come from "
            "data.image_keys)",
            key="data.folder",
        )
    return sorted(files)


def _upright_size(data: bytes) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            try:
                orientation = image.getexif().get(_ORIENTATION_TAG, 1)
            except Exception:  # a broken EXIF block must not hide a readable image
                orientation = 1
    except Exception as exc:  # Pillow's many exception types all mean "not an image"
        raise ImageHeaderError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def _metadata(sidecar: bytes | None, size: tuple[int, int]) -> bytes:
    """The json member: the sidecar with the image's size added (a sidecar that is not a json
    object is passed on as it is, for the loader to count as ``bad_json``)."""
    meta: dict = {}
    if sidecar is not None:
        try:
            meta = json.loads(sidecar)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return sidecar
        if not isinstance(meta, dict):
            return sidecar
    meta["width"], meta["height"] = size
    meta.setdefault("original_width", size[0])
    meta.setdefault("original_height", size[1])
    return json.dumps(meta).encode()


@dataclass(frozen=True)
class FolderSource:
    """How the loader reads a folder's "shards" (one image file each); picklable, for workers."""

    root: str
    members: tuple[str, ...]
    """Sidecar members looked for next to each image (``sidecar_members``)."""
    unit: str = "image"
    empty_passes: int = 20
    """A stream gets a fresh share of the files every epoch, so one whose share held nothing
    usable (a few broken files in a small folder) carries on; only this many empty passes in a
    row mean the folder yields nothing."""

    @classmethod
    def of(cls, cfg: DataConfig) -> FolderSource:
        return cls(str(Path(cfg.folder).expanduser()), sidecar_members(cfg))

    def name(self, url: str) -> str:
        """The image as logs name it: its path from the folder's own name on (``dogs/a.jpg``)."""
        root = Path(self.root)
        return str(Path(root.name) / Path(url).relative_to(root))

    def where(self, url: str, key: str) -> str:
        return self.name(url)

    def error_kind(self, err: ShardReadError) -> str:
        return "file_unreadable"

    def problem(self, raw: RawSample) -> tuple[str, str] | None:
        """(error kind, reason) of a sample that is unusable before any filter: an image whose
        header does not read (the size filter could not judge it)."""
        reason = raw.members.get(_HEADER_ERROR)
        return None if reason is None else ("bad_image", reason.decode())

    def read(self, url: str) -> Iterator[RawSample]:
        """The one sample of an image file: its bytes and those of its sidecars."""
        path = Path(url)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ShardReadError(f"cannot read {self.name(url)}: {err.strerror or err}") from err
        stem = url[: len(url) - len(path.suffix)]
        members = {path.suffix[1:].lower(): data}
        for member in self.members:
            try:
                members[member] = Path(f"{stem}.{member}").read_bytes()
            except FileNotFoundError:
                continue
            except OSError as err:
                raise ShardReadError(
                    f"cannot read the .{member} of {self.name(url)}: {err.strerror or err}"
                ) from err
        try:
            members["json"] = _metadata(members.get("json"), _upright_size(data))
        except ImageHeaderError as err:
            members[_HEADER_ERROR] = str(err).encode()
        key = Path(stem).relative_to(self.root).as_posix()
        yield RawSample(key=key, index=0, members=members)


def load_mask(data: bytes, info: CropInfo, out_h: int, out_w: int) -> torch.Tensor:
    """A mask file (``mask.png``: any mode, any size, in the image's upright frame; >= 128 is
    repaint) cropped like its image: (1, out_h, out_w) uint8 in {0, 1}."""
    from PIL import Image

    if not data:
        raise ImageDecodeError("empty mask data (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            gray = np.asarray(image.convert("L"))
    except Exception as exc:  # as in transforms._decode: a property of the bytes
        raise ImageDecodeError(f"cannot decode mask: {type(exc).__name__}: {exc}") from exc
    binary = (gray >= 128).astype(np.uint8)
    return torch.from_numpy(apply_geometry(binary, info, out_h, out_w, mode="nearest"))[None]
