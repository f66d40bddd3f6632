"""Shard specs, shard streams and tar iteration, with bad shards counted instead of fatal.

A spec is a brace pattern (``/data/laion/{00000..23999}.tar``), a path, a directory of ``.tar``
files, ``@list.txt`` (one spec per line) or a ``pipe:`` command whose stdout is a tar stream
(``pipe:aws s3 cp s3://bucket/{00000..00999}.tar -``). ``http(s)://`` URLs are read through curl.

Samples are the img2dataset layout: consecutive members sharing a key (the member name up to the
first dot of its basename), e.g. ``000000012.jpg`` + ``.txt`` + ``.json``.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand

log = logging.getLogger("sdtrain.data")


class DataError(RuntimeError):
    """A data problem that stops the run: no shards, too few shards, too many errors."""


class ShardReadError(OSError):
    """One shard cannot be opened or read; the loader counts it and moves on."""


def expand_shards(specs: Sequence[str] | str) -> list[str]:
    """Every shard URL the specs name, in order, duplicates removed."""
    if isinstance(specs, str):
        specs = [specs]
    urls: list[str] = []
    for spec in specs:
        urls.extend(_expand_one(spec.strip()))
    unique = list(dict.fromkeys(urls))
    if not unique:
        raise DataError(f"no shards found for {list(specs)!r}")
    return unique


def _expand_one(spec: str) -> list[str]:
    if not spec:
        return []
    if spec.startswith("@"):
        listing = Path(spec[1:])
        if not listing.is_file():
            raise DataError(f"shard list file {listing} does not exist")
        lines = [line.strip() for line in listing.read_text().splitlines()]
        return [
            url for line in lines if line and not line.startswith("#") for url in _expand_one(line)
        ]
    if spec.startswith(("pipe:", "http://", "https://", "s3://", "gs://")):
        return list(braceexpand(spec))
    path = Path(spec)
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raise DataError(f"directory {path} holds no .tar shards")
        return tars
    return list(braceexpand(spec))


def shard_name(url: str) -> str:
    """A short name for logs: the file name, or the command for ``pipe:``."""
    return url if url.startswith("pipe:") else Path(url.removeprefix("file://")).name


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


class _PipeStream:
    """stdout of a shell command; closing it waits for the command and reports its failure."""

    def __init__(self, command: str) -> None:
        self.command = command
        self.process = subprocess.Popen(
            command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.process.stdout is not None
        self.stdout: BinaryIO = self.process.stdout  # type: ignore[assignment]

    def read(self, size: int = -1) -> bytes:
        return self.stdout.read(size)

    def close(self) -> None:
        self.stdout.close()
        self.process.wait()

    def failure(self) -> str | None:
        """The command's exit status and stderr when it failed (after ``close``)."""
        code = self.process.returncode
        if code in (0, None) or code < 0:  # < 0: killed by our own close of the pipe
            return None
        assert self.process.stderr is not None
        err = self.process.stderr.read().decode(errors="replace").strip().splitlines()
        return f"exit status {code}" + (f": {err[-1]}" if err else "")


def open_shard(url: str) -> BinaryIO | _PipeStream:
    """A readable binary stream for a shard URL; ``ShardReadError`` when it cannot be opened."""
    if url.startswith("pipe:"):
        return _PipeStream(url[len("pipe:") :])
    if url.startswith(("http://", "https://")):
        return _PipeStream(f"curl -fsSL {shlex.quote(url)}")
    path = Path(url.removeprefix("file://"))
    try:
        return path.open("rb")
    except OSError as err:
        raise ShardReadError(f"cannot open shard {url}: {err.strerror or err}") from err


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@dataclass
class RawSample:
    """One sample's members as bytes, before any decoding; ``index`` counts samples in the shard."""

    key: str
    index: int
    members: dict[str, bytes]


def split_member_name(name: str) -> tuple[str, str]:
    """``dir/000012.depth.png`` -> (``dir/000012``, ``depth.png``)."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def iter_samples(url: str) -> Iterator[RawSample]:
    """The samples of one shard in order.

    Raises ``ShardReadError`` when the shard cannot be opened, is not a tar, or breaks off
    (truncated): samples completed before the break have been yielded; the partial one is dropped.
    """
    stream = open_shard(url)
    failure: str | None = None
    try:
        try:
            tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 - closed with the stream
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ShardReadError(f"shard {url} is not a readable tar: {err}") from err
        key: str | None = None
        members: dict[str, bytes] = {}
        index = 0
        try:
            for info in tar:
                if not info.isfile():
                    continue
                member_key, ext = split_member_name(info.name)
                if member_key != key:
                    if key is not None:
                        yield RawSample(key, index, members)
                        index += 1
                    key, members = member_key, {}
                handle = tar.extractfile(info)
                members[ext] = handle.read() if handle is not None else b""
                if handle is not None and len(members[ext]) != info.size:
                    raise ShardReadError(f"shard {url} is truncated inside {info.name}")
        except (tarfile.TarError, EOFError, OSError) as err:
            raise ShardReadError(f"shard {url} is truncated or corrupt: {err}") from err
        if key is not None:
            yield RawSample(key, index, members)
    finally:
        stream.close()
        if isinstance(stream, _PipeStream):
            failure = stream.failure()
    if failure:
        raise ShardReadError(f"shard command for {url} failed ({failure})")
