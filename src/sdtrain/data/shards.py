"""Shard specs, shard streams and tar iteration, with bad shards counted instead of fatal.

A spec is a brace pattern (``/data/laion/{00000..23999}.tar``), a glob (``/data/laion/*.tar``,
expanded here and sorted, for when the shell did not), a path, a directory of ``.tar`` files,
``@list.txt`` (one spec per line) or a ``pipe:`` command whose stdout is a tar stream
(``pipe:aws s3 cp s3://bucket/{00000..00999}.tar -``). Every URL is opened by webdataset's
``gopen`` (``open_shard``): ``http(s)://`` through curl, ``gs://`` through gsutil, ``s3://``
through the AWS CLI (``aws s3 cp URL -``), ``pipe:`` as a shell command.

Samples are the img2dataset layout: consecutive members sharing a key (the member name up to the
first dot of its basename), e.g. ``000000012.jpg`` + ``.txt`` + ``.json``.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shlex
import signal
import subprocess
import tarfile
import weakref
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from braceexpand import braceexpand
from webdataset.gopen import Pipe, gopen, gopen_schemes

from sdtrain.errors import ConfigError, DataError

log = logging.getLogger("sdtrain.data")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")
_GLOB = re.compile(r"[*?[]")


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
    if spec.startswith(REMOTE_PREFIXES):
        return list(braceexpand(spec))
    path = Path(spec)
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if not tars:
            raise DataError(f"directory {path} holds no .tar shards")
        return tars
    paths = list(braceexpand(spec))
    if not _GLOB.search(spec):
        return paths
    matches = [match for pattern in paths for match in sorted(glob.glob(pattern))]
    if not matches:
        raise ConfigError(f"no such file: {spec} (the pattern matches nothing)", key="data.shards")
    return matches


def check_local_shards(specs: Sequence[str], urls: Sequence[str]) -> None:
    """At start-up: a ``ConfigError`` when none of the local shard files exists (a mistyped
    path or pattern), a warning when some are missing (they are counted as unreadable while
    training, as a shard deleted mid-run is)."""
    local = [url for url in urls if not url.startswith(REMOTE_PREFIXES)]
    missing = [url for url in local if not Path(url.removeprefix("file://")).is_file()]
    if not missing:
        return
    if len(missing) == len(urls) == 1:
        raise ConfigError(f"no such file: {missing[0]}", key="data.shards")
    if len(missing) == len(urls):
        raise ConfigError(
            f"no such file: none of the {len(missing)} shard files named by {list(specs)!r} "
            f"exists (first: {missing[0]})",
            key="data.shards",
        )
    log.warning(
        "%d of the %d shard files do not exist (first: %s); they are skipped and counted as "
        "unreadable",
        len(missing),
        len(local),
        missing[0],
    )


def shard_name(url: str) -> str:
    """A short name for logs: the file name, or the command for ``pipe:``."""
    return url if url.startswith("pipe:") else Path(url.removeprefix("file://")).name


# ---------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------


# Every shard URL is opened by webdataset's ``gopen``: local paths and ``file://``, its schemes
# (``http(s)`` / ``sftp`` / ``ftps`` / ``scp`` through curl, ``gs`` through gsutil, ``ais``, ``hf``
# ...) and ``pipe:``; a command's exit status is checked by its ``Pipe`` (SIGPIPE after an early
# close is not a failure). Two entries of its scheme table are sdtrain's (SHARD_SCHEMES):
# ``pipe:`` runs webdataset's Pipe in a process group of its own with stderr kept, so that an
# ending loader worker can kill the whole command and a failure names the command's last stderr
# line; ``s3://`` (which webdataset leaves to the user) streams through ``aws s3 cp URL -``.
_LIVE_PIPES: weakref.WeakSet[Pipe] = weakref.WeakSet()
_OWN_GROUP: weakref.WeakSet[Pipe] = weakref.WeakSet()


def kill_pipe_commands() -> None:
    """SIGKILL the shard commands still running in this process (a loader worker that is
    ending): ``pipe:`` commands as whole process groups, so that none is left behind."""
    for pipe in list(_LIVE_PIPES):
        _kill(pipe)


def _kill(pipe: Pipe) -> None:
    if pipe.proc.poll() is None:
        with contextlib.suppress(OSError):
            if pipe in _OWN_GROUP:
                os.killpg(pipe.proc.pid, signal.SIGKILL)
            else:
                pipe.proc.kill()


def gopen_pipe_group(url: str, mode: str = "rb", bufsize: int = 8192) -> Pipe:
    """webdataset's ``pipe:`` handler, plus a process group of the command's own and its stderr
    kept for the error message."""
    if mode != "rb":
        raise ValueError(f"{url}: shards are read only (mode {mode})")
    pipe = Pipe(
        url[len("pipe:") :],
        mode=mode,
        shell=True,
        bufsize=bufsize,
        ignore_status=[141],  # the shell's SIGPIPE exit after an early close
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    _OWN_GROUP.add(pipe)
    return pipe


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192) -> Pipe:
    """``s3://bucket/key`` through the AWS CLI (its credentials and endpoint settings)."""
    return gopen_pipe_group(f"pipe:aws s3 cp {shlex.quote(url)} -", mode, bufsize)


SHARD_SCHEMES = {"pipe": gopen_pipe_group, "s3": gopen_s3}
gopen_schemes.update({"pipe": gopen_pipe_group})
gopen_schemes.setdefault("s3", gopen_s3)  # a handler the user registered first is kept


def open_shard(url: str) -> BinaryIO | Pipe:
    """A readable binary stream for a shard URL (``gopen``); ``ShardReadError`` when it cannot
    be opened (no such file, no handler for the scheme, the command cannot start)."""
    # file://relative/path: a path, as check_local_shards reads it (gopen would take "relative"
    # for a host)
    target = url.removeprefix("file://") if url.startswith("file://") else url
    try:
        stream = gopen(target, "rb")
    except OSError as err:
        raise ShardReadError(f"cannot open shard {url}: {err.strerror or err}") from err
    except ValueError as err:  # gopen: no handler for the scheme
        raise ShardReadError(f"cannot open shard {url}: {err}") from err
    if isinstance(stream, Pipe):
        _LIVE_PIPES.add(stream)
    return stream


def command_failure(stream: Any) -> str | None:
    """The exit status (and last stderr line) of a shard command that failed; None for files,
    commands that succeeded or still run, and those our own early close stopped."""
    if not isinstance(stream, Pipe):
        return None
    code = stream.proc.poll()
    if code is None or code < 0 or code in stream.ignore_status:
        return None
    err = stream.proc.stderr.read() if stream.proc.stderr is not None else b""
    lines = err.decode(errors="replace").strip().splitlines()
    return f"exit status {code}" + (f": {lines[-1]}" if lines else "")


def close_shard(stream: Any, finished: bool) -> str | None:
    """Close ``stream``; a command's failure (``command_failure``) when the shard was read to its
    end. After an early stop (the consumer left, or an error is on its way) a command still
    running is killed (it may never notice the closed pipe: a loop, a stalled download) and
    webdataset's status check on close is moot and ignored."""
    if not finished and isinstance(stream, Pipe):
        _kill(stream)
    try:
        stream.close()
    except OSError:
        if not finished:
            return None
    return command_failure(stream) if finished else None


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


_BLOCK = 512
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")


class _Prepended:
    """A stream with some already-read bytes put back in front (for tarfile's fallback)."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head = head
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data + (self.stream.read(size - len(data)) if len(data) < size else b"")


def _read_exact(stream: Any, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        return -1  # not a number: the checksum test rejects the header


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header."""
    for record in data.split(b"\n"):
        _, _, keyvalue = record.partition(b" ")
        key, sep, value = keyvalue.partition(b"=")
        if sep and key == b"path":
            return value.decode("utf-8", errors="replace")
    return None


def tar_members(stream: Any, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of an uncompressed tar stream, in order.

    A small reader of our own: Python's ``tarfile`` spent ~12% of the loader's time on
    per-member bookkeeping. Handles ustar, GNU long names and pax ``path`` records; compressed
    tars go through ``tarfile``.
    """
    header = _read_exact(stream, _BLOCK)
    if header.startswith(_COMPRESSED_MAGIC):
        yield from _tarfile_members(_Prepended(header, stream), url)
        return
    long_name: str | None = None
    while header:
        if len(header) < _BLOCK:
            raise ShardReadError(f"shard {url} is truncated (partial tar header)")
        if header == b"\0" * _BLOCK:
            return  # end-of-archive marker
        stored = header[148:156]
        if _octal(stored) != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardReadError(f"shard {url} is corrupt or not a tar (bad header checksum)")
        size = _octal(header[124:136])
        if size < 0:
            raise ShardReadError(f"shard {url} is corrupt (bad member size field)")
        kind = header[156:157]
        data = _read_exact(stream, size)
        if len(data) < size:
            raise ShardReadError(f"shard {url} is truncated inside a member")
        padding = -size % _BLOCK
        if padding and len(_read_exact(stream, padding)) < padding:
            raise ShardReadError(f"shard {url} is truncated after a member")
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", errors="replace")
        elif kind in (b"x", b"g"):
            long_name = _pax_path(data) if kind == b"x" else long_name
        else:
            if kind in (b"0", b"\0", b"7"):
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", errors="replace")
                prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
                if prefix:
                    name = prefix.decode("utf-8", errors="replace") + "/" + name
                yield (long_name or name), data
            long_name = None
        header = _read_exact(stream, _BLOCK)


def _tarfile_members(stream: Any, url: str) -> Iterator[tuple[str, bytes]]:
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")  # noqa: SIM115 - closed with the stream
        for info in tar:
            if not info.isfile():
                continue
            handle = tar.extractfile(info)
            data = handle.read() if handle is not None else b""
            if len(data) != info.size:
                raise ShardReadError(f"shard {url} is truncated inside {info.name}")
            yield info.name, data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ShardReadError(f"shard {url} is truncated or corrupt: {err}") from err


def iter_samples(url: str) -> Iterator[RawSample]:
    """The samples of one shard in order.

    Raises ``ShardReadError`` when the shard cannot be opened, is not a tar, breaks off
    (truncated) or its command fails: samples completed before the break have been yielded; the
    partial one is dropped.
    """
    stream = open_shard(url)
    finished = False
    failure: str | None = None
    try:
        key: str | None = None
        members: dict[str, bytes] = {}
        index = 0
        try:
            for name, data in tar_members(stream, url):
                member_key, ext = split_member_name(name)
                if member_key != key:
                    if key is not None:
                        yield RawSample(key, index, members)
                        index += 1
                    key, members = member_key, {}
                members[ext] = data
        except OSError as err:
            # webdataset's Pipe raises on a read once its command has failed
            if failed := command_failure(stream):
                raise ShardReadError(f"shard command for {url} failed ({failed})") from err
            if isinstance(err, ShardReadError):
                raise
            raise ShardReadError(f"shard {url} cannot be read: {err}") from err
        if key is not None:
            yield RawSample(key, index, members)
        finished = True
    finally:
        failure = close_shard(stream, finished)
    if failure:
        raise ShardReadError(f"shard command for {url} failed ({failure})")
