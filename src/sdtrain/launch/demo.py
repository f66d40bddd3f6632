"""``sdtrain demo``: the whole framework on an embedded default, end to end on CPU, nothing to
download.

1. data: captioned shape scenes ("a large red circle on the left on a white background") written
   as img2dataset-style shards with LAION-style metadata, plus samples the filters must drop (low
   aesthetic score, high pwatermark / punsafe, too small) and broken JPEGs; one
   ``sdtrain data stats`` pass shows the filters at work.
2. first stage: a tiny AutoencoderKL (L1 + KL, ``sdtrain.trainer.first_stage``) -> an
   original-layout file with the autoencoder and the frozen (random) text encoder.
3. base: the text-conditioned UNet (eps) with ``init_from`` = that file. It is interrupted on
   purpose (the demo sends itself SIGUSR1, as SLURM does before a time limit: checkpoint, stop)
   and continued with ``resume=auto``.
4. inpainting: ``init_from`` the exported base, UNet widened 4 -> 9 channels (extra channels
   zero), synthetic masks. 5. v: the base fine-tuned with the v objective.
6. every stage exported to an original-layout checkpoint; prompt grids and an inpainting grid
   (input, mask, result) sampled from the exported files with DDIM + classifier-free guidance;
   ``report.md`` (filter stats, loss curves, grids, quality figures) and ``demo.json``.

Every stage is an ordinary config in ``configs/demo/`` run by the ordinary entry points
(``fit``, ``export_run``, ``sample_images``); the demo only chains them and sets ``data.shards``,
``run.dir``, ``init_from``, the measured latent scale and (for ``--quick``) fewer steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont

from sdtrain.config.resolve import configs_dir as shipped_configs
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.utils.progress import progress

STAGES = ("first-stage", "base", "inpainting", "v")
COLOURS = ("red", "green", "blue", "yellow")
GRID_TEMPLATES = (
    "a large {c} circle in the middle on a white background",
    "a large {c} square on the left on a white background",
    "a large {c} triangle on the right on a white background",
    "a small {c} square at the top on a white background",
    "a {c} circle above a {o} square on a white background",
)
"""Columns of the prompt grid (rows: the colours); the first four name one colour."""
SCALE = 5.0
"""Classifier-free guidance scale of the demo's samples."""
MIN_CHROMA = 60
"""A pixel counts as coloured when its largest and smallest RGB values differ by this much."""


# ---------------------------------------------------------------------------------------------
# Plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoPlan:
    """How much the demo does: the full demo and ``--quick`` differ only here."""

    samples: int
    """Scene samples written (about 18% are dropped by the filters or broken)."""
    first_stage_steps: int
    base_steps: int
    interrupt_at: int
    """The base run is interrupted after this step and resumed."""
    inpainting_steps: int
    v_steps: int
    sampling_steps: int
    """DDIM steps of the sample grids."""


PLANS = {
    "full": DemoPlan(4000, 1500, 2500, 1000, 1200, 400, 50),
    "quick": DemoPlan(1500, 500, 550, 250, 200, 30, 25),
}


def configs_dir() -> Path:
    """The demo's stage configs (``configs/demo/``)."""
    return shipped_configs("demo")


def stage_config(stage: str, overrides: Sequence[str]) -> ExperimentConfig:
    """``configs/demo/<stage>.yaml`` with the demo's overrides."""
    from sdtrain.trainer.experiment import load_config

    return load_config([configs_dir() / f"{stage}.yaml"], list(overrides))


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


class InterruptAt(pl.Callback):
    """Sends this process SIGUSR1 after optimiser step ``step``: the trainer's preemption handler
    (the one SLURM's warning signal triggers) checkpoints and stops the run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


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


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


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
# Image statistics (the report's figures; tests/test_demo.py checks them)
# ---------------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


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
# Sampling
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


def open_exported(path: Path, cfg: ExperimentConfig) -> Any:
    """The model of an exported original-layout file, as ``sdtrain sample`` opens it."""
    from sdtrain.launch.sample import open_source

    return open_source(path, cfg).build("cpu")


def save_grid(images: torch.Tensor, cols: int, path: Path, zoom: int = 3) -> Path:
    """(B, 3, H, W) in [-1, 1] -> a PNG grid, each image enlarged ``zoom`` x (nearest)."""
    from sdtrain.launch.sample import image_grid
    from sdtrain.launch.smoke import to_image

    grid = to_image(image_grid(images.cpu(), cols=cols))
    grid = grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG", optimize=True)
    return path


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
# Report
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
    points: list[tuple[int, float]],
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
    """One panel per curve (log scale), side by side, drawn with PIL (no plotting dependency);
    ``marks`` puts a dashed line at a step of a curve (the resumption)."""
    w, h = 300, 210
    canvas = Image.new("RGB", (w * len(curves), h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (title, points) in enumerate(curves.items()):
        draw_panel(draw, (i * w + 40, 24, (i + 1) * w - 10, h - 22), title, points,
                   marks.get(title))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG", optimize=True)
    return path


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
        "| stage | objective | steps | initialised from | seconds | run folder |",
        "|---|---|---:|---|---:|---|",
    ]
    for stage in result.stages:
        init = rel(stage.init_from) if stage.init_from else "random"
        lines.append(
            f"| {stage.name} | {stage.objective} | {stage.steps} | `{init}` | "
            f"{stage.seconds:.0f} | `{rel(stage.run_dir)}/` |"
        )
    resume = result.resume
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
        "## Exported checkpoints (original layout)",
        "",
        *(f"- `{rel(p)}`" for p in result.exports.values()),
        "",
        "Sample from one: `sdtrain sample --checkpoint "
        f"{result.exports['base']} --config {configs_dir() / 'base.yaml'} "
        f"model.autoencoder.scale_factor={result.scale_factor:.6g} --size 32 "
        '--prompt "a large red circle on the left on a white background" --out red.png`',
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------
# The demo
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


class Demo:
    """The stages of ``sdtrain demo`` in order; ``run()`` does them all."""

    def __init__(self, out: Path, quick: bool = False, seed: int = 0) -> None:
        self.out = Path(out)
        self.plan = PLANS["quick" if quick else "full"]
        self.result = DemoResult(self.out, quick, seed)
        self.seed = seed

    def common(self, stage: str) -> list[str]:
        return [
            f"data.shards={self.out / 'shards'}",
            f"run.dir={self.out / stage}",
            f"seed={self.seed}",
            f"data.seed={self.seed}",
        ]

    # --- stages -----------------------------------------------------------------------------

    def data(self) -> None:
        from sdtrain.data.synthetic import SceneSpec, write_scene_shards
        from sdtrain.launch.data_cli import collect_stats

        banner(f"1/6 data: {self.plan.samples} captioned scenes -> {self.out / 'shards'}")
        spec = SceneSpec(samples=self.plan.samples, per_shard=250, seed=self.seed)
        with progress(total=spec.samples, desc="writing shards", unit="sample") as bar:
            self.result.shards = write_scene_shards(self.out / "shards", spec, bar.update)
        self.result.samples = spec.samples
        cfg = stage_config("base", self.common("base"))
        stats = collect_stats(cfg.data).to_dict()
        stats.pop("recent_errors", None)
        self.result.filter_stats = stats
        (self.out / "filter-stats.json").write_text(json.dumps(stats, indent=2))
        print(f"filters: seen {stats['seen']}, kept {stats['kept']}, rejected "
              f"{stats['rejected']}, errors {stats['errors']}")  # fmt: skip

    def first_stage(self) -> None:
        from sdtrain.trainer.first_stage import FirstStageLoss, train_first_stage

        steps = self.plan.first_stage_steps
        banner(f"2/6 first stage: autoencoder, {steps} steps (squared error + KL)")
        cfg = stage_config(
            "first-stage", [*self.common("first-stage"), f"trainer.max_steps={steps}"]
        )
        start = time.perf_counter()
        with quiet_data_log():
            first = train_first_stage(cfg, FirstStageLoss(reconstruction="l2"))
        self.first_stage_ckpt = first.checkpoint
        self.result.scale_factor = first.scale_factor
        self.result.quality["autoencoder L1 (0-1 scale)"] = round(first.l1 / 2, 4)
        self.result.stages.append(
            StageResult(
                "first-stage",
                "L2 + KL",
                steps,
                first.run_dir,
                None,
                time.perf_counter() - start,
                first.checkpoint,
            )
        )
        self.result.exports["first-stage"] = first.checkpoint
        print(f"autoencoder: L1 {first.l1 / 2:.4f}, latent scale factor {first.scale_factor:.4g}")

    def unet_stage(
        self, stage: str, steps: int, init_from: Path, interrupt_at: int = 0
    ) -> StageResult:
        from sdtrain.launch.export import export_run
        from sdtrain.trainer.fit import fit

        overrides = [
            *self.common(stage),
            f"init_from={init_from}",
            f"model.autoencoder.scale_factor={self.result.scale_factor}",
            f"trainer.max_steps={steps}",
        ]
        start = time.perf_counter()
        with quiet_data_log():
            if interrupt_at:
                run = fit(stage_config(stage, overrides), callbacks=[InterruptAt(interrupt_at)])
                self.note_interruption(run, interrupt_at)
                banner(f"{stage}: resuming the interrupted run with resume=auto")
                overrides.append("resume=auto")
            run = fit(stage_config(stage, overrides))
        cfg = stage_config(stage, overrides)
        export = self.out / "export" / f"{cfg.model.name}.ckpt"
        print(export_run(run, export).summary())
        result = StageResult(stage, cfg.model.diffusion.parameterization, steps, run, init_from,
                             time.perf_counter() - start, export)  # fmt: skip
        self.result.stages.append(result)
        self.result.exports[stage] = export
        return result

    def note_interruption(self, run: Path, signal_step: int) -> None:
        from sdtrain.trainer.fit import step_checkpoints

        step, path = step_checkpoints(run / "checkpoints")[-1]
        self.result.resume = {
            "signal_step": signal_step,
            "stopped_at": step,
            "checkpoint": path.relative_to(self.out).as_posix(),
        }
        print(f"base: interrupted (SIGUSR1 after step {signal_step}); stopped at step {step} "
              f"with checkpoint {path}")  # fmt: skip

    def samples(self) -> None:
        from sdtrain.launch.sample import sample_images

        banner("6/6 samples from the exported checkpoints (DDIM + classifier-free guidance)")
        prompts = grid_prompts()
        single = [i for i, p in enumerate(prompts) if i % len(GRID_TEMPLATES) != 4]
        steps = self.plan.sampling_steps
        with progress(total=3, desc="sampling grids", unit="grid") as bar:
            for stage in ("base", "v"):
                model = open_exported(self.result.exports[stage], self.stage_cfg(stage))
                images = sample_images(model, prompts, steps=steps, scale=SCALE,
                                       seed=self.seed, size=32)  # fmt: skip
                path = save_grid(images, len(GRID_TEMPLATES), self.out / "samples" / f"{stage}.png")
                self.result.grids[stage] = path
                colours = [dominant_colour(im) for im in to_uint8(images)]
                hits = sum(colours[i] == COLOURS[i // len(GRID_TEMPLATES)] for i in single)
                self.result.quality[f"colour accuracy ({stage})"] = f"{hits}/{len(single)}"
                bar.update()
            self.inpainting_grid(steps)
            bar.update()
        grids = self.result.grids
        grids["overview"] = overview_image(
            grids["base"], grids["inpainting"], self.out / "samples" / "overview.png"
        )

    def inpainting_grid(self, steps: int) -> None:
        """The inpainting grid, sampled with the unmasked latents held to the input's (as the
        original sampler's mask / x0); the same cases without that hold measure how much of the
        input the model keeps on its own (a report figure: little, at the demo's step count)."""
        from sdtrain.launch.sample import sample_images

        model = open_exported(self.result.exports["inpainting"], self.stage_cfg("inpainting"))
        rows, inside, outside, alone, hits = [], [], [], [], 0
        for i, case in enumerate(INPAINT_CASES):
            image, mask = case_inputs(case, 32)
            repaint = mask[0, 0].numpy() > 0.5
            before = to_uint8(image)[0]
            kwargs = dict(image=image, mask=mask, steps=steps, scale=SCALE, seed=self.seed + i,
                          size=32)  # fmt: skip
            result = sample_images(model, [case.prompt], keep_unmasked=True, **kwargs)
            after = to_uint8(result)[0]
            changed, kept = region_differences(before, after, repaint)
            inside.append(changed)
            outside.append(kept)
            hits += case.paints is not None and masked_colour(after, repaint) == case.paints
            raw = to_uint8(sample_images(model, [case.prompt], **kwargs))[0]
            alone.append(region_differences(before, raw, repaint)[1])
            rows += [image, mask.expand(1, 3, -1, -1) * 2 - 1, result]
        path = save_grid(torch.cat(rows), 3, self.out / "samples" / "inpainting.png")
        self.result.grids["inpainting"] = path
        quality = self.result.quality
        painted = sum(case.paints is not None for case in INPAINT_CASES)
        quality["inpainting: masked mean abs diff"] = round(float(np.mean(inside)), 1)
        quality["inpainting: unmasked mean abs diff"] = round(float(np.mean(outside)), 1)
        quality["inpainting: colour painted as prompted"] = f"{hits}/{painted}"
        quality["inpainting, model alone: unmasked mean abs diff"] = round(float(np.mean(alone)), 1)

    def stage_cfg(self, stage: str) -> ExperimentConfig:
        return stage_config(
            stage,
            [*self.common(stage), f"model.autoencoder.scale_factor={self.result.scale_factor}"],
        )

    def report(self) -> None:
        curves = {"first stage: L1": read_metrics(self.out / "first-stage", "train/l1")}
        for stage in STAGES[1:]:
            curves[f"{stage}: loss"] = read_metrics(self.out / stage, "train/loss")
        marks = {"base: loss": self.result.resume.get("stopped_at", 0)}
        self.result.loss_plot = plot_losses(curves, marks, self.out / "loss-curves.png")
        self.result.report = write_report(self.result)
        (self.out / "demo.json").write_text(json.dumps(self.result.to_json(), indent=2))

    # --- all of it --------------------------------------------------------------------------

    def run(self) -> DemoResult:
        start = time.perf_counter()
        os.environ.setdefault("WANDB_MODE", "offline")  # never reach for the network
        os.environ.setdefault("WANDB_SILENT", "true")
        self.out.mkdir(parents=True, exist_ok=True)
        plan = self.plan
        self.data()
        self.first_stage()
        banner(f"3/6 base text-to-image UNet (eps), {plan.base_steps} steps; interrupted after "
               f"step {plan.interrupt_at} and resumed")  # fmt: skip
        base = self.unet_stage("base", plan.base_steps, self.first_stage_ckpt, plan.interrupt_at)
        self.result.resume["final_step"] = plan.base_steps
        assert base.export is not None
        banner(
            f"4/6 inpainting UNet from the base (4 -> 9 channels), {plan.inpainting_steps} steps"
        )
        self.unet_stage("inpainting", plan.inpainting_steps, base.export)
        banner(f"5/6 v-objective variant fine-tuned from the base, {plan.v_steps} steps")
        self.unet_stage("v", plan.v_steps, base.export)
        self.samples()
        self.result.seconds = time.perf_counter() - start
        self.report()
        return self.result


def holds_demo(out: Path) -> bool:
    """Whether ``out`` holds (part of) an earlier demo run."""
    return (out / "demo.json").exists() or any((out / s).is_dir() for s in ("shards", *STAGES))


def run_demo(
    out: str | Path, quick: bool = False, seed: int = 0, overwrite: bool = False
) -> DemoResult:
    """Run the whole demo into ``out``; returns where everything is. An earlier demo run in
    ``out`` is an error unless ``overwrite``, which deletes it first."""
    out = Path(out)
    if holds_demo(out):
        if not overwrite:
            from sdtrain.errors import ConfigError

            raise ConfigError(
                f"{out} already holds a demo run: pass --overwrite to replace it, or another --out"
            )
        print(f"sdtrain demo: removing the earlier demo run in {out}")
        shutil.rmtree(out)
    result = Demo(out, quick, seed).run()
    print()
    print(result.summary())
    return result
