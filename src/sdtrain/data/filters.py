"""Metadata filters on the ``.json`` member, applied before any image is decoded, and the
per-reason counters the trainer logs and ``sdtrain data stats`` prints.

A filter rejecting a sample costs a tar read and a json parse (~0.6 ms); decoding the JPEG would
cost ten times more, so everything that can be decided from metadata is decided here.
"""

from __future__ import annotations

import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from sdtrain.data.config import DataConfig, FilterConfig, ThresholdFilter

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
}
_RECENT_ERRORS = 20
_THRESHOLDS = ("aesthetic", "watermark", "unsafe")


@dataclass
class DataStats:
    """Counters of one loader (or several, merged): what was read, kept, rejected and why."""

    seen: int = 0
    """Samples read from the shards (plus one per unreadable shard)."""
    kept: int = 0
    """Samples delivered in batches."""
    rejected: Counter = field(default_factory=Counter)
    """Filter reason -> count (``aesthetic``, ``watermark``, ``unsafe``, ``size``, ``caption``,
    ``blocklist``, ``depth``)."""
    missing: Counter = field(default_factory=Counter)
    """Of those, the ones rejected because the field the filter reads was absent (reason ->
    count): the ``missing`` policies, not the thresholds, decided them."""
    errors: Counter = field(default_factory=Counter)
    """Error kind -> count (``bad_image``, ``bad_json``, ``missing_image``, ``missing_caption``,
    ``bad_depth``, ``shard_unreadable``, ``shard_truncated``)."""
    recent_errors: list[str] = field(default_factory=list)
    """The last few errors as ``kind: shard/key: reason`` for logs."""
    buckets: Counter = field(default_factory=Counter)
    """With ``data.buckets``: samples delivered per bucket (``WxH`` -> count)."""

    def reject(self, reason: str, missing: bool = False) -> None:
        self.rejected[reason] += 1
        if missing:
            self.missing[reason] += 1

    def error(self, kind: str, where: str, reason: str) -> None:
        self.errors[kind] += 1
        self.recent_errors.append(f"{kind}: {where}: {reason}")
        del self.recent_errors[:-_RECENT_ERRORS]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def merge(self, other: DataStats) -> DataStats:
        """A new ``DataStats`` with both sets of counts."""
        return DataStats(
            seen=self.seen + other.seen,
            kept=self.kept + other.kept,
            rejected=self.rejected + other.rejected,
            missing=self.missing + other.missing,
            errors=self.errors + other.errors,
            recent_errors=(self.recent_errors + other.recent_errors)[-_RECENT_ERRORS:],
            buckets=self.buckets + other.buckets,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``seen``, ``kept``, ``rejected`` and ``errors`` mappings, recent errors."""
        return {
            "seen": self.seen,
            "kept": self.kept,
            "rejected": dict(sorted(self.rejected.items())),
            "missing": dict(sorted(self.missing.items())),
            "errors": dict(sorted(self.errors.items())),
            "recent_errors": list(self.recent_errors),
            # only with buckets, so that the counters of runs without them read as before
            **({"buckets": dict(sorted(self.buckets.items()))} if self.buckets else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataStats:
        return cls(
            seen=int(data.get("seen", 0)),
            kept=int(data.get("kept", 0)),
            rejected=Counter(data.get("rejected", {})),
            missing=Counter(data.get("missing", {})),
            errors=Counter(data.get("errors", {})),
            recent_errors=list(data.get("recent_errors", [])),
            buckets=Counter(data.get("buckets", {})),
        )


def _number(value: object) -> float | None:
    """A finite float from a json value, or None (null, strings, NaN all count as missing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class MetadataFilter:
    """Decides from a sample's json and caption whether it is kept; returns the reason if not."""

    def __init__(self, cfg: FilterConfig) -> None:
        self.cfg = cfg
        self.thresholds = [(name, getattr(cfg, name)) for name in _THRESHOLDS]
        words = [re.escape(word.strip().lower()) for word in cfg.blocklist if word.strip()]
        self.blocklist = re.compile(rf"\b(?:{'|'.join(words)})\b") if words else None

    def rejection(self, meta: Mapping[str, Any], caption: str) -> str | None:
        """The first filter that rejects the sample, or None when it is kept."""
        verdict = self.verdict(meta, caption)
        return None if verdict is None else verdict[0]

    def verdict(self, meta: Mapping[str, Any], caption: str) -> tuple[str, bool] | None:
        """``(reason, missing)`` of the first filter that rejects the sample (``missing``: the
        field it reads was absent), or None when it is kept."""
        for reason, rule in self.thresholds:
            if rule.enabled:
                passed = self._passes(rule, meta)
                if not passed:
                    return reason, passed is None
        if self.cfg.min_size:
            size_ok = self._size_ok(meta)
            if not size_ok:
                return "size", size_ok is None
        if self.cfg.require_caption and not caption:
            return "caption", True
        if self.blocklist is not None and self.blocklist.search(caption.lower()):
            return "blocklist", False
        return None

    @staticmethod
    def _passes(rule: ThresholdFilter, meta: Mapping[str, Any]) -> bool | None:
        """The comparison's result; for an absent field, True (``keep``) or None (``reject``)."""
        for name in rule.fields:
            value = _number(meta.get(name))
            if value is not None:
                return _COMPARE[rule.comparison](value, rule.value)
        return True if rule.missing == "keep" else None

    def _size_ok(self, meta: Mapping[str, Any]) -> bool | None:
        for w_key, h_key in (("original_width", "original_height"), ("width", "height")):
            width, height = _number(meta.get(w_key)), _number(meta.get(h_key))
            if width is not None and height is not None:
                return min(width, height) >= self.cfg.min_size
        return True if self.cfg.size_missing == "keep" else None


def explain_rejections(
    stats: DataStats, cfg: DataConfig, reasons: Collection[str] | None = None
) -> str:
    """Which filters rejected the samples counted in ``stats`` (only ``reasons``, if given), and
    the key that changes each, most frequent first; then the errors by kind."""
    parts = []
    for reason, count in stats.rejected.most_common():
        if reasons is not None and reason not in reasons:
            continue
        missing = stats.missing.get(reason, 0)
        parts.append(f"{reason} {count} ({_advice(reason, missing, count, cfg)})")
    text = "rejected by " + "; ".join(parts) if parts else "no sample was rejected by a filter"
    if stats.errors:
        text += f"; unusable (errors) by kind: {dict(stats.errors.most_common())}"
        if stats.recent_errors:
            text += f", e.g. {stats.recent_errors[-1]}"
    return text


def _advice(reason: str, missing: int, count: int, cfg: DataConfig) -> str:
    filters = cfg.filters
    key = f"data.filters.{reason}"
    rule: ThresholdFilter | None = getattr(filters, reason, None) if reason in _THRESHOLDS else None
    notes = []
    if rule is not None:
        if missing:
            notes.append(
                f"{missing} without any of the fields {rule.fields}: set {key}.missing=keep"
            )
        if count > missing:
            notes.append(
                f"{count - missing} failed {rule.fields[0]} {rule.comparison} {rule.value:g}: "
                f"change {key}.value"
            )
        notes.append(f"or {key}.enabled=false")
    elif reason == "size":
        if missing:
            notes.append(f"{missing} without width/height: set data.filters.size_missing=keep")
        if count > missing:
            notes.append(
                f"{count - missing} smaller than data.filters.min_size={filters.min_size}: "
                "lower it (0 disables)"
            )
    else:
        fixed = {
            "caption": "blank caption: set data.filters.require_caption=false",
            "blocklist": "caption holds a word of data.filters.blocklist",
            "depth": f"no depth member ({'/'.join(cfg.depth.keys)}): use shards with depth "
            "maps, or set data.depth.missing=keep to train on zero maps",
            "upscale": "would be enlarged more than data.buckets.max_upscale="
            f"{cfg.buckets.max_upscale:g} to cover its bucket: raise it, or use buckets "
            "nearer the images' sizes",
        }
        if reason in fixed:
            notes.append(fixed[reason])
    return "; ".join(notes) or reason
