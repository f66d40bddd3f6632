"""Turn local images into img2dataset-style shards: a folder of images with ``.txt`` captions
(and optional ``.json`` sidecars), or a CSV / parquet table of local paths plus metadata columns.
JPEG bytes are copied as they are; unreadable images are skipped and listed, never fatal.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrain.data.shards import DataError
from sdtrain.errors import ConfigError
from sdtrain.utils.progress import progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""Files ``make-shards`` picks up from a folder (by suffix, case-insensitive)."""
_MEMBER_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tiff"}
_JPEG_QUALITY = 95
_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that exchange width and height


class UnreadableSource(ValueError):
    """One source image (or its sidecar) that cannot be used; the sample is skipped."""


@dataclass
class SourceItem:
    """One sample to write: an image file, its caption and its metadata."""

    path: Path
    label: str
    """How the summary names it (the path as the folder or table gave it)."""
    caption: str
    meta: dict[str, Any]
    sidecar: Path | None = None


@dataclass
class MakeShardsResult:
    """What ``make_shards`` did."""

    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(path, reason) of every source skipped."""
    shards: list[Path] = field(default_factory=list)
    converted: int = 0
    """Images re-encoded as JPEG (``to_jpeg``)."""


def iter_folder(src: Path) -> list[SourceItem]:
    """Images under ``src`` (recursively, sorted) with their ``.txt`` / ``.json`` sidecars."""
    items = []
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    for path in files:
        txt, sidecar = path.with_suffix(".txt"), path.with_suffix(".json")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""
        items.append(
            SourceItem(
                path=path,
                label=str(path.relative_to(src)),
                caption=caption,
                meta={},
                sidecar=sidecar if sidecar.is_file() else None,
            )
        )
    return items


_INT = re.compile(r"[-+]?\d+")


def _csv_value(text: str) -> Any:
    """CSV cells as json values: numbers as numbers (the filters compare them), '' as null."""
    text = text.strip()
    if not text:
        return None
    if _INT.fullmatch(text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return text
    return value if math.isfinite(value) else None


def _json_value(value: Any) -> Any:
    """Table cells as json values (NaN -> null, other non-json types as text)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str, list, dict)):
        return value
    return str(value)


def read_table(src: Path) -> list[dict[str, Any]]:
    """The rows of a CSV (stdlib) or parquet (needs ``pyarrow``) file as dicts."""
    if src.suffix.lower() == ".csv":
        with src.open(newline="", encoding="utf-8") as handle:
            rows = csv.DictReader(handle)
            # a short row gives None values, a long one a None key holding the surplus cells
            return [
                {k: _csv_value(v or "") for k, v in row.items() if k is not None} for row in rows
            ]
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {src} needs the 'pyarrow' package, which is not installed "
            "(pip install pyarrow), or convert the table to CSV"
        ) from None
    try:
        rows = pq.read_table(src).to_pylist()
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError family
        raise DataError(f"cannot read parquet file {src}: {err}") from err
    return [{k: _json_value(v) for k, v in row.items()} for row in rows]


def iter_table(src: Path, path_column: str, caption_column: str) -> list[SourceItem]:
    """Rows of a table: ``path_column`` (relative paths are relative to the table's folder),
    ``caption_column``; every other column goes into the json as it is."""
    rows = read_table(src)
    if not rows:
        raise DataError(f"{src} holds no rows")
    columns = list(rows[0])
    for option, column in (("--path-column", path_column), ("--caption-column", caption_column)):
        if column not in columns:
            raise ConfigError(f"{src} has no column {column!r} (columns: {columns})", key=option)
    items = []
    for row in rows:
        given = row[path_column]
        path = Path(str(given)) if given is not None else Path()
        caption = row[caption_column]
        meta = {k: v for k, v in row.items() if k not in (path_column, caption_column)}
        items.append(
            SourceItem(
                path=path if path.is_absolute() else src.parent / path,
                label=str(given),
                caption="" if caption is None else str(caption),
                meta=meta,
            )
        )
    return items


def _upright_size(image: Any) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    width, height = image.size
    try:
        orientation = image.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block must not hide a readable image
        orientation = 1
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def encode_image(data: bytes, to_jpeg: bool, verify: bool) -> tuple[str, bytes, tuple[int, int]]:
    """(member extension, bytes, upright (w, h)) for one image file's bytes.

    JPEG is copied byte for byte; other formats keep their bytes and extension unless
    ``to_jpeg``, which re-encodes them as JPEG quality 95 (alpha composited onto white, EXIF and
    ICC profile kept). Only the header is read unless ``verify`` (or a conversion) decodes it.
    """
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or ""
            size = _upright_size(image)
            ext = _MEMBER_EXT.get(fmt, fmt.lower())
            if ext == "jpg" or not to_jpeg:
                if verify:
                    image.load()
                return ext, data, size
            image.load()
            if image.mode in ("RGBA", "LA", "PA", "P") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                rgb.paste(rgba, mask=rgba.getchannel("A"))
            else:
                rgb = image.convert("RGB")
            out = io.BytesIO()
            extra = {k: image.info[k] for k in ("exif", "icc_profile") if image.info.get(k)}
            rgb.save(out, format="JPEG", quality=_JPEG_QUALITY, **extra)
            return "jpg", out.getvalue(), size
    except Exception as exc:  # Pillow's many exception types all mean "not a usable image"
        raise UnreadableSource(f"{type(exc).__name__}: {exc}") from exc


def _prepare_sample(item: SourceItem, to_jpeg: bool, verify: bool) -> tuple[dict[str, Any], bool]:
    """The members of one sample and whether its image was re-encoded."""
    from sdtrain.data.transforms import normalize_caption

    try:
        data = item.path.read_bytes()
    except OSError as err:
        raise UnreadableSource(err.strerror or str(err)) from err
    ext, image, (width, height) = encode_image(data, to_jpeg, verify)
    meta = dict(item.meta)
    if item.sidecar is not None:
        try:
            sidecar = json.loads(item.sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UnreadableSource(f"bad json sidecar {item.sidecar.name}: {err}") from err
        if not isinstance(sidecar, dict):
            raise UnreadableSource(f"json sidecar {item.sidecar.name} is not an object")
        meta.update(sidecar)
    caption = normalize_caption(item.caption)
    if not caption and isinstance(meta.get("caption"), str):
        caption = normalize_caption(meta["caption"])
    meta["caption"] = caption
    meta["path"] = item.label
    meta["width"], meta["height"] = width, height
    meta.setdefault("original_width", width)
    meta.setdefault("original_height", height)
    converted = ext == "jpg" and image is not data
    return {ext: image, "txt": caption, "json": meta}, converted


def make_shards(
    src: str | Path,
    out: str | Path,
    per_shard: int = 1000,
    to_jpeg: bool = False,
    verify: bool = False,
    path_column: str = "path",
    caption_column: str = "caption",
) -> MakeShardsResult:
    """Write img2dataset-style shards of ``src`` (folder, ``.csv`` or ``.parquet``) to ``out``.

    Each sample is ``<key>.<jpg|png|webp|...>`` + ``.txt`` (the normalised caption) + ``.json``:
    for folders the ``.json`` sidecar (if any), for tables every column except path and caption;
    plus ``caption``, ``path`` (as given), ``width`` / ``height`` of the stored image and
    ``original_width`` / ``original_height`` (from the header unless the metadata has them),
    sizes upright after EXIF orientation. Unreadable sources are skipped and listed in the result.
    """
    from sdtrain.data.writer import ShardWriter

    src, out = Path(src), Path(out)
    if per_shard < 1:
        raise ConfigError("must be >= 1", key="--per-shard")
    if src.is_dir():
        items = iter_folder(src)
    elif src.is_file() and src.suffix.lower() in (".csv", ".parquet", ".pq"):
        items = iter_table(src, path_column, caption_column)
    elif not src.exists():
        raise DataError(f"source {src} does not exist")
    else:
        raise ConfigError(f"{src} is neither a folder nor a .csv / .parquet table", key="SRC")
    if not items:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {src}")
    if out.is_dir() and any(out.glob("*.tar")):
        raise ConfigError(f"{out} already holds .tar shards: choose an empty folder", key="OUT")

    result = MakeShardsResult()
    with (
        ShardWriter(out, per_shard=per_shard) as writer,
        progress(total=len(items), unit="img", desc="make-shards") as bar,
    ):
        for item in items:
            bar.update()
            try:
                members, converted = _prepare_sample(item, to_jpeg, verify)
            except UnreadableSource as err:
                result.skipped.append((item.label, str(err)))
                bar.set_postfix(skipped=len(result.skipped), refresh=False)
                continue
            writer.write(members)
            result.written += 1
            result.converted += converted
    result.shards = list(writer.written)
    if result.skipped:
        lines = [f"{path}\t{reason}" for path, reason in result.skipped]
        (out / "skipped.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return result
