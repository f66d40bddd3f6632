"""Range checks for the ``__post_init__`` of config dataclasses.

Each failure is a ``ConfigError`` keyed by the bare field name; the config loader prefixes the
dotted path (``optim.lr``) and names the file or the command line that set the value. Every
numeric field of every component config is checked this way at load time, so that a value that
would fail (or silently misbehave) hours into a run stops the command before any work is done.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sdtrain.errors import ConfigError


def require_finite(cfg: Any) -> None:
    """No float field of the dataclass ``cfg`` (nor any float in a list field) is NaN or
    infinite. Integer fields cannot be: the loader's type check refuses ``.inf`` for them."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        items = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise ConfigError(f"must be a finite number, got {value!r}", key=field.name)


def require_range(
    cfg: Any,
    *keys: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    note: str = "",
) -> None:
    """Each field ``keys`` of ``cfg`` (a number, or every element of a list) lies in the range:
    ``low <= value`` (``<`` with ``low_open``) and ``value <= high`` (``<`` with ``high_open``);
    ``None`` leaves that side open. ``note`` says what the bounds mean (``"0 = off"``)."""
    for key in keys:
        value = getattr(cfg, key)
        items = value if isinstance(value, (list, tuple)) else (value,)
        if all(_inside(v, low, high, low_open, high_open) for v in items):
            continue
        subject = "every value must" if isinstance(value, (list, tuple)) else "must"
        bounds = _describe(low, high, low_open, high_open)
        suffix = f" ({note})" if note else ""
        raise ConfigError(f"{subject} {bounds}{suffix}, got {value!r}", key=key)


def _inside(value: float, low: float | None, high: float | None, lo: bool, hi: bool) -> bool:
    if math.isnan(value):
        return False
    if low is not None and (value <= low if lo else value < low):
        return False
    return high is None or (value < high if hi else value <= high)


def _describe(low: float | None, high: float | None, lo: bool, hi: bool) -> str:
    if low is not None and high is not None:
        return f"be in {'(' if lo else '['}{_num(low)}, {_num(high)}{')' if hi else ']'}"
    if low is not None:
        return f"be {'>' if lo else '>='} {_num(low)}"
    return f"be {'<' if hi else '<='} {_num(high)}"


def _num(bound: float | None) -> str:
    return f"{bound:g}" if isinstance(bound, float) else str(bound)
