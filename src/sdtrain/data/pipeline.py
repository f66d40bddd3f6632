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
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from sdtrain.data.config import DataConfig
from sdtrain.data.filters import DataStats, MetadataFilter
from sdtrain.data.masks import build_mask_generator
from sdtrain.data.shards import (
    DataError,
    RawSample,
    ShardReadError,
    expand_shards,
    iter_samples,
    shard_name,
)
from sdtrain.data.transforms import (
    CropInfo,
    ImageDecodeError,
    load_depth,
    load_image,
    normalize_caption,
)

log = logging.getLogger("sdtrain.data")

STATE_KEY = "__state__"
LOADER_STATE_KEY = "__loader_state__"
WORKER_KEY = "__worker__"
SampleRef = tuple[int, int, int]  # (epoch, position in the worker's shard list, index in shard)


# ---------------------------------------------------------------------------------------------
# Which worker reads which shards
# ---------------------------------------------------------------------------------------------


class ShardPlan:
    """Shard lists of every (rank, worker) per epoch: a seeded permutation, dealt round-robin."""

    def __init__(self, urls: list[str], cfg: DataConfig, rank: int, world_size: int, workers: int):
        self.urls = urls
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.workers = max(workers, 1)
        streams = self.world_size * self.workers
        if len(urls) < streams:
            raise DataError(
                f"{len(urls)} shard(s) for {world_size} rank(s) x {self.workers} dataloader "
                f"worker(s) = {streams} streams: every stream needs at least one shard. Use more "
                "(smaller) shards or fewer data.num_workers."
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
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WorkerPosition:
        return cls(**{**data, "buffer": [tuple(ref) for ref in data.get("buffer", [])]})


@dataclass
class _Pending:
    """A sample that passed the filters, waiting in the shuffle buffer."""

    ref: SampleRef
    url_index: int
    raw: RawSample
    caption: str


class WorkerStream:
    """Reads, filters, shuffles and decodes the samples of one worker, batch by batch."""

    def __init__(self, cfg: DataConfig, plan: ShardPlan, worker: int, position: WorkerPosition):
        self.cfg = cfg
        self.plan = plan
        self.worker = worker
        self.pos = position
        self.stats = DataStats.from_dict(position.stats)
        self.filter = MetadataFilter(cfg.filters)
        self.rng = np.random.default_rng([cfg.seed, plan.rank, worker])
        if position.rng is not None:
            self.rng.bit_generator.state = position.rng
        image = cfg.image
        self.masks = (
            build_mask_generator(cfg.masks, image.height, image.out_width)
            if cfg.masks.enabled
            else None
        )

    # --- reading ----------------------------------------------------------------------------

    def _shards(self, epoch: int) -> list[int]:
        return self.plan.worker_shards(epoch, self.worker)

    def _read_shard(self, url_index: int, skip: int) -> Iterator[RawSample]:
        """Samples of one shard from ``skip`` on; an unreadable shard is counted, not raised."""
        url = self.plan.urls[url_index]
        try:
            for raw in iter_samples(url):
                if raw.index >= skip:
                    yield raw
        except ShardReadError as err:
            kind = "shard_truncated" if "truncated" in str(err) else "shard_unreadable"
            self.stats.seen += 1
            self._error(kind, shard_name(url), str(err))

    def _parse(self, raw: RawSample, url: str) -> str | None:
        """The normalised caption if the sample passes the filters, else None (counted)."""
        where = f"{shard_name(url)}/{raw.key}"
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
        reason = self.filter.rejection(meta, caption)
        if reason is not None:
            self.stats.reject(reason)
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
                        ref = (self.pos.epoch, self.pos.shard_pos, raw.index)
                        yield _Pending(ref, url_index, raw, caption)
                self.pos.shard_pos += 1
                self.pos.sample_pos = 0
            self._check_progress(len(shards), read_this_epoch, kept_this_epoch)
            if not self.cfg.resampled:
                return
            self.pos.epoch += 1
            self.pos.shard_pos = 0
            read_this_epoch = kept_this_epoch = 0

    def _check_progress(self, shards: int, read: int, kept: int) -> None:
        """A full pass that read nothing (or kept nothing) would loop forever in infinite mode."""
        if read == 0 and self.pos.sample_pos == 0:
            raise DataError(
                f"worker {self.worker} of rank {self.plan.rank}: none of its {shards} shard(s) "
                f"could be read in epoch {self.pos.epoch}. Recent errors: "
                + "; ".join(self.stats.recent_errors[-3:])
            )
        if kept == 0 and read > 0 and self.cfg.resampled:
            raise DataError(
                f"worker {self.worker} of rank {self.plan.rank}: no sample of {read} passed the "
                f"filters in a full pass over {shards} shard(s) (rejected: "
                f"{dict(self.stats.rejected)}, errors: {dict(self.stats.errors)}); check "
                "data.filters against the shards' metadata"
            )

    def _restore_buffer(self) -> list[_Pending]:
        """Re-read the samples the saved buffer held, from the shards they came from."""
        wanted: dict[tuple[int, int], set[int]] = {}
        for epoch, shard_pos, index in self.pos.buffer:
            wanted.setdefault((epoch, shard_pos), set()).add(index)
        found: dict[SampleRef, _Pending] = {}
        for (epoch, shard_pos), indices in wanted.items():
            url_index = self._shards(epoch)[shard_pos]
            url = self.plan.urls[url_index]
            for raw in iter_samples(url):
                if raw.index in indices:
                    ref = (epoch, shard_pos, raw.index)
                    caption = self._parse_quietly(raw, url)
                    found[ref] = _Pending(ref, url_index, raw, caption)
                    if len(found) == len(self.pos.buffer):
                        break
        missing = [ref for ref in self.pos.buffer if ref not in found]
        if missing:
            raise DataError(
                f"cannot resume worker {self.worker}: samples {missing[:3]} of its saved shuffle "
                "buffer are no longer in their shards (were the shards changed?)"
            )
        return [found[ref] for ref in self.pos.buffer]

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
        where = f"{shard_name(self.plan.urls[pending.url_index])}/{raw.key}"
        data = next((raw.members[k] for k in self.cfg.image_keys if k in raw.members), None)
        if data is None:
            self._error("missing_image", where, f"none of {self.cfg.image_keys} present")
            return None
        rng = self._sample_rng(pending)
        try:
            image, info = load_image(data, self.cfg.image, rng)
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
        if self.masks is not None:
            mask = self.masks(rng).mask
            sample["mask"] = torch.from_numpy(mask)[None]  # (1, H, W) uint8 {0, 1}
        if self.cfg.depth.enabled:
            depth = self._depth(raw, info, where)
            if depth is None:
                return None
            sample["depth"] = depth
        return sample

    def _depth(self, raw: RawSample, info: CropInfo, where: str) -> torch.Tensor | None:
        cfg = self.cfg.depth
        suffix = next((k for k in cfg.keys if k in raw.members), None)
        if suffix is None:
            if cfg.missing == "reject":
                self.stats.reject("depth")
                return None
            return torch.zeros(1, self.cfg.image.height, self.cfg.image.out_width)
        try:
            image = self.cfg.image
            return load_depth(raw.members[suffix], suffix, info, image.height, image.out_width)
        except ImageDecodeError as err:
            self._error("bad_depth", where, str(err))
            return None

    def batches(self) -> Iterator[dict[str, Any]]:
        """Collated batches, each with this worker's position after it under ``__state__``."""
        batch: list[dict[str, Any]] = []
        for pending in self._shuffled():
            sample = self._prepare(pending)
            if sample is None:
                continue
            batch.append(sample)
            self.stats.kept += 1
            if len(batch) == self.cfg.batch_size:
                yield self._collate(batch)
                batch = []
        if batch:
            yield self._collate(batch)

    def _collate(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        out = default_collate(samples)
        self.pos.rng = self.rng.bit_generator.state
        self.pos.stats = self.stats.to_dict()
        out[STATE_KEY] = self.pos.to_dict()
        out[WORKER_KEY] = self.worker
        return out

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


# ---------------------------------------------------------------------------------------------
# Dataset and loader
# ---------------------------------------------------------------------------------------------


class LaionDataset(IterableDataset):
    """What each DataLoader worker runs: its ``WorkerStream``, batches included."""

    def __init__(
        self, cfg: DataConfig, plan: ShardPlan, positions: dict[int, WorkerPosition], rotation: int
    ) -> None:
        self.cfg = cfg
        self.plan = plan
        self.positions = positions
        self.rotation = rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # Rotating makes physical worker 0 the logical worker whose batch comes next, since the
        # DataLoader always starts its round-robin at worker 0.
        worker = (physical + self.rotation) % self.plan.workers
        position = self.positions.get(worker, WorkerPosition())
        yield from WorkerStream(self.cfg, self.plan, worker, position).batches()


def ignore_preemption_signals(worker_id: int) -> None:
    """SLURM signals every process of a job step: the workers must leave SIGUSR1 / SIGTERM to
    the trainer (which checkpoints and requeues), not die of them and take the run down."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class LaionLoader:
    """Batches of one rank, with ``position`` / ``restore`` for exact resumption.

    (Deliberately not ``state_dict``: Lightning would save that itself, one prefetched batch
    ahead of the batch last trained on.)

    ``attach_state`` adds the loader state after each batch to the batch itself, for consumers
    that prefetch (the loader's own ``position()`` is then ahead of what was trained on).

    Each batch is a dict: ``image`` (B, 3, H, W) uint8, ``caption`` list[str], ``key``,
    ``original_size`` (B, 2), ``crop_top_left`` (B, 2), and ``mask`` (B, 1, H, W) uint8 for
    inpainting, ``depth`` (B, 1, H, W) float in [-1, 1] for depth models.
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
        if not cfg.shards:
            raise DataError("no shards configured: set data.shards")
        self.cfg = cfg
        self.plan = ShardPlan(expand_shards(cfg.shards), cfg, rank, world_size, cfg.num_workers)
        self.pin_memory = pin_memory
        self.attach_state = attach_state
        self.positions: dict[int, WorkerPosition] = {}
        self.rotation = 0
        self.batches = 0
        if state is not None:
            self.restore(state)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = LaionDataset(self.cfg, self.plan, dict(self.positions), self.rotation)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            worker_init_fn=ignore_preemption_signals,
        )
        for batch in loader:
            worker = int(batch.pop(WORKER_KEY))
            self.positions[worker] = WorkerPosition.from_dict(batch.pop(STATE_KEY))
            self.batches += 1
            if self.attach_state:
                # The trainer prefetches: it saves the state of the batch it trained on last.
                batch[LOADER_STATE_KEY] = self.position()
            yield batch

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
