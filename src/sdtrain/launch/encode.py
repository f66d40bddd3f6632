"""``sdtrain data encode SHARDS OUT --config X``: the frozen VAE encoder (and with ``--text`` the
text encoder) run once over image shards, so that ``data.latents: true`` training skips them.

Each input shard ``NAME.tar`` becomes ``OUT/NAME.tar`` (members: ``data/latents.py``). Samples go
through the ordinary pipeline of the config's ``data:`` section (``WorkerStream``): metadata
filters first (a rejected sample is never decoded), then decode and crop to ``data.image``, the
crop drawn from the same per-sample seed an epoch-0 training stream would use; flips and masks
are left to training (``--flip both`` stores the flipped crop's moments as well).

- Weights: the VAE / text encoder of ``init_from``; without one (or for parts the file lacks),
  the seeded initialisation ``sdtrain fit`` makes for the same config and seed. Each sample
  records the VAE's fingerprint and the crop size, which training checks.
- Resumable: a shard is written under a temporary name and renamed when complete, so a finished
  name is a finished shard; a rerun skips those and redoes the rest (temp files of dead runs are
  removed).
- Parallel: shard ``i`` belongs to rank ``i % world`` (``SLURM_PROCID`` / ``SLURM_NTASKS``, else
  ``RANK`` / ``WORLD_SIZE``); ranks never write the same file.
"""

from __future__ import annotations

import dataclasses
import logging
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sdtrain.data.config import DataConfig, MaskConfig
from sdtrain.data.filters import DataStats
from sdtrain.data.latents import (
    CROP,
    DEPTH_CROP,
    LATENT_MEMBERS,
    MOMENTS,
    MOMENTS_FLIP,
    RECORD,
    TEXT,
    LatentRecord,
    array_bytes,
    crop_png,
    depth_crop_png,
    text_fingerprint,
    vae_fingerprint,
)
from sdtrain.data.pipeline import ShardPlan, WorkerPosition, WorkerStream
from sdtrain.data.shards import RawSample
from sdtrain.data.transforms import to_model_images
from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.models.autoencoder import AutoencoderKL
from sdtrain.models.conditioning import conditioning_component
from sdtrain.models.text_encoders import FrozenTextEncoder
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.utils import files

log = logging.getLogger("sdtrain.encode")
Flip = Literal["both", "none"]


# ---------------------------------------------------------------------------------------------
# The frozen encoders
# ---------------------------------------------------------------------------------------------


@dataclass
class FrozenEncoders:
    """The first stage as training builds it, on the device, with its fingerprints."""

    autoencoder: AutoencoderKL
    text_encoder: FrozenTextEncoder | None
    scale_factor: float
    vae: str
    text: str = ""
    source: str = ""
    """Where the weights came from, for the summary."""


def frozen_encoders(cfg: ExperimentConfig, device: torch.device, text: bool) -> FrozenEncoders:
    """The VAE (and text encoder) of ``cfg``: from ``init_from`` when it holds them, else the
    seeded initialisation of ``sdtrain fit`` (``seed_everything(seed)`` then every part built in
    order; the parts the file holds loaded over it), so that the fingerprints match."""
    from sdtrain.models.adapters.diffusers import read_model_weights
    from sdtrain.models.adapters.original import load_state_dict_strict

    model_cfg, ckpt = cfg.model, None
    if cfg.init_from:
        ckpt = read_model_weights(cfg.init_from, model_cfg)
    if ckpt is not None and ckpt.vae and (ckpt.text or not text):
        autoencoder = AutoencoderKL(model_cfg.autoencoder)
        load_state_dict_strict(autoencoder, ckpt.vae, source=cfg.init_from, what="autoencoder")
        text_encoder = None
        if text:
            text_encoder = FrozenTextEncoder(model_cfg.text_encoder)
            try:
                text_encoder.load_original_state_dict(ckpt.text)
            except ValueError as err:
                raise CheckpointError(f"text encoder: {err}", cfg.init_from) from err
        source = cfg.init_from
    else:
        import pytorch_lightning as pl

        from sdtrain.models.stable_diffusion import StableDiffusion

        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        model = StableDiffusion(model_cfg)
        if ckpt is not None:
            given = {"unet": ckpt.unet, "vae": ckpt.vae, "text": ckpt.text}
            model.load_original(ckpt, parts=tuple(p for p, w in given.items() if w))
        autoencoder, text_encoder = model.autoencoder, model.text_encoder if text else None
        source = f"{cfg.init_from + ' + ' if cfg.init_from else ''}seeded init (seed {cfg.seed})"
        if not cfg.init_from:
            log.warning("no init_from: encoding with the seeded random VAE of this config (only "
                        "useful for tests and the demo)")  # fmt: skip
    autoencoder.requires_grad_(False).eval().to(device)
    scale = model_cfg.autoencoder.scale_factor
    encoders = FrozenEncoders(
        autoencoder, None, scale, vae_fingerprint(autoencoder.state_dict(), scale), source=source
    )
    if text_encoder is not None:
        text_encoder.requires_grad_(False).eval().to(device)
        encoders.text_encoder = text_encoder
        encoders.text = text_fingerprint(text_encoder.state_dict())
    return encoders


# ---------------------------------------------------------------------------------------------
# One shard
# ---------------------------------------------------------------------------------------------


class _OneShard(ShardPlan):
    """Every URL (so that sample ``i`` of shard ``k`` gets the crop seed ``(seed, 0, k, i)`` an
    epoch-0 training stream gives it) but a stream that reads only shard ``index``."""

    def __init__(self, urls: list[str], cfg: DataConfig, index: int) -> None:
        super().__init__(urls, cfg, 0, 1, 1)
        self.index = index

    def worker_shards(self, epoch: int, worker: int) -> list[int]:
        return [self.index]


def encode_data_config(data: DataConfig, urls: Sequence[str]) -> DataConfig:
    """The training data config as encode reads it: one pass in order, no flips (``--flip``),
    no masks (drawn per step), every error counted and none fatal."""
    return dataclasses.replace(
        data, shards=list(urls), resampled=False, shuffle_shards=False, shuffle_buffer=0,
        num_workers=0, max_error_rate=1.0, masks=MaskConfig(enabled=False),
        image=dataclasses.replace(data.image, flip_p=0.0), latents=False, text_embeddings=False,
    )  # fmt: skip


@dataclass
class EncodeOptions:
    text: bool = False
    """Also store the caption embeddings (``text.npy``)."""
    flip: Flip = "none"
    """``both``: also the moments of the horizontally flipped crop."""
    batch_size: int = 16
    """Images per encoder call."""


class ShardEncoder:
    """Writes latent shards for one config: moments, crops, embeddings, records."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        urls: Sequence[str],
        encoders: FrozenEncoders,
        options: EncodeOptions,
    ) -> None:
        self.urls = list(urls)
        self.data = encode_data_config(cfg.data, urls)
        self.encoders = encoders
        self.options = options
        self.device = next(encoders.autoencoder.parameters()).device
        component = conditioning_component(cfg.model.conditioning)
        self.keep_crop = component.needs_pixels(cfg.model.depth)
        """The mode needs the pixels in every step (inpainting's masked image)."""
        self.dropped = {*self.data.image_keys, *self.data.depth.keys, *LATENT_MEMBERS}
        """Members not copied: the image and depth (replaced by crops), old latent members."""

    def write_shard(
        self, index: int, path: Path, on_images: Callable[[int], None] | None = None
    ) -> DataStats:
        """Shard ``index`` encoded into the tar file ``path``; returns its counters."""
        stream = WorkerStream(self.data, _OneShard(self.urls, self.data, index), 0,
                              WorkerPosition())  # fmt: skip
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            # one batch per crop size: with data.buckets each sample is at its bucket's size
            batches: dict[tuple[int, ...], list[tuple[RawSample, dict[str, Any]]]] = {}
            for item in stream.samples():
                size = tuple(item[1]["image"].shape[-2:])
                batch = batches.setdefault(size, [])
                batch.append(item)
                if len(batch) == self.options.batch_size:
                    self._write(tar, batches.pop(size), on_images)
            for batch in batches.values():
                self._write(tar, batch, on_images)
        return stream.stats

    @torch.no_grad()
    def _write(
        self,
        tar: tarfile.TarFile,
        batch: list[tuple[RawSample, dict[str, Any]]],
        on_images: Callable[[int], None] | None,
    ) -> None:
        n, flip = len(batch), self.options.flip == "both"
        images = torch.stack([sample["image"] for _, sample in batch]).to(self.device)
        x = to_model_images(images)  # (n, 3, H, W) in [-1, 1]
        if flip:
            x = torch.cat([x, x.flip(-1)])  # (2n, 3, H, W)
        posterior = self.encoders.autoencoder.encode(x)
        moments = torch.cat([posterior.mean, posterior.logvar], dim=1).cpu()  # (n', 2C, h, w)
        embeddings = None
        if self.encoders.text_encoder is not None:
            captions = [sample["caption"] for _, sample in batch]
            embeddings = self.encoders.text_encoder.encode(captions).cpu()  # (n, T, D)
        for j, (raw, sample) in enumerate(batch):
            members = {e: d for e, d in raw.members.items() if e not in self.dropped}
            members[MOMENTS] = array_bytes(moments[j])
            if flip:
                members[MOMENTS_FLIP] = array_bytes(moments[n + j])
            if embeddings is not None:
                members[TEXT] = array_bytes(embeddings[j])
            if self.keep_crop:
                members[CROP] = crop_png(sample["image"])
            if "depth" in sample:
                members[DEPTH_CROP] = depth_crop_png(sample["depth"])
            record = LatentRecord(
                vae=self.encoders.vae,
                scale_factor=self.encoders.scale_factor,
                size=tuple(sample["image"].shape[-2:]),
                moments_shape=tuple(moments.shape[1:]),
                flip=flip,
                text=self.encoders.text,
                crop=self.keep_crop,
                depth="depth" in sample,
                original_size=tuple(int(v) for v in sample["original_size"]),
                crop_top_left=tuple(int(v) for v in sample["crop_top_left"]),
            )
            members[RECORD] = record.to_json()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{raw.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, _Reader(data))
        if on_images is not None:
            on_images(n)


class _Reader:
    """Bytes as the file object ``TarFile.addfile`` reads (without a BytesIO copy)."""

    def __init__(self, data: bytes) -> None:
        self.view, self.pos = memoryview(data), 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.view) if size < 0 else self.pos + size
        chunk = bytes(self.view[self.pos : end])
        self.pos += len(chunk)
        return chunk


# ---------------------------------------------------------------------------------------------
# A rank's share
# ---------------------------------------------------------------------------------------------


@dataclass
class EncodeSummary:
    """What one rank did."""

    rank: int
    world: int
    out: Path
    written: list[Path] = field(default_factory=list)
    finished: list[Path] = field(default_factory=list)
    """Output shards already complete (a resumed run)."""
    stats: DataStats = field(default_factory=DataStats)
    seconds: float = 0.0
    source: str = ""

    def lines(self) -> list[str]:
        s = self.stats
        rate = s.kept / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"rank {self.rank}/{self.world}: wrote {len(self.written)} latent shard(s) to "
            f"{self.out} ({s.kept} sample(s), {rate:.1f} images/s), skipped "
            f"{len(self.finished)} already finished",
            f"  weights: {self.source}",
            f"  seen {s.seen}, encoded {s.kept}, rejected {sum(s.rejected.values())}"
            + "".join(f", {reason} {n}" for reason, n in sorted(s.rejected.items())),
            f"  errors {s.error_count}"
            + "".join(f", {kind} {n}" for kind, n in sorted(s.errors.items())),
        ]
        lines += [f"    {line}" for line in s.recent_errors[-3:]]
        return lines


def output_names(urls: Sequence[str]) -> list[str]:
    """``OUT/<name>`` of every input shard: its file name, which must end in .tar and be unique."""
    names = []
    for url in urls:
        name = url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
        if url.startswith("pipe:") or not name.endswith(".tar"):
            raise ConfigError(f"cannot name the latent shard of {url!r}: give .tar files or URLs")
        names.append(name)
    seen: dict[str, str] = {}
    for url, name in zip(urls, names, strict=True):
        if name in seen:
            raise ConfigError(
                f"two input shards have the name {name} ({seen[name]} and {url}): OUT holds one "
                "latent shard per input shard by name; encode them into separate folders"
            )
        seen[name] = url
    return names


def encode_shards(
    encoder: ShardEncoder,
    out: Path,
    rank: int = 0,
    world: int = 1,
    on_images: Callable[[int], None] | None = None,
    on_shard: Callable[[], None] | None = None,
) -> EncodeSummary:
    """Rank ``rank`` of ``world``'s share of the encoder's shards into ``out``."""
    names = output_names(encoder.urls)
    out.mkdir(parents=True, exist_ok=True)
    files.remove_stale_temp_files(out)  # half-written shards of killed runs
    summary = EncodeSummary(rank, world, out, source=encoder.encoders.source)
    start = time.perf_counter()
    for index, name in enumerate(names):
        if index % world != rank:
            continue
        target = out / name
        if target.exists():
            summary.finished.append(target)
        else:
            counted: list[DataStats] = []

            def write(tmp: Path, i: int = index, into: list[DataStats] = counted) -> None:
                into.append(encoder.write_shard(i, tmp, on_images))

            files.write_atomic(target, write)
            summary.written.append(target)
            summary.stats = summary.stats.merge(counted[0])
        if on_shard is not None:
            on_shard()
    summary.seconds = time.perf_counter() - start
    return summary


def run_encode(
    cfg: ExperimentConfig,
    urls: Sequence[str],
    out: Path,
    options: EncodeOptions,
    device: str | None = None,
) -> EncodeSummary:
    """``sdtrain data encode``: this process's share of ``urls`` into ``out``, with a progress
    bar (shards, images/s) on stderr."""
    from sdtrain.launch.depth_shards import rank_and_world
    from sdtrain.utils.progress import progress

    if options.batch_size < 1:
        raise ConfigError("must be >= 1", key="--batch-size")
    names = output_names(urls)
    sources = {Path(u.removeprefix("file://")).resolve().parent for u in urls}
    if out.resolve() in sources:
        raise ConfigError(f"OUT {out} holds the input shards: choose another folder")
    rank, world = rank_and_world()
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoders = frozen_encoders(cfg, chosen, options.text)
    encoder = ShardEncoder(cfg, urls, encoders, options)
    mine = sum(1 for i in range(len(names)) if i % world == rank)
    data_log = logging.getLogger("sdtrain.data")
    level = data_log.level
    data_log.setLevel(logging.ERROR)  # bad samples are counted and summarised, not logged each
    try:
        with progress(total=mine, unit="shard", desc=f"encode {rank}/{world}") as bar:
            done, start = [0], time.perf_counter()

            def images(n: int) -> None:
                done[0] += n
                rate = done[0] / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(images=done[0], images_per_s=f"{rate:.1f}", refresh=False)

            return encode_shards(encoder, out, rank, world, images, bar.update)
    finally:
        data_log.setLevel(level)
