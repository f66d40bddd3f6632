"""Where the prompts of an eval come from: a text file, COCO captions, or a shard set's captions.

- ``*.txt``: one prompt per line (blank lines skipped), the first N in file order;
- ``*.json``: a COCO captions annotation file (``captions_val2017.json`` layout: ``images`` and
  ``annotations`` with ``image_id`` / ``caption``): N image ids drawn without replacement with the
  seed, as the SD model cards do, and one caption each (the image's first annotation by id);
- anything else is a shard spec (``data.shards``): the ``txt`` captions in shard order, first N.

Fewer prompts than N is an error unless ``with_replacement``: then N are drawn with replacement
with the seed. N None takes every prompt once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdtrain.data.shards import ShardReadError, expand_shards, iter_samples
from sdtrain.data.transforms import normalize_caption
from sdtrain.errors import ConfigError


@dataclass(frozen=True)
class Prompts:
    texts: list[str]
    image_ids: list[int] | None = None
    """COCO: the image each caption belongs to (for matching reference images)."""


def load_prompts(
    source: str, num: int | None, seed: int = 0, with_replacement: bool = False
) -> Prompts:
    """N prompts from ``source`` (see the module docstring)."""
    if num is not None and num < 1:
        raise ConfigError(f"--num must be >= 1, got {num}")
    path = Path(source)
    if path.suffix == ".json":
        return _coco(path, num, seed, with_replacement)
    if path.suffix == ".txt":
        if not path.is_file():
            raise ConfigError(f"prompts file {path} does not exist")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        texts = [normalize_caption(line) for line in lines if line.strip()]
    else:
        texts = _shard_captions(source, num)
    if not texts:
        raise ConfigError(f"--prompts {source} holds no prompts")
    picked = _pick(len(texts), num, seed, with_replacement, source, ordered=True)
    return Prompts([texts[i] for i in picked])


def _pick(
    have: int, num: int | None, seed: int, with_replacement: bool, source: str, ordered: bool
) -> list[int]:
    if num is None:
        return list(range(have))
    rng = np.random.default_rng(seed)
    if num <= have:
        if ordered:
            return list(range(num))
        return sorted(int(i) for i in rng.choice(have, size=num, replace=False))
    if not with_replacement:
        raise ConfigError(
            f"--prompts {source} has {have} prompts, fewer than --num {num}: lower --num or pass "
            "--with-replacement to draw prompts more than once"
        )
    return [int(i) for i in rng.choice(have, size=num, replace=True)]


def _coco(path: Path, num: int | None, seed: int, with_replacement: bool) -> Prompts:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        annotations = data["annotations"]
        first: dict[int, tuple[int, str]] = {}
        for ann in annotations:
            image_id, ann_id = int(ann["image_id"]), int(ann.get("id", 0))
            if image_id not in first or ann_id < first[image_id][0]:
                first[image_id] = (ann_id, normalize_caption(str(ann["caption"])))
    except FileNotFoundError:
        raise ConfigError(f"prompts file {path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"--prompts {path} is not a COCO captions file (captions_val2017.json layout: "
            f"'annotations' with 'image_id' and 'caption'): {type(err).__name__}: {err}"
        ) from None
    ids = sorted(first)
    if not ids:
        raise ConfigError(f"--prompts {path} holds no captions")
    picked = _pick(len(ids), num, seed, with_replacement, str(path), ordered=False)
    chosen = [ids[i] for i in picked]
    return Prompts([first[i][1] for i in chosen], chosen)


def _shard_captions(spec: str, num: int | None) -> list[str]:
    texts: list[str] = []
    for url in expand_shards(spec):
        try:
            for sample in iter_samples(url):
                if "txt" in sample.members:
                    texts.append(normalize_caption(sample.members["txt"]))
                if num is not None and len(texts) >= num:
                    return texts
        except ShardReadError as err:
            raise ConfigError(f"--prompts: {err}") from None
    return texts
