"""Benchmark ``sdtrain eval``'s three costs: generation, feature extraction and the metrics.

Per model case: images/s of generation as the eval samples (``models.sampling.sample_images``,
PLMS, 50 steps by default, classifier-free guidance batched: one UNet call per step over the
unconditional and conditional halves; bf16 autocast on CUDA, as ``evaluation.run`` does). Then the
feature-extraction rates of the eval's extractors on uint8 images of that size: InceptionV3
(torch-fidelity's, resized to 299 px) and the open_clip image tower, and the seconds of one FID
(torchmetrics, float64, the matrix square root of a D x D product) from N x D features. Weights
are seeded random (``--extractor-seed`` path): the rates do not depend on them, nothing is
downloaded. Wall and process-CPU seconds are both reported (CPU time is what other processes on a
shared machine do not inflate).

    python bench/eval.py                       # tiny-cpu preset (tiny-base at 64 px), markdown
    python bench/eval.py --write-docs          # also replace its block in docs/benchmarks.md
    python bench/eval.py --preset gpu          # SD 1.5 and SD 2 shapes at 512 px, bf16, batch 8
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from sdtrain.evaluation.extractors import ExtractorConfig
from sdtrain.evaluation.metrics import fid_from_features
from sdtrain.evaluation.run import cached_clip, cached_inception
from sdtrain.models.sampling import sample_images
from sdtrain.models.stable_diffusion import build_stable_diffusion
from sdtrain.trainer.experiment import load_config
from sdtrain.utils.markdown import write_section
from sdtrain.utils.threads import torch_threads

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOCS = REPO_ROOT / "docs" / "benchmarks.md"
PROMPT = "a photograph of an astronaut riding a horse"


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    """configs/models/<model>.yaml"""
    size: int
    """Pixels (square)."""


@dataclass(frozen=True)
class Preset:
    name: str
    cases: tuple[Case, ...]
    device: Literal["cpu", "cuda"]
    batch_size: int
    steps: int
    clip_model: str
    inception_features: int = 2048
    fid_rows: int = 2048
    """N of the N x D feature sets of the timed FID (covariance rank; D = the features)."""
    iters: int = 3
    warmup: int = 1
    threads: int | None = None


PRESETS = {
    "tiny-cpu": Preset("tiny-cpu", (Case("tiny-base@64px", "tiny-base", 64),), "cpu",
                       batch_size=4, steps=50, clip_model="ViT-S-32", threads=1),
    "micro": Preset("micro", (Case("tiny-base@32px", "tiny-base", 32),), "cpu", batch_size=2,
                    steps=2, clip_model="ViT-S-32", inception_features=64, fid_rows=8, iters=1,
                    warmup=0, threads=1),
    "gpu": Preset("gpu", (Case("sd15@512px", "sd15", 512), Case("sd2-base@512px", "sd2-base", 512)),
                  "cuda", batch_size=8, steps=50, clip_model="ViT-L-14"),
}  # fmt: skip


@dataclass
class Timing:
    wall: float
    cpu: float


@dataclass
class Row:
    case: str
    generate: Timing
    """Seconds per batch of ``batch`` images."""
    inception: Timing
    clip: Timing
    batch: int

    def rates(self) -> dict[str, float]:
        return {
            "gen_img_s": self.batch / self.generate.wall,
            "gen_img_cpu_s": self.batch / self.generate.cpu,
            "inception_img_s": self.batch / self.inception.wall,
            "clip_img_s": self.batch / self.clip.wall,
        }


@dataclass
class Report:
    preset: Preset
    command: str
    rows: list[Row] = field(default_factory=list)
    fid: Timing | None = None
    device_name: str = ""

    @property
    def section_key(self) -> str:
        return f"eval:{self.preset.name}"

    def to_markdown(self) -> str:
        p = self.preset
        lines = [
            f"`{self.command}` on {self.device_name}, {datetime.date.today().isoformat()}, torch "
            f"{torch.__version__}, {torch.get_num_threads()} thread(s); batch {p.batch_size}, "
            f"PLMS {p.steps} steps, guidance batched; median of {p.iters} (after {p.warmup} "
            "warm-up). Rates in images/s of wall time (process CPU time in brackets).",
            "",
            "| case | generation img/s | InceptionV3 img/s | CLIP "
            f"{p.clip_model} img/s | s/img generation (CPU) |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in self.rows:
            r = row.rates()
            lines.append(
                f"| {row.case} | {r['gen_img_s']:.3g} ({r['gen_img_cpu_s']:.3g}) | "
                f"{r['inception_img_s']:.3g} ({row.batch / row.inception.cpu:.3g}) | "
                f"{r['clip_img_s']:.3g} ({row.batch / row.clip.cpu:.3g}) | "
                f"{row.generate.cpu / row.batch:.3g} |"
            )
        if self.fid is not None:
            lines += ["", f"One FID from {p.fid_rows} x {p.inception_features} features "
                      f"(torchmetrics, float64): {self.fid.wall:.2f} s wall, {self.fid.cpu:.2f} s "
                      "CPU; an eval computes one per checkpoint and scale."]  # fmt: skip
        return "\n".join(lines)


def timed(fn: Callable[[], object], iters: int, warmup: int, cuda: bool) -> Timing:
    """Median wall and process-CPU seconds of ``fn``."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return Timing(statistics.median(walls), statistics.median(cpus))


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        yield


def run_case(case: Case, preset: Preset, extractors: ExtractorConfig) -> Row:
    device = torch.device(preset.device)
    cuda = device.type == "cuda"
    cfg = load_config([REPO_ROOT / "configs" / "models" / f"{case.model}.yaml"])
    torch.manual_seed(0)
    model = build_stable_diffusion(cfg.model).to(device).eval()
    prompts = [PROMPT] * preset.batch_size

    def generate() -> object:
        with autocast(device):
            return sample_images(model, prompts, sampler="plms", steps=preset.steps, scale=7.5,
                                 seed=0, size=case.size)  # fmt: skip

    generation = timed(generate, preset.iters, preset.warmup, cuda)
    g = torch.Generator().manual_seed(0)
    shape = (preset.batch_size, 3, case.size, case.size)
    images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(device)
    inception = cached_inception(extractors).to(device)
    clip = cached_clip(extractors).to(device)
    with torch.no_grad():
        inception_t = timed(lambda: inception(images), preset.iters, preset.warmup, cuda)
        clip_t = timed(lambda: clip.encode_images(images), preset.iters, preset.warmup, cuda)
    return Row(case.name, generation, inception_t, clip_t, preset.batch_size)


def time_fid(preset: Preset) -> Timing:
    g = torch.Generator().manual_seed(0)
    d = preset.inception_features
    real = torch.randn(preset.fid_rows, d, generator=g)
    fake = torch.randn(preset.fid_rows, d, generator=g) + 0.1
    return timed(lambda: fid_from_features(real, fake), 1, 0, False)


def device_name(preset: Preset) -> str:
    if preset.device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny-cpu")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--iters", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument("--out", type=Path, default=None, help="update this markdown file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    base = PRESETS[args.preset]
    preset = replace(
        base,
        batch_size=args.batch_size or base.batch_size,
        steps=args.steps or base.steps,
        iters=args.iters or base.iters,
        warmup=base.warmup if args.warmup is None else args.warmup,
        threads=args.threads or base.threads,
    )
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"preset {preset.name} needs a CUDA device (none here)")
    shown = ["python", "bench/eval.py", *(sys.argv[1:] if argv is None else argv)]
    extractors = ExtractorConfig(clip_model=preset.clip_model, seed=0,
                                 inception_features=preset.inception_features)  # fmt: skip
    report = Report(preset, shlex.join(shown), device_name=device_name(preset))
    with torch_threads(preset.threads):
        for case in preset.cases:
            report.rows.append(run_case(case, preset, extractors))
        report.fid = time_fid(preset)
        markdown = report.to_markdown()
    print(markdown)
    out = args.out or (DEFAULT_DOCS if args.write_docs else None)
    if out is not None:
        write_section(out, report.section_key, f"Eval: {preset.name}", markdown, level="###")
        print(f"wrote the {report.section_key} block of {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
