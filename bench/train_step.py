"""Benchmark the training step as ``sdtrain fit`` runs it, on cached latents, and the UNet-only
part of it.

Three steps are timed for each model and image size:

- **full**: ``LatentDiffusionModule.diffusion_loss`` on a uint8 image batch already on the device
  (VAE encode, tokenise + text encode, noise, UNet forward) + backward + AdamW step + EMA update;
- **latents**: the same ``diffusion_loss`` on the batch as latent shards (``sdtrain data encode
  --text``, ``data.latents: true``, ``data.text_embeddings: true``) deliver it: the posterior
  moments (float16) and caption embeddings of the same images and captions; the latents are
  sampled from the moments, inpainting still encodes its masked image;
- **unet**: the same UNet forward + loss + backward + AdamW step + EMA update on latents, timesteps
  and text context computed once beforehand (the floor any caching can reach).

The three are timed interleaved (full, latents, unet, full, ...) after warm-up rounds, so that a
shared machine slows them alike. Reported per step: the median wall time, images/s, peak device
memory (CUDA only), model FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions, attention; with gradient checkpointing off, so recomputation is not counted), the
achieved FLOP/s and its ratio to a matmul rate measured in the same run (bf16 on CUDA: the MFU;
float32 on CPU).

    python bench/train_step.py                                  # tiny-cpu preset (CI smoke test)
    python bench/train_step.py --preset gpu --batch-size 8 --write-docs

``--lora`` times every case twice, full fine-tuning and a LoRA (``configs/experiments/tiny-lora``'s
adapter settings: rank 4 on the attention projections; ``--lora-rank`` to change), so the rows
show what the adapter saves in step time and peak memory (``case`` ``<model>+lora@<px>``).

``--depth`` times the preset's depth model instead (tiny-cpu: ``tiny-depth`` with the ``tiny``
estimator at 64 px; gpu: ``sd2-depth`` with MiDaS ``dpt_hybrid`` at 512 px), one model and one
batch, the full step with ``model.depth.source=midas`` (the frozen estimator computes the depth
channel from the batch's images inside the step) against the same step with ``source=shard``
(the depth map handed over in the batch), and the estimator's ``conditioning`` call alone, all
three interleaved: what on-line depth costs per step against precomputed depth maps.

``--clock cpu`` times with the process's CPU clock (``time.process_time``), which other processes
on a shared machine do not advance (CPU presets only; with ``--threads 1`` the steadiest).

``--write-docs`` (or ``--out FILE``) replaces this preset's marked block in docs/benchmarks.md.
Without a CUDA device the gpu preset prints why it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdtrain.data.latents import text_fingerprint, vae_fingerprint
from sdtrain.data.transforms import to_model_images
from sdtrain.diffusion.loss import diffusion_loss
from sdtrain.models.lora import add_adapter
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import ExperimentConfig, load_config
from sdtrain.trainer.module import LatentDiffusionModule, step_generator
from sdtrain.utils.markdown import write_section
from sdtrain.utils.threads import torch_threads

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = REPO_ROOT / "configs" / "models"
DEFAULT_DOCS = REPO_ROOT / "docs" / "benchmarks.md"
STEPS = ("full", "latents", "unet")

# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Models x image sizes run on one device in one precision."""

    name: str
    models: tuple[str, ...]
    """Names of ``configs/models/*.yaml``."""
    pixels: tuple[int, ...]
    """Square image sizes (the latents are 1/8 of them)."""
    device: Literal["cpu", "cuda"]
    bf16: bool
    """bf16 autocast with float32 weights (Lightning's ``bf16-mixed``); else float32."""
    batch_size: int
    iters: int
    warmup: int
    matmul_size: int
    """Side of the square matmul whose rate is the reference for the utilisation."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    lora_rank: int = 0
    """> 0: each case also with a LoRA of this rank on the attention projections."""
    depth_models: tuple[str, ...] = ()
    """``--depth``: the depth models (``model.conditioning: depth``) to compare midas vs shard."""
    depth_estimator: Literal["dpt_hybrid", "tiny"] = "tiny"
    """``--depth``: the MiDaS size (``model.depth.estimator``)."""
    depth_pixels: tuple[int, ...] = ()
    """``--depth``: image sizes of the depth comparison."""
    depth: bool = False
    """Run the depth comparison (midas vs shard) instead of the full / unet cases."""
    clock: Literal["wall", "cpu"] = "wall"
    """``cpu``: the process's CPU time, which other processes do not advance (CPU only)."""


PRESETS: dict[str, Preset] = {
    "tiny-cpu": Preset(
        "tiny-cpu", ("tiny-base", "tiny-inpainting"), (64, 128), "cpu", False,
        batch_size=2, iters=5, warmup=2, matmul_size=1024, threads=1,
        depth_models=("tiny-depth",), depth_estimator="tiny", depth_pixels=(64,),
    ),
    "gpu": Preset(
        "gpu", ("sd15", "sd2-base"), (256, 512), "cuda", True,
        batch_size=8, iters=20, warmup=5, matmul_size=8192,
        depth_models=("sd2-depth",), depth_estimator="dpt_hybrid", depth_pixels=(512,),
    ),
}  # fmt: skip
"""``tiny-cpu``: the repo's tiny models, seconds on a laptop (its numbers say nothing about a
GPU), one thread: on a shared machine two threads wait on each other far more than they gain;
``gpu``: the real SD1.5 and SD2-base architectures (random weights)."""

# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, iters: int = 10) -> float:
    """FLOP/s of an (n x n) @ (n x n) matmul: the best of 3 blocks of ``iters`` after warm-up."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 * iters / best


def counted_flops(step: Callable[[], None]) -> int:
    """FLOPs of one call of ``step`` (forward and backward), as FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


@dataclass
class Timing:
    """Wall times of one step's timed calls; CUDA memory in bytes (None on CPU)."""

    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    resident_bytes: int | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def time_interleaved(
    steps: dict[str, Callable[[], None]],
    device: torch.device,
    iters: int,
    warmup: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Round-robin ``steps``: ``warmup`` untimed rounds, then ``iters`` timed ones, so that a
    shared or drifting machine slows them alike; each timed on ``clock``. On CUDA also the memory
    allocated when each step starts (weights, optimiser state, EMA, inputs) and the peak during
    it."""
    cuda = device.type == "cuda"
    timings = {name: Timing() for name in steps}
    for round_ in range(warmup + iters):
        for name, step in steps.items():
            synchronize(device)
            if cuda:
                resident = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = clock()
            step()
            synchronize(device)
            seconds = clock() - start
            if round_ < warmup:
                continue
            timing = timings[name]
            timing.times_s.append(seconds)
            if cuda:
                peak = torch.cuda.max_memory_allocated(device)
                timing.peak_bytes = max(timing.peak_bytes or 0, peak)
                timing.resident_bytes = max(timing.resident_bytes or 0, resident)
    return timings


# ---------------------------------------------------------------------------------------------
# The two steps
# ---------------------------------------------------------------------------------------------


def bench_config(
    model: str, batch_size: int, lora_rank: int = 0, overrides: Sequence[str] = ()
) -> ExperimentConfig:
    """The model's config with the training defaults (AdamW, EMA, caption dropout); with
    ``lora_rank`` a LoRA of that rank (alpha = rank) on the attention projections; then
    ``overrides`` (``key=value``)."""
    lora = ["finetune.method=lora", f"finetune.lora.rank={lora_rank}",
            f"finetune.lora.alpha={lora_rank}"] if lora_rank else []  # fmt: skip
    return load_config(
        [MODELS / f"{model}.yaml"], [f"data.batch_size={batch_size}", *lora, *overrides]
    )


def make_batch(cfg: ExperimentConfig, pixels: int, device: torch.device) -> dict[str, Any]:
    """What the loader hands the trainer: uint8 images (and masks), captions, on the device."""
    b = cfg.data.batch_size
    gen = torch.Generator().manual_seed(0)
    batch: dict[str, Any] = {
        "image": torch.randint(0, 256, (b, 3, pixels, pixels), generator=gen, dtype=torch.uint8),
        "caption": [f"a photograph of synthetic object number {i} on a table" for i in range(b)],
    }
    if cfg.model.conditioning == "inpainting":
        mask = torch.zeros(b, 1, pixels, pixels, dtype=torch.uint8)
        mask[..., pixels // 4 : 3 * pixels // 4, pixels // 4 : 3 * pixels // 4] = 1
        batch["mask"] = mask
    elif cfg.model.conditioning == "depth":
        batch["depth"] = torch.rand(b, 1, pixels, pixels, generator=gen) * 2 - 1
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class TrainStep:
    """A model, its optimiser and EMA on ``device``, and the two step functions."""

    def __init__(self, cfg: ExperimentConfig, pixels: int, device: torch.device, bf16: bool):
        self.device = device
        self.bf16 = bf16
        model = StableDiffusion(cfg.model)
        if cfg.finetune.method == "lora":  # as fit's build_module: before the EMA is made
            add_adapter(model.unet, cfg.finetune.lora)
        self.module = LatentDiffusionModule(cfg, model).to(device)
        self.module.train()
        assert self.module.ema is not None
        self.ema = self.module.ema.to(device)
        self.unet = self.module.model.unet
        self.optimizer = self.module.configure_optimizers()["optimizer"]
        self.batch = make_batch(cfg, pixels, device)
        self.step_index = 0
        self.unet_inputs = self._precompute()
        data = replace(cfg.data, latents=True, text_embeddings=True)
        self.latents_cfg = replace(cfg, data=data)
        self.latent_batch = self._latent_batch()

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _generator(self) -> torch.Generator:
        self.step_index += 1
        return step_generator(0, self.step_index, 0, 0, self.device)

    @torch.no_grad()
    def _precompute(self) -> tuple[torch.Tensor, ...]:
        """UNet input, timesteps, context and target of one batch, as diffusion_loss makes them."""
        model, g = self.module.model, self._generator()
        with self.autocast():
            images = to_model_images(self.batch["image"])  # (B, 3, H, W) in [-1, 1]
            latents = model.encode_images(images, generator=g)  # (B, 4, h, w)
            context = model.text_encoder.encode(self.batch["caption"])  # (B, 77, D)
            cond = model.conditioning.from_batch(model, self.batch, images, latents, g)
        b = latents.shape[0]
        t = torch.randint(0, model.schedule.num_timesteps, (b,), generator=g, device=self.device)
        noise = torch.randn(latents.shape, generator=g, device=self.device)
        unet_in = cond.unet_input(model.schedule.q_sample(latents.float(), t, noise))
        target = model.schedule.target(latents.float(), t, noise)
        return unet_in.float(), t, context.float(), target

    @torch.no_grad()
    def _latent_batch(self) -> dict[str, Any]:
        """The batch as latent shards deliver it: the posterior moments (float16) and caption
        embeddings of the same images and captions, the crop and mask where the mode needs them;
        the empty prompt's embedding computed here, once, as training does on its first step."""
        model, b = self.module.model, len(self.batch["caption"])
        with self.autocast():
            posterior = model.autoencoder.encode(to_model_images(self.batch["image"]))
            context = model.text_encoder.encode(self.batch["caption"])  # (B, 77, D)
        scale = self.module.cfg.model.autoencoder.scale_factor
        batch: dict[str, Any] = {
            "moments": torch.cat([posterior.mean, posterior.logvar], 1).to(torch.float16),
            "text_embedding": context.to(torch.float16),
            "caption": self.batch["caption"],
            "key": [f"{i:09d}" for i in range(b)],
            "latent_vae": [vae_fingerprint(model.autoencoder.state_dict(), scale)] * b,
            "latent_text": [text_fingerprint(model.text_encoder.state_dict())] * b,
        }
        if model.conditioning.needs_pixels(self.module.cfg.model.depth):
            batch["image"] = self.batch["image"]
        batch.update({k: self.batch[k] for k in ("mask", "depth") if k in self.batch})
        with self._latents_config():
            self.module.encode_text(batch, torch.zeros(b, dtype=torch.bool, device=self.device))
        return batch

    @contextlib.contextmanager
    def _latents_config(self) -> Iterator[None]:
        """The module as ``data.latents`` + ``data.text_embeddings`` training runs it."""
        cfg, self.module.cfg = self.module.cfg, self.latents_cfg
        try:
            yield
        finally:
            self.module.cfg = cfg

    def _finish(self, loss: torch.Tensor) -> None:
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.unet)

    def step_full(self) -> None:
        """VAE + text encode, UNet forward, backward, AdamW, EMA: one training step."""
        with self.autocast():
            loss = self.module.diffusion_loss(self.batch, self._generator())
        self._finish(loss)

    def step_latents(self) -> None:
        """The training step on cached latents and caption embeddings (``data.latents``)."""
        with self._latents_config(), self.autocast():
            loss = self.module.diffusion_loss(self.latent_batch, self._generator())
        self._finish(loss)

    def step_unet(self) -> None:
        """The same step on precomputed UNet inputs and context."""
        unet_in, t, context, target = self.unet_inputs
        with self.autocast():
            prediction = self.unet(unet_in, t, context)  # (B, 4, h, w)
        self._finish(diffusion_loss(self.module.model.schedule, prediction, target, t))

    def step(self, name: str) -> Callable[[], None]:
        """``step_full``, ``step_latents`` or ``step_unet`` by its name in STEPS."""
        return {"full": self.step_full, "latents": self.step_latents, "unet": self.step_unet}[name]

    def flops(self) -> dict[str, int]:
        """Model FLOPs of each step, counted with gradient checkpointing off."""
        checkpointing = self.unet.gradient_checkpointing
        self.unet.set_gradient_checkpointing(False)
        try:
            return {name: counted_flops(self.step(name)) for name in STEPS}
        finally:
            self.unet.set_gradient_checkpointing(checkpointing)


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    """One row of the report."""

    case: str
    step: str
    shape: str
    median_ms: float
    images_per_s: float
    flops: int
    """Counted FLOPs of one step (the whole batch)."""
    flops_per_s: float
    utilisation: float = math.nan
    """Achieved FLOP/s / measured matmul FLOP/s."""
    peak_mib: float | None = None
    resident_mib: float | None = None


def run_case(
    model: str, pixels: int, preset: Preset, checkpointing: bool, lora_rank: int = 0
) -> list[StepResult]:
    device = torch.device(preset.device)
    cfg = bench_config(model, preset.batch_size, lora_rank)
    bench = TrainStep(cfg, pixels, device, preset.bf16)
    bench.unet.set_gradient_checkpointing(checkpointing)
    flops = bench.flops()  # also a warm-up of both steps
    latent = bench.unet_inputs[0]
    shape = f"{pixels}px, UNet input {tuple(latent.shape)}"
    steps = {name: bench.step(name) for name in STEPS}
    timings = time_interleaved(steps, device, preset.iters, preset.warmup, CLOCKS[preset.clock])
    rows = []
    for name, timing in timings.items():
        seconds = timing.median_s
        row = StepResult(
            case=f"{model}{'+lora' if lora_rank else ''}@{pixels}px",
            step=name,
            shape=shape,
            median_ms=1000 * seconds,
            images_per_s=preset.batch_size / seconds,
            flops=flops[name],
            flops_per_s=flops[name] / seconds,
        )
        if timing.peak_bytes is not None and timing.resident_bytes is not None:
            row.peak_mib = timing.peak_bytes / 2**20
            row.resident_mib = timing.resident_bytes / 2**20
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Depth: on-line MiDaS vs precomputed depth maps
# ---------------------------------------------------------------------------------------------

DEPTH_STEPS = ("shard", "midas", "estimator")
"""``shard``: the full step with the depth map from the batch; ``midas``: the same step with the
frozen estimator computing it from the batch's images; ``estimator``: that computation alone."""


@dataclass
class DepthResult:
    """One row of the depth comparison."""

    case: str
    step: str
    shape: str
    median_ms: float
    images_per_s: float
    flops: int
    """Counted FLOPs of one call (the whole batch)."""
    estimator_calls: int
    """Forward calls of the estimator during this step's rounds (warm-up included)."""
    ratio: float = math.nan
    """Median time / the ``shard`` step's median."""
    peak_mib: float | None = None
    resident_mib: float | None = None


class DepthStep(TrainStep):
    """A depth model built with ``model.depth.source=midas``, and its full step run both ways:
    with the estimator (``midas``) and with it set aside so that the depth channel comes from the
    batch's ``depth`` member (``shard``), as ``source=shard`` builds the model without one."""

    def __init__(self, cfg: ExperimentConfig, pixels: int, device: torch.device, bf16: bool):
        super().__init__(cfg, pixels, device, bf16)
        estimator = self.module.model.depth_estimator
        assert estimator is not None, "the depth comparison needs model.depth.source=midas"
        self.estimator = estimator
        self.calls = 0
        estimator.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def _precompute(self) -> tuple[torch.Tensor, ...]:
        with self._without_estimator():  # the unet step is not timed here; keep set-up cheap
            return super()._precompute()

    @contextlib.contextmanager
    def _without_estimator(self) -> Iterator[None]:
        model = self.module.model
        estimator, model.depth_estimator = model.depth_estimator, None
        try:
            yield
        finally:
            model.depth_estimator = estimator

    def step_shard(self) -> None:
        """The full step, the depth channel resized from ``batch["depth"]``."""
        with self._without_estimator():
            self.step_full()

    def step_midas(self) -> None:
        """The full step, the depth channel from the estimator on the batch's images."""
        self.step_full()

    @torch.no_grad()
    def step_estimator(self) -> None:
        """The estimator's part of ``step_midas`` alone: images -> depth channel at latent size."""
        images = to_model_images(self.batch["image"])  # (B, 3, H, W) in [-1, 1]
        latent_hw = tuple(self.unet_inputs[0].shape[-2:])
        with self.autocast():
            self.estimator.conditioning(images, latent_hw)  # (B, 1, h, w)

    def depth_step(self, name: str) -> Callable[[], None]:
        """A step of DEPTH_STEPS by its name."""
        return {"shard": self.step_shard, "midas": self.step_midas,
                "estimator": self.step_estimator}[name]  # fmt: skip


def run_depth_case(
    model: str, pixels: int, preset: Preset, checkpointing: bool
) -> list[DepthResult]:
    """``model`` at ``pixels``: the shard, midas and estimator-only steps, interleaved."""
    device = torch.device(preset.device)
    overrides = ["model.depth.source=midas", f"model.depth.estimator={preset.depth_estimator}"]
    cfg = bench_config(model, preset.batch_size, overrides=overrides)
    bench = DepthStep(cfg, pixels, device, preset.bf16)
    bench.unet.set_gradient_checkpointing(False)
    flops = {name: counted_flops(bench.depth_step(name)) for name in DEPTH_STEPS}
    bench.unet.set_gradient_checkpointing(checkpointing)
    steps: dict[str, Callable[[], None]] = {}
    calls = dict.fromkeys(DEPTH_STEPS, 0)
    for name in DEPTH_STEPS:
        step = bench.depth_step(name)

        def counted(step: Callable[[], None] = step, name: str = name) -> None:
            before = bench.calls
            step()
            calls[name] += bench.calls - before

        steps[name] = counted
    timings = time_interleaved(steps, device, preset.iters, preset.warmup, CLOCKS[preset.clock])
    shard_s = timings["shard"].median_s
    latent = bench.unet_inputs[0]
    rows = []
    for name, timing in timings.items():
        seconds = timing.median_s
        row = DepthResult(
            case=f"{model}@{pixels}px",
            step=name,
            shape=f"{pixels}px, UNet input {tuple(latent.shape)}",
            median_ms=1000 * seconds,
            images_per_s=preset.batch_size / seconds,
            flops=flops[name],
            estimator_calls=calls[name],
            ratio=seconds / shard_s,
        )
        if timing.peak_bytes is not None and timing.resident_bytes is not None:
            row.peak_mib = timing.peak_bytes / 2**20
            row.resident_mib = timing.resident_bytes / 2**20
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything printed (and written to the docs) for one run of one preset."""

    preset: str
    command: str
    date: str
    versions: str
    device_name: str
    threads: int
    dtype: str
    batch_size: int
    iters: int
    warmup: int
    checkpointing: bool
    lora_rank: int = 0
    depth_estimator: str = ""
    """Set for the depth comparison (``--depth``): the MiDaS size."""
    clock: str = "wall"
    matmul: str = ""
    """How the reference rate was measured, e.g. ``bf16 8192^3: 700.1 TFLOP/s``."""
    matmul_flops_per_s: float = 0.0
    rows: list[StepResult] = field(default_factory=list)
    depth_rows: list[DepthResult] = field(default_factory=list)
    skipped: str = ""

    @property
    def section_key(self) -> str:
        lora = "+lora" if self.lora_rank else ""
        depth = "+depth" if self.depth_estimator else ""
        return f"train_step:{self.preset}{'+ckpt' if self.checkpointing else ''}{lora}{depth}"

    def to_markdown(self) -> str:
        lines = [
            f"`{self.command}`",
            "",
            f"- date: {self.date}; {self.versions}",
            f"- device: {self.device_name}; torch threads: {self.threads}; clock: {self.clock}"
            + (" (process CPU time)" if self.clock == "cpu" else " (wall time)"),
            f"- {self.dtype}; batch {self.batch_size}; {self.warmup} warm-up + {self.iters} timed "
            "rounds (full, latents and unet steps interleaved), median; gradient checkpointing "
            + ("on" if self.checkpointing else "off"),
        ]
        if self.lora_rank:
            lines.append(
                f"- `+lora` rows: LoRA rank {self.lora_rank} (alpha {self.lora_rank}) on the "
                "attention projections; only the adapter trains (AdamW and EMA over it alone)"
            )
        if self.depth_estimator:
            lines[-1] = (
                f"- {self.dtype}; batch {self.batch_size}; {self.warmup} warm-up + {self.iters} "
                "timed rounds (shard, midas and estimator interleaved), median; gradient "
                "checkpointing " + ("on" if self.checkpointing else "off")
            )
            lines.append(
                f"- one model built with `model.depth.source=midas`, "
                f"`model.depth.estimator={self.depth_estimator}`, and one batch: **shard** is the "
                "full step with the estimator set aside (depth channel resized from the batch's "
                "depth map), **midas** the same step with the estimator on the batch's images, "
                "**estimator** its `conditioning` call alone"
            )
        if self.skipped:
            return "\n".join([*lines, "", f"**Skipped:** {self.skipped}", ""])
        if self.depth_estimator:
            return "\n".join([*lines, "", *self._depth_table(), ""])
        lines += [
            f"- reference matmul rate: {self.matmul}",
            "",
            "| case | step | shape | median ms | images/s | GFLOP/image | achieved TFLOP/s "
            "| utilisation | peak / resident MiB |",
            "|---|---|---|--:|--:|--:|--:|--:|--:|",
        ]
        for r in self.rows:
            memory = "–"
            if r.peak_mib is not None:
                memory = f"{r.peak_mib:,.0f} / {r.resident_mib:,.0f}"
            lines.append(
                f"| {r.case} | {r.step} | {r.shape} | {r.median_ms:.1f} | {r.images_per_s:.2f} "
                f"| {r.flops / self.batch_size / 1e9:.2f} | {r.flops_per_s / 1e12:.3f} "
                f"| {100 * r.utilisation:.1f}% | {memory} |"
            )
        return "\n".join([*lines, "", *self._latents_lines(), ""])

    def _latents_lines(self) -> list[str]:
        """Per case: images/s of the step on cached latents against encoding on the fly."""
        lines = []
        for case in dict.fromkeys(r.case for r in self.rows):
            by_step = {r.step: r for r in self.rows if r.case == case}
            full, cached = by_step["full"].images_per_s, by_step["latents"].images_per_s
            lines.append(
                f"- {case}: cached latents {cached:.2f} images/s vs encoding on the fly "
                f"{full:.2f} images/s: x{cached / full:.2f}"
            )
        return lines

    def _depth_table(self) -> list[str]:
        lines = [
            "| case | step | shape | median ms | images/s | x shard | GFLOP/image "
            "| estimator calls | peak / resident MiB |",
            "|---|---|---|--:|--:|--:|--:|--:|--:|",
        ]
        for r in self.depth_rows:
            memory = "–"
            if r.peak_mib is not None:
                memory = f"{r.peak_mib:,.0f} / {r.resident_mib:,.0f}"
            lines.append(
                f"| {r.case} | {r.step} | {r.shape} | {r.median_ms:.1f} | {r.images_per_s:.2f} "
                f"| {r.ratio:.2f} | {r.flops / self.batch_size / 1e9:.3f} | {r.estimator_calls} "
                f"| {memory} |"
            )
        lines.append("")
        for case in dict.fromkeys(r.case for r in self.depth_rows):
            by_step = {r.step: r for r in self.depth_rows if r.case == case}
            shard, midas, alone = by_step["shard"], by_step["midas"], by_step["estimator"]
            extra = midas.median_ms - shard.median_ms
            lines.append(
                f"- {case}: on-line depth {midas.median_ms:.1f} ms/step vs precomputed "
                f"{shard.median_ms:.1f} ms/step, x{midas.ratio:.2f} ({extra:+.1f} "
                f"ms); the estimator alone {alone.median_ms:.1f} ms, "
                f"{100 * alone.median_ms / midas.median_ms:.0f}% of the midas step"
            )
        return lines


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny-cpu")
    parser.add_argument("--batch-size", type=int, help="default: the preset's (gpu: 8)")
    parser.add_argument("--iters", type=int, help="timed steps (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: the preset's)")
    parser.add_argument("--pixels", type=int, nargs="+", help="image sizes (default: preset's)")
    parser.add_argument("--models", nargs="+", help="configs/models names (default: preset's)")
    parser.add_argument("--matmul-size", type=int, help="side of the reference matmul")
    parser.add_argument("--checkpointing", action="store_true", help="UNet gradient checkpointing")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: preset's)")
    parser.add_argument(
        "--lora", action="store_true", help="each case also as a LoRA run (rows <model>+lora)"
    )
    parser.add_argument("--lora-rank", type=int, default=4, help="LoRA rank (default 4)")
    parser.add_argument(
        "--depth",
        action="store_true",
        help="compare model.depth.source=midas vs shard on the preset's depth model instead",
    )
    parser.add_argument(
        "--clock", choices=sorted(CLOCKS), help="wall (default) or cpu (process CPU time)"
    )
    parser.add_argument("--write-docs", action="store_true", help=f"update {DEFAULT_DOCS.name}")
    parser.add_argument("--out", type=Path, help="update this markdown file (implies writing)")
    return parser.parse_args(argv)


def run_preset(preset: Preset, checkpointing: bool, command: str) -> Report:
    """Every model x size of ``preset``, or a report saying why it was skipped."""
    cuda = preset.device == "cuda"
    report = Report(
        preset=preset.name,
        command=command,
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        versions=f"torch {torch.__version__}, python {platform.python_version()}",
        device_name=preset.device,
        threads=torch.get_num_threads(),
        dtype="bf16 autocast, fp32 weights" if preset.bf16 else "float32",
        batch_size=preset.batch_size,
        iters=preset.iters,
        warmup=preset.warmup,
        checkpointing=checkpointing,
        lora_rank=preset.lora_rank,
        depth_estimator=preset.depth_estimator if preset.depth else "",
        clock=preset.clock,
    )
    if cuda and not torch.cuda.is_available():
        report.skipped = "no CUDA device here; the gpu preset needs one."
        return report
    if cuda and preset.clock == "cpu":
        report.skipped = "--clock cpu times CPU presets only (GPU steps run asynchronously)."
        return report
    report.device_name = _device_name(preset.device)
    if preset.depth:
        for model in preset.depth_models:
            for pixels in preset.depth_pixels:
                print(f"running {model} @ {pixels}px, midas vs shard ...", file=sys.stderr)
                report.depth_rows += run_depth_case(model, pixels, preset, checkpointing)
                if cuda:
                    torch.cuda.empty_cache()
        return report
    device = torch.device(preset.device)
    dtype = torch.bfloat16 if preset.bf16 else torch.float32
    n = preset.matmul_size
    rates = [matmul_rate(device, dtype, n)]
    for model in preset.models:
        for pixels in preset.pixels:
            print(f"running {model} @ {pixels}px ...", file=sys.stderr, flush=True)
            for rank in (0, preset.lora_rank) if preset.lora_rank else (0,):
                report.rows += run_case(model, pixels, preset, checkpointing, rank)
                if cuda:
                    torch.cuda.empty_cache()
    # Measured before and after the cases; other work on the machine can only lower a rate, so
    # the higher one is the better estimate of what the device can do.
    rates.append(matmul_rate(device, dtype, n))
    rate = report.matmul_flops_per_s = max(rates)
    shown = ", ".join(f"{r / 1e12:.3f}" for r in rates)
    report.matmul = (
        f"{'bf16' if preset.bf16 else 'float32'} {n}x{n}x{n}: {rate / 1e12:.3f} TFLOP/s "
        f"(the higher of {shown} TFLOP/s, measured before and after the cases)"
    )
    for row in report.rows:
        row.utilisation = row.flops_per_s / rate
    return report


def main(argv: Sequence[str] | None = None) -> Report:
    """Run a preset, print its markdown report, optionally write it to the docs; return it."""
    args = parse_args(argv)
    base = PRESETS[args.preset]
    preset = replace(
        base,
        models=tuple(args.models or base.models),
        pixels=tuple(args.pixels or base.pixels),
        batch_size=args.batch_size or base.batch_size,
        iters=args.iters or base.iters,
        warmup=base.warmup if args.warmup is None else args.warmup,
        matmul_size=args.matmul_size or base.matmul_size,
        lora_rank=args.lora_rank if args.lora else 0,
        depth_models=tuple(args.models or base.depth_models),
        depth_pixels=tuple(args.pixels or base.depth_pixels),
        depth=args.depth,
        clock=args.clock or base.clock,
    )
    if args.depth and args.lora:
        raise SystemExit("--depth and --lora are separate comparisons: pass one of them")
    shown = ["python", "bench/train_step.py", *(sys.argv[1:] if argv is None else argv)]
    with torch_threads(args.threads or preset.threads):
        report = run_preset(preset, args.checkpointing, shlex.join(shown))
    markdown = report.to_markdown()
    print(markdown)
    out = args.out or (DEFAULT_DOCS if args.write_docs else None)
    if out is not None:
        title = f"Training step: {preset.name}" + (" + checkpointing" * args.checkpointing)
        title += f", full vs LoRA rank {preset.lora_rank}" if preset.lora_rank else ""
        title += ", on-line MiDaS depth vs precomputed" if preset.depth else ""
        write_section(out, report.section_key, title, markdown, level="###")
        print(f"wrote the {report.section_key} block of {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
