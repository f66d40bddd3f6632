"""``sdtrain data ...``: turn local images into shards, count what the filters keep, look at
samples with their masks, and measure the loader's throughput.

- ``make-shards SRC OUT``: a folder of images with ``.txt`` captions (optional ``.json``
  sidecars), or a CSV / parquet table of local paths plus metadata columns -> img2dataset-style
  shards (``00000.tar`` holding ``000000000.jpg`` + ``.txt`` + ``.json``, ...). JPEG bytes are
  copied as they are; unreadable images are skipped and listed, never fatal.
- ``stats SHARDS``: one pass with the configured pipeline; seen / kept / rejected per reason /
  errors per kind (``--json``: one object on stdout).
- ``preview SHARDS --out grid.png``: per sample a row of image, mask, masked image and caption.
- ``bench SHARDS``: delivered samples/s of the configured pipeline (decode, crop, masks,
  batching) after a warm-up.

Without ``--config`` the SD defaults of :class:`~sdtrain.data.config.DataConfig` apply (512 px,
the default filters); ``--config`` takes a data config file (or the name of a shipped one in
``configs/data/``, e.g. ``laion-sd15-inpainting``) of which only the ``data:`` section is read, so
experiment files work too. ``key=value`` overrides use the full key (``data.image.size=256``).
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtrain.config.resolve import configs_dir, resolve_config_path
from sdtrain.data.config import DataConfig, MaskConfig
from sdtrain.data.make_shards import make_shards
from sdtrain.data.shards import DataError
from sdtrain.errors import ConfigError
from sdtrain.utils.images import caption_panel
from sdtrain.utils.progress import progress

DATA_CONFIGS = configs_dir("data")
"""The shipped data configs (beside ``src/`` in a checkout or editable install)."""

_SHOWN_SKIPS = 20


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class DataRoot:
    """The part of an experiment config the data commands read."""

    data: DataConfig = field(default_factory=DataConfig)


def resolve_data_config(name: str) -> Path:
    """A path as given, or a shipped data config by short name (``laion-sd15-inpainting``)."""
    return resolve_config_path(name, "data")


def load_data_config(
    paths: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    base: DataConfig | None = None,
) -> DataConfig:
    """The ``data`` section of config files merged in order, then ``data.*`` overrides.

    Other top-level sections (``model``, ``seed``, ...) are ignored, so full experiment files can
    be given. Values start from ``base`` (default: ``DataConfig()``, the SD defaults); a file only
    changes the keys it sets. Unknown keys, wrong types and the components' own checks raise
    ``ConfigError`` naming the key and the file (or "command line") that set it, exactly as the
    experiment loader (:func:`sdtrain.trainer.experiment.load_config`) does; files may
    ``include:`` others.
    """
    from sdtrain.config.loader import COMMAND_LINE, load_dataclass

    for item in overrides:
        if not item.startswith("data."):
            raise ConfigError(
                f"the data commands take data.* overrides only, got {item!r} (did you mean "
                f"'data.{item}'?)",
                source=COMMAND_LINE,
            )
    start = DataRoot(data=base or DataConfig())
    return load_dataclass(DataRoot, paths, overrides, base=start, sections=("data",)).data


_OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")


def _split_positionals(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """(shard specs, overrides): ``key=value`` items are overrides, anything else another spec
    (several specs, or a brace pattern the shell expanded into many paths)."""
    specs = [item for item in items if not _OVERRIDE.match(item)]
    return specs, [item for item in items if _OVERRIDE.match(item)]


def shard_urls(specs: Sequence[str]) -> list[str]:
    """``expand_shards(specs)``, and a ``DataError`` naming the specs when none of the local
    files they name exists (a mistyped pattern would otherwise just count unreadable shards)."""
    from sdtrain.data.shards import expand_shards

    urls = expand_shards(specs)
    remote = ("pipe:", "http://", "https://", "s3://", "gs://")
    local = [url for url in urls if not url.startswith(remote)]
    exists = (Path(url.removeprefix("file://")).is_file() for url in local)
    if local and len(local) == len(urls) and not any(exists):
        raise DataError(
            f"no shards found for {list(specs)!r}: none of the {len(local)} file(s) it names "
            f"exists (first: {local[0]})"
        )
    return urls


def _config_from_args(
    args: argparse.Namespace, base: DataConfig | None = None, **changes: Any
) -> DataConfig:
    """Config files + overrides, then SHARDS, ``--size`` and the command's own ``changes``."""
    specs, overrides = _split_positionals([args.shards, *args.overrides])
    paths = [resolve_data_config(name) for name in args.config or []]
    cfg = load_data_config(paths, overrides, base=base)
    image = cfg.image
    if args.size is not None:
        try:
            image = dataclasses.replace(image, size=args.size)
        except ConfigError as err:
            raise ConfigError(err.message, key="--size") from None
    if cfg.source == "folder":  # SHARDS is the folder of images (data.source=folder)
        if len(specs) != 1:
            raise ConfigError("with data.source=folder give one folder of images", key="SHARDS")
        cfg = dataclasses.replace(cfg, folder=specs[0], image=image, **changes)
        pipeline_urls(cfg)  # a folder without images is an error naming it
        return cfg
    shard_urls(specs)
    return dataclasses.replace(cfg, shards=specs, image=image, **changes)


def pipeline_urls(cfg: DataConfig) -> list[str]:
    """What one pass reads: the shards, or with ``data.source: folder`` the image files."""
    if cfg.source == "folder":
        from sdtrain.data.folder import list_folder

        return list_folder(cfg)
    return shard_urls(cfg.shards)


def _workers(cfg: DataConfig, requested: int | None) -> int:
    """``--workers`` as given, else ``data.num_workers`` capped at the number of shards and of
    CPU cores."""
    if requested is not None:
        if requested < 0:
            raise ConfigError("must be >= 0", key="--workers")
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(cfg.num_workers, len(pipeline_urls(cfg)), cores or 1)


# ---------------------------------------------------------------------------------------------
# make-shards
# ---------------------------------------------------------------------------------------------


def cmd_make_shards(args: argparse.Namespace) -> int:
    result = make_shards(
        args.src,
        args.out,
        per_shard=args.per_shard,
        to_jpeg=args.to_jpeg,
        verify=args.verify,
        path_column=args.path_column,
        caption_column=args.caption_column,
    )
    print(
        f"wrote {result.written} sample(s) in {len(result.shards)} shard(s) to {args.out}; "
        f"skipped {len(result.skipped)} unreadable"
        + (f"; converted {result.converted} to JPEG" if args.to_jpeg else "")
    )
    for path, reason in result.skipped[:_SHOWN_SKIPS]:
        print(f"  skipped {path}: {reason}")
    if len(result.skipped) > _SHOWN_SKIPS:
        print(f"  ... and {len(result.skipped) - _SHOWN_SKIPS} more")
    if result.skipped:
        print(f"  (all skipped paths: {Path(args.out) / 'skipped.txt'})")
    if not result.written:
        raise DataError(f"none of the images in {args.src} could be read")
    return 0


# ---------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------


class ShardStats:
    """Map-style dataset: item ``i`` runs the configured pipeline over shard ``i`` alone, to the
    end, and returns its ``DataStats.to_dict()``. Counting per shard (rather than from batches)
    also covers the samples after a worker's last batch, which no batch reports."""

    def __init__(self, cfg: DataConfig, urls: Sequence[str]) -> None:
        from sdtrain.data.folder import FolderSource

        self.cfg = cfg
        self.urls = list(urls)
        self.source = FolderSource.of(cfg) if cfg.source == "folder" else None

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from sdtrain.data.pipeline import ShardPlan, WorkerPosition, WorkerStream

        plan = ShardPlan([self.urls[index]], self.cfg, 0, 1, 1, self.source)
        stream = WorkerStream(self.cfg, plan, 0, WorkerPosition())
        for _ in stream.batches():
            pass
        return stream.stats.to_dict()


def collect_stats(cfg: DataConfig, workers: int = 0) -> Any:
    """One pass (epoch mode, no shuffling, no error-rate cap) over ``cfg.shards``, shards spread
    over ``workers`` processes; the summed :class:`~sdtrain.data.filters.DataStats`."""
    from torch.utils.data import DataLoader

    from sdtrain.data.filters import DataStats

    cfg = dataclasses.replace(
        cfg, resampled=False, shuffle_buffer=0, num_workers=0, max_error_rate=1.0, augment=[]
    )
    urls = pipeline_urls(cfg)
    total = DataStats()
    loader = DataLoader(ShardStats(cfg, urls), batch_size=None, num_workers=workers)
    data_log = logging.getLogger("sdtrain.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # the errors are counted and summarised, not logged one by one
    try:
        with progress(total=len(urls), unit="shard", desc="stats") as bar:
            for shard_stats in loader:
                total = total.merge(DataStats.from_dict(shard_stats))
                bar.update()
                bar.set_postfix(seen=total.seen, kept=total.kept, refresh=False)
    finally:
        data_log.setLevel(level)
    return total


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    if args.buckets:
        try:
            buckets = dataclasses.replace(cfg.buckets, enabled=True)
            cfg = dataclasses.replace(cfg, buckets=buckets)
        except ConfigError as err:
            raise err.at("data") from None
    stats = collect_stats(cfg, _workers(cfg, args.workers))
    if args.json:
        print(json.dumps(stats.to_dict()))
        return 0
    print(f"seen:     {stats.seen}")
    print(f"kept:     {stats.kept}" + (f" ({stats.kept / stats.seen:.1%})" if stats.seen else ""))
    print(f"rejected: {sum(stats.rejected.values())}")
    for reason, count in sorted(stats.rejected.items()):
        print(f"  {reason}: {count}")
    print(f"errors:   {stats.error_count}")
    for kind, count in sorted(stats.errors.items()):
        print(f"  {kind}: {count}")
    if stats.recent_errors:
        print("last errors:")
        for line in stats.recent_errors[-5:]:
            print(f"  {line}")
    if args.buckets:
        print_bucket_stats(cfg, stats)
    return 0


def print_bucket_stats(cfg: DataConfig, stats: Any) -> None:
    """How the kept samples fall into the buckets of ``cfg.buckets`` and the share dropped for
    needing more than ``max_upscale``."""
    from sdtrain.data.buckets import UPSCALE_REASON, BucketSet

    kept = sum(stats.buckets.values())
    dropped = stats.rejected.get(UPSCALE_REASON, 0)
    placed = kept + dropped
    print(f"buckets:  {kept} sample(s) in batches (W x H, width / height, count, share)")
    for bucket in BucketSet(cfg.buckets, cfg.image.height, cfg.image.out_width).buckets:
        count = stats.buckets.get(bucket.name, 0)
        share = f"{count / kept:.1%}" if kept else "-"
        print(f"  {bucket.name:>11} {bucket.ratio:5.2f} {count:8d} {share:>6}")
    share = f" ({dropped / placed:.1%} of {placed} assigned to a bucket)" if placed else ""
    print(f"dropped:  {dropped} needing more than {cfg.buckets.max_upscale:g}x upscale{share}")


# ---------------------------------------------------------------------------------------------
# preview
# ---------------------------------------------------------------------------------------------


def preview_rows(batch_samples: Sequence[Mapping[str, Any]]) -> Any:
    """Grid of one row per sample: image | mask (white = repaint) | masked image (mid-grey where
    masked, which is ``image * (1 - mask)`` in the model's [-1, 1] range) | ``key: caption``.
    Rows may differ in size (``data.buckets``): columns are as wide as the widest sample."""
    import numpy as np
    from PIL import Image

    width = max(int(sample["image"].shape[2]) for sample in batch_samples)
    total = sum(int(sample["image"].shape[1]) for sample in batch_samples)
    grid = Image.new("RGB", (4 * width, total), "white")
    top = 0
    for sample in batch_samples:
        image = sample["image"].permute(1, 2, 0).numpy()  # (H, W, 3) uint8
        height = image.shape[0]
        mask = sample.get("mask")
        mask = np.zeros(image.shape[:2], np.uint8) if mask is None else mask[0].numpy()
        masked = np.where(mask[..., None] > 0, np.uint8(128), image)
        text = f"{sample['key']}: {sample['caption']}"
        panels = [
            Image.fromarray(image),
            Image.fromarray(mask * 255).convert("RGB"),
            Image.fromarray(masked),
            caption_panel(text, width, height),
        ]
        for column, panel in enumerate(panels):
            grid.paste(panel, (column * width, top))
        top += height
    return grid


def cmd_preview(args: argparse.Namespace) -> int:
    from sdtrain.data.pipeline import LaionLoader

    if args.n < 1:
        raise ConfigError("must be >= 1", key="--n")
    base = DataConfig(masks=MaskConfig(enabled=True, kind="sd15", preset="512train-large"))
    cfg = _config_from_args(
        args, base=base, resampled=False, shuffle_buffer=0, num_workers=0, batch_size=args.n
    )
    samples: list[dict[str, Any]] = []
    for batch in LaionLoader(cfg):
        for i in range(len(batch["caption"])):
            samples.append({k: v[i] for k, v in batch.items()})
        if len(samples) >= args.n:
            break
    if not samples:
        raise DataError(f"no sample of {cfg.shards} passed the filters: nothing to preview")
    grid = preview_rows(samples[: args.n])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    masks = "with masks" if cfg.masks.enabled else "masks off"
    print(f"wrote {out} ({len(samples[: args.n])} sample(s), {grid.width}x{grid.height}, {masks})")
    return 0


# ---------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------


def bench_loader(cfg: DataConfig, seconds: float, warmup: float) -> dict[str, Any]:
    """Delivered samples/s of ``LaionLoader(cfg)`` (infinite mode) over ``seconds`` after
    ``warmup`` seconds (at least one batch) of untimed batches."""
    from sdtrain.data.pipeline import LaionLoader

    # Measuring throughput, not guarding a run: a bad sample that recurs every epoch must not
    # stop the measurement (the stats command reports errors).
    cfg = dataclasses.replace(cfg, resampled=True, max_error_rate=1.0)
    batches = iter(LaionLoader(cfg))
    start = time.perf_counter()
    warm_batches = 0
    while True:
        next(batches)
        warm_batches += 1
        now = time.perf_counter()
        if now - start >= warmup:
            break
    samples = count = 0
    t0 = last = now
    with progress(unit="sample", desc="bench", total=None) as bar:
        while last - t0 < seconds:
            batch = next(batches)
            last = time.perf_counter()
            samples += len(batch["caption"])
            count += 1
            bar.update(len(batch["caption"]))
    del batches  # shuts the DataLoader workers down
    elapsed = last - t0
    return {
        "samples_per_s": samples / elapsed,
        "workers": cfg.num_workers,
        "size": cfg.image.size,
        "width": cfg.image.out_width,
        "seconds": elapsed,
        "batches": count,
        "samples": samples,
        "batch_size": cfg.batch_size,
        "warmup_s": now - start,
        "warmup_batches": warm_batches,
        "masks": cfg.masks.enabled,
    }


def cmd_depth(args: argparse.Namespace) -> int:
    """``sdtrain data depth SHARDS... OUT --checkpoint FILE``: see ``launch.depth_shards``."""
    import torch

    from sdtrain.launch.depth_shards import depth_shards, rank_and_world
    from sdtrain.models.adapters.original import load_state_dict_strict
    from sdtrain.models.midas import build_midas, read_midas_weights

    *specs, out = args.paths
    if not specs:
        raise ConfigError("give the input shards and then the output folder: SHARDS... OUT")
    urls = shard_urls(specs)
    shards = [Path(url.removeprefix("file://")) for url in urls]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise DataError(f"not local shard files: {', '.join(missing[:3])}")
    out_dir = Path(out)
    if out_dir.resolve() in {s.parent.resolve() for s in shards}:
        raise ConfigError(f"OUT {out} holds the input shards: choose another folder")
    rank, world = rank_and_world()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    estimator = build_midas(args.estimator)
    weights = read_midas_weights(args.checkpoint)
    load_state_dict_strict(estimator, weights, source=args.checkpoint, what="MiDaS")
    estimator = estimator.to(device)
    mine = sum(1 for i in range(len(shards)) if i % world == rank)
    with progress(total=mine, unit="shard", desc=f"depth {rank}/{world}") as bar:
        done = {"images": 0}
        start = time.perf_counter()

        def step(count: int) -> None:
            done["images"] += count
            rate = done["images"] / max(time.perf_counter() - start, 1e-9)
            bar.update()
            bar.set_postfix(images=done["images"], images_per_s=f"{rate:.1f}", refresh=False)

        summary = depth_shards(shards, out_dir, estimator, rank, world, on_image=step)
        bar.update(len(summary.skipped))
    print(summary.line())
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    """``sdtrain data encode SHARDS... OUT --config X [key=value ...]``: see ``launch.encode``."""
    from sdtrain.launch.encode import EncodeOptions, run_encode
    from sdtrain.trainer.experiment import load_config

    items = [*args.paths, *args.config]
    overrides = [item for item in items if _OVERRIDE.match(item)]
    files = [item for item in args.config if not _OVERRIDE.match(item)]
    *specs, out = [item for item in args.paths if not _OVERRIDE.match(item)]
    if not specs:
        raise ConfigError("give the input shards and then the output folder: SHARDS... OUT")
    if not files:
        raise ConfigError("give the experiment or model config: --config FILE [FILE ...]")
    cfg = load_config([resolve_config_path(name) for name in files], overrides)
    urls = shard_urls(specs)
    options = EncodeOptions(text=args.text, flip=args.flip, batch_size=args.batch_size)
    summary = run_encode(cfg, urls, Path(out), options, device=args.device)
    for line in summary.lines():
        print(line)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    if args.seconds <= 0:
        raise ConfigError("must be > 0", key="--seconds")
    cfg = _config_from_args(args)
    workers = _workers(cfg, args.workers)
    cfg = dataclasses.replace(cfg, num_workers=workers)
    warmup = min(2.0, args.seconds / 2) if args.warmup is None else args.warmup
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = bench_loader(cfg, args.seconds, warmup)
    finally:
        torch.set_num_threads(threads)
    result["torch_threads"] = args.threads or threads
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{result['samples_per_s']:.1f} samples/s ({result['size']}x{result['width']} px, "
        f"masks {'on' if result['masks'] else 'off'}, {workers} worker(s), batch "
        f"{cfg.batch_size}: {result['samples']} samples in {result['seconds']:.1f} s after "
        f"{result['warmup_s']:.1f} s warm-up)"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def _add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "shards",
        metavar="SHARDS",
        help="brace pattern ('/data/{00000..00099}.tar', quoted), one .tar path or a folder of "
        ".tar files; more specs may follow (e.g. the shell's expansion of /data/*.tar)",
    )
    parser.add_argument(
        "--config",
        action="append",
        metavar="FILE",
        help="data config YAML (only its data: section is read), or a shipped name "
        "(laion-sd15, laion-sd15-inpainting, laion-sd2, laion-sd2-inpainting); repeat to merge "
        "several in order. Default: the SD defaults (512 px, the default filters)",
    )
    parser.add_argument(
        "--size", type=int, default=None, help="output size in px, overrides data.image.size"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides applied after the config files, e.g. data.filters.min_size=256 "
        "(right after SHARDS, before the options)",
    )


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``sdtrain data make-shards|stats|preview|bench`` on the top-level subparsers."""
    data = sub.add_parser(
        "data",
        help="make shards from local images; count, preview and benchmark the data pipeline",
        description="Data tools for LAION-style WebDataset shards (img2dataset layout).",
    )
    actions = data.add_subparsers(dest="action", required=True, metavar="ACTION")

    make = actions.add_parser(
        "make-shards",
        help="write img2dataset-style shards from a folder of images or a CSV / parquet table",
        description="SRC is a folder of images (jpg, jpeg, png, webp, bmp, gif, tif, tiff; "
        "searched recursively) with <name>.txt captions and optional <name>.json metadata, or "
        "a .csv / .parquet table with a path column, a caption column and any metadata columns "
        "(relative paths are relative to the table's folder; parquet needs pyarrow). Each "
        "sample becomes <key>.jpg|png|webp + .txt (normalised caption) + .json (metadata plus "
        "caption, path, width, height, original_width, original_height). JPEG bytes are copied "
        "as they are. Unreadable images are skipped, listed in the summary and in "
        "OUT/skipped.txt; they never stop the run.",
    )
    make.add_argument("src", metavar="SRC", help="folder of images, or a .csv / .parquet table")
    make.add_argument("out", metavar="OUT", help="output folder for 00000.tar, 00001.tar, ...")
    make.add_argument(
        "--per-shard", type=int, default=1000, help="samples per shard (default: 1000)"
    )
    make.add_argument(
        "--to-jpeg",
        action="store_true",
        help="re-encode non-JPEG images as JPEG quality 95 (default: keep their bytes and "
        "extension, e.g. .png, .webp)",
    )
    make.add_argument(
        "--verify",
        action="store_true",
        help="decode every image fully, so truncated files are skipped here (default: header "
        "only, fast; the loader still counts bad images while training)",
    )
    make.add_argument(
        "--path-column", default="path", help="table column with the image paths (default: path)"
    )
    make.add_argument(
        "--caption-column",
        default="caption",
        help="table column with the captions (default: caption)",
    )
    make.set_defaults(func=cmd_make_shards)

    stats = actions.add_parser(
        "stats",
        help="one pass over shards: samples seen, kept, rejected per filter, errors per kind",
        description="Run the configured pipeline once over SHARDS (epoch mode, no shuffling, "
        "images decoded so bad ones are found; the error-rate cap is off) and print how many "
        "samples were seen, kept, rejected per filter reason and unusable per error kind.",
    )
    _add_pipeline_args(stats)
    stats.add_argument(
        "--workers",
        type=int,
        default=None,
        help="dataloader worker processes; 0 = in this process (default: data.num_workers, at "
        "most one per shard)",
    )
    stats.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object {seen, kept, rejected: {reason: n}, errors: {kind: n}, "
        "recent_errors} on stdout (with --buckets also buckets: {WxH: n})",
    )
    stats.add_argument(
        "--buckets",
        action="store_true",
        help="with aspect-ratio buckets (data.buckets.*, switched on): samples per bucket and "
        "the share dropped for needing more than data.buckets.max_upscale",
    )
    stats.set_defaults(func=cmd_stats)

    preview = actions.add_parser(
        "preview",
        help="a PNG grid of samples: image, mask, masked image, caption",
        description="Take the first N samples that pass the filters and draw one row per "
        "sample: the training crop, the inpainting mask (white = repaint), the masked image "
        "(grey where masked) and the caption. Masks are on (sd15, 512train-large) unless the "
        "config sets data.masks.",
    )
    _add_pipeline_args(preview)
    preview.add_argument("--out", required=True, help="output image file (e.g. grid.png)")
    preview.add_argument("--n", type=int, default=8, help="samples (rows) to show (default: 8)")
    preview.set_defaults(func=cmd_preview)

    depth = actions.add_parser(
        "depth",
        help="precompute MiDaS depth maps into shards (16-bit PNG depth members)",
        description="Runs the frozen MiDaS DPT-Hybrid over every image of SHARDS and writes "
        "OUT/<shard>.tar with the same members plus <key>.depth.png (16-bit, the image's "
        "size), which data.depth reads. Resumable: finished shards are skipped, and each is "
        "written under a temporary name first. Shards are shared out by SLURM_PROCID / "
        "SLURM_NTASKS (or RANK / WORLD_SIZE): start one process per GPU / task.",
    )
    depth.add_argument(
        "paths",
        nargs="+",
        metavar="SHARDS... OUT",
        help="input shards (files or brace patterns), then the output folder",
    )
    depth.add_argument(
        "--checkpoint",
        required=True,
        help="512-depth-ema.ckpt (depth_model.*) or dpt_hybrid-midas-501f0c75.pt",
    )
    depth.add_argument("--estimator", choices=("dpt_hybrid", "tiny"), default="dpt_hybrid",
                       help="estimator size (default dpt_hybrid; tiny for tests)")  # fmt: skip
    depth.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    depth.set_defaults(func=cmd_depth)

    encode = actions.add_parser(
        "encode",
        help="precompute VAE latents (and caption embeddings) into latent shards",
        description="Run the config's data pipeline (filters first, then decode and crop to "
        "data.image) over SHARDS and the frozen VAE encoder over the crops, and write "
        "OUT/<shard>.tar per input shard: the same keys, captions and json plus the posterior "
        "moments (mean, logvar; float16), with --text the caption embedding, and for inpainting "
        "/ depth models the crop / cropped depth map. Train on them with sdtrain fit ... "
        "data.shards=OUT data.latents=true (docs/latents.md). Weights: the config's init_from "
        "(else the seeded initialisation fit would make). Resumable: finished shards are "
        "skipped, each written under a temporary name first. Shards are shared out by "
        "SLURM_PROCID / SLURM_NTASKS (or RANK / WORLD_SIZE): start one process per GPU / task.",
    )
    encode.add_argument(
        "paths",
        nargs="+",
        metavar="SHARDS... OUT",
        help="input shards (files, folders or brace patterns), then the output folder; "
        "key=value overrides may follow (init_from=..., data.image.size=...)",
    )
    encode.add_argument(
        "--config",
        nargs="+",
        required=True,
        metavar="YAML",
        help="experiment or model config files merged in order (paths or shipped names)",
    )
    encode.add_argument(
        "--text",
        action="store_true",
        help="also store the caption embeddings (train with data.text_embeddings=true)",
    )
    encode.add_argument(
        "--flip",
        choices=("both", "none"),
        default="none",
        help="both: also the moments of the flipped crop, for data.image.flip_p > 0 (default none)",
    )
    encode.add_argument("--batch-size", type=int, default=16, help="images per encoder call")
    encode.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    encode.set_defaults(func=cmd_encode)

    bench = actions.add_parser(
        "bench",
        help="throughput of the configured pipeline in samples/s",
        description="Run the configured pipeline (shard reading, filters, decode, crop, masks, "
        "batching; infinite mode) for a warm-up and then SECONDS more, and print the delivered "
        "samples per second.",
    )
    _add_pipeline_args(bench)
    bench.add_argument(
        "--workers",
        type=int,
        default=None,
        help="dataloader worker processes; 0 = in this process (default: data.num_workers, at "
        "most one per shard)",
    )
    bench.add_argument(
        "--seconds", type=float, default=10.0, help="timed duration in seconds (default: 10)"
    )
    bench.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="untimed seconds first, at least one batch (default: 2 or half of --seconds, "
        "whichever is less)",
    )
    bench.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads in this process (default: torch's own)",
    )
    bench.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object {samples_per_s, workers, size, seconds, batches, ...} on "
        "stdout",
    )
    bench.set_defaults(func=cmd_bench)
