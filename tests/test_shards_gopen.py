"""Shard URLs opened through webdataset's ``gopen`` (data/shards.py): its scheme table dispatches
``pipe:``, ``s3://`` (sdtrain's handler: the AWS CLI) and a scheme registered by the user; a
failing command is a ``ShardReadError`` naming its exit status and last stderr line, counted by
the loader; an early stop is not a failure. No network: ``aws`` is a stand-in script on PATH."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from webdataset.gopen import Pipe, gopen_schemes

from sdtrain.data.config import DataConfig, FilterConfig, ImageConfig, MaskConfig
from sdtrain.data.pipeline import LaionLoader
from sdtrain.data.shards import (
    ShardReadError,
    expand_shards,
    gopen_pipe_group,
    gopen_s3,
    iter_samples,
    open_shard,
)
from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gopen-shards")
    write_synthetic_shards(out, SyntheticSpec(samples=6, per_shard=6, min_side=64, max_side=80))
    (tar,) = sorted(out.glob("*.tar"))
    return tar


def keys(url: str) -> list[str]:
    return [sample.key for sample in iter_samples(url)]


def test_pipe_and_file_urls_read_the_same_samples(shard: Path) -> None:
    assert gopen_schemes["pipe"] is gopen_pipe_group
    expected = keys(str(shard))
    assert len(expected) == 6
    assert keys(f"file://{shard}") == expected
    assert keys(f"pipe:cat {shard}") == expected
    assert isinstance(open_shard(f"pipe:cat {shard}"), Pipe)  # webdataset's Pipe


@pytest.fixture
def fake_aws(tmp_path: Path, shard: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An ``aws`` on PATH that serves s3://bucket/<name> from the shard's folder (and fails, as
    the real one does, for a key that does not exist); it logs its arguments."""
    log = tmp_path / "aws.log"
    script = tmp_path / "bin" / "aws"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {log}\n'
        f'f="{shard.parent}/${{3#s3://bucket/}}"\n'
        '[ -f "$f" ] || { echo "fatal error: An error occurred (404) when calling the '
        'HeadObject operation: Key not found" >&2; exit 1; }\n'
        'exec cat "$f"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ['PATH']}")
    return log


def test_s3_urls_stream_through_the_aws_cli(shard: Path, fake_aws: Path) -> None:
    assert gopen_schemes["s3"] is gopen_s3
    url = f"s3://bucket/{shard.name}"
    assert expand_shards(f"s3://bucket/{{{shard.stem},{shard.stem}}}.tar") == [url]
    assert keys(url) == keys(str(shard))
    assert fake_aws.read_text().split() == ["s3", "cp", url, "-"]
    with pytest.raises(ShardReadError, match=r"exit status 1: fatal error: .*\(404\)"):
        keys("s3://bucket/missing.tar")


def test_a_scheme_registered_with_webdataset_is_used(
    shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheme table is webdataset's: a handler registered there opens ``store://`` URLs."""
    opened: list[str] = []

    def gopen_store(url: str, mode: str = "rb", bufsize: int = 8192) -> object:
        opened.append(url)
        return (shard.parent / url.removeprefix("store://")).open(mode)

    monkeypatch.setitem(gopen_schemes, "store", gopen_store)
    assert keys(f"store://{shard.name}") == keys(str(shard))
    assert opened == [f"store://{shard.name}"]
    with pytest.raises(ShardReadError, match="no gopen handler"):
        keys("nowhere://x/0.tar")


def test_failing_commands_are_shard_errors_after_their_samples(shard: Path) -> None:
    # a complete tar, then a failure: every sample, then the error with the exit status
    samples: list[str] = []
    with pytest.raises(ShardReadError, match=r"failed \(exit status 3: broken link\)"):
        for sample in iter_samples(f"pipe:cat {shard}; echo broken link >&2; exit 3"):
            samples.append(sample.key)
    assert samples == keys(str(shard))
    # nothing at all
    with pytest.raises(ShardReadError, match="exit status 7"):
        keys("pipe:exit 7")
    with pytest.raises(ShardReadError, match=r"cannot open shard .*missing\.tar"):
        keys(str(shard.parent / "missing.tar"))


def test_an_early_stop_is_not_a_failure(shard: Path) -> None:
    """The consumer leaves after one sample of a long stream: the command ends (SIGPIPE) and
    nothing is raised."""
    samples: Iterator = iter_samples(f"pipe:while true; do cat {shard}; done")
    assert next(samples).key
    samples.close()  # would raise if the SIGPIPE'd command counted as failed


def test_the_loader_counts_a_failing_command_as_an_unreadable_shard(shard: Path) -> None:
    cfg = DataConfig(
        shards=[str(shard), "pipe:echo no such bucket >&2; exit 2"],
        batch_size=2, num_workers=0, shuffle_buffer=4, resampled=False, shuffle_shards=False,
        image=ImageConfig(size=32), filters=FilterConfig(min_size=32),
        masks=MaskConfig(enabled=False),
    )  # fmt: skip
    loader = LaionLoader(cfg)
    batches = list(loader)
    assert sum(len(b["caption"]) for b in batches) == 6
    assert loader.stats.errors["shard_unreadable"] == 1
    assert "no such bucket" in " ".join(loader.stats.recent_errors)


def test_bench_tar_readers_count_the_same_samples(shard: Path) -> None:
    """bench/loader.py --tar compares like with like: every reader finds the shard's samples."""
    from bench_support import load_bench

    bench = load_bench("loader")
    counts = {
        name: next(bench.tar_reader([str(shard)], name))
        for name in ("ours", "webdataset", "webdataset-samples")
    }
    assert counts == dict.fromkeys(counts, 6)
