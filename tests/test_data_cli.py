"""``sdtrain data make-shards|stats|preview|bench`` in-process on small images made here: shards
that the loader reads back, exact counts, the preview grid's size, a positive throughput, and the
exit codes of usage and data errors."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from bench_support import load_bench
from PIL import Image

from sdtrain.config.errors import ConfigError
from sdtrain.data.shards import expand_shards, iter_samples
from sdtrain.data.synthetic import SyntheticSpec, jpeg_bytes, photo_like, write_synthetic_shards
from sdtrain.data.writer import ShardWriter
from sdtrain.launch.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from sdtrain.launch.data_cli import load_data_config

KEY = re.compile(r"\d{9}")


def _jpeg(seed: int, width: int, height: int) -> bytes:
    return jpeg_bytes(photo_like(np.random.default_rng(seed), width, height))


def _png(width: int, height: int) -> bytes:
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def _samples(out: Path) -> list:
    return [raw for url in expand_shards(str(out)) for raw in iter_samples(url)]


# ---------------------------------------------------------------------------------------------
# make-shards
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    src = tmp_path / "images"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(_jpeg(1, 96, 64))
    (src / "a.txt").write_text("  a red\n\tcircle  ")
    (src / "a.json").write_text(json.dumps({"AESTHETIC_SCORE": 6.5, "url": "http://x/a.jpg"}))
    (src / "b.png").write_bytes(_png(80, 120))
    (src / "b.txt").write_text("a pink square")
    (src / "sub" / "c.jpeg").write_bytes(_jpeg(2, 160, 100))
    (src / "sub" / "c.txt").write_text("nested")
    (src / "broken.jpg").write_bytes(b"this is not an image")
    (src / "broken.txt").write_text("never written")
    (src / "notes.md").write_text("ignored: not an image")
    return src


def test_make_shards_from_folder(image_folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    argv = ["data", "make-shards", str(image_folder), str(out), "--per-shard", "2"]
    assert main(argv) == EXIT_OK
    report = capsys.readouterr().out
    assert "wrote 3 sample(s) in 2 shard(s)" in report
    assert "skipped 1" in report and "broken.jpg" in report
    assert "broken.jpg" in (out / "skipped.txt").read_text()
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]

    samples = {json.loads(raw.members["json"])["path"]: raw for raw in _samples(out)}
    assert set(samples) == {"a.jpg", "b.png", "sub/c.jpeg"}
    assert all(KEY.fullmatch(raw.key) for raw in samples.values())
    a = samples["a.jpg"]
    assert a.members["jpg"] == (image_folder / "a.jpg").read_bytes()  # copied, not re-encoded
    assert a.members["txt"] == b"a red circle"
    meta = json.loads(a.members["json"])
    assert meta["caption"] == "a red circle" and meta["AESTHETIC_SCORE"] == 6.5
    assert (meta["original_width"], meta["original_height"]) == (96, 64)
    assert (meta["width"], meta["height"]) == (96, 64)
    b = samples["b.png"]
    assert set(b.members) == {"png", "txt", "json"}
    assert b.members["png"] == (image_folder / "b.png").read_bytes()
    assert json.loads(b.members["json"])["original_height"] == 120
    assert "jpg" in samples["sub/c.jpeg"].members


def test_make_shards_to_jpeg_converts_other_formats(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert main(["data", "make-shards", str(image_folder), str(out), "--to-jpeg"]) == EXIT_OK
    samples = {json.loads(raw.members["json"])["path"]: raw for raw in _samples(out)}
    png = samples["b.png"]
    assert set(png.members) == {"jpg", "txt", "json"}
    with Image.open(io.BytesIO(png.members["jpg"])) as image:
        assert image.format == "JPEG" and image.size == (80, 120)
        # half-transparent red over white
        assert np.abs(np.asarray(image)[60, 40].astype(int) - [228, 127, 127]).max() < 8
    # a second run into the same folder would mix shards: refused
    assert main(["data", "make-shards", str(image_folder), str(out)]) == EXIT_USAGE


def test_make_shards_from_csv(tmp_path: Path, capsys) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.jpg").write_bytes(_jpeg(3, 64, 80))
    (tmp_path / "img" / "y.jpg").write_bytes(_jpeg(4, 120, 64))
    table = tmp_path / "meta.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "text", "AESTHETIC_SCORE", "url", "punsafe"])
        writer.writerow(["img/x.jpg", "first\n caption", "5.5", "http://x", ""])
        writer.writerow([str(tmp_path / "img" / "y.jpg"), "second", "7", "http://y", "0.01"])
        writer.writerow(["img/missing.jpg", "gone", "6", "http://z", "0"])
    argv = ["data", "make-shards", str(table), str(tmp_path / "out")]
    options = ["--path-column", "file", "--caption-column", "text"]
    assert main([*argv, *options]) == EXIT_OK
    report = capsys.readouterr().out
    assert "wrote 2 sample(s) in 1 shard(s)" in report and "img/missing.jpg" in report

    first, second = _samples(tmp_path / "out")
    meta = json.loads(first.members["json"])
    assert first.members["txt"] == b"first caption"
    assert meta["AESTHETIC_SCORE"] == 5.5 and meta["url"] == "http://x" and meta["punsafe"] is None
    assert (meta["original_width"], meta["original_height"]) == (64, 80)
    assert json.loads(second.members["json"])["AESTHETIC_SCORE"] == 7

    # the default caption column does not exist: a usage error naming the columns
    assert main([*argv[:3], str(tmp_path / "out2"), "--path-column", "file"]) == EXIT_USAGE
    assert "'caption'" in capsys.readouterr().err


def test_make_shards_parquet(tmp_path: Path, capsys) -> None:
    (tmp_path / "x.jpg").write_bytes(_jpeg(5, 64, 64))
    table = tmp_path / "meta.parquet"
    if importlib.util.find_spec("pyarrow") is None:
        table.write_bytes(b"PAR1")
        assert main(["data", "make-shards", str(table), str(tmp_path / "out")]) == EXIT_FAILURE
        assert "pyarrow" in capsys.readouterr().err
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {"path": ["x.jpg"], "caption": ["a  cat"], "aesthetic": [float("nan")]}
    pq.write_table(pa.table(rows), table)
    assert main(["data", "make-shards", str(table), str(tmp_path / "out")]) == EXIT_OK
    (sample,) = _samples(tmp_path / "out")
    assert json.loads(sample.members["json"])["aesthetic"] is None
    assert sample.members["txt"] == b"a cat"


# ---------------------------------------------------------------------------------------------
# stats, preview, bench on shards written here
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """10 samples in 2 shards: 3 rejected by the aesthetic filter, 1 truncated JPEG, 6 good.
    The metadata claims 1024 px originals, so the default filters (min_size 512) keep them."""
    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    with ShardWriter(out, per_shard=5) as writer:
        for i in range(10):
            width, height = int(rng.integers(64, 161)), int(rng.integers(64, 161))
            data = _jpeg(i, width, height)
            if i == 7:
                data = data[: len(data) // 3]
            meta = {
                "AESTHETIC_SCORE": 4.0 if i in (1, 4, 8) else 6.0,
                "pwatermark": 0.1,
                "punsafe": 0.01,
                "original_width": 1024,
                "original_height": 768,
            }
            writer.write({"jpg": data, "txt": f"sample  {i}\n", "json": meta})
    return out


@pytest.mark.parametrize("workers", ["0", "2"])
def test_stats_json_counts(shards: Path, workers: str, capsys) -> None:
    argv = ["data", "stats", str(shards / "{00000..00001}.tar"), "--json", "--size", "64"]
    assert main([*argv, "--workers", workers]) == EXIT_OK
    stats = json.loads(capsys.readouterr().out)  # stdout is that one object only
    assert stats["seen"] == 10 and stats["kept"] == 6
    assert stats["rejected"] == {"aesthetic": 3}
    assert stats["errors"] == {"bad_image": 1}


def test_stats_text_with_config_and_override(shards: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text("model: {name: ignored}\ndata:\n  filters: {min_size: 2000}\n")
    argv = ["data", "stats", str(shards), "data.image.size=64", "--config", str(config)]
    assert main([*argv, "--workers", "0"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "seen:     10" in out and "kept:     0" in out
    assert "aesthetic: 3" in out and "size: 7" in out


def test_preview_grid_size(shards: Path, tmp_path: Path, capsys) -> None:
    grid = tmp_path / "grid.png"
    argv = ["data", "preview", str(shards), "--out", str(grid)]
    assert main([*argv, "--n", "3", "--size", "64"]) == EXIT_OK
    assert "with masks" in capsys.readouterr().out
    with Image.open(grid) as image:
        assert image.size == (4 * 64, 3 * 64)
        pixels = np.asarray(image.convert("RGB"))
    # the caption panel is not blank
    assert (pixels[:64, 3 * 64 :] < 100).any()

    # a config that turns masks off keeps the layout, with an empty mask panel
    config = tmp_path / "nomask.yaml"
    config.write_text("data: {masks: {enabled: false}}\n")
    assert main([*argv, "--config", str(config), "--n", "20", "--size", "32"]) == EXIT_OK
    assert "masks off" in capsys.readouterr().out
    with Image.open(grid) as image:
        assert image.size == (4 * 32, 6 * 32)  # only 6 samples pass
        assert np.asarray(image.convert("L"))[:, 32:64].max() == 0


def test_bench_json(shards: Path, capsys) -> None:
    argv = ["data", "bench", str(shards), "--json", "--seconds", "1", "--size", "64"]
    assert main([*argv, "--workers", "0", "--warmup", "0.1"]) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["samples_per_s"] > 0
    assert result["workers"] == 0 and result["size"] == 64 and result["batches"] >= 1
    assert result["seconds"] >= 1


def test_loader_benchmark_runs(tmp_path: Path) -> None:
    """bench/loader.py end to end on small synthetic shards (timings not checked)."""
    shards = tmp_path / "shards"
    spec = SyntheticSpec(samples=12, per_shard=4, min_side=430, max_side=480, reject_fraction=0.25)
    write_synthetic_shards(shards, spec)
    bench = load_bench("loader")
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nhand-written notes stay\n")
    argv = ["--shards", str(shards), "--sizes", "64", "--rounds", "1", "--seconds", "0.2"]
    report = bench.main([*argv, "--warmup", "0.1", "--workers", "0", "--out", str(docs)])
    assert re.search(r"\| 64 \| \d+ \(", report)
    text = docs.read_text()
    assert "hand-written notes stay" in text and text.count("<!-- loader start -->") == 1
    assert "## Loader" in text


# ---------------------------------------------------------------------------------------------
# Errors and config loading
# ---------------------------------------------------------------------------------------------


def test_usage_errors_exit_2(shards: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "stats"])  # SHARDS missing
    assert exit_info.value.code == EXIT_USAGE
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "preview", str(shards)])  # --out missing
    assert exit_info.value.code == EXIT_USAGE
    capsys.readouterr()
    assert main(["data", "stats", str(shards), "data.filters.min_sise=3"]) == EXIT_USAGE
    assert "data.filters.min_sise" in capsys.readouterr().err
    assert main(["data", "stats", str(shards), "image.size=64"]) == EXIT_USAGE
    assert "data.image.size=64" in capsys.readouterr().err
    assert main(["data", "bench", str(shards), "--size", "63"]) == EXIT_USAGE
    assert "--size" in capsys.readouterr().err
    assert main(["data", "stats", str(shards), "--config", "no-such-data"]) == EXIT_USAGE


def test_data_errors_exit_1_naming_the_spec(tmp_path: Path, capsys) -> None:
    spec = str(tmp_path / "missing" / "{00000..00003}.tar")
    for command in ("stats", "bench"):
        assert main(["data", command, spec]) == EXIT_FAILURE
        err = capsys.readouterr().err
        assert "data error" in err and spec in err
    (tmp_path / "empty").mkdir()
    assert (
        main(["data", "preview", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
        == EXIT_FAILURE
    )
    assert "holds no .tar shards" in capsys.readouterr().err
    assert main(["data", "make-shards", str(tmp_path / "nope"), str(tmp_path / "o")]) == 1
    assert "nope" in capsys.readouterr().err


def test_load_data_config_reads_only_the_data_section(tmp_path: Path) -> None:
    from sdtrain.launch.data_cli import resolve_data_config

    cfg = load_data_config([resolve_data_config("laion-sd15-inpainting")], ["data.seed=3"])
    assert cfg.masks.enabled and cfg.masks.preset == "512train-large" and cfg.seed == 3
    assert not cfg.filters.unsafe.enabled and cfg.filters.aesthetic.comparison == ">"
    assert load_data_config() == load_data_config([], [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  image: {size: 100}\n")
    with pytest.raises(ConfigError) as err:
        load_data_config([bad])
    assert "bad.yaml" in str(err.value) and "data.image.size" in str(err.value)
