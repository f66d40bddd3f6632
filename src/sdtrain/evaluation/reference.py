"""The reference (real) images of an eval and their cached Inception features.

A reference is a folder of image files (sorted by relative path, sub-folders included) or a
shard spec (``data.shards``: the ``jpg`` / ``png`` / ``webp`` member of each sample, in order; a
folder that holds ``.tar`` shards and no image files is a shard set).
Images are centre-cropped square and resized to ``size`` (bicubic with antialiasing:
``utils.images.to_tensor``), the standard way, then quantised to uint8 as generated images are.
Unreadable images are counted and skipped, images of another size than ``size`` are counted.

Features are cached in ``cache_dir`` under a key made of what the data is (file names, sizes and
modification times), the size, the count and the extractor (``ExtractorConfig.inception_id``),
so a second eval against the same reference reads them instead of recomputing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from sdtrain.data.shards import REMOTE_PREFIXES, ShardReadError, expand_shards, iter_samples
from sdtrain.errors import ConfigError
from sdtrain.utils import files
from sdtrain.utils.images import to_tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdtrain" / "eval"


@dataclass
class ReferenceFeatures:
    features: Tensor
    """(N, F) Inception features of the readable images (F = 2048 unless chosen)."""
    unreadable: int
    resized: int
    """Images whose size was not ``size`` x ``size`` (cropped and resized)."""
    cached: bool
    key: str


def _is_image_folder(path: Path) -> bool:
    """A folder of image files, not a folder of shards (``*.tar`` and no image file)."""
    if not path.is_dir():
        return False
    if any(path.glob("*.tar")):
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file())
    return True


def _folder_images(path: Path) -> list[Path]:
    paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(f"--reference {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def _fingerprint(source: str) -> list[object]:
    """What the data is: (name, bytes, mtime) of every image file or shard."""
    path = Path(source)
    if _is_image_folder(path):
        listing = [(str(p.relative_to(path)), p) for p in _folder_images(path)]
    else:
        if (
            not path.exists()
            and not source.startswith((*REMOTE_PREFIXES, "@"))
            and not any(c in source for c in "{*?[")
        ):
            raise ConfigError(f"--reference {source} does not exist (a folder or shard set)")
        listing = [(url, Path(url.removeprefix("file://"))) for url in expand_shards(source)]
    out: list[object] = []
    for name, local in listing:
        stat = local.stat() if local.is_file() else None
        out.append([name, stat and stat.st_size, stat and stat.st_mtime_ns])
    return out


def iter_reference_images(source: str, size: int, stats: dict[str, int]) -> Iterator[Tensor]:
    """uint8 (3, size, size) per readable image; counts ``unreadable`` and ``resized`` in
    ``stats``."""
    path = Path(source)
    if _is_image_folder(path):
        for file in _folder_images(path):
            image = _decode(file.read_bytes(), stats)
            if image is not None:
                yield _prepare(image, size, stats)
        return
    for url in expand_shards(source):
        try:
            for sample in iter_samples(url):
                member = next((m for m in IMAGE_MEMBERS if m in sample.members), None)
                if member is None:
                    continue
                image = _decode(sample.members[member], stats)
                if image is not None:
                    yield _prepare(image, size, stats)
        except ShardReadError:
            stats["unreadable"] = stats.get("unreadable", 0) + 1


def _decode(data: bytes, stats: dict[str, int]) -> Image.Image | None:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        stats["unreadable"] = stats.get("unreadable", 0) + 1
        return None


def _prepare(image: Image.Image, size: int, stats: dict[str, int]) -> Tensor:
    if image.size != (size, size):
        stats["resized"] = stats.get("resized", 0) + 1
    x = to_tensor(image, size)[0]  # (3, S, S) in [-1, 1]
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def reference_key(source: str, size: int, count: int | None, extractor_id: str) -> str:
    """The cache key: what the data is, the size, the count and the extractor."""
    record = {"data": _fingerprint(source), "size": size, "count": count, "extractor": extractor_id}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def reference_features(
    source: str, size: int, count: int | None, extractor_id: str,
    extract: Callable[[Tensor], Tensor], cache_dir: Path, batch: int = 32,
) -> ReferenceFeatures:  # fmt: skip
    """The reference's Inception features, from the cache when it holds them."""
    key = reference_key(source, size, count, extractor_id)
    cached = cache_dir / f"reference-{key}.safetensors"
    if cached.is_file():
        tensors, meta = files.read_safetensors(cached)
        return ReferenceFeatures(tensors["features"], int(meta["unreadable"]),
                                 int(meta["resized"]), True, key)  # fmt: skip
    stats: dict[str, int] = {}
    features, pending = [], []
    for image in iter_reference_images(source, size, stats):
        pending.append(image)
        if len(pending) == batch:
            features.append(extract(torch.stack(pending)))
            pending = []
        if count is not None and sum(len(f) for f in features) + len(pending) >= count:
            break
    if pending:
        features.append(extract(torch.stack(pending)))
    n = sum(len(f) for f in features)
    unreadable = stats.get("unreadable", 0)
    if n < 2:
        raise ConfigError(
            f"--reference {source} has {n} readable image(s) ({unreadable} unreadable); FID and "
            "KID need at least 2"
        )
    if count is not None and n < count:
        raise ConfigError(f"--reference {source} has {n} readable images, fewer than "
                          f"--reference-num {count} ({unreadable} unreadable)")  # fmt: skip
    out = torch.cat(features).float()
    meta = {"unreadable": str(unreadable), "resized": str(stats.get("resized", 0)),
            "source": source, "size": str(size), "extractor": extractor_id}  # fmt: skip
    cache_dir.mkdir(parents=True, exist_ok=True)
    files.write_safetensors(cached, {"features": out}, meta)
    return ReferenceFeatures(out, unreadable, stats.get("resized", 0), False, key)
