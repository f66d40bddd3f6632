"""Reading and writing weight files: the one place sdtrain opens a torch pickle or a safetensors
file, and the one atomic writer every output goes through.

Rules kept here so no caller has to remember them:
- a torch file is only ever opened with ``torch.load(weights_only=True)`` and a small allowlist of
  data-only globals (``data_only_globals``); a file that needs code is refused, and no message
  ever suggests ``weights_only=False``;
- every write goes to a temp file in the target's folder, is fsynced, gets the permissions the
  umask gives a new file (0644 under umask 022; safetensors' writer would leave 0600), and is
  renamed over the target, then the folder is fsynced: readers see the old file or the new one;
- a file written with an ``integrity`` record gets a sidecar ``<name>.integrity.json`` (size and
  sha256 of the file, plus the caller's fields) written before the rename; ``load_torch``
  verifies the file against it whenever it exists;
- OS errors become ``WriteError`` / ``CheckpointError`` messages that name the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import Tensor

from sdtrain.errors import CheckpointError, WriteError

PathLike = str | os.PathLike[str]

INTEGRITY_SUFFIX = ".integrity.json"
_HASH_CHUNK = 8 << 20
# A temp file is `.<target name>.<host>.<pid>.<random>.tmp`; older sdtrain wrote
# `.<target name>.<pid>.tmp` (no host: this machine).
_TEMP_RES = (
    re.compile(r"^\.(?P<target>.+)\.(?P<host>[\w-]+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp$"),
    re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.tmp$"),
)
# A temp file from another machine is taken as abandoned once it has not changed for this long
# (a live writer keeps appending; the run-folder lock keeps two runs from sharing a folder).
FOREIGN_TEMP_GRACE_S = 600.0


# ---------------------------------------------------------------------------------------------
# Reading torch files
# ---------------------------------------------------------------------------------------------


class InertLightningClass:
    """Stands in for a Lightning callback class that old Lightning checkpoints (the released SD
    ones among them) use as a dict key in ``callbacks``. Unpickling yields this inert class; no
    Lightning code is imported or run."""


# Pickled names that only rebuild data, never run code: numpy scalars (e.g. a numpy
# ``global_step``), their dtypes, and the Lightning callback classes named as dict keys.
_LIGHTNING_CLASS_NAMES = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.early_stopping.EarlyStopping",
)

_REFUSAL_ADVICE = (
    "We never execute pickled code (torch.load weights_only=True). If the file comes from "
    "a source you trust, convert it to .safetensors with a trusted tool and load that."
)


def data_only_globals() -> list[object]:
    """The allowlist handed to ``torch.load(weights_only=True)`` on top of torch's own."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.float16)
    numeric += (np.float32, np.float64)
    allowed: list[object] = [
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
        np.dtype,
        *(type(np.dtype(kind)) for kind in numeric),
    ]
    allowed += [(InertLightningClass, name) for name in _LIGHTNING_CLASS_NAMES]
    return allowed


def check_readable(path: Path) -> None:
    """A regular, non-empty file, or a ``CheckpointError`` saying what it is instead."""
    if not path.exists():
        raise CheckpointError("file not found", path)
    if not path.is_file():
        raise CheckpointError("not a regular file", path)
    if path.stat().st_size == 0:
        raise CheckpointError("file is empty (0 bytes); it was probably not written fully", path)


def load_torch(
    path: PathLike, *, map_location: object = "cpu", verify: bool = True, mmap: bool = True
) -> object:
    """``torch.load`` without running pickled code; verifies the integrity record if any.

    Zip files (what ``torch.save`` writes) are memory-mapped unless ``mmap=False``: a multi-GB
    checkpoint is not read twice into RAM. Errors name the file and say whether it is damaged,
    not a torch file at all, or wants to run code.
    """
    path = Path(path)
    check_readable(path)
    if verify:
        verify_integrity(path)
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and not _starts_like_a_pickle(path):
        raise CheckpointError(
            "is not a checkpoint: it is neither a zip archive (what torch.save writes) nor a "
            "legacy torch pickle",
            path,
        )
    try:
        with torch.serialization.safe_globals(data_only_globals()), warnings.catch_warnings():
            # A damaged legacy file claims odd pickle protocols; the error below says enough.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(
                path, map_location=map_location, weights_only=True, mmap=is_zip and mmap
            )
    except pickle.UnpicklingError as err:
        raise _pickle_refusal(path, err) from None
    except Exception as err:  # torch surfaces corruption as RuntimeError, EOFError, KeyError...
        if is_zip:
            message = "cannot be read as a torch checkpoint: the archive is truncated or corrupt"
        else:
            message = "is not a checkpoint, or is a truncated or corrupt legacy torch file"
        raise CheckpointError(f"{message} ({_detail(err)})", path) from None


def _starts_like_a_pickle(path: Path) -> bool:
    # A legacy (pre-zip) torch file is a sequence of pickles, each starting with PROTO (0x80).
    with path.open("rb") as handle:
        return handle.read(1) == b"\x80"


def _pickle_refusal(path: Path, err: pickle.UnpicklingError) -> CheckpointError:
    # weights_only reports both forbidden globals and unreadable opcodes as UnpicklingError;
    # only the former means the file wants to run code.
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    if match:
        return CheckpointError(
            f"refusing to load: unpickling it would import and run {match.group(1)!r}. "
            + _REFUSAL_ADVICE,
            path,
        )
    detail = _detail(str(err).split("WeightsUnpickler error:")[-1])
    return CheckpointError(
        f"is not a checkpoint, or is corrupt: its pickle was not written by torch.save ({detail})",
        path,
    )


def _detail(err: BaseException | str) -> str:
    """The first line of an error, without torch's advice to load with ``weights_only=False``."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else (repr(err) if isinstance(err, BaseException) else "")
    if "weights_only" in first or "Weights only" in first:
        first = "not loadable as data only"
    name = type(err).__name__ if isinstance(err, BaseException) else ""
    return f"{name}: {first}" if name else first


# ---------------------------------------------------------------------------------------------
# safetensors
# ---------------------------------------------------------------------------------------------


def read_safetensors(path: PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors (on CPU) and the header metadata of a ``.safetensors`` file."""
    path = Path(path)
    check_readable(path)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            # safe_open handles are not iterable, hence .keys().
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(
            f"cannot be read as safetensors, the file is truncated or corrupt ({_detail(err)})",
            path,
        ) from None
    return tensors, metadata


def write_safetensors(
    path: PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Atomically write ``tensors`` (see ``writable_tensors``) with string ``metadata``."""
    header = dict(metadata or {})
    prepared = writable_tensors(tensors, Path(path))
    return write_atomic(
        path, lambda tmp: safetensors.torch.save_file(prepared, str(tmp), metadata=header)
    )


def writable_tensors(tensors: Mapping[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors, none sharing storage with another.

    safetensors refuses shared or overlapping storage, and torch.save would write the whole
    storage behind a small view (e.g. a slice of a flat FSDP/EMA buffer).
    """
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"entry {key!r} is a {type(value).__name__}, not a tensor", path)
        if value.is_meta:
            raise CheckpointError(f"entry {key!r} is on the meta device and has no data", path)
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        whole = storage.nbytes() == tensor.numel() * tensor.element_size()
        if storage.data_ptr() in seen or not whole:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def save_torch(
    path: PathLike, obj: object, *, integrity: Mapping[str, object] | None = None
) -> Path:
    """Atomically ``torch.save`` ``obj``; ``integrity``: write a verified sidecar record too."""
    return write_atomic(path, lambda tmp: torch.save(obj, tmp), integrity=integrity)


# ---------------------------------------------------------------------------------------------
# The atomic writer
# ---------------------------------------------------------------------------------------------


def write_text(path: PathLike, text: str) -> Path:
    """Atomically write a text file (UTF-8)."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_atomic(
    path: PathLike,
    write: Callable[[Path], object],
    *,
    integrity: Mapping[str, object] | None = None,
) -> Path:
    """``write(tmp)`` into a temp file in the same folder, fsync it, give it the permissions the
    umask grants (``0o666 & ~umask``), then rename it over ``path`` and fsync the folder.

    ``os.replace`` within one filesystem is atomic, so readers see the old file or the new one.
    With ``integrity`` the sidecar record (size, sha256 and those fields) is written first, so a
    file under its final name always has the record that matches it. Failures raise
    ``WriteError`` naming the file and the cause; no temp file is left behind.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        reason = "is a file, not a folder" if folder.exists() else "does not exist"
        raise WriteError(f"cannot write here: the folder {str(folder)!r} {reason}", path)
    tmp = temp_path(path)
    try:
        # O_EXCL: never write through someone else's file; 0o666 lets the umask decide.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        write(tmp)
        _fsync(tmp)
        # Writers that replace the file (safetensors) leave it 0600: set what the umask gives.
        os.chmod(tmp, 0o666 & ~current_umask())
        sidecar = integrity_path(path)
        if integrity is not None:
            record = {"file": path.name, **file_digest(tmp), **dict(integrity)}
            write_atomic(sidecar, lambda t: Path(t).write_text(json.dumps(record, indent=1)))
        elif sidecar.exists():
            sidecar.unlink()  # a record of the file this one replaces would not match it
        os.replace(tmp, path)
    except BaseException as err:
        # Judged before the temp file goes: deleting it frees the space that ran out.
        reason = _short_write(err, folder) if isinstance(err, Exception) else ""
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, CheckpointError):
            raise WriteError(
                f"{reason} while writing it; any previous file at this path is unchanged",
                path,
                reason=reason,
            ) from err
        raise
    # Make the rename itself durable; some filesystems cannot fsync a folder, which is harmless.
    with contextlib.suppress(OSError):
        _fsync(folder)
    return path


def cannot_write(path: PathLike) -> str | None:
    """Why ``path`` could not be written (its folder is created if missing), or None if it can:
    lets a command refuse an unwritable output before doing any work."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder"
    existing = next((p for p in path.parents if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"cannot write {path}: {existing} is a file, not a folder"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = temp_path(path)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as err:
        return f"cannot write {path}: {describe_os_error(err)}"
    return None


def describe_os_error(err: BaseException) -> str:
    """What went wrong while writing, in words (the file is named by the caller)."""
    code = err.errno if isinstance(err, OSError) else None
    words = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOTDIR: "a part of the path is a file, not a folder",
        errno.EISDIR: "the path is a folder",
    }
    if code in words:
        return words[code]
    if isinstance(err, RuntimeError) and "unexpected pos" in str(err):
        # torch's zip writer reports a short write (disk full) this way.
        return "the file could not be written fully (no space left on device?)"
    return f"writing failed ({_detail(err)})"


def _short_write(err: BaseException, folder: Path) -> str:
    words = describe_os_error(err)
    if not isinstance(err, OSError):
        # torch's C++ writer hides the errno: a full disk is told by its free space.
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < (1 << 20):
                return "no space left on device"
    return words


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (threads may be writing)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Temp files of writers that died
# ---------------------------------------------------------------------------------------------


def _host() -> str:
    return re.sub(r"[^\w-]", "-", socket.gethostname().split(".")[0]) or "host"


def temp_path(path: Path) -> Path:
    """The temp file name used while writing ``path``: hidden, beside it, naming the writer."""
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def stale_temp_files(folder: PathLike) -> list[Path]:
    """Temp files in ``folder`` whose writer is gone: a dead process on this machine, or a file
    from another machine untouched for ``FOREIGN_TEMP_GRACE_S``. Temp folders count too (an FSDP
    checkpoint is a folder written under a temp name: ``trainer/fsdp.py``)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = []
    for entry in folder.iterdir():
        match = next((m for r in _TEMP_RES if (m := r.match(entry.name))), None)
        if not match or not (entry.is_file() or entry.is_dir()):
            continue
        host = match.groupdict().get("host")
        pid = int(match.group("pid"))
        if host is None or host == _host():
            if not _alive(pid):
                stale.append(entry)
        elif time.time() - entry.stat().st_mtime > FOREIGN_TEMP_GRACE_S:
            stale.append(entry)
    return sorted(stale)


def remove_stale_temp_files(folder: PathLike) -> list[Path]:
    """Delete ``stale_temp_files(folder)`` (a temp folder with what it holds); returns what was
    removed."""
    removed = []
    for entry in stale_temp_files(folder):
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Integrity records
# ---------------------------------------------------------------------------------------------

# (device, inode, size, mtime) of files already verified in this process: resuming verifies the
# checkpoint when choosing it and Lightning loads it again; hashing twice buys nothing.
_verified: set[tuple[int, int, int, int]] = set()


def integrity_path(path: PathLike) -> Path:
    """The sidecar record of ``path``: ``<name>.integrity.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + INTEGRITY_SUFFIX)


def file_digest(path: PathLike) -> dict[str, object]:
    """``{"size": bytes, "sha256": hex}`` of a file."""
    digest = hashlib.sha256()
    size = 0
    with Path(path).open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def read_integrity(path: PathLike) -> dict[str, object] | None:
    """The sidecar record of ``path``, or None when there is none; a broken one is an error."""
    sidecar = integrity_path(path)
    try:
        text = sidecar.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CheckpointError(
            f"its integrity record cannot be read ({_detail(err)})", path
        ) from None
    try:
        record = json.loads(text)
        if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
            raise ValueError("no sha256 entry")
    except ValueError as err:
        raise CheckpointError(
            f"its integrity record {sidecar.name} is damaged ({err}); the file cannot be verified",
            path,
        ) from None
    return record


def verify_integrity(path: PathLike) -> bool:
    """Check ``path`` against its record: True when verified, False when it has no record.

    A mismatch raises ``CheckpointError`` saying how the file differs from what was written.
    """
    path = Path(path)
    record = read_integrity(path)
    if record is None:
        return False
    stat = path.stat()
    key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return True
    size = record.get("size")
    if isinstance(size, int) and size != stat.st_size:
        raise CheckpointError(
            f"is {stat.st_size:,} bytes but {size:,} were written (integrity record "
            f"{integrity_path(path).name}): the file is truncated or was replaced",
            path,
        )
    actual = file_digest(path)["sha256"]
    if actual != record["sha256"]:
        raise CheckpointError(
            f"does not match its integrity record {integrity_path(path).name} (sha256 "
            f"{str(actual)[:12]}... instead of {str(record['sha256'])[:12]}...): the file was "
            "damaged or changed after it was written",
            path,
        )
    _verified.add(key)
    return True


# ---------------------------------------------------------------------------------------------
# JSON files and whole folders (diffusers-format model folders)
# ---------------------------------------------------------------------------------------------


def read_json(path: PathLike) -> object:
    """The parsed content of a JSON file; a missing, unreadable or malformed one is a
    ``CheckpointError`` naming it."""
    path = Path(path)
    check_readable(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"cannot be read ({_detail(err)})", path) from None
    except ValueError as err:
        raise CheckpointError(f"is not valid JSON ({_detail(err)})", path) from None


def write_json(path: PathLike, obj: object) -> Path:
    """Atomically write ``obj`` as indented JSON (keys in the given order)."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def write_folder_atomic(path: PathLike, fill: Callable[[Path], object]) -> Path:
    """Create the folder ``path`` by ``fill(tmp)`` into a hidden sibling folder that is renamed
    onto ``path`` when complete: readers never see a half-written folder. ``path`` must not exist
    or be an empty folder; folders get the permissions the umask gives."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        what = "a file" if not path.is_dir() else "a folder that is not empty"
        raise WriteError(f"is {what}; choose a new output folder", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.mkdir()
        fill(tmp)
        if path.is_dir():
            path.rmdir()
        os.rename(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise WriteError(
                f"{describe_os_error(err)} while writing the folder", path,
                reason=describe_os_error(err),
            ) from err  # fmt: skip
        raise
    with contextlib.suppress(OSError):
        _fsync(path.parent)
    return path
