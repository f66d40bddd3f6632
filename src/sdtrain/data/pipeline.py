"""The resumable LAION pipeline: shards -> filters -> shuffle buffer -> decode / crop / mask ->
batches, one stream per (rank, dataloader worker).

Exact resumption by a deterministic scheme. Each worker reads a fixed list of shards per epoch
(seeded permutation, split by rank and worker), keeps a shuffle buffer of *undecoded* samples and
draws from it with its own seeded generator. Its position is small: the epoch, the shard and the
sample offset it reads next, the identities ``(epoch, shard, index)`` of the samples in its buffer
and the generator state. Every batch carries the position after it; ``LaionLoader`` keeps the
latest one per worker, and a loader rebuilt from that state re-reads just the shards the buffered
samples came from (usually one) and continues with exactly the next sample. Crops, flips and masks
are seeded per sample from ``(seed, epoch, shard, index)``, so they do not depend on the layout.

Bad input never kills a worker: unreadable shards, truncated tars, corrupt images and undecodable
json are counted per kind with the sample's key and logged; a cap on the error rate stops the run
with a clear message, so a broken mount cannot silently train on nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from sdtrain.data.augment import build_augment
from sdtrain.data.buckets import UPSCALE_REASON, Bucket, BucketBatcher, BucketSet, fingerprint_part
from sdtrain.data.config import DataConfig
from sdtrain.data.filters import DataStats, MetadataFilter, explain_rejections
from sdtrain.data.folder import MASK_MEMBER, FolderSource, list_folder, load_mask
from sdtrain.data.latents import LatentDecodeError, latent_sample
from sdtrain.data.masks import MaskGenerator, build_mask_generator
from sdtrain.data.shards import (
    DataError,
    RawSample,
    ShardReadError,
    check_local_shards,
    expand_shards,
    iter_samples,
    shard_name,
)
from sdtrain.data.transforms import (
    CropInfo,
    ImageDecodeError,
    image_size,
    load_depth,
    load_image,
    normalize_caption,
)
from sdtrain.data.workers import WorkerControl
from sdtrain.errors import ConfigError

log = logging.getLogger("sdtrain.data")

STATE_KEY = "__state__"
ERROR_KEY = "__error__"
DRAW_TIME_REASONS = ("depth", UPSCALE_REASON)
"""Rejections decided after the shuffle buffer (when the sample is decoded), not by metadata."""
END_KEY = "__end__"
LOADER_STATE_KEY = "__loader_state__"
WORKER_KEY = "__worker__"
SampleRef = tuple[int, int, int]  # (epoch, position in the worker's shard list, index in shard)


# ---------------------------------------------------------------------------------------------
# Which worker reads which shards
# ---------------------------------------------------------------------------------------------


class ShardSource:
    """How streams read ``data.source: shards``: tar shards (``FolderSource``, in
    ``data/folder.py``, reads a folder's images the same way, one "shard" per image)."""

    unit = "shard"

    def read(self, url: str) -> Iterator[RawSample]:
        return iter_samples(url)

    def name(self, url: str) -> str:
        return shard_name(url)

    def where(self, url: str, key: str) -> str:
        """A sample as logs and error counters name it."""
        return f"{shard_name(url)}/{key}"

    def error_kind(self, err: ShardReadError) -> str:
        return "shard_truncated" if "truncated" in str(err) else "shard_unreadable"

    def problem(self, raw: RawSample) -> tuple[str, str] | None:
        """(error kind, reason) of a sample unusable before any filter; none for shards."""
        return None

    empty_passes = 1
    """Passes in a row that yield nothing before a stream gives up (``FolderSource``: more)."""


SampleSource = ShardSource | FolderSource


class ShardPlan:
    """Shard lists of every (rank, worker) per epoch: a seeded permutation, dealt round-robin.

    Every stream needs a shard of its own, so a rank runs at most as many workers as it has
    shards (``workers`` may be below the ``requested`` number: one shard, one worker); more ranks
    than shards is an error. ``source`` reads a shard (with ``data.source: folder`` a "shard" is
    one image file).
    """

    def __init__(
        self,
        urls: list[str],
        cfg: DataConfig,
        rank: int,
        world_size: int,
        workers: int,
        source: SampleSource | None = None,
    ):
        self.urls = urls
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.requested = max(workers, 1)
        self.source = source if source is not None else ShardSource()
        if len(urls) < world_size:
            unit = self.source.unit
            raise DataError(
                f"{len(urls)} {unit}(s) for {world_size} rank(s) x {self.requested} dataloader "
                "worker(s): every rank needs at least one shard of its own. Use more (smaller) "
                "shards or fewer ranks (trainer.devices x trainer.num_nodes)."
            )
        # The same count on every rank, so that the deal below is the same everywhere.
        self.workers = min(self.requested, len(urls) // world_size)

    def reduction_note(self) -> str | None:
        """A line for the log when fewer workers run than ``data.num_workers`` asked for."""
        if self.workers == self.requested:
            return None
        return (
            f"{len(self.urls)} shard(s) for {self.world_size} rank(s): using {self.workers} "
            f"dataloader worker(s) per rank instead of data.num_workers={self.cfg.num_workers} "
            "(every worker reads shards of its own; more shards allow more workers)"
        )

    def worker_shards(self, epoch: int, worker: int) -> list[int]:
        """Indices into ``urls`` read by ``worker`` of this rank in ``epoch``."""
        order = np.arange(len(self.urls))
        if self.cfg.shuffle_shards:
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(order)
        stream = self.rank * self.workers + worker
        return order[stream :: self.world_size * self.workers].tolist()

    def fingerprint(self) -> str:
        """Changes when the shards, the split or anything that decides the sample order changes."""
        c = self.cfg
        text = json.dumps(
            [self.urls, self.world_size, self.workers, c.seed, c.shuffle_shards, c.resampled,
             c.shuffle_buffer, c.batch_size, dataclasses.asdict(c.filters)]
            # only when on, so that runs without buckets keep their fingerprints
            + ([fingerprint_part(c.buckets, c.image.height, c.image.out_width)]
               if c.buckets.enabled else [])
        )  # fmt: skip
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# One worker's stream
# ---------------------------------------------------------------------------------------------


@dataclass
class WorkerPosition:
    """Where one worker stands; JSON-friendly so it can live in checkpoints."""

    epoch: int = 0
    shard_pos: int = 0
    """Position in this epoch's shard list of the shard read next."""
    sample_pos: int = 0
    """Samples of that shard already read."""
    buffer: list[SampleRef] = field(default_factory=list)
    """The samples in the shuffle buffer, in buffer order."""
    rng: dict[str, Any] | None = None
    """State of the shuffle generator (None: fresh)."""
    buckets: list[SampleRef] = field(default_factory=list)
    """The samples held in the per-bucket buffers (``data.buckets``), in arrival order."""
    stats: dict[str, Any] = field(default_factory=dict)
    """``DataStats.to_dict()`` of this worker so far."""

    def to_dict(self) -> dict[str, Any]:
        """A snapshot; written by hand because ``dataclasses.asdict`` deep-copies every buffer
        entry, which cost ~6% of the loader's time."""
        return {
            "epoch": self.epoch,
            "shard_pos": self.shard_pos,
            "sample_pos": self.sample_pos,
            "buffer": list(self.buffer),
            "rng": self.rng,
            "stats": self.stats,
            "buckets": list(self.buckets),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerPosition:
        return cls(
            **{
                **data,
                "buffer": [tuple(ref) for ref in data.get("buffer", [])],
                "buckets": [tuple(ref) for ref in data.get("buckets", [])],
            }
        )


class _Stopped(Exception):
    """The loader is shutting its workers down: the stream ends early."""


@dataclass
class _Pass:
    """One pass (epoch) of a worker, read from its start: samples that passed the filters and,
    of those drawn from the buffer, how many were unusable (no usable one seen yet)."""

    passed: int = 0
    unusable: int = 0
    read_done: bool = False


@dataclass
class _Pending:
    """A sample that passed the filters, waiting in the shuffle buffer."""

    ref: SampleRef
    url_index: int
    raw: RawSample
    caption: str


class WorkerStream:
    """Reads, filters, shuffles and decodes the samples of one worker, batch by batch."""

    def __init__(
        self,
        cfg: DataConfig,
        plan: ShardPlan,
        worker: int,
        position: WorkerPosition,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.cfg = cfg
        self.plan = plan
        self.worker = worker
        self.pos = position
        self.stopping = stopping
        """True once the loader shuts its workers down: the stream ends at the next sample."""
        self.passes: dict[int, _Pass] = {}
        self.empty_in_a_row = 0
        """Passes in a row that yielded nothing usable (``_another_pass``)."""
        """The passes (epochs) this stream reads from their start, until one sample is usable."""
        self.stats = DataStats.from_dict(position.stats)
        self.filter = MetadataFilter(cfg.filters)
        self.rng = np.random.default_rng([cfg.seed, plan.rank, worker])
        if position.rng is not None:
            self.rng.bit_generator.state = position.rng
        image = cfg.image
        self.size = (image.height, image.out_width)
        """(h, w) of every sample without buckets."""
        self.buckets = BucketSet(cfg.buckets, *self.size) if cfg.buckets.enabled else None
        self.batcher: BucketBatcher[dict[str, Any]] = BucketBatcher(cfg.batch_size)
        self._masks: dict[tuple[int, int], MaskGenerator] = {}
        self.masks = self._mask_generator(self.size) if cfg.masks.enabled else None
        self.augment = build_augment(cfg.augment, *self.size) if cfg.augment else None
        """The mask generator at ``self.size`` (buckets: one per bucket, ``_mask_generator``)."""

    # --- reading ----------------------------------------------------------------------------

    def _shards(self, epoch: int) -> list[int]:
        return self.plan.worker_shards(epoch, self.worker)

    def _read_shard(self, url_index: int, skip: int) -> Iterator[RawSample]:
        """Samples of one shard from ``skip`` on; an unreadable shard is counted, not raised."""
        url = self.plan.urls[url_index]
        try:
            for raw in self.plan.source.read(url):
                if self.stopping():
                    raise _Stopped
                if raw.index >= skip:
                    yield raw
        except ShardReadError as err:
            self._shard_error(url, err)

    def _shard_error(self, url: str, err: ShardReadError) -> None:
        self.stats.seen += 1
        self._error(self.plan.source.error_kind(err), self.plan.source.name(url), str(err))

    def _parse(self, raw: RawSample, url: str) -> str | None:
        """The normalised caption if the sample passes the filters, else None (counted)."""
        where = self.plan.source.where(url, raw.key)
        problem = self.plan.source.problem(raw)
        if problem is not None:
            self._error(problem[0], where, problem[1])
            return None
        meta: dict[str, Any] = {}
        if "json" in raw.members:
            try:
                meta = json.loads(raw.members["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                self._error("bad_json", where, str(err))
                return None
            if not isinstance(meta, dict):
                self._error("bad_json", where, "the json member is not an object")
                return None
        text = raw.members.get(self.cfg.caption_key)
        if text is not None:
            caption = normalize_caption(text.decode("utf-8", errors="replace"))
        elif isinstance(meta.get("caption"), str):
            caption = normalize_caption(meta["caption"])
        elif self.cfg.filters.require_caption:
            self._error("missing_caption", where, f"no .{self.cfg.caption_key} member")
            return None
        else:
            caption = ""
        verdict = self.filter.verdict(meta, caption)
        if verdict is not None:
            self.stats.reject(*verdict)
            return None
        return caption

    def _kept_samples(self) -> Iterator[_Pending]:
        """Samples that pass the filters, from the current position on, advancing it."""
        read_this_epoch = kept_this_epoch = 0
        if self.pos.shard_pos >= len(self._shards(self.pos.epoch)):
            # The last pass is complete (epoch mode, iterated again): the next one starts.
            self.pos.epoch += 1
            self.pos.shard_pos = self.pos.sample_pos = 0
        while True:
            shards = self._shards(self.pos.epoch)
            # Only a pass read from its start here can tell that the whole pass yields nothing.
            whole = self.pos.shard_pos == 0 and self.pos.sample_pos == 0
            tally = _Pass()
            if whole:
                self.passes[self.pos.epoch] = tally
            while self.pos.shard_pos < len(shards):
                url_index = shards[self.pos.shard_pos]
                for raw in self._read_shard(url_index, self.pos.sample_pos):
                    self.pos.sample_pos = raw.index + 1
                    self.stats.seen += 1
                    read_this_epoch += 1
                    self._check_error_rate()
                    caption = self._parse(raw, self.plan.urls[url_index])
                    if caption is not None:
                        kept_this_epoch += 1
                        tally.passed += 1
                        ref = (self.pos.epoch, self.pos.shard_pos, raw.index)
                        yield _Pending(ref, url_index, raw, caption)
                self.pos.shard_pos += 1
                self.pos.sample_pos = 0
            if whole:
                self._check_pass(len(shards), read_this_epoch, tally)
            if not self.cfg.resampled:
                return
            self.pos.epoch += 1
            self.pos.shard_pos = 0
            read_this_epoch = kept_this_epoch = 0

    def _check_pass(self, shards: int, read: int, tally: _Pass) -> None:
        """A full pass that read nothing (or kept nothing) would loop forever in infinite mode
        (in epoch mode the loader tells whether the rank as a whole yielded nothing)."""
        if read == 0 and not self._another_pass():
            raise DataError(
                f"worker {self.worker} of rank {self.plan.rank}: none of its {shards} shard(s) "
                f"could be read in epoch {self.pos.epoch}. Recent errors: "
                + "; ".join(self.stats.recent_errors[-3:])
            )
        if read == 0:
            self.passes.pop(self.pos.epoch, None)
            return
        tally.read_done = True
        if tally.passed == 0 and self.cfg.resampled and not self._another_pass():
            raise DataError(
                f"worker {self.worker} of rank {self.plan.rank}: no sample of {read} passed the "
                f"filters in a full pass over its {shards} shard(s); "
                + explain_rejections(self.stats, self.cfg)
            )
        if tally.passed == 0:
            self.passes.pop(self.pos.epoch, None)

    def _count_drawn(self, pending: _Pending, usable: bool) -> None:
        """After a sample left the buffer: a pass whose every sample that passed the filters
        proved unusable (no depth map, broken images) yields nothing; infinite mode would spin."""
        epoch = pending.ref[0]
        if usable:
            self.empty_in_a_row = 0
        tally = self.passes.get(epoch)
        if tally is None:
            return
        if usable:
            del self.passes[epoch]  # this pass yields something: no more to check
            return
        tally.unusable += 1
        if tally.read_done and tally.unusable == tally.passed and self.cfg.resampled:
            if self._another_pass():
                del self.passes[epoch]
                return
            raise DataError(
                f"worker {self.worker} of rank {self.plan.rank}: none of the {tally.passed} "
                f"sample(s) that passed the filters in a full pass could be used; "
                + explain_rejections(self.stats, self.cfg, reasons=DRAW_TIME_REASONS)
            )

    def _another_pass(self) -> bool:
        """Counts a pass that yielded nothing; whether another may follow. Shards: never (the
        data yields nothing). A folder deals every stream a fresh share of its files each epoch,
        so a share of broken files is no reason to stop until ``empty_passes`` in a row."""
        self.empty_in_a_row += 1
        return self.empty_in_a_row < self.plan.source.empty_passes

    def _restore_buffer(self) -> list[_Pending]:
        """Re-read the samples the saved buffer held, from the shards they came from."""
        restored = self._reread(self.pos.buffer, "shuffle buffer")
        self.pos.buffer = [p.ref for p in restored]
        return restored

    def _restore_buckets(self) -> Iterator[list[dict[str, Any]]]:
        """Re-read and re-prepare the samples the saved bucket buffers held (their crops and
        masks are seeded per sample, so they come back as they were); full buckets (a changed
        setup) come out at once."""
        restored = self._reread(self.pos.buckets, "bucket buffers")
        self.pos.buckets = []
        saved = self.stats
        self.stats = DataStats()  # counted when they were first prepared
        try:
            prepared = [(p, self._prepare(p)) for p in restored]
        finally:
            self.stats = saved
        for pending, sample in prepared:
            if sample is not None:
                full = self._add_to_bucket(pending, sample)
                if full is not None:
                    yield full

    def _reread(self, refs: list[SampleRef], what: str) -> list[_Pending]:
        """The samples ``refs`` (of a saved position), read again from their shards."""
        wanted: dict[tuple[int, int], set[int]] = {}
        for epoch, shard_pos, index in refs:
            wanted.setdefault((epoch, shard_pos), set()).add(index)
        found: dict[SampleRef, _Pending] = {}
        for (epoch, shard_pos), indices in wanted.items():
            url_index = self._shards(epoch)[shard_pos]
            url = self.plan.urls[url_index]
            try:
                for raw in self.plan.source.read(url):
                    if self.stopping():
                        raise _Stopped
                    if raw.index in indices:
                        ref = (epoch, shard_pos, raw.index)
                        caption = self._parse_quietly(raw, url)
                        found[ref] = _Pending(ref, url_index, raw, caption)
                        if len(found) == len(refs):
                            break
            except ShardReadError as err:
                self._shard_error(url, err)
        missing = [ref for ref in refs if ref not in found]
        if missing:
            self._changed_shards(missing, len(refs), what)
        return [found[ref] for ref in refs if ref in found]

    def _changed_shards(
        self, missing: list[SampleRef], saved: int, what: str = "shuffle buffer"
    ) -> None:
        """Samples of the saved buffer that are gone from their shards: an error, or with
        ``data.on_changed_shards=skip`` dropped from the buffer (the rest resumes as saved)."""
        shards = sorted(
            {
                self.plan.source.name(self.plan.urls[self._shards(epoch)[pos]])
                for epoch, pos, _ in missing
            }
        )
        what = (
            f"{len(missing)} of the {saved} samples in the saved {what} "
            f"of worker {self.worker} of rank {self.plan.rank} are no longer in their shards "
            f"({', '.join(shards[:3])}{' ...' if len(shards) > 3 else ''}): the shards changed "
            "since the checkpoint"
        )
        if self.cfg.on_changed_shards == "error":
            raise DataError(
                f"cannot resume: {what}. Restore the shards, or set data.on_changed_shards=skip "
                "to drop those samples and carry on."
            )
        log.warning("%s; dropped them (data.on_changed_shards=skip) and carrying on", what)

    def _parse_quietly(self, raw: RawSample, url: str) -> str:
        """Caption of a sample that passed the filters before; counted already, so not again."""
        saved = self.stats
        self.stats = DataStats()
        try:
            return self._parse(raw, url) or ""
        finally:
            self.stats = saved

    # --- shuffling, decoding, batching ------------------------------------------------------

    def _shuffled(self) -> Iterator[_Pending]:
        buffer = self._restore_buffer()
        source = self._kept_samples()
        size = max(self.cfg.shuffle_buffer, 1)
        exhausted = False
        while True:
            while not exhausted and len(buffer) < size:
                pending = next(source, None)
                if pending is None:
                    exhausted = True
                else:
                    buffer.append(pending)
            if not buffer:
                return
            pick = int(self.rng.integers(len(buffer))) if len(buffer) > 1 else 0
            buffer[pick], buffer[-1] = buffer[-1], buffer[pick]
            chosen = buffer.pop()
            self.pos.buffer = [p.ref for p in buffer]
            yield chosen

    def _sample_rng(self, pending: _Pending) -> np.random.Generator:
        epoch, _, index = pending.ref
        return np.random.default_rng([self.cfg.seed, epoch, pending.url_index, index])

    def _prepare(self, pending: _Pending) -> dict[str, Any] | None:
        """Decode, crop, mask: the model-ready (uint8) sample, or None when it is unusable."""
        raw = pending.raw
        where = self.plan.source.where(self.plan.urls[pending.url_index], raw.key)
        if self.cfg.latents:  # latent shards (``sdtrain data encode``): no image to decode
            return self._prepare_latents(pending, where)
        data = next((raw.members[k] for k in self.cfg.image_keys if k in raw.members), None)
        if data is None:
            self._error("missing_image", where, f"none of {self.cfg.image_keys} present")
            return None
        rng = self._sample_rng(pending)
        try:
            size = self.size if self.buckets is None else self._bucket_size(raw, data)
            if size is None:
                self.stats.reject(UPSCALE_REASON)
                return None
            image, info = load_image(data, self.cfg.image, rng, size)
        except ImageDecodeError as err:
            self._error("bad_image", where, str(err))
            return None
        sample: dict[str, Any] = {
            "image": image,  # (3, H, W) uint8
            "caption": pending.caption,
            "key": raw.key,
            "original_size": torch.tensor(info.original_size),  # (h, w)
            "crop_top_left": torch.tensor(info.crop_top_left),  # (top, left)
        }
        if self.buckets is not None:
            sample["bucket_size"] = torch.tensor(size)  # (h, w)
        if self.cfg.masks.enabled:
            mask = self._mask(raw, info, where, size, rng)
            if mask is None:
                return None
            sample["mask"] = mask  # (1, H, W) uint8 {0, 1}
        if self.cfg.depth.enabled:
            depth = self._depth(raw, info, where, size)
            if depth is None:
                return None
            sample["depth"] = depth
        if self.cfg.loss_mask:  # data.loss_mask: the pixels the loss counts (1), from the file
            loss_mask = self._loss_mask(raw, info, where, size)
            if loss_mask is None:
                return None
            sample["loss_mask"] = loss_mask  # (1, H, W) uint8 {0, 1}
        if self.augment is not None:  # data.augment: image, mask and depth map together
            self._augment(sample, rng)
        return sample

    def _loss_mask(
        self, raw: RawSample, info: CropInfo, where: str, size: tuple[int, int]
    ) -> torch.Tensor | None:
        """The sample's mask file cropped like its image, else every pixel counts."""
        if MASK_MEMBER not in raw.members:
            return torch.ones(1, *size, dtype=torch.uint8)
        try:
            return load_mask(raw.members[MASK_MEMBER], info, *size)
        except ImageDecodeError as err:
            self._error("bad_mask", where, str(err))
            return None

    def _mask(
        self,
        raw: RawSample,
        info: CropInfo,
        where: str,
        size: tuple[int, int],
        rng: np.random.Generator,
    ) -> torch.Tensor | None:
        """The sample's own mask (a ``mask.png`` member: a folder's ``<name>.mask.png``) cropped
        like its image, else a generated one; a mask file that does not decode is counted."""
        if MASK_MEMBER not in raw.members:
            return torch.from_numpy(self._mask_generator(size)(rng).mask)[None]
        try:
            return load_mask(raw.members[MASK_MEMBER], info, *size)
        except ImageDecodeError as err:
            self._error("bad_mask", where, str(err))
            return None

    def _augment(self, sample: dict[str, Any], rng: np.random.Generator) -> None:
        assert self.augment is not None
        image, masks, depth = self.augment(
            sample["image"], rng, [sample[k] for k in ("mask", "loss_mask") if k in sample],
            sample.get("depth"),
        )  # fmt: skip
        sample["image"] = image
        for key, mask in zip([k for k in ("mask", "loss_mask") if k in sample], masks, strict=True):
            sample[key] = mask
        if depth is not None:
            sample["depth"] = depth

    def _prepare_latents(self, pending: _Pending, where: str) -> dict[str, Any] | None:
        """A latent sample (``data.latents``): stored moments and crops, the flip and the mask
        drawn here in that order; a bad member is counted like a bad image."""
        rng = self._sample_rng(pending)
        try:
            sample = latent_sample(pending.raw.members, self.cfg, rng, where)
        except LatentDecodeError as err:
            self._error("bad_latent", where, str(err))
            return None
        sample["caption"], sample["key"] = pending.caption, pending.raw.key
        if self.cfg.masks.enabled:  # at the stored size (buckets: that of the sample's bucket)
            size = tuple(sample["bucket_size"].tolist()) if self.buckets else self.size
            mask = self._mask_generator(size)(rng).mask
            sample["mask"] = torch.from_numpy(mask)[None]  # (1, H, W) uint8
        return sample

    def _bucket_size(self, raw: RawSample, data: bytes) -> tuple[int, int] | None:
        """(h, w) of the sample's bucket, from the json's width / height when present (no
        decode), else the image header; None when it needs more than ``max_upscale``."""
        assert self.buckets is not None
        width = height = None
        if "json" in raw.members:
            meta = json.loads(raw.members["json"])  # parsed (and checked) by the filters before
            width, height = meta.get("width"), meta.get("height")
        if not (_positive(width) and _positive(height)):
            width, height = image_size(data)
        bucket = self.buckets.place(width, height)
        return None if bucket is None else (bucket.height, bucket.width)

    def _mask_generator(self, size: tuple[int, int]) -> MaskGenerator:
        """The mask generator of one output size (h, w), built once."""
        generator = self._masks.get(size)
        if generator is None:
            generator = self._masks[size] = build_mask_generator(self.cfg.masks, *size)
        return generator

    def _add_to_bucket(
        self, pending: _Pending, sample: dict[str, Any]
    ) -> list[dict[str, Any]] | None:
        """Hold a prepared sample in its bucket's buffer; the bucket's batch once it is full."""
        h, w = (int(x) for x in sample["bucket_size"])
        full = self.batcher.add(Bucket(w, h), pending.ref, sample)
        self.pos.buckets = list(self.batcher.refs())
        return full

    def _depth(
        self, raw: RawSample, info: CropInfo, where: str, size: tuple[int, int] | None = None
    ) -> torch.Tensor | None:
        cfg = self.cfg.depth
        size = size or self.size
        suffix = next((k for k in cfg.keys if k in raw.members), None)
        if suffix is None:
            if cfg.missing == "reject":
                self.stats.reject("depth", missing=True)
                return None
            return torch.zeros(1, *size)
        try:
            return load_depth(raw.members[suffix], suffix, info, *size)
        except ImageDecodeError as err:
            self._error("bad_depth", where, str(err))
            return None

    def samples(self) -> Iterator[tuple[RawSample, dict[str, Any]]]:
        """Model-ready samples in stream order, each with the raw sample it was made from
        (``sdtrain data encode`` copies its other members); unusable ones are counted."""
        for pending in self._shuffled():
            sample = self._prepare(pending)
            self._count_drawn(pending, usable=sample is not None)
            if sample is None:
                continue
            self.stats.kept += 1
            yield pending.raw, sample

    def batches(self) -> Iterator[dict[str, Any]]:
        """Collated batches, each with this worker's position after it under ``__state__``."""
        if self.buckets is not None:
            yield from self._bucket_batches()
            return
        batch: list[dict[str, Any]] = []
        for _, sample in self.samples():
            batch.append(sample)
            if len(batch) == self.cfg.batch_size:
                yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)

    def _bucket_batches(self) -> Iterator[dict[str, Any]]:
        """``batches`` with buckets: a batch leaves when its bucket's buffer is full; at the end
        of a pass (epoch mode) the partly filled buffers leave too."""
        for full in self._restore_buckets():
            yield self._emit(full)
        for pending in self._shuffled():
            sample = self._prepare(pending)
            self._count_drawn(pending, usable=sample is not None)
            if sample is not None:
                full = self._add_to_bucket(pending, sample)
                if full is not None:
                    yield self._emit(full)
        for rest in self.batcher.drain():
            self.pos.buckets = list(self.batcher.refs())
            yield self._emit(rest)

    def _emit(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        self.stats.kept += len(samples)
        for sample in samples:
            h, w = (int(x) for x in sample["bucket_size"])
            self.stats.buckets[Bucket(w, h).name] += 1
        return self._collate(samples)

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        out = default_collate(samples)
        out[STATE_KEY] = self.snapshot()
        out[WORKER_KEY] = self.worker
        return out

    def snapshot(self) -> dict[str, Any]:
        """The position now, generator state and counters included."""
        self.pos.rng = self.rng.bit_generator.state
        self.pos.stats = self.stats.to_dict()
        return self.pos.to_dict()

    # --- errors -----------------------------------------------------------------------------

    def _error(self, kind: str, where: str, reason: str) -> None:
        self.stats.error(kind, where, reason)
        count = self.stats.error_count
        # Every error is counted; the log names the first ones, then every 100th (a bad sample
        # recurs every epoch in infinite mode and would flood the log).
        if count <= 20 or count % 100 == 0:
            log.warning("skipping %s (%s, error %d of this worker): %s", where, kind, count, reason)
        self._check_error_rate()

    def _check_error_rate(self) -> None:
        stats, cfg = self.stats, self.cfg
        if stats.seen < cfg.error_rate_min_samples or not stats.error_count:
            return
        rate = stats.error_count / stats.seen
        if rate > cfg.max_error_rate:
            raise DataError(
                f"{stats.error_count} of {stats.seen} samples read by worker {self.worker} of rank "
                f"{self.plan.rank} were unusable ({rate:.1%} > data.max_error_rate "
                f"{cfg.max_error_rate:.1%}); by kind: {dict(stats.errors)}. Recent: "
                + "; ".join(stats.recent_errors[-3:])
                + ". Check the shards and the storage mount, or raise data.max_error_rate."
            )


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


# ---------------------------------------------------------------------------------------------
# Dataset and loader
# ---------------------------------------------------------------------------------------------


class LaionDataset(IterableDataset):
    """What each DataLoader worker runs: its ``WorkerStream``, batches included.

    Besides batches a worker sends two kinds of item the loader consumes itself: a data error
    (``ERROR_KEY``, raised again by the loader as a ``DataError`` without the worker's
    traceback) and, in epoch mode, its position at the end of its pass (``END_KEY``).
    """

    def __init__(
        self,
        cfg: DataConfig,
        plan: ShardPlan,
        positions: dict[int, WorkerPosition],
        rotation: int,
        control: WorkerControl | None = None,
        finished: frozenset[int] = frozenset(),
    ) -> None:
        self.cfg = cfg
        self.plan = plan
        self.positions = positions
        self.rotation = rotation
        self.control = control
        self.finished = finished
        """Workers whose pass ended before the checkpoint this iteration resumes: they stay done."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # Rotating makes physical worker 0 the logical worker whose batch comes next, since the
        # DataLoader always starts its round-robin at worker 0.
        worker = (physical + self.rotation) % self.plan.workers
        position = self.positions.get(worker, WorkerPosition())
        stopping = self.control.stopping if self.control is not None else (lambda: False)
        stream = WorkerStream(self.cfg, self.plan, worker, position, stopping)
        try:
            if worker not in self.finished:
                yield from stream.batches()
        except _Stopped:
            return
        except DataError as err:
            yield {ERROR_KEY: str(err)}
            return
        if not self.cfg.resampled:
            yield {END_KEY: True, STATE_KEY: stream.snapshot(), WORKER_KEY: worker}


_NOTED: set[str] = set()


def check_shards(cfg: DataConfig, world_size: int) -> ShardPlan:
    """The start-up check of a training run, before any work: shards configured, listed, local
    files present (``ConfigError``), at least one per rank (``DataError``). Rank 0's plan.
    With ``data.source: folder``: the folder set and holding images (``ConfigError``)."""
    if cfg.source == "folder":
        return plan_shards(cfg, 0, world_size)
    if not cfg.shards:
        raise ConfigError(
            "no shards configured: point it at .tar shards (a folder, a file, a pattern)",
            key="data.shards",
        )
    urls = expand_shards(cfg.shards)
    check_local_shards(cfg.shards, urls)
    return plan_shards(cfg, 0, world_size, urls)


def plan_shards(
    cfg: DataConfig, rank: int = 0, world_size: int = 1, urls: list[str] | None = None
) -> ShardPlan:
    """The shards listed and split for ``rank``: ``DataError`` when there are none or fewer
    than ranks; a note in the log (once per process) when fewer workers run than configured.
    Every shard (folder: every image) is listed ``data.repeats`` times."""
    source: SampleSource = ShardSource()
    if cfg.source == "folder":
        urls, source = (list_folder(cfg) if urls is None else urls), FolderSource.of(cfg)
    elif not cfg.shards:
        raise DataError("no shards configured: set data.shards")
    else:
        urls = expand_shards(cfg.shards) if urls is None else urls
    plan = ShardPlan(urls * cfg.repeats, cfg, rank, world_size, cfg.num_workers, source)
    note = plan.reduction_note() if cfg.num_workers else None
    if note is not None and note not in _NOTED:
        _NOTED.add(note)
        log.warning("%s", note)
    return plan


class LaionLoader:
    """Batches of one rank, with ``position`` / ``restore`` for exact resumption.

    (Deliberately not ``state_dict``: Lightning would save that itself, one prefetched batch
    ahead of the batch last trained on.)

    ``attach_state`` adds the loader state after each batch to the batch itself, for consumers
    that prefetch (the loader's own ``position()`` is then ahead of what was trained on).

    Each batch is a dict: ``image`` (B, 3, H, W) uint8, ``caption`` list[str], ``key``,
    ``original_size`` (B, 2), ``crop_top_left`` (B, 2), and ``mask`` (B, 1, H, W) uint8 for
    inpainting, ``depth`` (B, 1, H, W) float in [-1, 1] for depth models; with ``data.buckets``
    ``bucket_size`` (B, 2) as (h, w), one bucket per batch (H, W vary between batches).
    """

    def __init__(
        self,
        cfg: DataConfig,
        rank: int = 0,
        world_size: int = 1,
        state: Mapping[str, Any] | None = None,
        pin_memory: bool = False,
        attach_state: bool = False,
    ) -> None:
        self.cfg = cfg
        self.plan = plan_shards(cfg, rank, world_size)
        self.pin_memory = pin_memory
        self.attach_state = attach_state
        self.positions: dict[int, WorkerPosition] = {}
        self.rotation = 0
        self.batches = 0
        if state is not None:
            self.restore(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        finished = self._finished_workers()
        # Epoch mode, resumed mid-pass: the workers done before the checkpoint stay done until
        # the next iteration, as they would have without the interruption.
        started = [p for w, p in self.positions.items() if w not in finished]
        resumed_mid_pass = any(
            p.buffer or p.buckets or p.shard_pos or p.sample_pos for p in started
        )
        workers = self.plan.workers if self.cfg.num_workers else 0
        control = WorkerControl() if workers else None
        dataset = LaionDataset(
            self.cfg,
            self.plan,
            dict(self.positions),
            self.rotation,
            control,
            finished if resumed_mid_pass else frozenset(),
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            worker_init_fn=control,
        )
        delivered = 0
        batches = iter(loader)
        try:
            for batch in batches:
                if ERROR_KEY in batch:
                    raise DataError(batch[ERROR_KEY])
                worker = int(batch.pop(WORKER_KEY))
                self.positions[worker] = WorkerPosition.from_dict(batch.pop(STATE_KEY))
                if END_KEY in batch:
                    continue
                self.batches += 1
                delivered += 1
                if self.attach_state:
                    # The trainer prefetches: it saves the state of the batch it trained on last.
                    batch[LOADER_STATE_KEY] = self.position()
                yield batch
        finally:
            if control is not None:
                control.stop()  # before torch's shutdown, which ends busy workers by SIGTERM
            # Now rather than when the iterator is collected (it lives in reference cycles):
            # torch asks the workers to stop, waits, then SIGTERMs the busy ones.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if not delivered and not resumed_mid_pass:
            # Epoch mode: Lightning would start the next epoch, and the next, without end.
            raise DataError(
                f"a full pass over the {len(self.plan.urls)} shard(s) of rank {self.plan.rank} "
                "yielded no sample; " + explain_rejections(self.stats, self.cfg)
            )

    def _finished_workers(self) -> frozenset[int]:
        """Workers whose saved position is at the end of their pass with an empty buffer."""
        done = set()
        for worker, position in self.positions.items():
            shards = self.plan.worker_shards(position.epoch, worker)
            if not position.buffer and not position.buckets and position.shard_pos >= len(shards):
                done.add(worker)
        return frozenset(done)

    @property
    def stats(self) -> DataStats:
        """Counters summed over the workers, as of the last batch delivered."""
        total = DataStats()
        for position in self.positions.values():
            total = total.merge(DataStats.from_dict(position.stats))
        return total

    def position(self) -> dict[str, Any]:
        """Everything needed to continue with exactly the next batch."""
        return {
            "version": 1,
            "fingerprint": self.plan.fingerprint(),
            "rank": self.plan.rank,
            "world_size": self.plan.world_size,
            "num_workers": self.plan.workers,
            "next_worker": (self.rotation + self.batches) % self.plan.workers,
            "workers": {str(w): p.to_dict() for w, p in self.positions.items()},
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue where ``state`` left off; a changed data setup starts the next epoch fresh."""
        if (
            state.get("fingerprint") != self.plan.fingerprint()
            or state.get("rank") != self.plan.rank
        ):
            epochs = [p.get("epoch", 0) for p in state.get("workers", {}).values()]
            restart = max(epochs, default=-1) + 1
            log.warning(
                "data setup changed since the checkpoint (shards, ranks, workers, seed, batch "
                "size or filters); the data stream restarts at epoch %d instead of resuming "
                "exactly",
                restart,
            )
            self.positions = {w: WorkerPosition(epoch=restart) for w in range(self.plan.workers)}
            self.rotation = self.batches = 0
            return
        self.positions = {
            int(w): WorkerPosition.from_dict(p) for w, p in state.get("workers", {}).items()
        }
        self.rotation = int(state["next_worker"])
        self.batches = 0
