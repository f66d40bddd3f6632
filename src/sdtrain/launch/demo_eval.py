"""The demo's eval stage: ``sdtrain eval``'s machinery over a few guidance scales on the demo's
exported text-to-image models, against the demo's own scene images, with the colour accuracy of
the same samples beside each row.

The standard InceptionV3 / CLIP weights are not available offline, so the extractors are built
with seeded random weights (``--extractor-seed``; the same code path as the real ones). The
distance between feature statistics is then not FID: the table calls it "random-feature FD" and
names the features ("random features (seed S; not FID)"). Colour accuracy is the demo's own
figure (``demo_report.dominant_colour``: does the image's dominant hue match the one colour the
prompt names?), counted over the prompts that name exactly one colour.

``launch/demo.py`` calls :func:`run_demo_eval`; everything it writes is under ``out_dir``
(chunks, ``metrics.csv`` / ``metrics.json``, ``fid_vs_clip.png``, the reference-feature cache,
``eval-table.md``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sdtrain.evaluation.extractors import ExtractorConfig
from sdtrain.evaluation.report import write_metrics
from sdtrain.evaluation.run import EvalConfig, EvalModel, Rank, check_model, evaluate
from sdtrain.launch.demo_report import COLOURS, dominant_colour
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.utils import files

DEMO_CLIP = "ViT-S-32"
"""A small open_clip architecture: with random weights any one is as meaningful, this is cheap."""

ColourAccuracy = Callable[[Tensor, Sequence[str]], tuple[int, int]]
"""(uint8 (B, 3, S, S) images, their prompts) -> (hits, counted)."""


def colour_accuracy(images: Tensor, prompts: Sequence[str]) -> tuple[int, int]:
    """Over the prompts that name exactly one palette colour: how many images have it as their
    dominant colour (``demo_report.dominant_colour``)."""
    hits = counted = 0
    for image, prompt in zip(images, prompts, strict=True):
        named = [c for c in COLOURS if c in prompt.split()]
        if len(named) != 1:
            continue
        counted += 1
        hits += dominant_colour(image.permute(1, 2, 0).numpy()) == named[0]
    return hits, counted


@dataclass(frozen=True)
class DemoEvalRow:
    stage: str
    scale: float
    distance: float
    """Frechet distance of random features (computed as FID is, but it is not FID)."""
    kid: float
    kid_std: float
    clip_score: float
    """CLIP score of a random CLIP model."""
    colour_hits: int
    colour_counted: int
    seconds: float


@dataclass
class DemoEvalTable:
    rows: list[DemoEvalRow]
    features: str
    """What the features are, e.g. "random features (seed 0; not FID)"."""
    out: Path
    num: int
    steps: int
    sampler: str

    def to_json(self) -> dict[str, object]:
        rows = [dataclasses.asdict(r) for r in self.rows]
        return {"features": self.features, "num": self.num, "steps": self.steps,
                "sampler": self.sampler, "rows": rows}  # fmt: skip

    def markdown(self) -> str:
        """The table for report.md, the features named above it."""
        lines = [
            f"Features: {self.features}. {self.num} images per row, {self.sampler} "
            f"{self.steps} steps; the distance is computed as FID is, on random features, so it "
            "is not FID and is comparable only within this table.",
            "",
            "| model | scale | random-feature FD | KID (random) | CLIP score (random) | "
            "colour accuracy | seconds |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.stage} | {r.scale:g} | {r.distance:.3f} | {r.kid:.5f} ± {r.kid_std:.5f} | "
                f"{r.clip_score:.2f} | {r.colour_hits}/{r.colour_counted} | {r.seconds:.1f} |"
            )
        return "\n".join(lines)

    def text(self) -> str:
        """The table as the demo prints it."""
        lines = [f"features: {self.features}",
                 f"{'model':<12} {'scale':>5} {'random FD':>10} {'KID':>9} {'CLIP':>7} "
                 f"{'colour':>7} {'s':>6}"]  # fmt: skip
        for r in self.rows:
            lines.append(
                f"{r.stage:<12} {r.scale:>5g} {r.distance:>10.3f} {r.kid:>9.5f} "
                f"{r.clip_score:>7.2f} {f'{r.colour_hits}/{r.colour_counted}':>7} {r.seconds:>6.1f}"
            )
        return "\n".join(lines)


def run_demo_eval(
    checkpoints: Mapping[str, Path],
    configs: Mapping[str, ExperimentConfig],
    prompts: Sequence[str],
    reference: str | Path,
    out_dir: Path,
    *,
    scales: Sequence[float] = (1.0, 3.0, 5.0),
    steps: int = 10,
    size: int = 32,
    reference_num: int = 16,
    seed: int = 0,
    colour_accuracy_fn: ColourAccuracy = colour_accuracy,
) -> DemoEvalTable:
    """Evaluate each exported text-to-image model (stage name -> original-layout file, opened
    with ``configs[stage]``) on ``prompts`` (every one once, PLMS ``steps`` steps, ``size`` px) at
    every guidance scale, against the first ``reference_num`` images of ``reference`` (the
    demo's scene shards, or a folder of images), with seeded random extractors; returns the table
    (also written to ``out_dir/eval-table.md`` and ``metrics.csv``)."""
    from sdtrain.launch.sample import open_source

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompt_file = files.write_text(out_dir / "prompts.txt", "\n".join(prompts) + "\n")
    cfg = EvalConfig(
        prompts=str(prompt_file), reference=str(reference), scales=tuple(scales),
        sampler="plms", steps=steps, size=size, num=len(prompts), seed=seed,
        batch=min(8, len(prompts)), reference_num=reference_num,
        extractors=ExtractorConfig(clip_model=DEMO_CLIP, seed=seed, inception_features=64),
        cache_dir=str(out_dir / "cache"), grid_images=len(prompts),
    )  # fmt: skip
    models, stage_of = [], {}
    for stage, path in checkpoints.items():
        source = open_source(path, configs[stage])
        check_model(source.config.model, f"{path} ({stage})", size, steps)
        models.append(EvalModel(str(path), lambda device, s=source: s.build(device), stage))
        stage_of[str(path)] = stage
    colours: dict[tuple[str, float], list[int]] = {}

    def count_colours(model: EvalModel, scale: float, index: int, pixels: Tensor,
                      part: Sequence[str]) -> None:  # fmt: skip
        hits, counted = colour_accuracy_fn(pixels, part)
        tally = colours.setdefault((model.name, scale), [0, 0])
        tally[0] += hits
        tally[1] += counted

    result = evaluate(cfg, models, out_dir, device=torch.device("cpu"), rank=Rank(),
                      on_images=count_colours)  # fmt: skip
    write_metrics(out_dir, result.rows)
    rows = []
    for row in result.rows:
        name, scale = str(row["checkpoint"]), float(str(row["scale"]))
        hits, counted = colours.get((name, scale), [0, 0])
        rows.append(DemoEvalRow(
            stage_of[name], scale, float(str(row["fid"])), float(str(row["kid"])),
            float(str(row["kid_std"])), float(str(row["clip_score"])), hits, counted,
            float(str(row["seconds"])),
        ))  # fmt: skip
    table = DemoEvalTable(rows, cfg.extractors.describe(), out_dir, len(prompts), steps, "plms")
    files.write_text(out_dir / "eval-table.md", table.markdown() + "\n")
    files.write_json(out_dir / "eval-table.json", table.to_json())
    return table
