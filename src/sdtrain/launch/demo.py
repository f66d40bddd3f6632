"""``sdtrain demo``: the whole framework on an embedded default, end to end on CPU, nothing to
download.

1. data: captioned shape scenes ("a large red circle on the left on a white background") written
   as img2dataset-style shards with LAION-style metadata, plus samples the filters must drop (low
   aesthetic score, high pwatermark / punsafe, too small) and broken JPEGs; one
   ``sdtrain data stats`` pass shows the filters at work.
2. first stage: a tiny AutoencoderKL (L1 + KL, ``sdtrain.trainer.first_stage``) -> an
   original-layout file with the autoencoder and the frozen (random) text encoder; then
   ``sdtrain data encode`` runs that VAE and text encoder once over the shards (latent shards:
   posterior moments, caption embeddings and the crop the inpainting stage masks).
3. base: the text-conditioned UNet (eps) with ``init_from`` = that file, trained from the latent
   shards (``data.latents``). It is interrupted on purpose (the demo sends itself SIGUSR1, as
   SLURM does before a time limit: checkpoint, stop) and continued with ``resume=auto``.
4. inpainting: ``init_from`` the exported base, UNet widened 4 -> 9 channels (extra channels
   zero), synthetic masks; image latents from the cache, the masked image encoded per step.
5. v: the base fine-tuned with the v objective, from the image shards (VAE and text encoder run
   every step), so that its step time beside the base's measures what the latents save.
6. every stage exported to an original-layout checkpoint; prompt grids and an inpainting grid
   (input, mask, result) sampled from the exported files with DDIM + classifier-free guidance;
   ``report.md`` (filter stats, loss curves, grids, quality figures) and ``demo.json``.
7. eval (full demo only, ``launch/demo_eval.py``): the base and v models over guidance scales,
   random-feature FD / KID / CLIP score (seeded random extractors, never called FID) and colour
   accuracy per scale; ``--quick`` leaves it out for its time goal and its report says so.
8. x4 upscaler and LoRA (full demo only, ``launch/demo_upscale.py``, ``launch/demo_lora.py``):
   the upscaler scored against bicubic; a LoRA that teaches the base "a sks shape" = a star,
   star rate and class-prompt shape before and after; ``--quick`` leaves both out, saying so.

Every stage is an ordinary config in ``configs/demo/`` run by the ordinary entry points
(``fit``, ``export_run``, ``sample_images``); the demo only chains them and sets ``data.shards``,
``run.dir``, ``init_from``, the measured latent scale and (for ``--quick``) fewer steps. This
module is the orchestration; the prompts, scene metrics, pictures and ``report.md`` are
:mod:`sdtrain.launch.demo_report`, images and the loss-curve plot :mod:`sdtrain.utils.images`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from sdtrain.config.resolve import configs_dir as shipped_configs
from sdtrain.launch.demo_report import (
    COLOURS,
    GRID_TEMPLATES,
    INPAINT_CASES,
    DemoResult,
    StageResult,
    case_inputs,
    dominant_colour,
    grid_prompts,
    latent_step_ratio,
    lora_section,
    masked_colour,
    overview_image,
    quiet_data_log,
    read_metrics,
    region_differences,
    save_grid,
    write_report,
)
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.trainer.preemption import RunInterrupted, StopSignals, signal_name
from sdtrain.utils.images import plot_losses, to_uint8
from sdtrain.utils.progress import progress

LATENTS = ("data.latents=true", "data.text_embeddings=true")
"""The overrides that train a stage from the demo's latent shards (``Demo.encode``)."""
WIDE_RATIOS = [2 / 3, 1.0, 1.5]
"""Width / height of the v stage's non-square scenes (64x96, 80x80, 96x64 px)."""
BUCKETS = ("data.buckets.enabled=true", "data.buckets.sizes=[[48,32],[32,32],[32,48]]")
"""The v stage's aspect-ratio buckets (sides divide by 16, as the demo's UNet needs; the
generated set at 32 px area holds only 32x32, hence the list)."""

STAGES = ("first-stage", "base", "inpainting", "v")
SCALE = 5.0
"""Classifier-free guidance scale of the demo's samples."""


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
    wide_samples: int = 250
    """Non-square scene samples the v stage trains on (with aspect-ratio buckets)."""
    eval_scales: tuple[float, ...] = ()
    """Guidance scales of the eval stage (``launch/demo_eval.py``); empty: the stage is left
    out (``--quick``: its time goal has no room for it)."""
    upscaler_steps: int = 0
    """Training steps of the x4 upscaler stage (``launch/demo_upscale.py``); 0: left out
    (``--quick``: it beats bicubic only after ~250 steps, ~90 s of CPU)."""
    lora: bool = False
    """Whether the LoRA stage runs (``launch/demo_lora.py``, its full plan: 400 steps); off in
    ``--quick`` (its quick plan alone costs ~42 s of CPU)."""


PLANS = {
    "full": DemoPlan(
        *(4000, 1500, 2500, 1000, 1200, 400, 50),
        wide_samples=1000,
        eval_scales=(1.0, 3.0, 5.0),
        upscaler_steps=400,
        lora=True,
    ),
    "quick": DemoPlan(1500, 500, 550, 250, 200, 30, 25),
}
EVAL_STEPS = 10
"""PLMS steps of the eval stage's samples."""


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


class StepTimer(pl.Callback):
    """Wall and process-CPU seconds from one optimiser step's end to the next (the batch, its
    data loading included), after the first ``skip`` steps of each run (start-up): the
    per-step figures of the report's training table."""

    def __init__(self, skip: int = 5) -> None:
        self.skip = skip
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.bucket: list[str] = []
        """Each timed step's bucket (``WxH``; ``""`` without buckets)."""
        self._seen = 0
        self._last = (0.0, 0.0)

    def on_train_start(self, *args: Any) -> None:
        self._seen = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, *args: Any
    ) -> None:
        now = (time.perf_counter(), time.process_time())
        self._seen += 1
        if self._seen > self.skip:
            self.wall.append(now[0] - self._last[0])
            self.cpu.append(now[1] - self._last[1])
            size = batch.get("bucket_size") if isinstance(batch, dict) else None
            self.bucket.append("" if size is None else f"{int(size[0][1])}x{int(size[0][0])}")
        self._last = now

    def median(self, bucket: str | None = None) -> tuple[float, float]:
        """(wall, CPU) seconds per step, medians (0 when nothing was timed); ``bucket``: of the
        steps whose batch was that bucket only."""
        keep = [i for i, b in enumerate(self.bucket) if bucket is None or b == bucket]
        if not keep:
            return 0.0, 0.0
        return (float(np.median([self.wall[i] for i in keep])),
                float(np.median([self.cpu[i] for i in keep])))  # fmt: skip

    def per_bucket(self) -> dict[str, tuple[float, float]]:
        """``median(bucket)`` of every bucket seen (empty without buckets)."""
        return {b: self.median(b) for b in sorted(set(self.bucket)) if b}


class InterruptAt(pl.Callback):
    """Sends this process SIGUSR1 after optimiser step ``step``: the trainer's preemption handler
    (the one SLURM's warning signal triggers) checkpoints and stops the run."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.sent = False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)

    def planned(self, stop: RunInterrupted) -> bool:
        """Whether ``stop`` is this interruption alone (not a signal from outside as well)."""
        return self.sent and stop.received == (signal.SIGUSR1,) and not stop.requeued


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def open_exported(path: Path, cfg: ExperimentConfig) -> Any:
    """The model of an exported original-layout file, as ``sdtrain sample`` opens it."""
    from sdtrain.launch.sample import open_source

    return open_source(path, cfg).build("cpu")


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


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
        self.wide_data()

    def wide_data(self) -> None:
        """The v stage's non-square scenes (``shards-wide/``) and how they fall into its
        aspect-ratio buckets (``sdtrain data stats --buckets``)."""
        from sdtrain.data.buckets import UPSCALE_REASON
        from sdtrain.data.synthetic import SceneSpec, write_scene_shards
        from sdtrain.launch.data_cli import collect_stats

        spec = SceneSpec(samples=self.plan.wide_samples, per_shard=250, side=80,
                         aspect_ratios=WIDE_RATIOS, seed=self.seed + 1)  # fmt: skip
        shards = write_scene_shards(self.out / "shards-wide", spec)
        cfg = stage_config("v", self.stage_overrides("v", self.wide_source()))
        stats = collect_stats(cfg.data)
        self.result.buckets = {
            "shards": len(shards),
            "samples": spec.samples,
            "kept": stats.kept,
            "buckets": dict(sorted(stats.buckets.items())),
            "dropped_upscale": stats.rejected.get(UPSCALE_REASON, 0),
        }
        print(f"v stage's scenes: {spec.samples} non-square, kept {stats.kept}; per bucket "
              f"{self.result.buckets['buckets']}")  # fmt: skip

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

    def encode(self) -> None:
        """``sdtrain data encode`` of the shards with the first stage's VAE and text encoder,
        with the inpainting config: its latent shards also keep the crop that the inpainting
        stage masks (and encodes) per step; the base reads the same shards."""
        from sdtrain.launch.data_cli import shard_urls
        from sdtrain.launch.encode import EncodeOptions, run_encode

        banner("latents: `sdtrain data encode` (frozen VAE + text encoder, once per image)")
        overrides = [*self.stage_overrides("inpainting"), f"init_from={self.first_stage_ckpt}"]
        cfg = stage_config("inpainting", overrides)
        start = time.perf_counter()
        with quiet_data_log():
            summary = run_encode(cfg, shard_urls(cfg.data.shards), self.out / "latents",
                                 EncodeOptions(text=True, batch_size=64), device="cpu")  # fmt: skip
        print("\n".join(summary.lines()))
        self.result.latents = {
            "shards": len(summary.written),
            "samples": summary.stats.kept,
            "seconds": round(time.perf_counter() - start, 1),
        }

    def latent_source(self) -> list[str]:
        return [f"data.shards={self.out / 'latents'}", *LATENTS]

    def wide_source(self) -> list[str]:
        return [f"data.shards={self.out / 'shards-wide'}", *BUCKETS]

    def unet_stage(
        self,
        stage: str,
        steps: int,
        init_from: Path,
        interrupt_at: int = 0,
        data: Sequence[str] = (),
    ) -> StageResult:
        """Train one UNet stage (``data``: overrides of its data source, e.g.
        ``latent_source()``; none: the image shards) and export it."""
        from sdtrain.launch.export import export_run
        from sdtrain.trainer.fit import fit

        overrides = [
            *self.stage_overrides(stage, data),
            f"init_from={init_from}",
            f"trainer.max_steps={steps}",
        ]
        start = time.perf_counter()
        timer = StepTimer()
        with quiet_data_log():
            if interrupt_at:
                interrupt = InterruptAt(interrupt_at)
                try:
                    fit(stage_config(stage, overrides), callbacks=[interrupt, timer])
                except RunInterrupted as stop:
                    if not interrupt.planned(stop):
                        raise  # a signal from outside ends the demo
                self.note_interruption(self.out / stage, interrupt_at)
                banner(f"{stage}: resuming the interrupted run with resume=auto")
                overrides.append("resume=auto")
            run = fit(stage_config(stage, overrides), callbacks=[timer])
        cfg = stage_config(stage, overrides)
        export = self.out / "export" / f"{cfg.model.name}.ckpt"
        print(export_run(run, export).summary())
        result = StageResult(stage, cfg.model.diffusion.parameterization, steps, run, init_from,
                             time.perf_counter() - start, export, data=source_name(data),
                             step_seconds=timer.median(),
                             bucket_step_seconds=timer.per_bucket())  # fmt: skip
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

    def evaluate(self) -> None:
        """The eval stage: random-feature FD / KID / CLIP score and colour accuracy of the base
        and v models over guidance scales, against the demo's scene images."""
        from sdtrain.launch.demo_eval import run_demo_eval

        scales = self.plan.eval_scales
        stages = ("base", "v")
        banner(
            f"eval: {', '.join(stages)} at guidance scales {', '.join(map(str, scales))} "
            "(random-feature FD, KID, CLIP score: seeded random extractors, not FID)"
        )
        start = time.perf_counter()
        table = run_demo_eval(
            {stage: self.result.exports[stage] for stage in stages},
            {stage: self.stage_cfg(stage) for stage in stages},
            grid_prompts(),
            self.out / "shards",
            self.out / "eval",
            scales=scales,
            steps=EVAL_STEPS,
            seed=self.seed,
        )
        print(table.text())
        self.result.eval = {**table.to_json(), "seconds": round(time.perf_counter() - start, 1)}
        self.result.eval_markdown = table.markdown()

    def upscaler(self) -> None:
        """The x4 upscaler stage: trained on the scenes (8 -> 32 px) from the first stage's
        file, scored against bicubic on held-out scenes."""
        from sdtrain.launch.demo_upscale import run_upscaler_stage

        steps = self.plan.upscaler_steps
        banner(f"x4 upscaler: {steps} steps on the scenes, 8 -> 32 px, against bicubic")
        with quiet_data_log():
            up = run_upscaler_stage(self.out / "shards", self.out,
                                    first_stage_file=self.first_stage_ckpt,
                                    scale_factor=self.result.scale_factor, steps=steps,
                                    seed=self.seed)  # fmt: skip
        self.result.stages.append(StageResult("upscaler", "v", steps, up.run, self.first_stage_ckpt,
                                              up.wall_seconds, up.export))  # fmt: skip
        self.result.exports["upscaler"] = up.export
        self.result.grids["upscaler"] = up.grid
        self.result.quality.update(up.quality())
        self.result.sections.append(up.markdown(relative_to=self.out))
        print(f"x4 upscaler: mean abs error {up.mean_abs_error['sdtrain x4']:.2f} vs bicubic "
              f"{up.mean_abs_error['bicubic']:.2f} (0-255)")  # fmt: skip

    def lora(self) -> None:
        """The LoRA stage: "a sks shape" taught as a star (a shape no scene holds) to the
        exported base, with prior preservation on a class prompt the base knows; the shape of
        each prompt's samples before and after, measured by a shape classifier."""
        from sdtrain.launch.demo_lora import run_lora_stage

        banner("LoRA: 'a sks shape' = a star, DreamBooth-style with prior preservation")
        with quiet_data_log():
            lora = run_lora_stage(self.out, self.result.exports["base"], self.result.scale_factor,
                                  quick=self.result.quick, seed=self.seed)  # fmt: skip
        self.result.stages.append(StageResult("lora", "eps (LoRA)", lora.steps, lora.run_dir,
                                              self.result.exports["base"], lora.seconds,
                                              lora.export))  # fmt: skip
        self.result.exports["lora"] = lora.export
        self.result.grids["lora-before"] = lora.grids["before"]
        self.result.grids["lora-after"] = lora.grids["after"]
        self.result.quality.update(lora.quality())
        self.result.lora = lora.to_json()
        self.result.sections.append(lora_section(lora, self.out))
        print("\n".join(f"{k}: {v}" for k, v in lora.quality().items()))

    def stage_overrides(self, stage: str, data: Sequence[str] = ()) -> list[str]:
        """The demo's overrides of a stage: run folder, seeds, measured latent scale, and
        ``data`` (another data source: ``latent_source()``, ``wide_source()``)."""
        return [
            *self.common(stage),
            f"model.autoencoder.scale_factor={self.result.scale_factor}",
            *data,
        ]

    def stage_cfg(self, stage: str) -> ExperimentConfig:
        """A stage's config as sampling opens its export (image shards)."""
        return stage_config(stage, self.stage_overrides(stage))

    def report(self) -> None:
        curves = {"first stage: L1": read_metrics(self.out / "first-stage", "train/l1")}
        for stage in STAGES[1:]:
            curves[f"{stage}: loss"] = read_metrics(self.out / stage, "train/loss")
        if self.result.lora:
            curves["lora: loss"] = read_metrics(self.out / "lora", "train/loss")
        marks = {"base: loss": self.result.resume.get("stopped_at", 0)}
        self.result.loss_plot = plot_losses(curves, marks, self.out / "loss-curves.png")
        ratio = latent_step_ratio(self.result)
        if ratio is not None:
            self.result.latents["step_cpu_ratio_images_over_latents"] = round(ratio, 3)
        self.result.report = write_report(self.result)
        (self.out / "demo.json").write_text(json.dumps(self.result.to_json(), indent=2))

    # --- all of it --------------------------------------------------------------------------

    def run(self) -> DemoResult:
        """All stages. A signal from outside (SIGTERM, SIGINT, or a SIGUSR1 not the demo's own)
        ends it with ``RunInterrupted``: inside a training stage after that stage's checkpoint,
        elsewhere at once."""
        with StopSignals():
            return self._run()

    def _run(self) -> DemoResult:
        start = time.perf_counter()
        os.environ.setdefault("WANDB_MODE", "offline")  # never reach for the network
        os.environ.setdefault("WANDB_SILENT", "true")
        self.out.mkdir(parents=True, exist_ok=True)
        plan = self.plan
        self.data()
        self.first_stage()
        banner(f"3/6 base text-to-image UNet (eps), {plan.base_steps} steps; interrupted after "
               f"step {plan.interrupt_at} and resumed")  # fmt: skip
        self.encode()
        base = self.unet_stage("base", plan.base_steps, self.first_stage_ckpt, plan.interrupt_at,
                               self.latent_source())  # fmt: skip
        self.result.resume["final_step"] = plan.base_steps
        assert base.export is not None
        banner(
            f"4/6 inpainting UNet from the base (4 -> 9 channels), {plan.inpainting_steps} steps"
        )
        self.unet_stage("inpainting", plan.inpainting_steps, base.export, data=self.latent_source())
        banner(f"5/6 v-objective variant fine-tuned from the base, {plan.v_steps} steps, on "
               "non-square scenes in aspect-ratio buckets")  # fmt: skip
        self.unet_stage("v", plan.v_steps, base.export, data=self.wide_source())
        self.samples()
        if plan.eval_scales:
            self.evaluate()
        if plan.upscaler_steps:
            self.upscaler()
        if plan.lora:
            self.lora()
        self.result.seconds = time.perf_counter() - start
        self.report()
        return self.result


def source_name(data: Sequence[str]) -> str:
    return "latent shards" if "data.latents=true" in data else "image shards"


def holds_demo(out: Path) -> bool:
    """Whether ``out`` holds (part of) an earlier demo run."""
    return (out / "demo.json").exists() or any(
        (out / s).is_dir() for s in ("shards", "shards-wide", *STAGES)
    )


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
    demo = Demo(out, quick, seed)
    try:
        result = demo.run()
    except RunInterrupted as stop:
        done = ", ".join(s.name for s in demo.result.stages) or "none"
        text = stop.message or f"stopped by {signal_name(stop.signum)}"
        raise stop.with_message(
            f"{text}. Stages finished: {done}. The demo does not continue a stopped run: "
            f"`sdtrain demo --out {out} --overwrite` runs it again"
        ) from None
    print()
    print(result.summary())
    return result
