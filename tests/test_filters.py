"""Metadata filters: each rule, its comparison, missing-field policies and the counters."""

from __future__ import annotations

import pytest

from sdtrain.config.errors import ConfigError
from sdtrain.data.config import FilterConfig, ThresholdFilter
from sdtrain.data.filters import DataStats, MetadataFilter

GOOD = {
    "AESTHETIC_SCORE": 6.0,
    "pwatermark": 0.1,
    "punsafe": 0.01,
    "original_width": 1024,
    "original_height": 768,
}


def reason(meta: dict, caption: str = "a photo", **cfg) -> str | None:
    return MetadataFilter(FilterConfig(**cfg)).rejection(meta, caption)


def test_defaults_keep_a_good_sample() -> None:
    assert reason(GOOD) is None


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"AESTHETIC_SCORE": 4.99}, "aesthetic"),
        ({"AESTHETIC_SCORE": 5.0}, None),  # >= 5.0 by default
        ({"pwatermark": 0.5}, "watermark"),  # < 0.5 keeps
        ({"pwatermark": 0.49}, None),
        ({"punsafe": 0.1}, "unsafe"),
        ({"original_width": 511}, "size"),
        ({"original_height": 512}, None),
    ],
)
def test_each_threshold(change: dict, expected: str | None) -> None:
    assert reason({**GOOD, **change}) == expected


def test_field_fallbacks_and_comparisons() -> None:
    lowercase = {k: v for k, v in GOOD.items() if k != "AESTHETIC_SCORE"} | {"aesthetic": 5.2}
    assert reason(lowercase) is None
    sd15 = ThresholdFilter(fields=["AESTHETIC_SCORE"], comparison=">", value=5.0)
    assert reason({**GOOD, "AESTHETIC_SCORE": 5.0}, aesthetic=sd15) == "aesthetic"
    sizes = {k: v for k, v in GOOD.items() if not k.startswith("original")}
    assert reason(sizes | {"width": 600, "height": 600}) is None
    assert reason(sizes | {"width": 600, "height": 300}) == "size"


def test_missing_fields_follow_the_policy() -> None:
    no_score = {k: v for k, v in GOOD.items() if k != "AESTHETIC_SCORE"}
    # Issue 11: the default keeps samples without a score (what make-shards writes); the LAION
    # recipes in configs/data reject them explicitly.
    strict = ThresholdFilter(fields=["AESTHETIC_SCORE", "aesthetic"], value=5.0, missing="reject")
    assert reason(no_score, aesthetic=strict) == "aesthetic"
    assert reason(no_score) is None
    keep = ThresholdFilter(fields=["AESTHETIC_SCORE"], value=5.0, missing="keep")
    assert reason(no_score, aesthetic=keep) is None
    assert reason({**GOOD, "AESTHETIC_SCORE": None}, aesthetic=strict) == "aesthetic"
    assert reason({**GOOD, "AESTHETIC_SCORE": "high"}, aesthetic=strict) == "aesthetic"
    assert reason({**GOOD, "AESTHETIC_SCORE": float("nan")}, aesthetic=strict) == "aesthetic"
    no_size = {k: v for k, v in GOOD.items() if not k.startswith("original")}
    assert reason(no_size) == "size"
    assert reason(no_size, size_missing="keep") is None
    assert reason({}, **{k: ThresholdFilter(enabled=False) for k in ("aesthetic", "watermark",
                  "unsafe")}, min_size=0) is None  # fmt: skip


def test_caption_and_blocklist() -> None:
    assert reason(GOOD, caption="") == "caption"
    assert reason(GOOD, caption="", require_caption=False) is None
    assert reason(GOOD, caption="A Watermarked stock photo", blocklist=["stock"]) == "blocklist"
    assert reason(GOOD, caption="stockings on a line", blocklist=["stock"]) is None


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="fields"):
        ThresholdFilter(fields=[])
    with pytest.raises(ConfigError, match="min_size"):
        FilterConfig(min_size=-1)


def test_stats_merge_and_round_trip() -> None:
    a, b = DataStats(seen=3, kept=1), DataStats(seen=2, kept=2)
    a.reject("aesthetic")
    a.error("bad_image", "00000.tar/000000001", "truncated")
    b.reject("aesthetic")
    merged = a.merge(b)
    assert merged.seen == 5 and merged.kept == 3 and merged.rejected["aesthetic"] == 2
    assert merged.error_count == 1
    assert DataStats.from_dict(merged.to_dict()).to_dict() == merged.to_dict()
