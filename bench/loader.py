"""Benchmark the LAION loader against a naive WebDataset pipeline and the bare decode limit.

On photo-like JPEG shards (img2dataset layout, long side 512-1600 px, ~100-400 KB, 25% of the
samples rejected by the metadata filters) it measures delivered samples per second of:

- ``ours``: ``LaionLoader`` with the default filters and SD-1.5 inpainting masks: tar ->
  json filters -> shuffle buffer -> reduced-size JPEG decode -> crop -> bicubic resize ->
  uint8 image + uint8 mask -> batches (the float conversion belongs on the device);
- ``ours+float``: the same, plus ``to_model_images`` / ``masked_images`` on the CPU, so that its
  output (float image, float masked image) matches what the naive pipeline hands over;
- ``naive``: ``webdataset.WebDataset(urls).decode("pil")``, the same metadata filter applied
  after decoding (as a naive user would), albumentations ``SmallestMaxSize`` + ``RandomCrop``,
  a float32 tensor in [-1, 1] and a float mask from our generator, ``DataLoader`` batches;
  ``naive-area`` the same with ``INTER_AREA`` (the default ``INTER_LINEAR`` aliases on big
  downscales: ~6 dB below bicubic at 256 px, see shared/PERF_NOTES.md);
- ``bare``: our ``load_image`` on the kept samples' JPEG bytes already in memory: no tar, no
  filters, no masks, no batches; the decode + resize limit.

Per core (``num_workers=0``, one process, one torch and OpenCV thread) all five run as
persistent infinite iterators, timed in short interleaved runs (the order rotating every round)
on the process's CPU clock, so that other work on a shared machine neither slows nor favours
one of them; medians are reported, ratios as the median of the per-round ratios. Then
optionally the whole machine (``DataLoader`` with ``--workers`` processes, wall clock) for
``ours`` and ``naive``. Samples/s counts delivered (kept) samples: rejected samples cost ours a
tar read and a json parse, the naive pipeline a full decode, and the bare limit nothing.

    python bench/loader.py                        # generate the shards once (cached), print
    python bench/loader.py --profile --write-docs # + cProfile of ours, replace the docs block
    python bench/loader.py --shards '/data/{00000..00009}.tar' --sizes 256 512 --rounds 7
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import itertools
import os
import platform
import pstats
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtrain.data.config import DataConfig, FilterConfig, ImageConfig, MaskConfig
from sdtrain.data.filters import MetadataFilter
from sdtrain.data.masks import build_mask_generator
from sdtrain.data.pipeline import LaionLoader
from sdtrain.data.shards import expand_shards, iter_samples, split_member_name, tar_members
from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.data.transforms import (
    ImageDecodeError,
    load_image,
    masked_images,
    needed_short_side,
    normalize_caption,
    reduction_factor,
    to_model_images,
)
from sdtrain.utils.markdown import write_section

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOCS = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_CACHE = Path("/tmp/sdtrain-bench-loader")
SECTION_KEY = "loader"
BATCH_SIZE = 8
SHUFFLE_BUFFER = 64
MIN_SIZE = 256
"""``filters.min_size`` for the synthetic shards: their short sides are >= 307 px, so only the
samples made to fail the size filter (200 px) fail it."""

Batches = Iterator[int]
"""An infinite pipeline, as the number of samples in each batch it delivers."""


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def ensure_shards(cache: Path, samples: int, seed: int) -> Path:
    """Synthetic shards in ``cache/<samples>-<seed>``, written once (atomically) and reused."""
    out = cache / f"photo-{samples}-{seed}"
    if (out / "DONE").is_file():
        return out
    tmp = cache / f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    spec = SyntheticSpec(
        samples=samples, per_shard=max(1, samples // 10), reject_fraction=0.25, seed=seed
    )
    start = time.perf_counter()
    print(f"writing {samples} synthetic samples to {out} ...", file=sys.stderr)
    write_synthetic_shards(tmp, spec)
    (tmp / "DONE").write_text(f"{spec}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"  done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return out


@dataclass
class DataSummary:
    """What the shards hold."""

    shards: int
    samples: int
    kept: int
    kept_jpegs: list[bytes] = field(repr=False)
    kept_sizes: list[tuple[int, int]] = field(repr=False)
    """(width, height) of the kept images."""
    mean_kb: float
    long_sides: tuple[int, int]

    def reduced_share(self, size: int) -> float:
        """Share of the kept images that libjpeg can decode at 1/2, 1/4 or 1/8 for ``size``."""
        reduced = [
            reduction_factor(w, h, needed_short_side(w, h, size, size)) > 1
            for w, h in self.kept_sizes
        ]
        return sum(reduced) / max(1, len(reduced))


def summarize(urls: Sequence[str], filters: FilterConfig) -> DataSummary:
    """Count the samples, apply the metadata filter, keep the kept samples' JPEG bytes."""
    import json

    from PIL import Image

    check = MetadataFilter(filters)
    total, kept, kept_sizes, file_sizes, sides = 0, [], [], [], []
    for url in urls:
        for raw in iter_samples(url):
            total += 1
            data = raw.members["jpg"]
            with Image.open(io.BytesIO(data)) as image:  # the header only
                size = image.size
            file_sizes.append(len(data))
            sides.append(max(size))
            meta = json.loads(raw.members["json"])
            if check.rejection(meta, normalize_caption(raw.members["txt"])) is None:
                kept.append(data)
                kept_sizes.append(size)
    if not kept:
        raise SystemExit(f"no sample of {urls[0]} ... passes the filters: nothing to measure")
    return DataSummary(
        shards=len(urls),
        samples=total,
        kept=len(kept),
        kept_jpegs=kept,
        kept_sizes=kept_sizes,
        mean_kb=sum(file_sizes) / len(file_sizes) / 1024,
        long_sides=(min(sides), max(sides)),
    )


# ---------------------------------------------------------------------------------------------
# The pipelines
# ---------------------------------------------------------------------------------------------


def ours_config(urls: Sequence[str], size: int, workers: int) -> DataConfig:
    return DataConfig(
        shards=list(urls),
        resampled=True,
        shuffle_buffer=SHUFFLE_BUFFER,
        batch_size=BATCH_SIZE,
        num_workers=workers,
        filters=FilterConfig(min_size=MIN_SIZE),
        image=ImageConfig(size=size),
        masks=MaskConfig(enabled=True, kind="sd15", preset="512train-large"),
    )


def ours(urls: Sequence[str], size: int, workers: int, to_float: bool = False) -> Batches:
    for batch in LaionLoader(ours_config(urls, size, workers)):
        if to_float:
            images = to_model_images(batch["image"])  # (B, 3, H, W) float32
            masked_images(images, batch["mask"])  # (B, 3, H, W) float32
        yield len(batch["caption"])


class NaiveTransform:
    """What a naive user writes: filter the decoded sample, albumentations, floats, a mask."""

    def __init__(self, size: int, interpolation: int | None = None) -> None:
        import albumentations as A

        self.filter = MetadataFilter(FilterConfig(min_size=MIN_SIZE))
        resize = (
            A.SmallestMaxSize(max_size=size)  # default INTER_LINEAR: aliases on big downscales
            if interpolation is None
            else A.SmallestMaxSize(max_size=size, interpolation=interpolation)
        )
        self.augment = A.Compose([resize, A.RandomCrop(size, size)])
        self.masks = build_mask_generator(MaskConfig(enabled=True), size, size)
        self.rng = np.random.default_rng(0)

    def keep(self, sample: dict[str, Any]) -> bool:
        return self.filter.rejection(sample["json"], " ".join(sample["txt"].split())) is None

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        array = np.asarray(sample["jpg"].convert("RGB"))
        crop = self.augment(image=array)["image"]  # (H, W, 3) uint8
        image = torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W)
        mask = torch.from_numpy(self.masks(self.rng).mask)[None].float()  # (1, H, W)
        return {"image": image, "mask": mask, "masked": image * (1 - mask), "txt": sample["txt"]}


def naive(urls: Sequence[str], size: int, workers: int, area: bool = False) -> Batches:
    import cv2
    import webdataset as wds
    from torch.utils.data import DataLoader

    transform = NaiveTransform(size, cv2.INTER_AREA if area else None)
    dataset = (
        wds.WebDataset(list(urls), resampled=True, shardshuffle=False)
        .decode("pil", handler=wds.ignore_and_continue)
        .select(transform.keep)
        .map(transform, handler=wds.ignore_and_continue)
    )
    for batch in DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=workers):
        yield len(batch["txt"])


def bare(jpegs: Sequence[bytes], size: int) -> Batches:
    cfg = ImageConfig(size=size)
    rng = np.random.default_rng(0)
    for data in itertools.cycle(jpegs):
        try:
            load_image(data, cfg, rng)
        except ImageDecodeError:
            yield 0
        else:
            yield 1


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


Clock = Callable[[], float]


def timed_run(
    batches: Batches, seconds: float, preroll: int, clock: Clock = time.perf_counter
) -> float:
    """Delivered samples per second of ``clock`` over ``seconds`` of it, after ``preroll``
    untimed batches (which also drain batches that DataLoader workers prefetched while another
    pipeline was being timed).

    ``clock`` is wall time, or ``time.process_time`` for work done in this process alone: CPU
    seconds of this process are what "per core" means, and unlike wall time they do not count
    the time other work on a shared machine takes the core away.
    """
    for _ in range(preroll):
        next(batches)
    samples = 0
    start = last = clock()
    while last - start < seconds:
        samples += next(batches)
        last = clock()
    return samples / (last - start)


@dataclass
class Cell:
    """The rates of one pipeline at one size."""

    rates: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.rates)

    def render(self) -> str:
        if not self.rates:
            return "–"
        return f"{self.median:.0f} ({min(self.rates):.0f}-{max(self.rates):.0f})"


def paired_ratio(cells: dict[str, Cell], top: str, bottom: str) -> float:
    """Median over rounds of ``top / bottom`` within the same round: runs of one round are
    seconds apart, so a load change on the shared machine mostly cancels out."""
    pairs = zip(cells[top].rates, cells[bottom].rates, strict=True)
    return statistics.median(a / b for a, b in pairs)


def interleaved(
    pipelines: dict[str, Callable[[], Batches]],
    rounds: int,
    seconds: float,
    warmup: float,
    preroll: int,
    clock: Clock = time.perf_counter,
) -> dict[str, Cell]:
    """Start every pipeline, warm each up, then ``rounds`` rounds of one timed run each (the
    order rotating), every pipeline staying alive between its runs."""
    names = list(pipelines)
    running = {name: make() for name, make in pipelines.items()}
    for name in names:
        timed_run(running[name], warmup, preroll=1, clock=clock)
    cells = {name: Cell() for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            rate = timed_run(running[name], seconds, preroll, clock)
            cells[name].rates.append(rate)
            print(f"  round {round_index + 1}: {name:<11} {rate:7.1f} samples/s", file=sys.stderr)
    for batches in running.values():
        batches.close()  # stops DataLoader workers
    return cells


# ---------------------------------------------------------------------------------------------
# Tar readers alone (--tar): sdtrain's hand-written reader vs webdataset's tar iteration
# ---------------------------------------------------------------------------------------------

TAR_SECTION_KEY = "loader-tar"


def tar_reader(urls: Sequence[str], reader: str) -> Batches:
    """Samples per shard, over the shards forever, read by ``reader`` from local files (page
    cache), grouped into samples by the same code; nothing decoded.

    ``ours``: ``data.shards.tar_members``; ``webdataset``: ``tariterators.tar_file_iterator``
    (Python's ``tarfile`` in stream mode); ``webdataset-samples``: webdataset's whole tar path,
    ``tar_file_expander`` + ``group_by_keys`` over ``url_opener`` (its own grouping and gopen).
    """
    from webdataset import tariterators

    def members(url: str, handle: Any) -> Iterator[tuple[str, bytes]]:
        if reader == "ours":
            yield from tar_members(handle, url)
        else:
            for member in tariterators.tar_file_iterator(handle):
                yield member["fname"], member["data"]

    def samples_of(url: str) -> int:
        if reader == "webdataset-samples":
            opened = tariterators.url_opener([{"url": url}])
            return sum(
                1 for _ in tariterators.group_by_keys(tariterators.tar_file_expander(opened))
            )
        count, key = 0, None
        with open(url, "rb") as handle:
            for name, _ in members(url, handle):
                member_key, _ = split_member_name(name)
                if member_key != key:
                    count, key = count + 1, member_key
        return count

    def forever() -> Batches:
        while True:
            for url in urls:
                yield samples_of(url)

    return forever()


def tar_report(command: str, urls: Sequence[str], cells: dict[str, Cell], args: Any) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    size = sum(Path(url).stat().st_size for url in urls)
    samples = sum(1 for url in urls for _ in iter_samples(url))
    per_mb = samples / (size / 1e6)
    lines = [
        f"`{command}`",
        "",
        f"- date: {now}; {_versions()}",
        f"- machine: {_cpu()}, {os.cpu_count()} cores",
        f"- data: {len(urls)} shards, {size / 1e6:.1f} MB, {samples} samples "
        f"({size / samples / 1e3:.0f} KB each), read from the page cache; {args.rounds} "
        f"interleaved rounds of {args.seconds:g} s per reader on the process's CPU clock",
        "",
        "| tar reader | samples per CPU-second | MB per CPU-second | ours / this |",
        "|---|--:|--:|--:|",
    ]
    for name, cell in cells.items():
        ratio = paired_ratio(cells, "ours", name)
        lines.append(f"| {name} | {cell.render()} | {cell.median / per_mb:.0f} | {ratio:.2f}x |")
    return "\n".join(lines)


def run_tar_readers(args: argparse.Namespace, urls: Sequence[str]) -> str:
    print("tar readers, per core:", file=sys.stderr)
    cells = interleaved(
        {name: lambda name=name: tar_reader(urls, name)
         for name in ("ours", "webdataset", "webdataset-samples")},
        args.rounds, args.seconds, args.warmup, preroll=1, clock=time.process_time,
    )  # fmt: skip
    shown = ["python", "bench/loader.py", *sys.argv[1:]]
    report = tar_report(shlex.join(shown), urls, cells, args)
    print(report)
    out = args.out or (DEFAULT_DOCS if args.write_docs else None)
    if out is not None:
        write_section(out, TAR_SECTION_KEY, "Tar readers", report, level="###")
        print(f"wrote the {TAR_SECTION_KEY} block of {out}", file=sys.stderr)
    return report


PROFILE_PARTS = (
    ("decode + crop + resize (`load_image`)", "transforms.py", "load_image"),
    ("tar reading (`iter_samples`, rejected samples too)", "shards.py", "iter_samples"),
    ("json + filters (`_parse`)", "pipeline.py", "_parse"),
    ("masks (`MaskGenerator.__call__`)", "masks.py", "__call__"),
    ("per-sample generator (`_sample_rng`)", "pipeline.py", "_sample_rng"),
    ("collate + worker position (`_collate`)", "pipeline.py", "_collate"),
    ("DataLoader `default_convert` of the batch", "collate.py", "default_convert"),
)


def profile_ours(urls: Sequence[str], size: int, seconds: float, top: int) -> str:
    """cProfile of ours per core: where the time goes, and the ``top`` functions by own time."""
    batches = ours(urls, size, 0)
    timed_run(batches, 1.0, preroll=1, clock=time.process_time)
    profiler = cProfile.Profile()
    profiler.enable()
    rate = timed_run(batches, seconds, preroll=0, clock=time.process_time)
    profiler.disable()
    batches.close()
    entries = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in entries.values())
    lines = [
        f"cProfile of ours at {size} px, 1 core, {seconds:g} CPU-s ({rate:.0f} samples/s under the "
        f"profiler), cumulative time of its parts:",
        "",
        "| part | share of the time |",
        "|---|--:|",
    ]
    accounted = 0.0
    for label, filename, name in PROFILE_PARTS:
        cumulative = sum(
            entry[3]
            for (file, _, func), entry in entries.items()
            if func == name and Path(file).name == filename
        )
        accounted += cumulative
        lines.append(f"| {label} | {cumulative / total:.0%} |")
    lines += [
        f"| everything else | {max(0.0, 1 - accounted / total):.0%} |",
        "",
        "Top functions by own time:",
        "",
        "| own s | share | calls | function |",
        "|--:|--:|--:|---|",
    ]
    rows = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:top]
    for (filename, line, name), (_, calls, own, _cum, _) in rows:
        where = f" ({Path(filename).name}:{line})" if line else ""
        lines.append(f"| {own:.2f} | {own / total:.0%} | {calls} | `{name}`{where} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _versions() -> str:
    import albumentations
    import cv2
    import PIL
    import webdataset

    return (
        f"python {platform.python_version()}, torch {torch.__version__}, Pillow {PIL.__version__}, "
        f"webdataset {webdataset.__version__}, albumentations {albumentations.__version__}, "
        f"OpenCV {cv2.__version__}"
    )


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def render(
    command: str,
    data: DataSummary,
    per_core: dict[int, dict[str, Cell]],
    machine: dict[int, dict[str, Cell]],
    args: argparse.Namespace,
    load: tuple[float, float],
    profile: str,
) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"`{command}`",
        "",
        f"- date: {now}; {_versions()}",
        f"- machine: {_cpu()}, {os.cpu_count()} cores; load average {load[0]:.2f} before, "
        f"{load[1]:.2f} after",
        f"- data: {data.samples} samples in {data.shards} shards, {data.kept} kept by the "
        f"filters ({1 - data.kept / data.samples:.0%} rejected), JPEG quality 90, mean "
        f"{data.mean_kb:.0f} KB, long side {data.long_sides[0]}-{data.long_sides[1]} px; kept "
        "images libjpeg can decode at a reduced scale: "
        + ", ".join(f"{data.reduced_share(size):.0%} at {size} px" for size in per_core),
        f"- batch {BATCH_SIZE}, shuffle buffer {SHUFFLE_BUFFER}, masks sd15 512train-large; "
        f"{args.rounds} interleaved rounds of {args.seconds:g} s per pipeline after "
        f"{args.warmup:g} s warm-up; cells: median (min-max) delivered samples/s; ratios: "
        "median of the per-round ratios",
        "",
        "Per core (`num_workers=0`, 1 torch thread, 1 OpenCV thread; samples per CPU-second of "
        "the process):",
        "",
        "| size | ours | ours+float | naive | naive-area | bare decode+resize | **ours/naive** "
        "| **ours/bare** | ours+float/naive | ours/naive-area |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for size, cells in per_core.items():
        lines.append(
            f"| {size} | {cells['ours'].render()} | {cells['ours+float'].render()} "
            f"| {cells['naive'].render()} | {cells['naive-area'].render()} "
            f"| {cells['bare'].render()} | **{paired_ratio(cells, 'ours', 'naive'):.2f}x** "
            f"| **{paired_ratio(cells, 'ours', 'bare'):.0%}** "
            f"| {paired_ratio(cells, 'ours+float', 'naive'):.2f}x "
            f"| {paired_ratio(cells, 'ours', 'naive-area'):.2f}x |"
        )
    if machine:
        lines += [
            "",
            f"Whole machine (`num_workers={args.workers}`, batches to the main process; samples "
            "per wall-clock second):",
            "",
            "| size | ours | naive | ours/naive |",
            "|--:|--:|--:|--:|",
        ]
        for size, cells in machine.items():
            ratio = paired_ratio(cells, "ours", "naive")
            lines.append(
                f"| {size} | {cells['ours'].render()} | {cells['naive'].render()} | {ratio:.2f}x |"
            )
    if profile:
        lines += ["", profile]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", help="shard spec to use instead of generated shards")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="generated shards here")
    parser.add_argument("--samples", type=int, default=240, help="generated samples (240)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="crop sizes")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs per pipeline (5)")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one run (2 s)")
    parser.add_argument("--warmup", type=float, default=2.0, help="untimed seconds first (2)")
    parser.add_argument(
        "--workers", type=int, default=2, help="whole-machine DataLoader workers (2; 0: skip)"
    )
    parser.add_argument(
        "--machine-rounds", type=int, default=3, help="timed runs per pipeline, whole machine"
    )
    parser.add_argument(
        "--profile", action="store_true", help="add a cProfile of ours at the smallest size"
    )
    parser.add_argument(
        "--tar", action="store_true", help="only the tar readers: ours vs webdataset's"
    )
    parser.add_argument("--write-docs", action="store_true", help=f"update {DEFAULT_DOCS.name}")
    parser.add_argument("--out", type=Path, help="update this markdown file (implies writing)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    import cv2

    args = parse_args(argv)
    shards = args.shards or str(ensure_shards(args.cache, args.samples, seed=0))
    urls = expand_shards(shards)
    if args.tar:
        return run_tar_readers(args, urls)
    data = summarize(urls, FilterConfig(min_size=MIN_SIZE))
    load_before = os.getloadavg()[0]

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    per_core: dict[int, dict[str, Cell]] = {}
    for size in args.sizes:
        print(f"per core, {size} px:", file=sys.stderr)
        per_core[size] = interleaved(
            {
                "ours": lambda size=size: ours(urls, size, 0),
                "ours+float": lambda size=size: ours(urls, size, 0, to_float=True),
                "naive": lambda size=size: naive(urls, size, 0),
                "naive-area": lambda size=size: naive(urls, size, 0, area=True),
                "bare": lambda size=size: bare(data.kept_jpegs, size),
            },
            args.rounds,
            args.seconds,
            args.warmup,
            preroll=1,
            clock=time.process_time,
        )
    machine: dict[int, dict[str, Cell]] = {}
    if args.workers > 0:
        for size in args.sizes:
            print(f"whole machine, {args.workers} workers, {size} px:", file=sys.stderr)
            machine[size] = interleaved(
                {
                    "ours": lambda size=size: ours(urls, size, args.workers),
                    "naive": lambda size=size: naive(urls, size, args.workers),
                },
                args.machine_rounds,
                args.seconds + 1,
                args.warmup,
                preroll=2 * args.workers + 1,
            )
    profile = profile_ours(urls, min(args.sizes), 6.0, 10) if args.profile else ""
    shown = ["python", "bench/loader.py", *(sys.argv[1:] if argv is None else argv)]
    load = (load_before, os.getloadavg()[0])
    report = render(shlex.join(shown), data, per_core, machine, args, load, profile)
    print(report)
    out = args.out or (DEFAULT_DOCS if args.write_docs else None)
    if out is not None:
        write_section(out, SECTION_KEY, "Loader", report)
        print(f"wrote the {SECTION_KEY} block of {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
