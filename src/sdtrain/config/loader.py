"""Load configs into a given dataclass: YAML files merged in order (each with its ``include:``
files), then ``key=value`` overrides, checked against the structured schema by OmegaConf and
turned into real dataclasses.

Every problem surfaces as a ``ConfigError`` naming the key and the file (or "command line") that
set it: unknown keys and wrong types when merging, missing required values and the components'
own ``__post_init__`` rules (cross-field checks) when building the dataclasses. The experiment
schema and its ``load_config`` are in :mod:`sdtrain.trainer.experiment`; the data commands load
only the ``data:`` section through the same function.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdtrain.errors import ConfigError

T = TypeVar("T")
COMMAND_LINE = "command line"
DEFAULTS = "defaults"
_ABSENT = object()


def load_dataclass(
    schema: type[T],
    paths: Sequence[str | Path],
    overrides: Sequence[str] = (),
    *,
    base: T | None = None,
    sections: Sequence[str] | None = None,
) -> T:
    """Merge ``paths`` in order, apply ``overrides`` (``a.b=value``); return a checked ``schema``.

    Values start from ``base`` (default: the schema's defaults). With ``sections``, only those
    top-level keys are read from the files (the data commands read the ``data:`` section of
    experiment files and ignore the rest).
    """
    merged = OmegaConf.structured(base if base is not None else schema)
    sources: list[tuple[str, DictConfig]] = []
    for path in paths:
        for source, node in read_with_includes(Path(path)):
            if sections is not None:
                node = OmegaConf.create({k: node[k] for k in sections if node.get(k) is not None})
            merged = _merge(merged, node, source)
            sources.append((source, node))
    if overrides:
        node = parse_overrides(overrides, merged)
        merged = _merge(merged, node, COMMAND_LINE)
        sources.append((COMMAND_LINE, node))
    return build_dataclass(schema, merged, "", sources)


def read_yaml(path: str | Path) -> DictConfig:
    """Read one YAML file whose top level is a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("no such config file", source=str(path))
    try:
        node = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as err:
        raise ConfigError(f"not valid YAML: {err}", source=str(path)) from err
    if node is None or isinstance(node, ListConfig):
        raise ConfigError("the top level must be a mapping of keys", source=str(path))
    return node


def read_with_includes(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, DictConfig]]:
    """A file and the files its top-level ``include:`` list names (relative to it), in merge
    order: includes first, then the file itself."""
    if path.resolve() in chain:
        raise ConfigError("includes itself (directly or through other files)", source=str(path))
    node = read_yaml(path)
    includes = node.pop("include", None) if "include" in node else None
    if includes is None:
        return [(str(path), node)]
    if isinstance(includes, str):
        includes = [includes]
    out: list[tuple[str, DictConfig]] = []
    for item in includes:
        if not isinstance(item, str):
            raise ConfigError("include entries must be file paths", key="include", source=str(path))
        target = (path.parent / item) if not Path(item).is_absolute() else Path(item)
        out.extend(read_with_includes(target, (*chain, path.resolve())))
    out.append((str(path), node))
    return out


def parse_overrides(overrides: Sequence[str], schema: DictConfig | None = None) -> DictConfig:
    """``["a.b=1", "c=[1,2]"]`` -> a DictConfig; values are parsed as YAML.

    A list-typed key given a bare value gets a one-element list, taken verbatim: shard specs
    such as ``data.shards=/data/{00000..00099}.tar`` are not valid YAML flow syntax.
    """
    node = OmegaConf.create({})
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not of the form key=value", source=COMMAND_LINE
            )
        target = OmegaConf.select(schema, key, default=None) if schema is not None else None
        if isinstance(target, ListConfig) and not raw.lstrip().startswith("["):
            value: Any = [raw]
        else:
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as err:
                raise ConfigError(
                    f"cannot parse the value of {key!r}: {err}", key=key, source=COMMAND_LINE
                ) from None
        try:
            OmegaConf.update(node, key, value, force_add=True)
        except OmegaConfBaseException as err:
            raise ConfigError(str(err).splitlines()[0], key=key, source=COMMAND_LINE) from None
    return node


def _merge(base: DictConfig, node: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, node)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        message = str(err).splitlines()[0]
        if type(err).__name__ == "ConfigKeyError":
            message = f"unknown key ({message})"
        raise ConfigError(message, key=getattr(err, "full_key", None), source=source) from None


def _source_of(key: str, sources: Sequence[tuple[str, DictConfig]]) -> str:
    """The last file (or the command line) that set ``key``, else its nearest parent."""
    parts = key.split(".")
    for depth in range(len(parts), 0, -1):
        partial = ".".join(parts[:depth])
        for name, node in reversed(sources):
            if OmegaConf.select(node, partial, default=_ABSENT) is not _ABSENT:
                return name
    return DEFAULTS


def build_dataclass(
    cls: type[T], node: DictConfig, prefix: str, sources: Sequence[tuple[str, DictConfig]]
) -> T:
    """Instantiate ``cls`` (and its nested dataclasses) from a merged, type-checked node.

    A ``ConfigError`` raised by a ``__post_init__`` is re-raised with its full dotted key and the
    source that set it.
    """
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        key = f"{prefix}.{field.name}" if prefix else field.name
        if OmegaConf.is_missing(node, field.name):
            raise ConfigError("is required but not set", key=key, source=_source_of(key, sources))
        value = node[field.name]
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            kwargs[field.name] = build_dataclass(hint, value, key, sources)  # type: ignore[arg-type]
            continue
        try:
            plain = (
                OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            )
        except OmegaConfBaseException as err:
            raise ConfigError(
                str(err).splitlines()[0], key=key, source=_source_of(key, sources)
            ) from None
        if typing.get_origin(hint) is tuple and isinstance(plain, list):
            plain = tuple(plain)
        kwargs[field.name] = plain
    try:
        return cls(**kwargs)
    except ConfigError as err:
        full = err.at(prefix)
        raise full.at(source=_source_of(full.key or prefix, sources)) from None


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML (for ``--print-config``, run folders and checkpoints)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain Python containers."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
