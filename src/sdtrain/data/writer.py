"""Write img2dataset-compatible WebDataset shards: ``<key>.jpg`` + ``.txt`` + ``.json`` per sample.

Keys follow img2dataset: 5 digits of shard number then 4 of the index in the shard
(``000120007``); shard files are ``00012.tar``. Members are written in a fixed order with fixed
metadata (mtime 0, no owner), so the same input gives byte-identical shards. Each shard is
written to a temporary name and renamed when complete: an interrupted run leaves no half shard.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class ShardWriter:
    """Appends samples to ``out_dir/{shard:05d}.tar``, starting a new shard every ``per_shard``."""

    def __init__(self, out_dir: str | Path, per_shard: int = 10000, start_shard: int = 0):
        if per_shard < 1:
            raise ValueError("per_shard must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.per_shard = per_shard
        self.shard = start_shard
        self.count = 0
        self.written: list[Path] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None

    def next_key(self) -> str:
        """The img2dataset key the next sample gets."""
        digits = max(4, len(str(self.per_shard - 1)))
        return f"{self.shard:05d}{self.count:0{digits}d}"

    def write(
        self, members: Mapping[str, bytes | str | Mapping[str, Any]], key: str | None = None
    ) -> str:
        """Add one sample; ``members`` maps extension -> bytes (str is UTF-8, a mapping is json)."""
        if self._tar is None:
            self._open()
        key = key or self.next_key()
        assert self._tar is not None
        for ext, value in members.items():
            if isinstance(value, Mapping):
                value = json.dumps(value, ensure_ascii=False)
            data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1
        if self.count >= self.per_shard:
            self._close_shard()
        return key

    def _open(self) -> None:
        final = self.out_dir / f"{self.shard:05d}.tar"
        self._tmp = final.with_suffix(".tar.partial")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 - spans write() calls

    def _close_shard(self) -> None:
        if self._tar is None or self._tmp is None:
            return
        self._tar.close()
        final = self._tmp.with_suffix("")
        with self._tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(self._tmp, final)
        self.written.append(final)
        self._tar, self._tmp = None, None
        self.shard += 1
        self.count = 0

    def close(self) -> list[Path]:
        """Finish the last shard; returns every shard written."""
        self._close_shard()
        return self.written

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and self._tar is not None and self._tmp is not None:
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
            self._tar = None
            return
        self.close()
