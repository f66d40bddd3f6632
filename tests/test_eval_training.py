"""The ``eval:`` section: FID / KID / CLIP score during training (tiny model, seeded random
extractors, CPU). The figures logged at a step equal those ``sdtrain eval`` computes from that
step's checkpoint; they reach the CSV log next to the loss, RUN/eval/metrics.csv and the offline
wandb run; evaluating leaves the training weights as they would have been without it."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.errors import ConfigError
from sdtrain.launch.cli import main
from sdtrain.trainer.eval_callback import EvalCallback
from sdtrain.trainer.experiment import ExperimentConfig, load_config
from sdtrain.trainer.fit import fit

ROOT = Path(__file__).resolve().parents[1]
CLIP = "ViT-S-32"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-training")
    write_synthetic_shards(root / "shards", SyntheticSpec(samples=8, per_shard=8, min_side=96,
                                                          max_side=112))  # fmt: skip
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    ref = root / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    return {"root": root, "shards": root / "shards", "prompts": prompts, "reference": ref}


EVAL = ["eval.num=2", "eval.scales=[1.0,4.0]", "eval.steps=2", "eval.size=32", "eval.batch=1",
        "eval.seed=1", "eval.extractor_seed=0", f"eval.clip_model={CLIP}",
        "eval.inception_features=64"]  # fmt: skip


def experiment(inputs: dict[str, Path], run: Path, *overrides: str) -> ExperimentConfig:
    return load_config(
        [ROOT / "configs/experiments/tiny-base.yaml"],
        [
            f"data.shards=[{inputs['shards']}]", f"run.dir={run}", "data.num_workers=0",
            "data.batch_size=2", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
            "checkpoint.every_n_steps=2", "logging.wandb=false",
            f"eval.prompts={inputs['prompts']}", f"eval.reference={inputs['reference']}", *EVAL,
            *overrides,
        ],
    )  # fmt: skip


@pytest.fixture(scope="module")
def evaluated_run(inputs: dict[str, Path]) -> Path:
    import wandb

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        try:
            return fit(experiment(inputs, inputs["root"] / "run", "eval.every_n_steps=2",
                                  "logging.wandb=true"))  # fmt: skip
        finally:
            wandb.finish()


def test_eval_during_training_is_logged_next_to_the_loss(evaluated_run: Path) -> None:
    with (evaluated_run / "eval" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["step"], float(r["scale"])) for r in rows] == [("2", 1.0), ("2", 4.0)]
    assert all(r["num"] == "2" and "random features" in r["features"] for r in rows)
    with (evaluated_run / "logs" / "version_0" / "metrics.csv").open() as handle:
        logged = [r for r in csv.DictReader(handle) if r.get("eval/fid_scale1")]
    assert len(logged) == 1 and logged[0]["step"] == "2"
    for key in ("fid", "kid", "kid_std", "clip_score"):
        for row in rows:
            value = logged[0][f"eval/{key}_scale{float(row['scale']):g}"]
            assert float(value) == pytest.approx(float(row[key]), rel=1e-6)
    records = list((evaluated_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1 and b"eval/fid_scale4" in records[0].read_bytes()


def test_the_figures_equal_sdtrain_eval_of_that_steps_checkpoint(
    evaluated_run: Path, inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    code = main([
        "eval", "--checkpoint", str(evaluated_run / "checkpoints" / "step=00000002.ckpt"),
        "--prompts", str(inputs["prompts"]), "--reference", str(inputs["reference"]),
        "--scales", "1,4", "--steps", "2", "--size", "32", "--num", "2", "--batch", "1",
        "--seed", "1", "--extractor-seed", "0", "--clip-model", CLIP, "--inception-features", "64",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
    ])  # fmt: skip
    assert code == 0
    standalone = json.loads((out / "metrics.json").read_text())
    with (evaluated_run / "eval" / "metrics.csv").open() as handle:
        during = list(csv.DictReader(handle))
    for a, b in zip(standalone, during, strict=True):
        for key in ("fid", "kid", "clip_score"):
            assert float(b[key]) == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_eval_leaves_training_unchanged(evaluated_run: Path, inputs: dict[str, Path]) -> None:
    plain = fit(experiment(inputs, inputs["root"] / "plain"))
    assert not (plain / "eval").exists()
    a = torch.load(evaluated_run / "checkpoints" / "step=00000002.ckpt", weights_only=True)
    b = torch.load(plain / "checkpoints" / "step=00000002.ckpt", weights_only=True)
    unet = [k for k in a["state_dict"] if k.startswith("model.unet.")]
    assert unet and all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in unet)


def test_eval_section_needs_inputs_and_a_text_to_image_model(inputs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"is needed when eval\.every_n_steps > 0") as caught:
        load_config([ROOT / "configs/experiments/tiny-base.yaml"], ["eval.every_n_steps=5"])
    assert caught.value.key == "eval.prompts"
    # Weights files are checked when training starts (a run's config loads again elsewhere).
    cfg = load_config([ROOT / "configs/experiments/tiny-base.yaml"], [
        "eval.every_n_steps=5", "eval.prompts=p.txt", "eval.reference=ref",
        "eval.inception_weights=/nonexistent/inception.pth", "eval.clip_weights=clip.pt",
    ])  # fmt: skip
    with pytest.raises(ConfigError, match=r"no file at /nonexistent/inception\.pth: set eval\."):
        EvalCallback(cfg, inputs["root"] / "unused")
    with pytest.raises(ConfigError, match=r"inpainting model .*eval measures text-to-image"):
        load_config([ROOT / "configs/experiments/tiny-inpainting.yaml"], [
            "eval.every_n_steps=5", f"eval.prompts={inputs['prompts']}", "eval.reference=ref",
            "eval.extractor_seed=0",
        ])  # fmt: skip


def test_a_resumed_run_keeps_the_earlier_evals(
    evaluated_run: Path, inputs: dict[str, Path]
) -> None:
    """(Last: it extends the module's run.) Resumed to step 4, the run evaluates step 4 and keeps
    step 2's rows, numbers as numbers, in RUN/eval/metrics.csv and the settings folder."""
    before = (evaluated_run / "eval" / "metrics.csv").read_text().splitlines()
    fit(experiment(inputs, evaluated_run, "eval.every_n_steps=2", "trainer.max_steps=4",
                   "resume=auto"))  # fmt: skip
    after = (evaluated_run / "eval" / "metrics.csv").read_text().splitlines()
    assert after[: len(before)] == before
    with (evaluated_run / "eval" / "metrics.csv").open() as handle:
        assert [(r["step"], r["scale"]) for r in csv.DictReader(handle)] == [
            ("2", "1.0"), ("2", "4.0"), ("4", "1.0"), ("4", "4.0")]  # fmt: skip
    (folder,) = [p for p in (evaluated_run / "eval").iterdir() if p.is_dir() and p.name != "cache"]
    rows = json.loads((folder / "metrics.json").read_text())
    assert [Path(r["checkpoint"]).name for r in rows] == ["step=00000002"] * 2 + [
        "step=00000004"
    ] * 2
    assert all(isinstance(r["fid"], float) and isinstance(r["num"], int) for r in rows)
