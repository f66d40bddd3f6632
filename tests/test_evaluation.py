"""``sdtrain eval`` and ``sdtrain.evaluation``: the metrics against closed forms and hand
computations, the inputs' failure modes, and the command end to end (resume included) on a
tiny random model with seeded random extractors (offline, CPU)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.evaluation import run as eval_run
from sdtrain.evaluation.extractors import ExtractorConfig, build_clip, build_inception
from sdtrain.evaluation.metrics import clip_score, fid_from_features, kid_from_features
from sdtrain.evaluation.prompts import load_prompts
from sdtrain.evaluation.reference import reference_features
from sdtrain.launch.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = "ViT-S-32"

# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def exact_sample(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """(n, d) rows whose sample mean and (n-1)-normalised covariance are exactly mean, cov."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mean.numel(), generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    whiten = torch.linalg.cholesky(z.T @ z / (n - 1))
    z = z @ torch.linalg.inv(whiten).T  # sample covariance = I
    return z @ torch.linalg.cholesky(cov).T + mean


def test_fid_is_the_frechet_distance_of_two_known_gaussians() -> None:
    d = 4
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0),
                                       dtype=torch.float64))  # fmt: skip
    a = torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    b = torch.tensor([4.0, 0.5, 0.5, 1.0], dtype=torch.float64)
    mu1 = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    # Same eigenvectors: Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt a - sqrt b)^2.
    real = exact_sample(50, mu1, q @ torch.diag(a) @ q.T, 1)
    fake = exact_sample(60, mu2, q @ torch.diag(b) @ q.T, 2)
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-6)
    assert fid_from_features(real, real) == pytest.approx(0.0, abs=1e-6)


def test_kid_is_the_unbiased_mmd_of_the_cubic_kernel() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(6, 3, generator=g, dtype=torch.float64) + 0.7

    def k(u, v):
        return (float(u @ v) / 3 + 1) ** 3

    m = 5  # subsets of min(5, 6) rows: the whole x each time, 5 of the 6 y rows
    # With subset_size = len(y) too, every subset is all the data: compare on y[:5] and x.
    y5 = y[:5]
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y5[i], y5[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y5[j]) for i in range(m) for j in range(m)) / m**2
    kid = kid_from_features(x, y5, subsets=7)
    assert kid.mean == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    assert kid.std == pytest.approx(0.0, abs=1e-9)
    # Random subsets: the same seed gives the same figures.
    assert kid_from_features(x, y, subsets=7, seed=1) == kid_from_features(x, y, subsets=7, seed=1)


def test_clip_score_definition_on_hand_made_embeddings() -> None:
    image = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    text = torch.tensor([[5.0, 0.0], [1.0, math.sqrt(3)], [-1.0, 0.0], [1.0, 0.0]])
    scores = clip_score(image, text)  # 100 * max(cos, 0)
    assert scores.tolist() == pytest.approx([100.0, 50.0, 0.0, 0.0])


# ---------------------------------------------------------------------------------------------
# Prompts and references
# ---------------------------------------------------------------------------------------------


def test_prompts_text_file_too_few_prompts(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("one\n\n  two  \nthree\n")
    assert load_prompts(str(path), 2).texts == ["one", "two"]
    with pytest.raises(ConfigError, match=r"3 prompts, fewer than --num 5.*--with-replacement"):
        load_prompts(str(path), 5)
    drawn = load_prompts(str(path), 5, seed=4, with_replacement=True).texts
    assert len(drawn) == 5 and set(drawn) <= {"one", "two", "three"}
    assert drawn == load_prompts(str(path), 5, seed=4, with_replacement=True).texts


def test_prompts_coco_layout_draws_images_with_the_seed(tmp_path: Path) -> None:
    annotations = [
        {"id": 10 * i + j, "image_id": 100 + i, "caption": f"image {i} caption {j}"}
        for i in range(6) for j in (2, 1)
    ]  # fmt: skip
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": [{"id": 100 + i} for i in range(6)],
                                "annotations": annotations}))  # fmt: skip
    picked = load_prompts(str(path), 3, seed=7)
    assert len(set(picked.image_ids)) == 3
    # One caption per image: its first annotation by id (caption 1).
    assert picked.texts == [f"image {i - 100} caption 1" for i in picked.image_ids]
    assert load_prompts(str(path), 3, seed=7) == picked
    assert len(load_prompts(str(path), None).texts) == 6
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ConfigError, match="not a COCO captions file"):
        load_prompts(str(bad), 2)


def write_images(folder: Path, sizes: list[tuple[int, int]], unreadable: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for i in range(unreadable):
        (folder / f"broken{i}.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


def mean_colour(images: torch.Tensor) -> torch.Tensor:
    return images.float().mean(dim=(2, 3))  # (B, 3): a stand-in feature extractor


def test_reference_counts_unreadable_and_resized_and_caches(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "ref", [(16, 16), (20, 30), (16, 16)], unreadable=2)
    calls = []

    def extract(images):
        calls.append(images.shape)
        return mean_colour(images)

    first = reference_features(str(folder), 16, None, "mean", extract, tmp_path / "cache")
    assert (first.features.shape, first.unreadable, first.resized) == ((3, 3), 2, 1)
    assert not first.cached and calls and all(s[1:] == (3, 16, 16) for s in calls)
    calls.clear()
    again = reference_features(str(folder), 16, None, "mean", extract, tmp_path / "cache")
    assert again.cached and not calls and torch.equal(again.features, first.features)
    other = reference_features(str(folder), 8, None, "mean", extract, tmp_path / "cache")
    assert not other.cached  # another size is another key


def test_reference_needs_two_readable_images(tmp_path: Path) -> None:
    folder = write_images(tmp_path / "ref", [(16, 16)], unreadable=1)
    with pytest.raises(ConfigError, match=r"1 readable image\(s\) \(1 unreadable\).*at least 2"):
        reference_features(str(folder), 16, None, "mean", mean_colour, tmp_path / "cache")
    with pytest.raises(ConfigError, match="does not exist"):
        reference_features(str(tmp_path / "nope"), 16, None, "m", mean_colour, tmp_path / "c")


# ---------------------------------------------------------------------------------------------
# Extractors
# ---------------------------------------------------------------------------------------------


def test_extractor_weights_missing_or_of_the_wrong_architecture(tmp_path: Path) -> None:
    missing = tmp_path / "none.pth"
    with pytest.raises(ConfigError, match=r"no InceptionV3 weights at .*none\.pth.*--inception"):
        build_inception(ExtractorConfig(inception_weights=str(missing)))
    wrong = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, wrong)
    with pytest.raises(CheckpointError, match=r"resnet\.pth: does not hold InceptionV3"):
        build_inception(ExtractorConfig(inception_weights=str(wrong)))
    with pytest.raises(ConfigError, match="no CLIP weights: pass --clip-weights"):
        build_clip(ExtractorConfig(clip_model=TINY_CLIP))
    with pytest.raises(CheckpointError, match=rf"resnet\.pth: does not hold open_clip {TINY_CLIP}"):
        build_clip(ExtractorConfig(clip_model=TINY_CLIP, clip_weights=str(wrong)))
    with pytest.raises(ConfigError, match="not an open_clip architecture"):
        build_clip(ExtractorConfig(clip_model="ViT-Q-99", seed=0))


def test_inception_from_a_file_and_seeded_are_one_code_path_without_network(
    tmp_path: Path, monkeypatch
) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("the extractor tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    seeded = build_inception(ExtractorConfig(seed=5))
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(seeded.state_dict(), path)
    from_file = build_inception(ExtractorConfig(inception_weights=str(path)))
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    features = seeded(images)
    assert features.shape == (1, 2048) and features.std() > 0
    assert torch.equal(from_file(images), features)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, Path]:
    from sdtrain.models.adapters.original import write_checkpoint
    from sdtrain.models.stable_diffusion import build_stable_diffusion
    from sdtrain.trainer.experiment import load_config

    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = build_stable_diffusion(load_config([ROOT / "configs/models/tiny-base.yaml"]).model)
    ckpt = write_checkpoint(root / "tiny.safetensors", **model.original_parts())
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    ref = write_images(root / "ref", [(32, 32), (40, 48), (32, 32)], unreadable=1)
    return {"checkpoint": ckpt, "prompts": prompts, "reference": ref, "root": root}


def eval_args(inputs: dict[str, Path], out: Path, *extra: str, scales: str = "1,4") -> list[str]:
    return [
        "eval", "--checkpoint", str(inputs["checkpoint"]), "--config", "tiny-base",
        "--prompts", str(inputs["prompts"]), "--reference", str(inputs["reference"]),
        "--scales", scales, "--steps", "2", "--size", "32", "--num", "2", "--batch", "1",
        "--seed", "1", "--extractor-seed", "0", "--clip-model", TINY_CLIP,
        "--inception-features", "64",  # cheap: the 2048-d path is tested on its own above
        "--cache-dir", str(inputs["root"] / "cache"), "--out", str(out), *extra,
    ]  # fmt: skip


def without_seconds(path: Path) -> list[dict]:
    return [
        {k: v for k, v in row.items() if k != "seconds"} for row in json.loads(path.read_text())
    ]


def test_eval_end_to_end_and_an_interrupted_eval_resumes_to_the_same_numbers(
    tiny_inputs: dict[str, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    whole = tmp_path / "whole"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main(eval_args(tiny_inputs, whole, "--wandb", scales="4")) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "random features" in printed and "1 unreadable skipped" in printed
    # progress: images/s and the ETA (elapsed<remaining)
    assert "img/s" in captured.err and "scale 4" in captured.err and "<00:00" in captured.err
    # wandb (offline): the settings, the rows as a table, the plot as an image
    (record,) = (whole / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    for key in (b"eval/metrics", b"eval/fid_vs_clip", b"clip_score", b"extractors", b"/fid"):
        assert key in data, key
    media = record.parent / "files" / "media"
    assert list(media.glob("images/eval/fid_vs_clip_*.png"))
    (table,) = media.glob("table/eval/metrics_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"][:2] == ["checkpoint", "scale"] and len(logged["data"]) == 1
    with (whole / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["scale"]) for r in rows] == [4.0]
    for column in ("checkpoint", "scale", "sampler", "steps", "num", "fid", "kid", "kid_std",
                   "clip_score", "seconds"):  # fmt: skip
        assert column in rows[0]
    assert all(r["num"] == "2" and r["sampler"] == "plms" and r["steps"] == "2" for r in rows)
    assert all(math.isfinite(float(r["fid"])) and float(r["fid"]) >= 0 for r in rows)
    assert all(r["reference_num"] == "3" for r in rows)
    assert (whole / "fid_vs_clip.png").stat().st_size > 0
    assert len(list((whole / "grids").rglob("scale=*.png"))) == 1

    # Interrupt after the first of the two chunks (one image each), then continue.
    real_chunk, calls = eval_run._generate_chunk, []

    def interrupted(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_chunk(*args, **kwargs)

    part = tmp_path / "part"
    monkeypatch.setattr(eval_run, "_generate_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(eval_args(tiny_inputs, part, scales="4"))
    assert not (part / "metrics.csv").exists()
    resumed = []
    monkeypatch.setattr(eval_run, "_generate_chunk",
                        lambda *a, **k: resumed.append(a[4]) or real_chunk(*a, **k))  # fmt: skip
    assert main(eval_args(tiny_inputs, part, scales="4")) == 0
    assert resumed == [1]  # only the missing chunk was generated
    assert without_seconds(part / "metrics.json") == without_seconds(whole / "metrics.json")
    capsys.readouterr()
    # Other settings into the same folder are refused, naming what differs.
    assert main(eval_args(tiny_inputs, part, "--sampler", "ddim", scales="4")) == 2
    assert "sampler differ" in capsys.readouterr().err


@pytest.fixture(scope="module")
def one_process(tiny_inputs: dict[str, Path], tmp_path_factory) -> Path:
    """A single-process eval at scales 1 and 4, on one thread (as the ranks below run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = tmp_path_factory.mktemp("one-process")
        assert main(eval_args(tiny_inputs, one)) == 0
        return one
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_ranks_split_the_chunks_and_give_the_numbers_of_one(
    tiny_inputs: dict[str, Path], one_process: Path, tmp_path: Path, monkeypatch, one_thread
) -> None:
    """Rank 1 of 2 generates its chunks and writes no metrics; rank 0 generates the rest and
    computes rows equal to a single process's."""
    one, two = one_process, tmp_path / "two"
    done = []
    real_chunk = eval_run._generate_chunk
    monkeypatch.setattr(eval_run, "_generate_chunk",
                        lambda *a, **k: done.append(a[4]) or real_chunk(*a, **k))  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(eval_args(tiny_inputs, two)) == 0
    assert done == [1, 1] and not (two / "metrics.json").exists()  # chunk 1 of each scale
    monkeypatch.setenv("RANK", "0")
    assert main(eval_args(tiny_inputs, two)) == 0
    assert done == [1, 1, 0, 0]
    assert without_seconds(two / "metrics.json") == without_seconds(one / "metrics.json")


def test_eval_refuses_other_kinds_and_architectures_naming_the_file(
    tiny_inputs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    from sdtrain.models.adapters.original import write_checkpoint
    from sdtrain.models.stable_diffusion import build_stable_diffusion
    from sdtrain.trainer.experiment import load_config

    cfg = load_config([ROOT / "configs/models/tiny-inpainting.yaml"])
    inpainting = write_checkpoint(tmp_path / "inpaint.safetensors",
                                  **build_stable_diffusion(cfg.model).original_parts())  # fmt: skip
    args = eval_args(tiny_inputs, tmp_path / "out")
    args[args.index("--checkpoint") + 1] = str(inpainting)
    args[args.index("--config") + 1] = "tiny-inpainting"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{inpainting} is an inpainting model (model.conditioning: inpainting" in err
    assert "eval measures text-to-image checkpoints" in err and "--image" not in err
    # A text-to-image file read with another architecture's config: the file is named.
    wider = [*eval_args(tiny_inputs, tmp_path / "out2"), "model.unet.model_channels=64"]
    assert main(wider) == 1
    err = capsys.readouterr().err
    assert f"{tiny_inputs['checkpoint']}: UNet weights do not match the model" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(
    tiny_inputs: dict[str, Path], one_process: Path, tmp_path: Path, monkeypatch, one_thread
) -> None:
    """Rank 1 in a second process (as torchrun / srun start it), rank 0 here, at the same time,
    into one OUT: the rows equal a single process's (every process on one thread: float sums
    depend on the thread count)."""
    one, two = one_process, tmp_path / "two"
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
    other = subprocess.Popen(
        [sys.executable, "-m", "sdtrain.launch.cli", *eval_args(tiny_inputs, two)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    real_wait = eval_run._wait_for_chunks

    def wait_while_rank_1_lives(cfg, models, n, out):
        while True:
            try:
                return real_wait(dataclasses.replace(cfg, wait_seconds=2.0), models, n, out)
            except ConfigError:
                if other.poll() not in (None, 0):
                    raise AssertionError(f"rank 1 failed: {other.communicate()[1]}") from None

    generated = []
    real_chunk = eval_run._generate_chunk
    monkeypatch.setattr(eval_run, "_wait_for_chunks", wait_while_rank_1_lives)
    monkeypatch.setattr(eval_run, "_generate_chunk",
                        lambda *a, **k: generated.append(a[4]) or real_chunk(*a, **k))  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    try:
        assert main(eval_args(tiny_inputs, two)) == 0
    finally:
        _, err = other.communicate(timeout=600)
    assert other.returncode == 0, err
    assert generated == [0, 0]  # rank 0 made chunk 0 of each scale; rank 1 the rest
    assert without_seconds(two / "metrics.json") == without_seconds(one / "metrics.json")
