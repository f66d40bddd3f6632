"""Periodic validation during training, and the counters of the data that training consumes.

``ValidationCallback`` runs every ``validation.every_n_steps`` optimiser steps, with the UNet in
eval mode and, when ``validation.use_ema`` and EMA is on, the EMA weights swapped in (both undone
afterwards):

1. Sample grids, one per sampler: the fixed prompts from the same initial noise every time
   (``validation.seed``), classifier-free guidance against the empty prompt. Text-to-image grids
   are one row (a column per prompt); inpainting and depth grids have the rows input, mask (or
   depth), result, column ``j`` pairing the ``j``-th fixed input with prompt ``j``. The inputs are
   the first held-out images (centre crops) or, without held-out shards, a drawn test scene; the
   inpainting mask is a fixed centre box. Written to ``RUN/samples/step=NNNNNNNN-<sampler>.png``
   (plus ``...-captioned.png`` with the prompts under the columns) and logged to wandb.
2. The loss on held-out shards: ``loss_batches`` batches, each evaluated once per timestep bucket
   (equal ranges ``[lo, hi)`` of ``[0, T)``) with ``t`` drawn uniformly inside the bucket. Every
   random draw comes from a generator seeded by ``(seed, batch, bucket)``, so validations are
   comparable with each other. Captions are not dropped. Reported as ``val/loss`` (the mean over
   buckets, i.e. uniform ``t``) and ``val/loss_t{lo}-{hi}``.

Distribution: the loss is computed on every rank, rank ``r`` taking held-out batches
``r, r + world, ...``, and the sums are all-reduced, so every rank must reach the same validation
step (they do: it is keyed on the global step). Sampling runs on rank 0 only (DeepSpeed ZeRO-3:
on every rank, since its forward needs all of them), and only rank 0 writes and logs.

Validation leaves training exactly as it was: the global torch / numpy / python RNG states are
restored afterwards, the held-out data come from their own loader, and the weights and train mode
are put back; a run with validation ends with the same weights as one without.

``DataStatsLogger`` logs the effective global batch at the start (``train/global_batch``) and the
training loader's counters (``data/seen``, ``data/kept``, ``data/rejected_<reason>``,
``data/errors_<kind>``, summed over ranks) every ``trainer.log_every_n_steps`` steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger
from torch import Tensor

from sdtrain.data.config import DataConfig
from sdtrain.data.filters import DataStats
from sdtrain.data.pipeline import LaionLoader
from sdtrain.data.transforms import to_model_images
from sdtrain.diffusion.loss import diffusion_loss, sample_noise
from sdtrain.models.conditioning import ConditioningComponent, ConditioningInputs, UNetConditioning
from sdtrain.models.sampling import sample_images
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.trainer.module import LatentDiffusionModule
from sdtrain.utils.images import (
    caption_text,
    captioned_grid,
    column_strips,
    draw_test_scene,
    make_grid,
    to_uint8,
)
from sdtrain.utils.images import to_tensor as scene_tensor

log = logging.getLogger("sdtrain.trainer")


def validation_callbacks(cfg: ExperimentConfig, run_dir: Path) -> list[Callback]:
    """The callbacks of this file that ``cfg`` asks for (the data counters always)."""
    callbacks: list[Callback] = [DataStatsLogger()]
    if cfg.validation.every_n_steps > 0:
        callbacks.append(ValidationCallback(cfg, run_dir))
    return callbacks


# ---------------------------------------------------------------------------------------------
# Held-out data
# ---------------------------------------------------------------------------------------------


def heldout_data_config(cfg: ExperimentConfig) -> DataConfig:
    """The training data config pointed at the held-out shards: one pass in a fixed order, no
    shuffling, centre crops, no flips, read in-process; masks and filters as in training."""
    data = cfg.data
    return dataclasses.replace(
        data,
        shards=list(cfg.validation.shards),
        source="shards",  # held-out shards also for a run on a folder (data.source: folder)
        repeats=1,
        augment=[],
        resampled=False,
        shuffle_shards=False,
        shuffle_buffer=0,
        num_workers=0,
        image=dataclasses.replace(data.image, crop="center", flip_p=0.0),
        latents=False,  # held-out shards hold images, also when training reads latent shards
        text_embeddings=False,
    )


def timestep_buckets(num_timesteps: int, buckets: int) -> list[tuple[int, int]]:
    """``buckets`` equal half-open ranges ``[lo, hi)`` covering ``[0, num_timesteps)``."""
    n = min(max(buckets, 1), num_timesteps)
    edges = [i * num_timesteps // n for i in range(n + 1)]
    return list(pairwise(edges))


def _generator(device: torch.device, *keys: int) -> torch.Generator:
    mixed = 0
    for key in keys:
        mixed = mixed * 1_000_003 + key
    return torch.Generator(device=device).manual_seed(mixed % (2**63))


@dataclass
class _EncodedBatch:
    """What the held-out loss needs from a batch, encoded once for all timestep buckets."""

    latents: Tensor  # (B, 4, h, w), scaled
    context: Tensor  # (B, 77, D)
    cond: UNetConditioning  # inpainting / depth channels


@torch.no_grad()
def _encode_batch(
    model: StableDiffusion, batch: Mapping[str, Any], g: torch.Generator, device: torch.device
) -> _EncodedBatch:
    """As ``LatentDiffusionModule.diffusion_loss`` does, without caption dropout."""
    images = to_model_images(batch["image"].to(device))  # (B, 3, H, W) in [-1, 1]
    latents = model.encode_images(images, generator=g)  # (B, 4, h, w)
    context = model.text_encoder.encode(list(batch["caption"]))  # (B, 77, D)
    cond = model.conditioning.from_batch(model, batch, images, latents, g)
    return _EncodedBatch(latents, context, cond)


@torch.no_grad()
def _loss_in_bucket(
    model: StableDiffusion,
    encoded: _EncodedBatch,
    bucket: tuple[int, int],
    g: torch.Generator,
    channels_last: bool = False,
) -> Tensor:
    """The training loss of an encoded batch with every ``t`` drawn inside ``bucket``."""
    latents, schedule = encoded.latents, model.schedule
    t = torch.randint(*bucket, (latents.shape[0],), generator=g, device=latents.device)  # (B,)
    noise = sample_noise(latents, model.config.diffusion.offset_noise, g)
    unet_in = encoded.cond.unet_input(schedule.q_sample(latents, t, noise))
    if channels_last:
        unet_in = unet_in.contiguous(memory_format=torch.channels_last)
    prediction = model.unet(unet_in, t, encoded.context, **encoded.cond.kwargs)  # (B, 4, h, w)
    return diffusion_loss(schedule, prediction, schedule.target(latents, t, noise), t)


# ---------------------------------------------------------------------------------------------
# Sampling and grids
# ---------------------------------------------------------------------------------------------


@dataclass
class SampleInputs:
    """The fixed inputs of the sample grids."""

    prompts: list[str]
    noise: Tensor  # (P, 4, s, s) initial latents, the same every validation
    conditioning: ConditioningInputs = dataclasses.field(default_factory=ConditioningInputs)
    """Inpainting / depth inputs (P, ., S, S): image, mask or depth."""


def square(images: Tensor, size: int) -> Tensor:
    """Centre square crop of (B, C, H, W) floats, resized to ``size`` x ``size``."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[..., top : top + side, left : left + side]
    if side == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True).clamp(-1, 1)


def grid_rows(
    inputs: SampleInputs, results: Tensor, conditioning: ConditioningComponent
) -> list[np.ndarray]:
    """The grid's rows, each (P, S, S, 3) uint8: [result], [input, mask / depth, result] or
    (x4 upscaler) [low-res, upscaled, target]: what the conditioning component shows."""
    return [to_uint8(row) for row in conditioning.grid_pictures(inputs.conditioning, results)]


# ---------------------------------------------------------------------------------------------
# The validation callback
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def evaluation_weights(module: LatentDiffusionModule, use_ema: bool) -> Iterator[None]:
    """The UNet in eval mode, with the EMA weights when asked and available; restored after."""
    unet = module.model.unet
    was_training = unet.training
    unet.eval()
    try:
        if use_ema and module.ema is not None:
            with module.ema.applied_to(unet):
                yield
        else:
            yield
    finally:
        unet.train(was_training)


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Put back the global torch (CPU and ``device``), numpy and python RNG states."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class ValidationCallback(Callback):
    """Sample grids and held-out loss every ``validation.every_n_steps`` optimiser steps."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.samples_dir = Path(run_dir) / "samples"
        self._last_step = -1
        self._heldout: list[tuple[int, dict[str, Any]]] | None = None  # (index, batch) of a rank
        self._references: tuple[Tensor, Tensor | None] | None = None  # (images, depth), CPU

    # --- Lightning hooks --------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        every = self.cfg.validation.every_n_steps
        if every <= 0 or step == 0 or step == self._last_step or step % every:
            return
        self._last_step = step  # several micro-batches end at the same optimiser step
        assert isinstance(pl_module, LatentDiffusionModule)
        self.validate(trainer, pl_module)

    # --- the work ---------------------------------------------------------------------------

    def validate(self, trainer: pl.Trainer, module: LatentDiffusionModule) -> dict[str, float]:
        """One validation at the current step: grids written and logged, losses logged."""
        v, step = self.cfg.validation, trainer.global_step
        sample_here = trainer.is_global_zero or self.cfg.trainer.strategy == "deepspeed_stage_3"
        metrics: dict[str, float] = {}
        grids: dict[str, list[np.ndarray]] = {}
        with (
            preserved_rng(module.device),
            evaluation_weights(module, v.use_ema),
            trainer.precision_plugin.forward_context(),
            torch.no_grad(),
        ):
            if v.shards:
                metrics = self.heldout_losses(module, trainer.global_rank, trainer.world_size)
            if sample_here and v.prompts:
                grids = self.sample_grids(module)
        if not trainer.is_global_zero:
            return metrics
        if grids:
            self.publish_grids(trainer, step, grids)
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
            log.info("step %d: val/loss %.4f", step, metrics["val/loss"])
        return metrics

    def heldout_batches(self, rank: int = 0, world_size: int = 1) -> list[tuple[int, dict]]:
        """The first ``loss_batches`` held-out batches of this rank's share, cached (uint8)."""
        if self._heldout is None:
            loader = LaionLoader(heldout_data_config(self.cfg), 0, 1)
            batches: list[tuple[int, dict]] = []
            for index, batch in enumerate(loader):
                if index >= self.cfg.validation.loss_batches:
                    break
                if index % world_size == rank:
                    batches.append((index, batch))
            if rank == 0 and not batches:
                log.warning("validation: no held-out batch in %s", self.cfg.validation.shards)
            self._heldout = batches
        return self._heldout

    def heldout_losses(
        self, module: LatentDiffusionModule, rank: int = 0, world_size: int = 1
    ) -> dict[str, float]:
        """``val/loss`` and ``val/loss_t{lo}-{hi}``, averaged over samples (all ranks)."""
        model, device, v = module.model, module.device, self.cfg.validation
        buckets = timestep_buckets(model.schedule.num_timesteps, v.loss_buckets)
        sums = torch.zeros(len(buckets), dtype=torch.float64, device=device)
        count = torch.zeros((), dtype=torch.float64, device=device)
        for index, batch in self.heldout_batches(rank, world_size):
            encoded = _encode_batch(model, batch, _generator(device, v.seed, index), device)
            b = encoded.latents.shape[0]
            for j, bucket in enumerate(buckets):
                g = _generator(device, v.seed, index, j + 1)
                loss = _loss_in_bucket(model, encoded, bucket, g, self.cfg.trainer.channels_last)
                sums[j] += float(loss) * b
            count += b
        if world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(count)
        if count == 0:
            return {}
        means = (sums / count).tolist()
        metrics = {"val/loss": sum(means) / len(means)}
        for (lo, hi), mean in zip(buckets, means, strict=True):
            metrics[f"val/loss_t{lo}-{hi}"] = mean
        return metrics

    def sample_size(self) -> int:
        return self.cfg.validation.image_size or self.cfg.data.image.size

    def sample_inputs(self, module: LatentDiffusionModule) -> SampleInputs:
        """The prompts, the fixed initial noise and, for inpainting / depth, the fixed inputs."""
        v, model, device = self.cfg.validation, module.model, module.device
        size = self.sample_size()
        f = self.cfg.model.latent_downsampling
        shape = (len(v.prompts), self.cfg.model.unet.out_channels, size // f, size // f)
        noise = torch.randn(shape, generator=torch.Generator().manual_seed(v.seed))
        inputs = SampleInputs(list(v.prompts), noise.to(device))
        if not model.conditioning.sample_inputs:
            return inputs
        images, depth = self.reference_images(len(v.prompts), size)
        # model.depth.source: midas -> the estimator's depth of the images, as in training.
        estimated = model.depth_from_images(images.to(device))
        depth = depth if estimated is None else estimated
        inputs.conditioning = model.conditioning.stand_in_inputs(images, depth).to(device)
        return inputs

    def reference_images(self, count: int, size: int) -> tuple[Tensor, Tensor | None]:
        """``count`` fixed inputs (N, 3, S, S) in [-1, 1]: the first held-out images (repeated
        when there are fewer) or the drawn test scene; with their depth maps when loaded."""
        if self._references is None:
            images: list[Tensor] = []
            depths: list[Tensor] = []
            if self.cfg.validation.shards:
                for batch in LaionLoader(heldout_data_config(self.cfg), 0, 1):
                    # squared per batch: with data.buckets batches differ in size
                    images.append(square(to_model_images(batch["image"]), size))
                    if "depth" in batch:
                        depths.append(square(batch["depth"].float(), size))
                    if sum(len(x) for x in images) >= count:
                        break
            if images:
                picked = torch.cat(images)
                depth = torch.cat(depths) if depths else None
            else:
                picked = scene_tensor(draw_test_scene(size), size)  # (1, 3, S, S)
                depth = None
            repeat = torch.arange(count) % len(picked)
            picked = square(picked[repeat], size)
            depth = square(depth[repeat], size) if depth is not None else None
            self._references = (picked, depth)
        return self._references

    def sample_grids(self, module: LatentDiffusionModule) -> dict[str, list[np.ndarray]]:
        """Sampler name -> grid rows (each (P, S, S, 3) uint8), with the current weights."""
        v = self.cfg.validation
        inputs = self.sample_inputs(module)
        chunk = max(self.cfg.data.batch_size, 1)
        grids = {}
        c = inputs.conditioning
        for sampler in v.samplers:
            results = sample_images(  # (P, 3, S, S)
                module.model, inputs.prompts, image=c.image, mask=c.mask, depth=c.depth,
                sampler=sampler, steps=v.steps, scale=v.guidance_scale, noise=inputs.noise,
                chunk=chunk,
            )  # fmt: skip
            grids[sampler] = grid_rows(inputs, results, module.model.conditioning)
        return grids

    def grid_path(self, step: int, sampler: str, suffix: str = "") -> Path:
        return self.samples_dir / f"step={step:08d}-{sampler}{suffix}.png"

    def publish_grids(
        self, trainer: pl.Trainer | None, step: int, grids: Mapping[str, list[np.ndarray]]
    ) -> None:
        """Write the PNG grids (plain and captioned); log the columns to wandb if attached."""
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        prompts = list(self.cfg.validation.prompts)
        size = self.sample_size()
        for sampler, rows in grids.items():
            grid = make_grid(rows)
            Image.fromarray(grid).save(self.grid_path(step, sampler))
            captioned_grid(grid, prompts, size).save(self.grid_path(step, sampler, "-captioned"))
            for logger in trainer.loggers if trainer is not None else []:
                if isinstance(logger, WandbLogger):
                    logger.log_image(
                        key=f"val/samples_{sampler}",
                        images=column_strips(rows),
                        caption=[caption_text(p) for p in prompts],
                        step=step,
                    )


# ---------------------------------------------------------------------------------------------
# Data counters
# ---------------------------------------------------------------------------------------------


def find_laion_loader(loaders: Any) -> LaionLoader | None:
    """The ``LaionLoader`` in what Lightning holds as the train dataloader(s) (possibly a
    collection of loaders, as a CombinedLoader's ``iterables``)."""
    pending = [loaders]
    while pending:
        item = pending.pop()
        if isinstance(item, LaionLoader):
            return item
        if isinstance(item, Mapping):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return None


def data_metrics(stats: DataStats) -> dict[str, float]:
    """``data/seen``, ``data/kept``, ``data/rejected_<reason>``, ``data/errors_<kind>``."""
    metrics = {"data/seen": float(stats.seen), "data/kept": float(stats.kept)}
    metrics.update({f"data/rejected_{k}": float(n) for k, n in sorted(stats.rejected.items())})
    metrics.update({f"data/errors_{k}": float(n) for k, n in sorted(stats.errors.items())})
    return metrics


def global_batch(trainer: pl.Trainer, batch_size: int) -> int:
    """Samples per optimiser step over all ranks."""
    return trainer.world_size * trainer.accumulate_grad_batches * batch_size


class DataStatsLogger(Callback):
    """``train/global_batch`` once at the start; the training loader's counters, summed over
    ranks, every ``trainer.log_every_n_steps`` optimiser steps."""

    def __init__(self) -> None:
        self._last_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, LatentDiffusionModule)
        value = global_batch(trainer, pl_module.cfg.data.batch_size)
        for logger in trainer.loggers:
            logger.log_hyperparams({"train/global_batch": value})
            logger.log_metrics({"train/global_batch": float(value)}, step=trainer.global_step)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % trainer.log_every_n_steps:
            return
        self._last_step = step
        loader = find_laion_loader(trainer.train_dataloader)
        stats = loader.stats if loader is not None else DataStats()
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            every: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(every, stats.to_dict())
            stats = DataStats()
            for other in every:
                stats = stats.merge(DataStats.from_dict(other))
        if loader is None or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(data_metrics(stats), step=step)
