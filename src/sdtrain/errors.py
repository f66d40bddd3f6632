"""The error classes every layer raises: the one home of sdtrain's error types.

Each names the thing at fault (a config key and file, a checkpoint file) so the CLI can print one
line and exit without a traceback.
"""

from __future__ import annotations

import os


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, written or loaded; the message names the file."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        self.message = message
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)

    def at(self, path: str | os.PathLike[str]) -> CheckpointError:
        """Return the same error attributed to ``path`` (for helpers that do not know the file)."""
        return type(self)(self.message, path)


class WriteError(CheckpointError):
    """A file (checkpoint, export, sample image, config copy) that could not be written; the
    message says why (no space left, read-only, permission) and that any previous file at that
    path is unchanged. ``reason`` is the why alone (``no space left on device``)."""

    def __init__(
        self, message: str, path: str | os.PathLike[str] | None = None, reason: str = ""
    ) -> None:
        super().__init__(message, path)
        self.reason = reason or message


class ConfigError(ValueError):
    """A config value, key or combination that cannot be used.

    ``key`` is the dotted path (``model.unet.context_dim``) once known; component ``__post_init__``
    checks raise it with the bare field name and the loader prefixes the path and the source file.
    """

    def __init__(self, message: str, key: str | None = None, source: str | None = None) -> None:
        self.message = message
        self.key = key
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = ", ".join(part for part in (self.source, self.key and f"key '{self.key}'") if part)
        return f"{where}: {self.message}" if where else self.message

    def at(self, prefix: str | None = None, source: str | None = None) -> ConfigError:
        """Return a copy whose key is prefixed with ``prefix`` and whose source is ``source``."""
        key = ".".join(part for part in (prefix, self.key) if part) or None
        return ConfigError(self.message, key=key, source=source or self.source)


class DataError(RuntimeError):
    """A data problem that stops the run: no shards, too few shards, too many errors."""


class RunFolderLocked(RuntimeError):
    """Another live ``sdtrain`` process holds the run folder's lock; the message names it (host,
    pid, SLURM job id)."""


class RunInterrupted(BaseException):
    """A run stopped by a signal before it finished.

    A ``BaseException`` (as ``KeyboardInterrupt``), so that no ``except Exception`` on the way out
    (a bad-sample counter, a retry) takes it for an ordinary error. ``checkpoint`` is the one
    written for the stop (None: nothing had been trained since the last one, or no step ended in
    time); ``requeued``: SLURM will restart the job, which resumes by itself.
    """

    def __init__(
        self,
        signum: int,
        message: str,
        step: int | None = None,
        checkpoint: os.PathLike[str] | None = None,
        requeued: bool = False,
        received: tuple[int, ...] = (),
    ) -> None:
        self.signum = signum
        self.received = received or (signum,)
        """Every signal that came, in order."""
        self.message = message
        self.step = step
        self.checkpoint = checkpoint
        self.requeued = requeued
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        """0 when SLURM requeues the job, else 128 + the signal number (143 for SIGTERM)."""
        return 0 if self.requeued else 128 + self.signum

    def with_message(self, message: str) -> RunInterrupted:
        return RunInterrupted(self.signum, message, self.step, self.checkpoint, self.requeued,
                              self.received)  # fmt: skip
