"""The demo's x4 upscaler stage: a tiny upscaler trained on the demo's scenes, 8 px -> 32 px.

``run_upscaler_stage`` is one ordinary run of ``configs/demo/upscaler.yaml`` (``fit`` with
``init_from`` = the demo's first-stage file: its f=4 autoencoder and frozen text encoder; or,
without one, a first stage trained here from ``configs/demo/first-stage.yaml``), exported with
``export_run`` and sampled from the exported file as ``sdtrain sample --image`` does. The
measured figure: held-out scenes (drawn fresh, never in the shards) at 32 px are the ground
truth, their bicubic (antialiased) 4x downscale the low-res input, the training degradation;
PSNR and mean absolute error against the ground truth of the sdtrain x4 result and of plain
bicubic upsampling. The grid's rows are low-res (nearest) | bicubic | sdtrain x4 | ground truth.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from sdtrain.config.resolve import configs_dir
from sdtrain.launch.demo_report import quiet_data_log
from sdtrain.utils.files import PathLike

if TYPE_CHECKING:
    from sdtrain.trainer.experiment import ExperimentConfig

CONFIG = "upscaler"
"""``configs/demo/upscaler.yaml``."""
TARGET = 32
"""Ground-truth side: the demo's image size (``configs/demo/data.yaml``)."""
GRID_ROWS = ("low-res", "bicubic", "sdtrain x4", "ground truth")


@dataclass
class UpscaleStageResult:
    """What the stage wrote and measured."""

    run: Path
    export: Path
    grid: Path
    first_stage: Path
    steps: int
    images: int
    noise_level: int
    sampling_steps: int
    psnr: dict[str, float] = field(default_factory=dict)
    """dB against the ground truth over all held-out images: ``bicubic``, ``sdtrain x4``."""
    mean_abs_error: dict[str, float] = field(default_factory=dict)
    """Mean absolute error in 0-255 pixel values, the same two."""
    wall_seconds: float = 0.0
    cpu_seconds: float = 0.0
    """user + sys CPU seconds of this process during the stage (training, export, sampling)."""

    @property
    def beats_bicubic(self) -> bool:
        """The stage's figure: a lower mean absolute error against the ground truth than plain
        bicubic upsampling. (PSNR is reported too; it favours the blur of a mean prediction
        over sharp edges placed a pixel off, and a tiny model passes bicubic on it later.)"""
        return self.mean_abs_error["sdtrain x4"] < self.mean_abs_error["bicubic"]

    def quality(self) -> dict[str, Any]:
        """The report's quality figures."""
        return {
            "upscaler x4 PSNR (dB)": round(self.psnr["sdtrain x4"], 2),
            "bicubic x4 PSNR (dB)": round(self.psnr["bicubic"], 2),
            "upscaler x4 mean abs error (0-255)": round(self.mean_abs_error["sdtrain x4"], 2),
            "bicubic x4 mean abs error (0-255)": round(self.mean_abs_error["bicubic"], 2),
        }

    def markdown(self, relative_to: Path | None = None) -> str:
        """A report section: what was trained, the figure and the grid."""
        grid = self.grid.relative_to(relative_to) if relative_to else self.grid
        low = TARGET // 4
        return "\n".join([
            "## x4 upscaler",
            "",
            f"A tiny x4 upscaler (the SD 2 x4 architecture in small: 7 UNet inputs, the noise "
            f"level as a class label, v objective) trained {self.steps} steps on the scenes at "
            f"{low} px -> {TARGET} px, sampled with {self.sampling_steps} DDIM steps at noise "
            f"level {self.noise_level}. {self.images} held-out scenes (not in the shards); the "
            "low-res input is their bicubic (antialiased) 4x downscale.",
            "",
            "| | mean abs error (0-255, lower is better) | PSNR (dB, higher is better) |",
            "|---|---|---|",
            *(f"| {name} | {self.mean_abs_error[name]:.2f} | {self.psnr[name]:.2f} |"
              for name in ("bicubic", "sdtrain x4")),
            "",
            f"Rows: {' | '.join(GRID_ROWS)}.",
            "",
            f"![x4 upscaler]({grid.as_posix()})",
        ])  # fmt: skip


def held_out_scenes(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` scenes drawn fresh (a seed the shards never use): (N, 3, 32, 32) in [-1, 1]
    and their captions."""
    from sdtrain.data.synthetic import draw_scene, random_scene

    rng = np.random.default_rng([seed, 4])  # the shards use default_rng(seed)
    scenes = [random_scene(rng) for _ in range(count)]
    pixels = np.stack([np.asarray(draw_scene(s, TARGET), dtype=np.float32) for s in scenes])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2) / 127.5 - 1.0
    return images, [s.caption for s in scenes]


def scores(images: torch.Tensor, truth: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) of the mean squared error over all pixels and the mean absolute error, both on
    the 0-255 images as saved."""
    from sdtrain.utils.images import to_uint8

    a = to_uint8(images).astype(np.float64)
    b = to_uint8(truth).astype(np.float64)
    mse = float(np.mean((a - b) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12)), float(np.mean(np.abs(a - b)))


def run_upscaler_stage(
    shards: PathLike,
    out_dir: PathLike,
    *,
    first_stage_file: PathLike | None = None,
    scale_factor: float | None = None,
    steps: int = 400,
    first_stage_steps: int = 500,
    images: int = 16,
    sampling_steps: int = 20,
    noise_level: int = 0,
    guidance: float = 1.0,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
) -> UpscaleStageResult:
    """Train, export, sample and measure the demo's tiny x4 upscaler; see the module docstring.

    ``shards``: the demo's scene shards. ``first_stage_file``: the demo's first-stage file (f=4
    autoencoder + text encoder); None trains one here for ``first_stage_steps``.
    ``scale_factor``: the latent scale (None: the file's ``sdtrain_scale_factor`` metadata).
    ``noise_level``: the sampling noise level of the low-res input (0..350). ``guidance``: the
    classifier-free guidance scale (1: none; the text says little about the pixels here).
    ``overrides``: further ``key=value`` for the stage config. Everything goes under ``out_dir``:
    ``upscaler/`` (the run), ``export/demo-upscaler.ckpt``, ``samples/upscaler.png``.
    """
    from sdtrain.data.degradation import downscale
    from sdtrain.launch.demo_report import save_grid
    from sdtrain.launch.export import export_run
    from sdtrain.launch.sample import open_source
    from sdtrain.models.adapters.original import read_checkpoint
    from sdtrain.models.sampling import sample_images
    from sdtrain.trainer.fit import fit

    out = Path(out_dir)
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    common = [f"data.shards={shards}", f"seed={seed}", f"data.seed={seed}"]
    if first_stage_file is None:
        first_stage_file, scale_factor = _train_first_stage(
            common, out / "upscaler-first-stage", first_stage_steps
        )
    first_stage_file = Path(first_stage_file)
    if scale_factor is None:
        meta = read_checkpoint(first_stage_file).metadata.get("sdtrain_scale_factor")
        scale_factor = float(meta) if meta else 1.0
    stage_overrides = [
        *common,
        f"run.dir={out / 'upscaler'}",
        f"init_from={first_stage_file}",
        f"model.autoencoder.scale_factor={scale_factor}",
        f"trainer.max_steps={steps}",
        *overrides,
    ]
    with quiet_data_log():
        run = fit(stage_config(CONFIG, stage_overrides))
    cfg = stage_config(CONFIG, stage_overrides)
    export = export_run(run, out / "export" / f"{cfg.model.name}.ckpt").path
    model = open_source(export, cfg).build("cpu")  # as `sdtrain sample` opens the file

    truth, captions = held_out_scenes(images, seed)
    low = downscale(truth, cfg.model.upscale.factor)  # (N, 3, 8, 8), the training degradation
    bicubic = F.interpolate(low, size=truth.shape[-2:], mode="bicubic").clamp(-1, 1)
    with torch.no_grad():
        ours = sample_images(model, captions, image=low, noise_level=noise_level,
                             steps=sampling_steps, scale=guidance, seed=seed)  # fmt: skip
    nearest = F.interpolate(low, size=truth.shape[-2:], mode="nearest")
    grid = save_grid(torch.cat([nearest, bicubic, ours, truth]), images,
                     out / "samples" / "upscaler.png")  # fmt: skip
    result = UpscaleStageResult(run, export, grid, first_stage_file, steps, images, noise_level,
                                sampling_steps)  # fmt: skip
    for name, candidate in (("bicubic", bicubic), ("sdtrain x4", ours)):
        result.psnr[name], result.mean_abs_error[name] = scores(candidate, truth)
    result.wall_seconds = time.perf_counter() - start
    result.cpu_seconds = _cpu_seconds() - cpu0
    return result


def stage_config(stage: str, overrides: Sequence[str]) -> ExperimentConfig:
    """``configs/demo/<stage>.yaml`` with ``overrides`` (as ``launch.demo``, which imports this
    module, so not imported from there)."""
    from sdtrain.trainer.experiment import load_config

    return load_config([configs_dir("demo") / f"{stage}.yaml"], list(overrides))


def _train_first_stage(common: list[str], run_dir: Path, steps: int) -> tuple[Path, float]:
    """The demo's f=4 autoencoder (``configs/demo/first-stage.yaml``) when no file is given."""
    from sdtrain.trainer.first_stage import FirstStageLoss, train_first_stage

    cfg = stage_config("first-stage", [*common, f"run.dir={run_dir}", f"trainer.max_steps={steps}"])
    with quiet_data_log():
        first = train_first_stage(cfg, FirstStageLoss(reconstruction="l2"))
    return first.checkpoint, first.scale_factor


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
