"""``sdtrain data depth``: MiDaS depth maps precomputed into shards, for ``model.depth.source:
shard`` runs that prefer to pay the estimator once.

Each input shard ``NAME.tar`` becomes ``OUT/NAME.tar`` with every member as it was (same keys,
captions, json) plus ``<key>.depth.png``: the estimator's raw depth (``models.midas``, the
original ``AddMiDaS`` preprocessing) resized bicubic to the image's own size, scaled per image
to the full 16-bit range (larger = nearer) — the member ``data.depth`` reads and normalises.

- Resumable: an output shard is written to a temporary name and renamed when complete, so a
  finished name is a finished shard; a rerun skips those and redoes the rest.
- Parallel: shard ``i`` belongs to rank ``i % world`` (``SLURM_PROCID`` / ``SLURM_NTASKS``, else
  ``RANK`` / ``WORLD_SIZE``); ranks never write the same file.
- Samples whose image cannot be decoded are copied without a depth member and counted.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdtrain.errors import ConfigError
from sdtrain.models.midas import MiDaS, midas_input
from sdtrain.utils import files

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
DEPTH_MEMBER = "depth.png"


@dataclass
class DepthSummary:
    """What one rank did."""

    rank: int
    world: int
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    """Output shards already finished (resume)."""
    images: int = 0
    undecodable: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"rank {self.rank}/{self.world}: wrote {len(self.written)} shard(s), skipped "
            f"{len(self.skipped)} finished, {self.images} depth map(s) at {rate:.1f} images/s"
        )
        if self.undecodable:
            text += f", {self.undecodable} image(s) undecodable (copied without depth)"
        return text


def rank_and_world(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """This process's share: ``SLURM_PROCID`` / ``SLURM_NTASKS``, else ``RANK`` / ``WORLD_SIZE``,
    else (0, 1)."""
    env = os.environ if env is None else env
    for rank_key, world_key in (("SLURM_PROCID", "SLURM_NTASKS"), ("RANK", "WORLD_SIZE")):
        if rank_key in env and world_key in env:
            try:
                rank, world = int(env[rank_key]), int(env[world_key])
            except ValueError:
                raise ConfigError(f"{rank_key}/{world_key} must be integers") from None
            if not 0 <= rank < world:
                raise ConfigError(f"{rank_key}={rank} is not in [0, {world_key}={world})")
            return rank, world
    return 0, 1


def depth_png(estimator: MiDaS, image: Image.Image) -> bytes:
    """The 16-bit PNG depth map of ``image`` at its own size."""
    rgb = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    x = rgb[None].float() / 127.5 - 1.0  # (1, 3, H, W) in [-1, 1]
    param = next(estimator.parameters())
    midas_in = midas_input(x, estimator.cfg).to(param.device, param.dtype)
    if param.device.type == "cuda" and param.dtype == torch.float32:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            raw = estimator(midas_in)
    else:
        raw = estimator(midas_in)
    depth = F.interpolate(raw.float(), size=x.shape[-2:], mode="bicubic", align_corners=False)
    depth = depth[0, 0].cpu().numpy()
    low, high = float(depth.min()), float(depth.max())
    scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
    out = io.BytesIO()
    Image.fromarray(np.round(scaled * 65535).astype(np.uint16)).save(out, format="PNG")
    return out.getvalue()


def _samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """A shard's samples in order: (key, {extension: bytes})."""
    order: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = Path(member.name).name
            key, _, ext = name.partition(".")
            handle = tar.extractfile(member)
            if handle is None or not ext:
                continue
            order.setdefault(str(Path(member.name).parent / key), {})[ext] = handle.read()
    return list(order.items())


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))


def depth_shards(
    shards: list[Path],
    out: Path,
    estimator: MiDaS,
    rank: int = 0,
    world: int = 1,
    on_image: Callable[[int], None] | None = None,
) -> DepthSummary:
    """Rank ``rank`` of ``world``'s share of ``shards`` with depth members into ``out``;
    ``on_image(n)`` after each shard with its number of depth maps (progress)."""
    out.mkdir(parents=True, exist_ok=True)
    summary = DepthSummary(rank, world)
    start = time.perf_counter()
    for i, shard in enumerate(shards):
        if i % world != rank:
            continue
        target = out / shard.name
        if target.exists():
            summary.skipped.append(target)
            continue
        samples, count = _samples(shard), 0
        for _, members in samples:
            ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
            if ext is None or DEPTH_MEMBER in members:
                continue
            try:
                with Image.open(io.BytesIO(members[ext])) as image:
                    image.load()
                    members[DEPTH_MEMBER] = depth_png(estimator, image)
                count += 1
            except (OSError, ValueError):
                summary.undecodable += 1
        files.write_atomic(target, lambda tmp, s=samples: _write_shard(tmp, s))
        summary.written.append(target)
        summary.images += count
        if on_image is not None:
            on_image(count)
    summary.seconds = time.perf_counter() - start
    return summary
