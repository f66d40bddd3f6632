"""Images in and out of tensors, grids, captions and the loss-curve plot — drawn with PIL, no
plotting dependency. Used by smoke, validation grids, ``sdtrain sample``, ``sdtrain data preview``
and the demo's report.

Tensors are images in [-1, 1], ``(B, C, H, W)``; arrays are ``uint8`` ``(..., H, W, 3)``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

CAPTION_LINES = 3
CAPTION_LINE_HEIGHT = 12

# ---------------------------------------------------------------------------------------------
# Tensors <-> pictures
# ---------------------------------------------------------------------------------------------


def draw_test_scene(size: int) -> Image.Image:
    """A red circle above a blue square on a white background."""
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    s = size
    draw.ellipse((0.3 * s, 0.05 * s, 0.7 * s, 0.45 * s), fill=(220, 30, 30))
    draw.rectangle((0.3 * s, 0.55 * s, 0.7 * s, 0.95 * s), fill=(30, 60, 220))
    return image


def to_tensor(image: Image.Image, size: int) -> Tensor:
    """PIL image -> (1, 3, size, size) float in [-1, 1], centre-cropped and resized."""
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    array = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float()  # (3, S, S)
    return (array / 127.5 - 1.0)[None]


def to_image(x: Tensor) -> Image.Image:
    """(1, C, H, W) in [-1, 1] -> PIL image (grey for one channel)."""
    array = ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def to_uint8(images: Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] (C = 1 or 3) -> (N, H, W, 3) uint8."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_png(image: Image.Image, path: Path, zoom: int = 1) -> Path:
    """Write ``image`` as a PNG (enlarged ``zoom`` x, nearest neighbour), creating the folder."""
    if zoom != 1:
        image = image.resize((image.width * zoom, image.height * zoom), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=True)
    return path


# ---------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------


def image_grid(images: Tensor, cols: int | None = None) -> Tensor:
    """(B, C, H, W) -> (1, C, rows * H, cols * W), row by row; ``cols`` defaults to
    ``ceil(sqrt(B))``; empty cells are white."""
    b, c, h, w = images.shape
    cols = cols or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = images.new_ones(rows * cols, c, h, w)
    grid[:b] = images
    grid = grid.reshape(rows, cols, c, h, w).permute(2, 0, 3, 1, 4)  # (C, rows, H, cols, W)
    return grid.reshape(1, c, rows * h, cols * w)


def make_grid(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of cells (N, S, S, 3) -> one (rows x S, N x S, 3) image, no padding."""
    return np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)


def column_strips(rows: list[np.ndarray]) -> list[np.ndarray]:
    """Each column of the grid as one (rows x S, S, 3) image."""
    return [np.concatenate([row[j] for row in rows], axis=0) for j in range(len(rows[0]))]


def caption_text(prompt: str) -> str:
    return prompt if prompt else "(empty prompt)"


def captioned_grid(grid: np.ndarray, prompts: list[str], cell: int) -> Image.Image:
    """The grid with each column's prompt written below it (wrapped, at most a few lines)."""
    strip = CAPTION_LINES * CAPTION_LINE_HEIGHT + 4
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + strip), "white")
    canvas.paste(Image.fromarray(grid), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    chars = max(cell // 6, 4)  # the default bitmap font is about 6 px per character
    for j, prompt in enumerate(prompts):
        lines = textwrap.wrap(caption_text(prompt), chars)[:CAPTION_LINES]
        for k, line in enumerate(lines):
            xy = (j * cell + 2, grid.shape[0] + 2 + k * CAPTION_LINE_HEIGHT)
            draw.text(xy, line, fill="black", font=font)
    return canvas


def wrap_pixels(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (over-long words are cut)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = max(1, int(len(word) * width / draw.textlength(word, font=font)))
            lines.append(word[:cut])
            word = word[cut:]
        line = word
    if line:
        lines.append(line)
    return lines


def caption_panel(text: str, width: int, height: int) -> Image.Image:
    """A light grey ``width`` x ``height`` image with ``text`` wrapped in black (Pillow's default
    font, scaled with the panel; too many lines end in an ellipsis)."""
    panel = Image.new("RGB", (width, height), (242, 242, 242))  # set apart from white masks
    draw = ImageDraw.Draw(panel)
    try:
        font: Any = ImageFont.load_default(size=max(10, height // 20))
    except TypeError:  # Pillow < 10.1: a fixed-size bitmap font only
        font = ImageFont.load_default()
    margin = max(4, width // 40)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (10, 2)
    line_height = ascent + descent + 2
    lines = wrap_pixels(draw, text, font, width - 2 * margin)
    fits = max(1, (height - 2 * margin) // line_height)
    if len(lines) > fits:
        lines = [*lines[: fits - 1], lines[fits - 1] + " …"]
    for row, line in enumerate(lines):
        draw.text((margin, margin + row * line_height), line, fill="black", font=font)
    return panel


# ---------------------------------------------------------------------------------------------
# Loss curves
# ---------------------------------------------------------------------------------------------


def smoothed(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Bias-corrected exponential running average (as TensorBoard's smoothing)."""
    out, acc = np.empty_like(values), 0.0
    for j, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[j] = acc / (1 - weight ** (j + 1))
    return out


def draw_panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    title: str,
    points: Sequence[tuple[int, float]],
    mark: int | None,
) -> None:
    """One loss curve in ``box`` (left, top, right, bottom): raw values light, smoothed dark, on
    a log scale; a dashed red line at step ``mark``."""
    font = ImageFont.load_default()
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(160, 160, 160))
    draw.text((x0, y0 - 18), title, fill="black", font=font)
    if len(points) < 2:
        return
    steps = np.array([p[0] for p in points], dtype=np.float64)
    values = np.log10(np.maximum([p[1] for p in points], 1e-12))
    top, bottom = float(np.percentile(values, 99)), float(values.min())
    span, width = max(top - bottom, 1e-9), max(steps[-1] - steps[0], 1.0)

    def xy(step: float, value: float) -> tuple[float, float]:
        fy = (min(value, top) - bottom) / span
        return x0 + (step - steps[0]) / width * (x1 - x0), y1 - fy * (y1 - y0)

    draw.line([xy(a, b) for a, b in zip(steps, values, strict=True)], fill=(170, 200, 235))
    line = [xy(a, b) for a, b in zip(steps, smoothed(values), strict=True)]
    draw.line(line, fill=(20, 70, 160), width=2)
    if mark is not None:
        mx = xy(mark, bottom)[0]
        for y in range(y0, y1, 6):
            draw.line((mx, y, mx, y + 3), fill=(200, 40, 40))
        draw.text((mx + 3, y0 + 3), f"resumed at {mark}", fill=(200, 40, 40), font=font)
    draw.text((x0 - 34, y0), f"{10**top:.2g}", fill="black", font=font)
    draw.text((x0 - 34, y1 - 10), f"{10**bottom:.2g}", fill="black", font=font)
    draw.text((x0, y1 + 4), f"step {int(steps[0])}", fill="black", font=font)
    draw.text((x1 - 60, y1 + 4), f"step {int(steps[-1])}", fill="black", font=font)


def plot_losses(
    curves: dict[str, list[tuple[int, float]]], marks: dict[str, int], path: Path
) -> Path:
    """One panel per curve (log scale), side by side; ``marks`` puts a dashed line at a step of
    a curve (a resumption)."""
    w, h = 300, 210
    canvas = Image.new("RGB", (w * len(curves), h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, points) in enumerate(curves.items()):
        draw_panel(draw, (i * w + 40, 24, (i + 1) * w - 10, h - 22), title, points,
                   marks.get(title))  # fmt: skip
    return save_png(canvas, path)
