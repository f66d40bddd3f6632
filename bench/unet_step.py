"""Benchmark one UNet training step (forward + backward), ours against diffusers', same weights.

Our ``UNetModel`` and diffusers' ``UNet2DConditionModel`` are built as the same architecture; our
(randomised) state dict, which is the original ldm layout, goes through diffusers' own
``convert_ldm_unet_checkpoint`` into theirs with ``strict=True``. Before any timing the two outputs
are compared on the same input in float32. Then the two steps are timed interleaved (ours, theirs,
ours, theirs, ...) after warm-up, so that a shared or drifting machine slows both alike, and the
medians and their ratio ``ours / diffusers`` are reported (goal: <= 1.0).

    pip install -e '.[bench]'
    python bench/unet_step.py                          # tiny-cpu preset, prints a markdown table
    python bench/unet_step.py --preset small-cpu --write-docs  # 8/16/32 latents, SD2 and SD1 layout
    python bench/unet_step.py --preset small-cpu --threads 1 --clock cpu  # steadiest when shared
    python bench/unet_step.py --preset gpu --batch-size 4 --write-docs
    python bench/unet_step.py --checkpointing          # gradient checkpointing in both models

``--write-docs`` (or ``--out FILE``) replaces this preset's marked section of docs/benchmarks.md.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

from sdtrain.models import UNetModel, build_unet
from sdtrain.utils.markdown import write_section
from sdtrain.utils.threads import torch_threads

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOCS = REPO_ROOT / "docs" / "benchmarks.md"
LDM_PREFIX = "model.diffusion_model."
REL_TOLERANCE = 1e-4
"""Equivalence passes when max |ours - theirs| <= REL_TOLERANCE * max(1, max |ours|) in float32."""

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# ---------------------------------------------------------------------------------------------
# Cases and presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchCase:
    """One UNet architecture at one latent size."""

    name: str
    """Row label, e.g. ``sd15@512px``."""
    unet: Mapping[str, Any]
    """The original ``unet_config.params``, as ``build_unet`` takes them."""
    latent: int
    """Latent height = width (image pixels / 8)."""
    context_len: int = 77
    """Text tokens in the cross-attention context (CLIP: 77)."""


@dataclass(frozen=True)
class Preset:
    """A closed set of cases run on one device in one precision."""

    name: str
    cases: tuple[BenchCase, ...]
    device: Literal["cpu", "cuda"]
    autocast_bf16: bool
    """bf16 autocast around the forward (weights stay float32), as in mixed-precision training."""
    batch_size: int
    iters: int
    warmup: int
    clock: Literal["wall", "cpu"] = "wall"
    """``cpu``: the process's CPU time (``time.process_time``), which other processes on a shared
    machine do not advance; with ``--threads 1`` it is the steadiest CPU measure."""


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _small_unet(mc: int, mult: list[int], ctx: int, *, linear: bool, heads: int) -> dict[str, Any]:
    """SD1-like (conv proj, fixed head count) or SD2-like (linear proj, fixed head width)."""
    params: dict[str, Any] = {
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": mc,
        "attention_resolutions": [1, 2],
        "num_res_blocks": 1,
        "channel_mult": mult,
        "transformer_depth": 1,
        "context_dim": ctx,
        "use_linear_in_transformer": linear,
    }
    if linear:
        return {**params, "num_heads": -1, "num_head_channels": heads}
    return {**params, "num_heads": heads}


def read_unet_params(model: str) -> dict[str, Any]:
    """``model.unet`` of ``configs/models/<model>.yaml``: the real-size original params."""
    path = REPO_ROOT / "configs" / "models" / f"{model}.yaml"
    return dict(yaml.safe_load(path.read_text())["model"]["unet"])


def _tiny_cpu() -> Preset:
    cases = (
        BenchCase("tiny-sd1", _small_unet(64, [1, 2, 2], 64, linear=False, heads=4), latent=32),
        BenchCase("tiny-sd2", _small_unet(64, [1, 2, 2], 96, linear=True, heads=32), latent=32),
    )
    return Preset("tiny-cpu", cases, "cpu", False, batch_size=2, iters=10, warmup=3)


def _small_latent_unet(*, linear: bool) -> dict[str, Any]:
    """Issue 10's case: 4 levels of 64-wide heads-of-32 UNet, context 128, linear or conv proj."""
    params = _small_unet(64, [1, 2, 4, 4], 128, linear=True, heads=32)
    return {**params, "use_linear_in_transformer": linear}


def _small_cpu() -> Preset:
    # Small latents make the per-call costs (copies, layout changes) a large share of the step.
    cases = tuple(
        BenchCase(f"{'sd2' if linear else 'sd1'}-mc64@{latent}", unet, latent=latent)
        for linear in (True, False)
        for unet in [_small_latent_unet(linear=linear)]
        for latent in (8, 16, 32)
    )
    return Preset("small-cpu", cases, "cpu", False, batch_size=2, iters=20, warmup=3)


def _micro() -> Preset:
    cases = (
        BenchCase("micro-sd1", _small_unet(32, [1, 2], 32, linear=False, heads=2), 16, 8),
        BenchCase("micro-sd2", _small_unet(32, [1, 2], 48, linear=True, heads=16), 16, 8),
    )
    return Preset("micro", cases, "cpu", False, batch_size=1, iters=2, warmup=1)


def _gpu() -> Preset:
    cases = tuple(
        BenchCase(f"{model}@{px}px", read_unet_params(model), latent=px // 8)
        for model in ("sd15", "sd2-base")
        for px in (256, 512)
    )
    return Preset("gpu", cases, "cuda", True, batch_size=4, iters=20, warmup=5)


PRESETS: dict[str, Callable[[], Preset]] = {
    "tiny-cpu": _tiny_cpu,
    "small-cpu": _small_cpu,
    "micro": _micro,
    "gpu": _gpu,
}
"""``tiny-cpu``: the default, minutes-free CPU check; ``small-cpu``: a 4-level UNet (model_channels
64, channel_mult [1, 2, 4, 4], 32-wide heads, context 128) at 8, 16 and 32 latents, linear and conv
projections; ``micro``: smoke-test size (its timings mean nothing); ``gpu``: SD1.5 and SD2-base full
UNets at 256 and 512 px."""

# ---------------------------------------------------------------------------------------------
# The diffusers twin: same architecture, same weights
# ---------------------------------------------------------------------------------------------


class ConversionError(RuntimeError):
    """Our weights could not be carried over into diffusers' layout."""


def diffusers_config(unet: UNetModel) -> dict[str, Any]:
    """``UNet2DConditionModel`` kwargs for the architecture of ``unet``."""
    cfg = unet.config
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    factors = [2**i for i in range(len(widths))]  # downsampling factor of each level
    attn = [f in cfg.attention_resolutions for f in factors]
    return {
        "sample_size": 64,  # informative only
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": widths,
        "layers_per_block": cfg.num_res_blocks,
        "cross_attention_dim": cfg.context_dim,
        # Despite its name this is the head COUNT per level in diffusers (SD2: [5, 10, 20, 20]).
        "attention_head_dim": [cfg.heads_and_width(w)[0] for w in widths],
        "transformer_layers_per_block": cfg.transformer_depth,
        "use_linear_projection": cfg.use_linear_in_transformer,
        "flip_sin_to_cos": True,  # ours is cat([cos, sin])
        "freq_shift": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "dropout": cfg.dropout,
    }


def diffusers_twin(ours: UNetModel) -> nn.Module:
    """A ``UNet2DConditionModel`` holding exactly our weights, converted by diffusers' own code."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = diffusers_config(ours)
    ldm = {LDM_PREFIX + k: v for k, v in ours.state_dict().items()}
    theirs = UNet2DConditionModel(**config)
    try:
        converted = convert_ldm_unet_checkpoint(ldm, config)
        theirs.load_state_dict(converted, strict=True)
    except (KeyError, IndexError, RuntimeError) as err:  # unmapped keys, shape mismatches
        message = " ".join(str(err).split())
        raise ConversionError(message[:300] + ("..." if len(message) > 300 else "")) from err
    if len(converted) != len(ldm) or _numel(theirs) != _numel(ours):
        raise ConversionError(f"{len(ldm)} of our tensors became {len(converted)} of theirs")
    return theirs


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomize_(model: nn.Module, seed: int) -> None:
    """Random weights everywhere: the zero-initialised output layers would hide any mismatch."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norm scales
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@contextlib.contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 in convs or matmuls on CUDA, so that the comparison is float32 against float32."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def compare_outputs(
    ours: Forward, theirs: Forward, inputs: tuple[torch.Tensor, ...]
) -> tuple[float, float]:
    """(max |ours - theirs|, max |ours|) of one float32 forward on ``inputs``."""
    with torch.no_grad(), exact_float32():
        a, b = ours(*inputs), theirs(*inputs)
    return (a - b).abs().max().item(), a.abs().max().item()


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class StepStats:
    """Wall times of one model's timed steps and its largest per-step CUDA memory peak."""

    times_s: list[float] = field(default_factory=list)
    peak_bytes: int = 0

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.times_s)


def train_step(
    model: nn.Module,
    forward: Forward,
    inputs: tuple[torch.Tensor, ...],
    bf16: bool,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Zero the grads, then one timed forward + backward of ``mean(out^2)``; returns seconds."""
    model.zero_grad(set_to_none=True)
    cuda = inputs[0].is_cuda
    if cuda:
        torch.cuda.synchronize()
    start = clock()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = forward(*inputs)  # (B, C_out, h, w)
    out.float().pow(2).mean().backward()
    if cuda:
        torch.cuda.synchronize()
    return clock() - start


def time_interleaved(
    models: Sequence[tuple[nn.Module, Forward]],
    inputs: tuple[torch.Tensor, ...],
    *,
    iters: int,
    warmup: int,
    bf16: bool,
    clock: Callable[[], float] = time.perf_counter,
) -> list[StepStats]:
    """Round-robin ``models`` for ``warmup`` untimed then ``iters`` timed rounds."""
    stats = [StepStats() for _ in models]
    cuda = inputs[0].is_cuda
    for round_ in range(warmup + iters):
        for (model, forward), stat in zip(models, stats, strict=True):
            if cuda:
                model.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                resident = torch.cuda.memory_allocated()  # both models' weights
                torch.cuda.reset_peak_memory_stats()
            seconds = train_step(model, forward, inputs, bf16, clock)
            if round_ < warmup:
                continue
            stat.times_s.append(seconds)
            if cuda:
                stat.peak_bytes = max(stat.peak_bytes, torch.cuda.max_memory_allocated() - resident)
    return stats


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """One row of the report."""

    case: str
    shape: str
    ours_ms: float
    theirs_ms: float | None = None
    max_abs_diff: float | None = None
    output_scale: float | None = None
    ours_peak_mib: float | None = None
    theirs_peak_mib: float | None = None
    round_ratios: list[float] = field(default_factory=list)
    """``ours / diffusers`` of each timed round (the two steps of a round run back to back)."""
    note: str = ""
    """Why diffusers' column is empty (conversion failed) or the check failed."""

    @property
    def ratio(self) -> float | None:
        return None if self.theirs_ms is None else self.ours_ms / self.theirs_ms

    @property
    def round_ratio_quartiles(self) -> tuple[float, float] | None:
        """(Q1, Q3) of the per-round ratios: how much a shared machine moved single rounds."""
        if len(self.round_ratios) < 2:
            return None
        q1, _, q3 = statistics.quantiles(self.round_ratios, n=4)
        return q1, q3

    @property
    def equivalent(self) -> bool:
        if self.max_abs_diff is None or self.output_scale is None:
            return False
        return self.max_abs_diff <= REL_TOLERANCE * max(1.0, self.output_scale)


def make_inputs(
    case: BenchCase, batch_size: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents (B, C_in, h, w), timesteps (B,), context (B, L, D)), the same for both models."""
    gen = torch.Generator().manual_seed(seed)
    unet = case.unet
    x = torch.randn(batch_size, unet["in_channels"], case.latent, case.latent, generator=gen)
    t = torch.randint(0, 1000, (batch_size,), generator=gen)
    ctx = torch.randn(batch_size, case.context_len, unet["context_dim"], generator=gen)
    return x.to(device), t.to(device), ctx.to(device)


def run_case(case: BenchCase, preset: Preset, checkpointing: bool) -> CaseResult:
    """Build both models, check that they agree, then time them interleaved."""
    device = torch.device(preset.device)
    ours = build_unet({**case.unet, "use_checkpoint": checkpointing})
    randomize_(ours, seed=0)
    inputs = make_inputs(case, preset.batch_size, device)
    x, _, ctx = inputs
    shape = f"x {tuple(x.shape)}, ctx {tuple(ctx.shape)}"
    models: list[tuple[nn.Module, Forward]] = [(ours, ours)]
    note = ""
    try:
        theirs = diffusers_twin(ours)
    except ConversionError as err:
        theirs, note = None, f"conversion to diffusers failed: {err}"
    ours.to(device)
    result = CaseResult(case.name, shape, ours_ms=math.nan, note=note)
    if theirs is not None:
        theirs.to(device)
        if checkpointing:
            theirs.enable_gradient_checkpointing()

        def theirs_forward(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return theirs(x, t, encoder_hidden_states=c, return_dict=False)[0]

        ours.eval()
        theirs.eval()
        result.max_abs_diff, result.output_scale = compare_outputs(ours, theirs_forward, inputs)
        if not result.equivalent:
            result.note = "OUTPUTS DIFFER: the timings do not compare the same model"
        theirs.train()
        models.append((theirs, theirs_forward))
    ours.train()
    stats = time_interleaved(
        models,
        inputs,
        iters=preset.iters,
        warmup=preset.warmup,
        bf16=preset.autocast_bf16,
        clock=CLOCKS[preset.clock],
    )
    result.ours_ms = stats[0].median_ms
    if len(stats) > 1:
        result.theirs_ms = stats[1].median_ms
        pairs = zip(stats[0].times_s, stats[1].times_s, strict=True)
        result.round_ratios = [a / b for a, b in pairs]
    if device.type == "cuda":
        result.ours_peak_mib = stats[0].peak_bytes / 2**20
        if len(stats) > 1:
            result.theirs_peak_mib = stats[1].peak_bytes / 2**20
    return result


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Everything printed (and written to the docs) for one run of one preset."""

    preset: str
    command: str
    dtype: str
    device: str
    device_name: str
    checkpointing: bool
    clock: str
    batch_size: int
    iters: int
    warmup: int
    threads: int
    versions: str
    date: str
    rows: list[CaseResult] = field(default_factory=list)
    skipped: str = ""
    """Why nothing was run (no CUDA device for the gpu preset)."""

    @property
    def ok(self) -> bool:
        return not self.skipped and all(r.theirs_ms is not None and r.equivalent for r in self.rows)

    @property
    def section_key(self) -> str:
        return f"unet_step:{self.preset}{'+ckpt' if self.checkpointing else ''}"

    def to_markdown(self) -> str:
        lines = [
            f"`{self.command}`",
            "",
            f"- date: {self.date}; {self.versions}",
            f"- device: {self.device_name}; torch threads: {self.threads}; clock: {self.clock}"
            + (" (process CPU time)" if self.clock == "cpu" else " (wall time)"),
            f"- batch {self.batch_size}, {self.warmup} warm-up + {self.iters} timed rounds "
            f"(interleaved), gradient checkpointing {'on' if self.checkpointing else 'off'}",
            "",
        ]
        if self.skipped:
            return "\n".join([*lines, f"**Skipped:** {self.skipped}", ""])
        lines += [
            "| preset | case | shape | dtype | device | ours median ms | diffusers median ms "
            "| ratio ours/diffusers | per-round ratio Q1-Q3 | max abs diff (fp32) "
            "| peak MiB ours / diffusers |",
            "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|",
        ]
        for r in self.rows:
            peak = "–"
            if r.ours_peak_mib is not None:
                theirs = "–" if r.theirs_peak_mib is None else f"{r.theirs_peak_mib:.0f}"
                peak = f"{r.ours_peak_mib:.0f} / {theirs}"
            spread = "–"
            if r.round_ratio_quartiles is not None:
                spread = "{:.2f}-{:.2f}".format(*r.round_ratio_quartiles)
            diff = "–"
            if r.max_abs_diff is not None:
                diff = f"{r.max_abs_diff:.1e} (out max {r.output_scale:.2g})"
            lines.append(
                f"| {self.preset} | {r.case} | {r.shape} | {self.dtype} | {self.device} "
                f"| {r.ours_ms:.1f} | {_fmt(r.theirs_ms, '.1f')} | {_fmt(r.ratio, '.3f')} "
                f"| {spread} | {diff} | {peak} |"
            )
        notes = [f"- **{r.case}: {r.note}**" for r in self.rows if r.note]
        return "\n".join([*lines, *(["", *notes] if notes else []), ""])


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _versions() -> str:
    try:
        import diffusers

        theirs = diffusers.__version__
    except ImportError:
        theirs = "not installed"
    return f"torch {torch.__version__}, diffusers {theirs}, python {platform.python_version()}"


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny-cpu")
    parser.add_argument("--batch-size", type=int, help="default: the preset's (gpu: 4)")
    parser.add_argument("--iters", type=int, help="timed rounds (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default: the preset's)")
    parser.add_argument("--checkpointing", action="store_true", help="in both models")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="cpu: time steps by the process's CPU time (CPU presets on a shared machine)",
    )
    parser.add_argument("--write-docs", action="store_true", help=f"update {DEFAULT_DOCS.name}")
    parser.add_argument("--out", type=Path, help="update this markdown file (implies writing)")
    return parser.parse_args(argv)


def run_preset(preset: Preset, checkpointing: bool, command: str) -> Report:
    """Every case of ``preset``, or a report saying why it was skipped."""
    cuda = preset.device == "cuda"
    report = Report(
        preset=preset.name,
        command=command,
        dtype="bf16 autocast, fp32 weights" if preset.autocast_bf16 else "float32",
        device=preset.device,
        device_name=_cpu_name(),
        checkpointing=checkpointing,
        clock=preset.clock,
        batch_size=preset.batch_size,
        iters=preset.iters,
        warmup=preset.warmup,
        threads=torch.get_num_threads(),
        versions=_versions(),
        date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    )
    if cuda and preset.clock == "cpu":
        report.skipped = "--clock cpu times CPU presets only (GPU steps run asynchronously)."
        return report
    if cuda and not torch.cuda.is_available():
        report.skipped = "no CUDA device here; the gpu preset needs one."
        return report
    if "not installed" in report.versions:
        report.skipped = "diffusers is not installed (pip install -e '.[bench]')."
        return report
    if cuda:
        report.device_name = torch.cuda.get_device_name()
    for case in preset.cases:
        print(f"running {case.name} ...", file=sys.stderr, flush=True)
        report.rows.append(run_case(case, preset, checkpointing))
        if cuda:
            torch.cuda.empty_cache()
    return report


def main(argv: Sequence[str] | None = None) -> Report:
    """Run a preset, print its markdown report, optionally write it to the docs; return it."""
    args = parse_args(argv)
    preset = PRESETS[args.preset]()
    preset = replace(
        preset,
        batch_size=args.batch_size or preset.batch_size,
        iters=args.iters or preset.iters,
        warmup=preset.warmup if args.warmup is None else args.warmup,
        clock=args.clock,
    )
    shown = ["python", "bench/unet_step.py", *(sys.argv[1:] if argv is None else argv)]
    with torch_threads(args.threads):
        report = run_preset(preset, args.checkpointing, shlex.join(shown))
    markdown = report.to_markdown()
    print(markdown)
    out = args.out or (DEFAULT_DOCS if args.write_docs else None)
    if out is not None:
        title = f"UNet training step: {preset.name}" + (" + checkpointing" * args.checkpointing)
        write_section(out, report.section_key, title, markdown)
        print(f"wrote the {report.section_key} section of {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    final = main()
    sys.exit(0 if final.ok or final.skipped else 1)
