"""``sdtrain data depth``: MiDaS depth maps precomputed into shards the loader reads, resumable
per shard, shared out by rank."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.launch.cli import main
from sdtrain.launch.data_cli import collect_stats, load_data_config
from sdtrain.models.midas import build_midas


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.fixture()
def setup(tmp_path: Path) -> dict[str, object]:
    shards = write_synthetic_shards(
        tmp_path / "in", SyntheticSpec(samples=6, per_shard=2, min_side=64, max_side=96)
    )
    torch.manual_seed(0)
    estimator = build_midas("tiny")
    for p in estimator.parameters():
        p.data.normal_(0, 0.2)
    weights = tmp_path / "dpt_tiny-midas.pt"  # the MiDaS release layout
    torch.save({k.removeprefix("model."): v for k, v in estimator.state_dict().items()}, weights)
    return {"shards": shards, "weights": weights, "out": tmp_path / "out"}


def run(setup: dict, capsys) -> str:
    args = ["data", "depth", *map(str, setup["shards"]), str(setup["out"])]
    assert main([*args, "--checkpoint", str(setup["weights"]), "--estimator", "tiny"]) == 0
    return capsys.readouterr().out


def test_depth_shards_are_read_by_the_loader_and_resume(setup, capsys, monkeypatch) -> None:
    for key in ("SLURM_PROCID", "SLURM_NTASKS", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert "wrote 3 shard(s), skipped 0 finished, 6 depth map(s)" in run(setup, capsys)
    outputs = sorted(setup["out"].glob("*.tar"))
    assert [p.name for p in outputs] == [p.name for p in setup["shards"]]
    for src, dst in zip(setup["shards"], outputs, strict=True):
        before, after = members(src), members(dst)
        assert {k: v for k, v in after.items() if not k.endswith(".depth.png")} == before
        for name, data in after.items():
            if name.endswith(".depth.png"):
                depth = Image.open(io.BytesIO(data))
                image_name = name.removesuffix("depth.png") + "jpg"
                image = Image.open(io.BytesIO(before[image_name]))
                assert depth.mode.startswith("I") and depth.size == image.size
                values = np.asarray(depth)
                assert values.min() == 0 and values.max() == 65535
    shards = ",".join(f'"{p}"' for p in outputs)
    cfg = load_data_config(overrides=[f"data.shards=[{shards}]", "data.depth.enabled=true",
                                      "data.image.size=64", "data.filters.min_size=0"])  # fmt: skip
    stats = collect_stats(cfg)
    assert stats.kept == 6 and not stats.rejected, stats.to_dict()
    # Resume: a deleted output shard is redone, the finished ones are left as they are.
    stamps = {p: p.stat().st_mtime_ns for p in outputs}
    outputs[1].unlink()
    assert "wrote 1 shard(s), skipped 2 finished, 2 depth map(s)" in run(setup, capsys)
    assert outputs[1].exists()
    assert all(p.stat().st_mtime_ns == stamps[p] for p in (outputs[0], outputs[2]))
    assert not [p for p in setup["out"].iterdir() if p.suffix != ".tar"]  # no temp left


def test_ranks_share_the_shards(setup, capsys, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "rank 1/2: wrote 1 shard(s)" in run(setup, capsys)
    assert [p.name for p in setup["out"].glob("*.tar")] == [setup["shards"][1].name]
