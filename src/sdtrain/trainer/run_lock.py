"""One writer per run folder: ``RUN/sdtrain.lock``, an exclusive ``flock`` held while ``fit`` runs.

The file names its holder (host, pid, SLURM job id, start time) so that a second ``sdtrain fit``
on the same ``run.dir`` can say who has it. The kernel drops the lock when its process dies, so
the lock of a crashed or killed run is stale by construction: the next run takes it over and says
whose it was. A restart of the same SLURM job (a requeue) waits a little for its previous
incarnation to let go. Only global rank 0 takes the lock (every rank of one run shares the folder).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sdtrain.errors import ConfigError, RunFolderLocked
from sdtrain.utils.files import describe_os_error

log = logging.getLogger("sdtrain.trainer")
LOCK_NAME = "sdtrain.lock"
REQUEUE_WAIT_S = 60.0
"""How long a requeued SLURM job waits for its previous incarnation to release the lock."""


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    job: str
    started: str

    @classmethod
    def me(cls) -> LockHolder:
        return cls(socket.gethostname(), os.getpid(), slurm_job_id(),
                   time.strftime("%Y-%m-%d %H:%M:%S"))  # fmt: skip

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        return f"host {self.host}, pid {self.pid}{job}, since {self.started}"

    def alive_here(self) -> bool | None:
        """Whether the holder's process runs (None: it is on another host, which we cannot see)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def slurm_job_id() -> str:
    """This job's id (array jobs: ``<array job>_<task>``), or '' outside SLURM."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID", "")


def _read_holder(fd: int) -> LockHolder | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        data = json.loads(raw.decode())
        return LockHolder(str(data["host"]), int(data["pid"]), str(data.get("job", "")),
                          str(data.get("started", "?")))  # fmt: skip
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return None


class RunLock:
    """``with RunLock(folder) as lock:`` holds the folder's lock; ``lock.notes`` says what it found
    (a stale lock taken over). Raises ``RunFolderLocked`` (exit code 2) naming the live holder."""

    def __init__(self, folder: Path, requeue_wait_s: float = REQUEUE_WAIT_S) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.requeue_wait_s = requeue_wait_s
        self.notes: list[str] = []
        self._fd: int | None = None

    def check_free(self) -> None:
        """Raise ``RunFolderLocked`` now if a live run holds the folder, writing nothing (so a
        second start fails at once, before its other checks); a requeue of the same SLURM job is
        left to ``acquire``, which waits for its predecessor."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # no lock file (or not readable): acquire decides
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                mine = slurm_job_id()
                if not (holder is not None and mine and holder.job == mine):
                    raise RunFolderLocked(self._held_message(holder)) from None
            except OSError:
                return  # no file locks here: acquire logs it
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)  # umask applies
        except OSError as err:
            raise ConfigError(
                f"run folder {self.folder} cannot be used: {describe_os_error(err)}",
                key="run.dir",
            ) from None
        try:
            self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        previous = _read_holder(fd)
        if previous is not None:
            self.notes.append(
                f"run folder lock: took over the stale lock of {previous.describe()} (that "
                "process has ended)"
            )
        me = LockHolder.me()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(asdict(me)) + "\n").encode(), 0)
        os.fsync(fd)

    def _lock(self, fd: int) -> None:
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            except OSError as err:
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    log.warning("the file system of %s has no file locks: two runs in one folder "
                                "are not detected", self.folder)  # fmt: skip
                    return
                raise
            holder = _read_holder(fd)
            mine = slurm_job_id()
            if holder is not None and mine and holder.job == mine:
                # A requeued job whose previous incarnation has not quite let go yet.
                deadline = deadline or time.monotonic() + self.requeue_wait_s
                if time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
            raise RunFolderLocked(self._held_message(holder))

    def _held_message(self, holder: LockHolder | None) -> str:
        if holder is None:
            return (f"run folder {self.folder} is in use by another sdtrain process (its lock "
                    f"file {self.path} names no holder yet); set run.dir / run.name for a "
                    "second run")  # fmt: skip
        text = f"run folder {self.folder} is in use by another sdtrain run ({holder.describe()})"
        if holder.alive_here() is False:
            text += (
                "; that process has ended but a child of it (a data-loader worker?) still holds "
                f"{self.path}: end it (`fuser -v {self.path}`) and start again"
            )
        else:
            text += "; wait for it to end, or set run.dir / run.name for a second run"
        return text

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # an unlocked, empty file: nobody holds it
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
