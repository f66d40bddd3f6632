"""The demo's figures and report: the prompts and inpainting cases it samples, the scene metrics
that score them (dominant colour by hue, change inside / outside a mask), the overview picture,
``report.md`` and the result record behind ``demo.json``. ``launch/demo.py`` runs the stages;
tests/test_demo.py checks these metrics on drawn scenes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from sdtrain.config.resolve import configs_dir
from sdtrain.utils.images import image_grid, save_png, to_image

if TYPE_CHECKING:
    from sdtrain.launch.demo_lora import LoraStageResult

COLOURS = ("red", "green", "blue", "yellow")
GRID_TEMPLATES = (
    "a large {c} circle in the middle on a white background",
    "a large {c} square on the left on a white background",
    "a large {c} triangle on the right on a white background",
    "a small {c} square at the top on a white background",
    "a {c} circle above a {o} square on a white background",
)
"""Columns of the prompt grid (rows: the colours); the first four name one colour."""
MIN_CHROMA = 60
"""A pixel counts as coloured when its largest and smallest RGB values differ by this much."""


# ---------------------------------------------------------------------------------------------
# Prompts and inpainting cases
# ---------------------------------------------------------------------------------------------


def grid_prompts() -> list[str]:
    """Row by row: one row per colour, one column per template."""
    return [
        template.format(c=c, o=COLOURS[(i + 2) % len(COLOURS)])
        for i, c in enumerate(COLOURS)
        for template in GRID_TEMPLATES
    ]


@dataclass(frozen=True)
class InpaintCase:
    """An input scene, a box to repaint (fractions: left, top, right, bottom), a prompt and the
    colour the prompt puts into the box (None: the box should become background)."""

    scene: str
    box: tuple[float, float, float, float]
    prompt: str
    paints: str | None


INPAINT_CASES = (
    InpaintCase("blue:square:0.73:0.5:0.16", (0.0, 0.0, 0.5, 1.0),
                "a red circle to the left of a blue square on a white background", "red"),
    InpaintCase("green:triangle:0.5:0.5:0.24", (0.15, 0.15, 0.85, 0.85),
                "a large yellow circle in the middle on a white background", "yellow"),
    InpaintCase("blue:square:0.5:0.27:0.16|yellow:circle:0.5:0.73:0.16", (0.0, 0.0, 1.0, 0.5),
                "a large yellow circle at the bottom on a white background", None),
    InpaintCase("red:circle:0.27:0.5:0.16", (0.5, 0.0, 1.0, 1.0),
                "a red circle to the left of a green triangle on a white background", "green"),
)  # fmt: skip


def masked_colour(image: np.ndarray, mask: np.ndarray) -> str | None:
    """``dominant_colour`` of the repainted region only (mask: (H, W) bool, True = repainted)."""
    region = image.copy()
    region[~mask] = 255
    return dominant_colour(region)


def case_inputs(case: InpaintCase, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, S, S) image in [-1, 1] and (1, 1, S, S) mask (1 = repaint) for a case."""
    from sdtrain.data.synthetic import Scene, SceneShape, draw_scene

    shapes = []
    for part in case.scene.split("|"):
        colour, kind, x, y, r = part.split(":")
        shapes.append(SceneShape(colour, kind, float(x), float(y), float(r)))
    image = np.asarray(draw_scene(Scene(tuple(shapes), ""), size), dtype=np.float32)
    mask = torch.zeros(1, 1, size, size)
    left, top, right, bottom = (round(v * size) for v in case.box)
    mask[..., top:bottom, left:right] = 1.0
    return torch.from_numpy(image).permute(2, 0, 1)[None] / 127.5 - 1.0, mask


# ---------------------------------------------------------------------------------------------
# Scene metrics (the report's quality figures)
# ---------------------------------------------------------------------------------------------


def hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of (..., 3) RGB values; blending a colour with white keeps its hue."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    high, low = rgb.max(axis=-1).astype(np.float64), rgb.min(axis=-1).astype(np.float64)
    chroma = np.maximum(high - low, 1e-9)
    h = np.where(high == r, (g - b) / chroma % 6, np.where(high == g, (b - r) / chroma + 2,
                 (r - g) / chroma + 4))  # fmt: skip
    return h * 60.0


def dominant_colour(image: np.ndarray, min_pixels: int = 4) -> str | None:
    """The palette colour whose hue most coloured pixels (chroma >= ``MIN_CHROMA``) are nearest
    to, for an (H, W, 3) uint8 image; None when fewer than ``min_pixels`` are coloured.

    Hue rather than RGB distance: the anti-aliased edge of a blue shape on white is a pale blue
    that is nearer in RGB to purple, but has blue's hue."""
    from sdtrain.data.synthetic import SCENE_COLOURS

    pixels = image.reshape(-1, 3)
    coloured = pixels[np.ptp(pixels, axis=1) >= MIN_CHROMA]
    if len(coloured) < min_pixels:
        return None
    names = list(SCENE_COLOURS)
    palette = hue(np.array([SCENE_COLOURS[n] for n in names]))  # (K,)
    gap = np.abs(hue(coloured)[:, None] - palette[None])  # (N, K)
    nearest = np.minimum(gap, 360.0 - gap).argmin(axis=1)
    return names[int(np.bincount(nearest, minlength=len(names)).argmax())]


def region_differences(
    before: np.ndarray, after: np.ndarray, mask: np.ndarray
) -> tuple[float, float]:
    """Mean absolute difference (0-255) inside and outside ``mask`` (H, W, bool = repainted)."""
    diff = np.abs(before.astype(np.float64) - after.astype(np.float64)).mean(axis=-1)
    return float(diff[mask].mean()), float(diff[~mask].mean())


# ---------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------


def save_grid(images: torch.Tensor, cols: int, path: Path, zoom: int = 3) -> Path:
    """(B, 3, H, W) in [-1, 1] -> a PNG grid, each image enlarged ``zoom`` x (nearest)."""
    return save_png(to_image(image_grid(images.cpu(), cols=cols)), path, zoom)


def overview_image(prompt_grid: Path, inpainting_grid: Path, path: Path) -> Path:
    """One labelled picture of the results: the base model's prompt grid (rows: colours) beside
    the inpainting grid (input, mask, result)."""
    font = ImageFont.load_default()
    with Image.open(prompt_grid) as a, Image.open(inpainting_grid) as b:
        left, right = a.convert("RGB"), b.convert("RGB")
    label, gap, head = 56, 24, 34
    width = label + left.width + gap + right.width
    canvas = Image.new("RGB", (width, head + max(left.height, right.height)), "white")
    canvas.paste(left, (label, head))
    canvas.paste(right, (label + left.width + gap, head))
    draw = ImageDraw.Draw(canvas)
    draw.text((label, 4), "text-to-image (base, eps): one prompt per cell", fill="black", font=font)
    draw.text((label, 17), "rows: " + ", ".join(COLOURS) + " in the prompt", fill="black",
              font=font)  # fmt: skip
    draw.text((label + left.width + gap, 4), "inpainting:", fill="black", font=font)
    draw.text((label + left.width + gap, 17), "input, mask, result", fill="black", font=font)
    cell = left.height // len(COLOURS)
    for i, colour in enumerate(COLOURS):
        draw.text((4, head + i * cell + cell // 2 - 6), colour, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", optimize=True)
    return path


# ---------------------------------------------------------------------------------------------
# Training curves
# ---------------------------------------------------------------------------------------------


def read_metrics(run: Path, key: str) -> list[tuple[int, float]]:
    """(step, value) of ``key`` over every CSV log version of a run (a resumed run has two)."""
    import csv

    points: dict[int, float] = {}
    for path in sorted((run / "logs").glob("version_*/metrics.csv")):
        with path.open() as handle:
            for row in csv.DictReader(handle):
                if row.get(key):
                    points[int(row["step"])] = float(row[key])
    return sorted(points.items())


# ---------------------------------------------------------------------------------------------
# The result and the report
# ---------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    name: str
    objective: str
    steps: int
    run_dir: Path
    init_from: Path | None
    seconds: float
    export: Path | None = None
    data: str = "image shards"
    """What the stage trained from: ``image shards`` or ``latent shards`` (``data.latents``)."""
    step_seconds: tuple[float, float] = (0.0, 0.0)
    """Median (wall, process CPU) seconds per optimiser step (UNet stages)."""
    bucket_step_seconds: dict[str, tuple[float, float]] = field(default_factory=dict)
    """``step_seconds`` per aspect-ratio bucket (``WxH``) of a stage trained with buckets."""


@dataclass
class DemoResult:
    """Where everything is, and the figures the report shows."""

    out: Path
    quick: bool
    seed: int
    samples: int = 0
    shards: list[Path] = field(default_factory=list)
    filter_stats: dict[str, Any] = field(default_factory=dict)
    scale_factor: float = 1.0
    stages: list[StageResult] = field(default_factory=list)
    resume: dict[str, Any] = field(default_factory=dict)
    latents: dict[str, Any] = field(default_factory=dict)
    """The ``sdtrain data encode`` pass: shards, samples, seconds."""
    eval: dict[str, Any] = field(default_factory=dict)
    """The eval stage's table (``DemoEvalTable.to_json``); empty when it was left out."""
    eval_markdown: str = ""
    sections: list[str] = field(default_factory=list)
    """Report sections of the full demo's extra stages (x4 upscaler, LoRA)."""
    buckets: dict[str, Any] = field(default_factory=dict)
    """The v stage's non-square scenes: shards, samples, kept, ``buckets`` {WxH: n},
    ``dropped_upscale``."""
    lora: dict[str, Any] = field(default_factory=dict)
    """The LoRA stage's figures (``LoraStageResult.to_json``); empty when it was left out."""
    exports: dict[str, Path] = field(default_factory=dict)
    grids: dict[str, Path] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    report: Path | None = None
    loss_plot: Path | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))

    def summary(self) -> str:
        q = self.quality
        lines = [
            f"sdtrain demo: done in {self.seconds / 60:.1f} min -> {self.out}",
            f"  report:       {self.report}",
            f"  loss curves:  {self.loss_plot}",
            *(f"  grid {k + ':':<11} {v}" for k, v in self.grids.items()),
            *(f"  checkpoint {k + ':':<11} {v}" for k, v in self.exports.items()),
            f"  colour accuracy (base): {q.get('colour accuracy (base)')}, "
            f"(v): {q.get('colour accuracy (v)')}",
            f"  inpainting: masked region changed by {q.get('inpainting: masked mean abs diff')}, "
            f"the rest by {q.get('inpainting: unmasked mean abs diff')} (0-255)",
            f"  logs: {self.out}/<stage>/logs/version_*/metrics.csv and <stage>/wandb/ (offline; "
            "`wandb sync` uploads them)",
        ]
        return "\n".join(lines)


RATIO_BUCKET = "32x32"
"""The v stage's bucket whose steps have the base's shape (the latents ratio)."""


def latent_step_ratio(result: DemoResult) -> float | None:
    """CPU seconds per step of the v stage (image shards: VAE and text encoder every step) over
    the base's (latent shards): the same UNet and batch, so the ratio is what the latents save.
    The v stage trains in aspect-ratio buckets: only its steps on the square bucket (the base's
    32x32) count, so that both sides are the same shape."""
    stages = {s.name: s for s in result.stages}
    if "base" not in stages or "v" not in stages:
        return None
    v = stages["v"]
    v_cpu = v.bucket_step_seconds.get(RATIO_BUCKET, v.step_seconds)[1]
    base_cpu = stages["base"].step_seconds[1]
    return v_cpu / base_cpu if v_cpu and base_cpu else None


def latents_lines(result: DemoResult) -> list[str]:
    latents = result.latents
    if not latents:
        return []
    lines = [
        f"`sdtrain data encode` wrote {latents['samples']} samples' posterior moments, caption "
        f"embeddings and crops into {latents['shards']} latent shards (`latents/`) in "
        f"{latents['seconds']:.0f} s; the base and inpainting stages train from them "
        "(`data.latents: true`, the masked image still encoded per step), the v stage from the "
        "non-square image shards."
    ]
    if result.buckets:
        lines += ["", *bucket_lines(result)]
    ratio = latents.get("step_cpu_ratio_images_over_latents")
    if ratio is not None:
        lines[0] += (
            f" Measured here: a step on image shards (v) takes {ratio:.2f}x the CPU time of one "
            "on latent shards (base), same UNet and batch (the median of the v stage's steps on "
            f"its {RATIO_BUCKET} bucket, the base's shape, against the median of the base's)."
        )
    return lines


def bucket_lines(result: DemoResult) -> list[str]:
    """The v stage's non-square data: how its scenes fall into the aspect-ratio buckets (as
    ``sdtrain data stats --buckets`` counts them) and its step time per bucket."""
    b = result.buckets
    kept = sum(b["buckets"].values())
    steps = {s.name: s for s in result.stages}.get("v")
    per_step = steps.bucket_step_seconds if steps else {}
    lines = [
        f"The v stage trains on {b['samples']} non-square scenes (`shards-wide/`, width / height "
        "2:3, 1:1, 3:2) in aspect-ratio buckets (`data.buckets`, every batch one bucket; "
        f"`sdtrain data stats --buckets`): {kept} of {b['kept']} kept samples placed, "
        f"{b['dropped_upscale']} dropped for needing more than the allowed upscale.",
        "",
        "| bucket (W x H) | samples | share | v step ms (wall / CPU) |",
        "|---|---:|---:|---:|",
    ]
    for name, count in b["buckets"].items():
        share = f"{count / kept:.1%}" if kept else "-"
        wall, cpu = per_step.get(name, (0.0, 0.0))
        timing = f"{wall * 1000:.0f} / {cpu * 1000:.0f}" if wall else "—"
        lines.append(f"| {name} | {count} | {share} | {timing} |")
    return lines


def lora_section(lora: LoraStageResult, out: Path) -> str:
    """The report's "## LoRA" section: what was taught, both grids and the two measured rates
    (a shape classifier on the scenes' geometry; chance 1/4)."""
    rel = lambda p: Path(p).relative_to(out).as_posix()  # noqa: E731
    n = lora.samples
    count = lambda rate: f"{round(rate * n)}/{n}"  # noqa: E731
    lines = [
        "## LoRA (DreamBooth-style, prior preservation)",
        "",
        f"A rank-8 LoRA on the exported base, {lora.steps} steps (`launch/demo_lora.py`, "
        f'`configs/demo/lora.yaml`): "a sks shape" taught as a five-pointed star, a shape no '
        f'scene holds, with class images of "{lora.class_prompt}" generated by the base '
        f"itself (prior preservation). Adapter: `{rel(lora.export)}` (kohya layout).",
        "",
        f'Each grid: row 1 "a sks shape", row 2 the class prompt, {n} samples each; shapes '
        f"read by a template classifier (circle, square, triangle, star: chance "
        f"{lora.chance:.2f}).",
        "",
        "| prompt | measured | before | after |",
        "|---|---|---:|---:|",
        f"| a sks shape | star | {count(lora.star_rate['before'])} | "
        f"{count(lora.star_rate['after'])} |",
        f"| {lora.class_prompt} | {lora.class_shape} | {count(lora.class_rate['before'])} | "
        f"{count(lora.class_rate['after'])} |",
        "",
        f"Before (base): ![LoRA before]({rel(lora.grids['before'])})",
        "",
        f"After (base + adapter): ![LoRA after]({rel(lora.grids['after'])})",
    ]
    return "\n".join(lines)


def write_report(result: DemoResult) -> Path:
    """``report.md`` in the run folder: filter stats, training, loss curves, grids, figures."""
    out = result.out
    rel = lambda p: Path(p).relative_to(out).as_posix()  # noqa: E731
    stats = result.filter_stats
    lines = [
        "# sdtrain demo",
        "",
        f"{'Quick' if result.quick else 'Full'} demo, seed {result.seed}, "
        f"{result.seconds / 60:.1f} minutes on {torch.get_num_threads()} CPU thread(s).",
        "",
        "## Data and filters",
        "",
        f"{result.samples} generated scenes in {len(result.shards)} img2dataset-style shards "
        f"(`{rel(out / 'shards')}/`), filtered by the default LAION recipe (aesthetic >= 5, "
        "pwatermark < 0.5, punsafe < 0.1) and the size filter (>= 64 px):",
        "",
        "| | samples |",
        "|---|---:|",
        f"| seen | {stats['seen']} |",
        f"| kept | {stats['kept']} |",
        *(f"| rejected: {k} | {v} |" for k, v in stats["rejected"].items()),
        *(f"| error: {k} | {v} |" for k, v in stats["errors"].items()),
        "",
        "## Training",
        "",
        "| stage | objective | steps | trained from | initialised from | seconds | ms/step "
        "(wall / CPU) | run folder |",
        "|---|---|---:|---|---|---:|---:|---|",
    ]
    for stage in result.stages:
        init = rel(stage.init_from) if stage.init_from else "random"
        wall, cpu = stage.step_seconds
        per_step = f"{wall * 1000:.0f} / {cpu * 1000:.0f}" if wall else "—"
        lines.append(
            f"| {stage.name} | {stage.objective} | {stage.steps} | {stage.data} | `{init}` | "
            f"{stage.seconds:.0f} | {per_step} | `{rel(stage.run_dir)}/` |"
        )
    resume = result.resume
    lines += ["", *latents_lines(result)]
    lines += [
        "",
        f"The base run was interrupted on purpose (SIGUSR1 after step {resume['signal_step']}: "
        f"checkpoint `{resume['checkpoint']}`, stop) and continued with `resume=auto` to step "
        f"{resume['final_step']}.",
        "",
        "![loss curves](loss-curves.png)",
        "",
        "## Samples (DDIM, classifier-free guidance)",
        "",
        f"Prompt grid of the base model (`{rel(result.grids['base'])}`): rows "
        f"{', '.join(COLOURS)}; columns:",
        "",
        *(
            f"{i + 1}. {t.format(c='<colour>', o='<other colour>')}"
            for i, t in enumerate(GRID_TEMPLATES)
        ),
        "",
        f"![base prompt grid]({rel(result.grids['base'])})",
        "",
        f"v-objective model, same prompts: ![v prompt grid]({rel(result.grids['v'])})",
        "",
        "Inpainting (columns: input, mask, result), sampled with the unmasked latents held to "
        "the input's (`sdtrain sample --keep-unmasked`, the original `DDIMSampler`'s `mask` / "
        "`x0`); the model alone, without that hold, keeps little of the input after the demo's "
        "few steps (the last quality figure):",
        "",
        f"![inpainting grid]({rel(result.grids['inpainting'])})",
        "",
        *(f"- {c.prompt}" for c in INPAINT_CASES),
        "",
        "## Quality figures",
        "",
        "| figure | value |",
        "|---|---:|",
        *(f"| {k} | {v} |" for k, v in result.quality.items()),
        "",
        "## Evaluation over guidance scales",
        "",
        result.eval_markdown
        or "Left out of `--quick` (its time goal has no room for it): `sdtrain demo` runs it "
        "(`launch/demo_eval.py`; random-feature FD, KID and CLIP score with seeded random "
        "extractors, never FID, and colour accuracy per scale).",
        "",
        *(f"{section}\n" for section in result.sections),
        *(
            []
            if result.sections
            else [
                "## x4 upscaler",
                "",
                "Left out of `--quick` (it passes bicubic only after ~250 training steps, about "
                "90 s of CPU): `sdtrain demo` trains it (`launch/demo_upscale.py`).",
                "",
                "## LoRA (DreamBooth-style, prior preservation)",
                "",
                "Left out of `--quick` (its time goal has no room for it): `sdtrain demo` "
                'teaches the base "a sks shape" = a star with a LoRA and measures the star '
                "rate and the class prompt's shape before and after (`launch/demo_lora.py`).",
                "",
            ]
        ),
        "## Exported checkpoints (original layout)",
        "",
        *(f"- `{rel(p)}`" for p in result.exports.values()),
        "",
        "Sample from one: `sdtrain sample --checkpoint "
        f"{result.exports['base']} --config {configs_dir('demo') / 'base.yaml'} "
        f"model.autoencoder.scale_factor={result.scale_factor:.6g} --size 32 "
        '--prompt "a large red circle on the left on a white background" --out red.png`',
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


@contextlib.contextmanager
def quiet_data_log() -> Iterator[None]:
    """Broken samples are counted (and shown once in the filter stats), not logged each epoch."""
    data_log = logging.getLogger("sdtrain.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        data_log.setLevel(level)
