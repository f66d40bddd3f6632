"""Benchmark the training step as ``sdtrain fit`` runs it, and the UNet-only part of it.

Two steps are timed for each model and image size:

- **full**: ``LatentDiffusionModule.diffusion_loss`` on a uint8 image batch already on the device
  (VAE encode, tokenise + text encode, noise, UNet forward) + backward + AdamW step + EMA update;
- **unet**: the same UNet forward + loss + backward + AdamW step + EMA update on latents, timesteps
  and text context computed once beforehand (what training on precomputed latents would cost).

The two are timed interleaved (full, unet, full, ...) after warm-up rounds, so that a shared
machine slows both alike. Reported per step: the median wall time, images/s, peak device memory
(CUDA only), model FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions, attention; with gradient checkpointing off, so recomputation is not counted), the
achieved FLOP/s and its ratio to a matmul rate measured in the same run (bf16 on CUDA: the MFU;
float32 on CPU).

    python bench/train_step.py                                  # tiny-cpu preset (CI smoke test)
    python bench/train_step.py --preset gpu --batch-size 8 --write-docs

``--lora`` times every case twice, full fine-tuning and a LoRA (``configs/experiments/tiny-lora``'s
adapter settings: rank 4 on the attention projections; ``--lora-rank`` to change), so the rows
show what the adapter saves in step time and peak memory (``case`` ``<model>+lora@<px>``).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

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
STEPS = ("full", "unet")

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


PRESETS: dict[str, Preset] = {
    "tiny-cpu": Preset(
        "tiny-cpu", ("tiny-base", "tiny-inpainting"), (64, 128), "cpu", False,
        batch_size=2, iters=5, warmup=2, matmul_size=1024, threads=1,
    ),
    "gpu": Preset(
        "gpu", ("sd15", "sd2-base"), (256, 512), "cuda", True,
        batch_size=8, iters=20, warmup=5, matmul_size=8192,
    ),
}  # fmt: skip
"""``tiny-cpu``: the repo's tiny models, seconds on a laptop (its numbers say nothing about a
GPU), one thread: on a shared machine two threads wait on each other far more than they gain;
``gpu``: the real SD1.5 and SD2-base architectures (random weights)."""

# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


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
    steps: dict[str, Callable[[], None]], device: torch.device, iters: int, warmup: int
) -> dict[str, Timing]:
    """Round-robin ``steps``: ``warmup`` untimed rounds, then ``iters`` timed ones, so that a
    shared or drifting machine slows them alike. On CUDA also the memory allocated when each step
    starts (weights, optimiser state, EMA, inputs) and the peak during it."""
    cuda = device.type == "cuda"
    timings = {name: Timing() for name in steps}
    for round_ in range(warmup + iters):
        for name, step in steps.items():
            synchronize(device)
            if cuda:
                resident = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            seconds = time.perf_counter() - start
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


def bench_config(model: str, batch_size: int, lora_rank: int = 0) -> ExperimentConfig:
    """The model's config with the training defaults (AdamW, EMA, caption dropout); with
    ``lora_rank`` a LoRA of that rank (alpha = rank) on the attention projections."""
    lora = ["finetune.method=lora", f"finetune.lora.rank={lora_rank}",
            f"finetune.lora.alpha={lora_rank}"] if lora_rank else []  # fmt: skip
    return load_config([MODELS / f"{model}.yaml"], [f"data.batch_size={batch_size}", *lora])


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

    def step_unet(self) -> None:
        """The same step on precomputed UNet inputs and context."""
        unet_in, t, context, target = self.unet_inputs
        with self.autocast():
            prediction = self.unet(unet_in, t, context)  # (B, 4, h, w)
        self._finish(diffusion_loss(self.module.model.schedule, prediction, target, t))

    def step(self, name: str) -> Callable[[], None]:
        """``step_full`` or ``step_unet`` by its name in STEPS."""
        return {"full": self.step_full, "unet": self.step_unet}[name]

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
    timings = time_interleaved(steps, device, preset.iters, preset.warmup)
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
    matmul: str = ""
    """How the reference rate was measured, e.g. ``bf16 8192^3: 700.1 TFLOP/s``."""
    matmul_flops_per_s: float = 0.0
    rows: list[StepResult] = field(default_factory=list)
    skipped: str = ""

    @property
    def section_key(self) -> str:
        lora = "+lora" if self.lora_rank else ""
        return f"train_step:{self.preset}{'+ckpt' if self.checkpointing else ''}{lora}"

    def to_markdown(self) -> str:
        lines = [
            f"`{self.command}`",
            "",
            f"- date: {self.date}; {self.versions}",
            f"- device: {self.device_name}; torch threads: {self.threads}",
            f"- {self.dtype}; batch {self.batch_size}; {self.warmup} warm-up + {self.iters} timed "
            "rounds (full and unet steps interleaved), median; gradient checkpointing "
            + ("on" if self.checkpointing else "off"),
        ]
        if self.lora_rank:
            lines.append(
                f"- `+lora` rows: LoRA rank {self.lora_rank} (alpha {self.lora_rank}) on the "
                "attention projections; only the adapter trains (AdamW and EMA over it alone)"
            )
        if self.skipped:
            return "\n".join([*lines, "", f"**Skipped:** {self.skipped}", ""])
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
        return "\n".join([*lines, ""])


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
    )
    if cuda and not torch.cuda.is_available():
        report.skipped = "no CUDA device here; the gpu preset needs one."
        return report
    report.device_name = _device_name(preset.device)
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
    )
    shown = ["python", "bench/train_step.py", *(sys.argv[1:] if argv is None else argv)]
    with torch_threads(args.threads or preset.threads):
        report = run_preset(preset, args.checkpointing, shlex.join(shown))
    markdown = report.to_markdown()
    print(markdown)
    out = args.out or (DEFAULT_DOCS if args.write_docs else None)
    if out is not None:
        title = f"Training step: {preset.name}" + (" + checkpointing" * args.checkpointing)
        title += f", full vs LoRA rank {preset.lora_rank}" if preset.lora_rank else ""
        write_section(out, report.section_key, title, markdown, level="###")
        print(f"wrote the {report.section_key} block of {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
