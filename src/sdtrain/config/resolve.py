"""The one resolver of shipped config names: ``tiny-base`` -> ``configs/models/tiny-base.yaml``.

The shipped ``configs/`` folder sits beside ``src/`` in a checkout or an editable install; its
sub-folders are the kinds: ``models/``, ``data/``, ``experiments/``, ``demo/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sdtrain.errors import ConfigError

Kind = Literal["models", "data", "experiments", "demo"]
_NOUN = {"models": "model", "data": "data", "experiments": "experiment", "demo": "demo"}


def configs_dir(kind: Kind | None = None) -> Path:
    """The shipped ``configs/`` folder, or one kind's folder in it."""
    root = Path(__file__).resolve().parents[3] / "configs"
    return root / kind if kind else root


def shipped_names(kind: Kind) -> list[str]:
    """The short names of one kind's shipped configs, sorted."""
    return sorted(p.stem for p in configs_dir(kind).glob("*.yaml"))


def resolve_config_path(name: str | Path, kind: Kind = "models") -> Path:
    """A path as given (a ``.yaml`` name or an existing file), or a shipped config of ``kind`` by
    short name (``tiny-base``, ``sd15``, ``laion-sd15-inpainting``, ...)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    shipped = configs_dir(kind) / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(
        f"no config file {str(name)!r} and no shipped {_NOUN[kind]} config of that name "
        f"({shipped_names(kind)})"
    )
