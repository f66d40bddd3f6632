"""The one error type every config problem surfaces as: it names the key and the file at fault."""

from __future__ import annotations


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
