"""``sdtrain export`` and ``sdtrain sample`` on real tiny runs trained in-process on CPU: the
exported file holds exactly the run's weights in the original layout, and sampling from a run,
a step checkpoint or an exported file is deterministic and agrees across them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.launch.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from sdtrain.launch.export import export_run, read_training_checkpoint
from sdtrain.launch.sample import image_grid, load_mask, open_source, sample_images
from sdtrain.launch.smoke import draw_test_scene
from sdtrain.models.adapters.original import SCHEDULE_BUFFERS, read_checkpoint
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
MODELS = ROOT / "configs" / "models"
FAST = ("--steps", "4", "--size", "64")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export-shards")
    write_synthetic_shards(out, SyntheticSpec(samples=32, per_shard=8, min_side=64, max_side=96))
    return out


def train(experiment: str, shards: Path, run_dir: Path) -> Path:
    from sdtrain.trainer.fit import fit

    overrides = [
        f"data.shards=[{shards}]", f"run.dir={run_dir}", "trainer.max_steps=3",
        # a checkpoint at step 2 and the final one at step 3: the folder must resolve to step 3
        "checkpoint.every_n_steps=2", "logging.wandb=false", "data.num_workers=0",
        "data.batch_size=2",
    ]  # fmt: skip
    return fit(load_config([EXPERIMENTS / f"{experiment}.yaml"], overrides))


@pytest.fixture(scope="module")
def inpainting_run(shards: Path, tmp_path_factory) -> Path:
    return train("tiny-inpainting", shards, tmp_path_factory.mktemp("runs") / "inpainting")


@pytest.fixture(scope="module")
def base_run(shards: Path, tmp_path_factory) -> Path:
    return train("tiny-base", shards, tmp_path_factory.mktemp("runs") / "base")


def step_file(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step={step:08d}.ckpt"


def run_weights(run: Path, step: int = 3) -> tuple[dict, dict]:
    """(raw UNet, EMA shadow) as the trainer saved them, keyed like the UNet."""
    ckpt = torch.load(step_file(run, step), weights_only=True)
    raw = {
        k.removeprefix("model.unet."): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("model.unet.")
    }
    return raw, ckpt["sdtrain"]["ema"]["shadow"]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).copy()


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_export_writes_the_runs_weights_in_the_original_layout(
    inpainting_run: Path, tmp_path: Path, suffix: str, capsys
) -> None:
    raw, ema = run_weights(inpainting_run)
    assert step_file(inpainting_run, 2).is_file()  # the folder has an older checkpoint too
    rng = torch.get_rng_state()

    ema_out, raw_out = tmp_path / f"ema{suffix}", tmp_path / f"raw{suffix}"
    assert main(["export", str(inpainting_run), str(ema_out)]) == EXIT_OK  # EMA by default
    printed = capsys.readouterr().out
    assert str(ema_out) in printed and "step 3" in printed and "EMA weights" in printed
    assert main(["export", str(step_file(inpainting_run, 3)), str(raw_out), "--no-ema"]) == 0
    assert "raw" in capsys.readouterr().out
    assert torch.equal(torch.get_rng_state(), rng), "export must not reseed the caller's RNG"

    exported_ema, exported_raw = read_checkpoint(ema_out), read_checkpoint(raw_out)
    assert_same(exported_ema.unet, ema)
    assert_same(exported_raw.unet, raw)
    assert not all(torch.equal(raw[k], ema[k]) for k in raw)  # they are different weights
    assert exported_ema.global_step == exported_raw.global_step == 3
    assert not exported_ema.ema and not exported_raw.ema

    # Frozen parts: the seeded from-scratch init the run trained with, in the original layout.
    cfg = read_training_checkpoint(inpainting_run).config
    torch.manual_seed(cfg.seed)
    fresh = StableDiffusion(cfg.model)
    assert_same(exported_ema.vae, fresh.autoencoder.state_dict())
    text = fresh.text_encoder.original_state_dict()
    assert_same(exported_ema.text, text)
    assert len(text) == 16 * cfg.model.text_encoder.layers + 5  # 197 for SD1's 12 layers
    assert "transformer.text_model.embeddings.position_ids" in exported_ema.text
    assert sorted(exported_ema.schedule) == sorted(SCHEDULE_BUFFERS)  # safetensors sorts keys
    assert_same(exported_ema.schedule, fresh.schedule.original_buffers())

    model = StableDiffusion(cfg.model)
    assert model.load_original(exported_raw).loaded == ["unet", "vae", "text"]
    assert_same(model.unet.state_dict(), raw)


def test_export_with_ema_keeps_both(inpainting_run: Path, tmp_path: Path) -> None:
    raw, ema = run_weights(inpainting_run)
    result = export_run(inpainting_run, tmp_path / "both.ckpt", with_ema=True)
    assert result.weights == "raw" and result.with_ema and result.global_step == 3
    both = read_checkpoint(result.path)
    assert_same(both.unet, raw)
    assert_same(both.ema, ema)
    assert int(both.ema_meta["num_updates"]) == 3


def test_export_errors_name_the_file(inpainting_run: Path, tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty-run"
    (empty / "checkpoints").mkdir(parents=True)
    assert main(["export", str(empty), str(tmp_path / "x.ckpt")]) == EXIT_FAILURE
    assert str(empty) in capsys.readouterr().err

    garbage = tmp_path / "step=00000001.ckpt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert main(["export", str(garbage), str(tmp_path / "x.ckpt")]) == EXIT_FAILURE
    assert str(garbage) in capsys.readouterr().err

    no_ema = tmp_path / "no-ema" / "step=00000003.ckpt"
    no_ema.parent.mkdir()
    ckpt = torch.load(step_file(inpainting_run, 3), weights_only=True)
    ckpt["sdtrain"]["ema"] = None
    torch.save(ckpt, no_ema)
    assert main(["export", str(no_ema), str(tmp_path / "x.ckpt"), "--ema"]) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert str(no_ema) in err and "no EMA" in err
    assert main(["export", str(no_ema), str(tmp_path / "raw.ckpt")]) == EXIT_OK  # raw default

    out = tmp_path / "x.ckpt"
    assert main(["export", str(inpainting_run), str(out), "--ema", "--with-ema"]) == EXIT_USAGE
    assert main(["export", str(inpainting_run), str(tmp_path / "x.bin")]) == EXIT_USAGE
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def test_sample_base_is_deterministic_per_seed(base_run: Path, tmp_path: Path, capsys) -> None:
    def run(name: str, *extra: str) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        args = ["sample", "--checkpoint", str(base_run), "--prompt", "a red circle", *FAST]
        assert main([*args, "--out", str(out), *extra]) == EXIT_OK
        return read_png(out)

    first, again, other = run("a", "--seed", "1"), run("b", "--seed", "1"), run("c", "--seed", "2")
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert "seed 1" in capsys.readouterr().out

    grid = run("grid", "--seed", "1", "--n", "2", "--sampler", "plms", "--no-ema")
    assert grid.shape == (64, 128, 3)  # two images side by side
    args = ["sample", "--checkpoint", str(base_run), "--prompt", "x", "--out", str(tmp_path / "e")]
    assert main([*args, "--image", "i.png"]) == EXIT_USAGE  # --image without --mask


def test_image_grid_layout() -> None:
    images = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 3, 2, 2)
    grid = image_grid(images)  # 2 columns, 2 rows, the last cell white
    assert grid.shape == (1, 3, 4, 4)
    assert grid[0, 0, 0, 2].item() == 1.0 and grid[0, 0, 2, 0].item() == 2.0
    assert grid[0, 0, 3, 3].item() == 1.0


@pytest.fixture
def inpainting_inputs(tmp_path: Path) -> tuple[Path, Path]:
    image, mask = tmp_path / "scene.png", tmp_path / "mask.png"
    draw_test_scene(96).save(image)
    left_half = np.zeros((96, 96), np.uint8)
    left_half[:, :48] = 255  # white = repaint
    Image.fromarray(left_half).save(mask)
    return image, mask


def test_sample_inpainting_from_run_and_export_agree(
    inpainting_run: Path, inpainting_inputs: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    image, mask = inpainting_inputs
    loaded = load_mask(mask, 64)
    assert loaded.shape == (1, 1, 64, 64) and set(loaded.unique().tolist()) == {0.0, 1.0}
    assert loaded[..., :32].min() == 1 and loaded[..., 32:].max() == 0

    def run(name: str, checkpoint: Path, *extra: str) -> np.ndarray:
        out = tmp_path / f"{name}.png"
        args = ["sample", "--checkpoint", str(checkpoint), "--prompt", "a blue square", *FAST]
        args += ["--image", str(image), "--mask", str(mask), "--seed", "7", "--out", str(out)]
        assert main([*args, *extra]) == EXIT_OK
        return read_png(out)

    from_run = run("run", inpainting_run)
    assert from_run.shape == (64, 64, 3)
    assert np.array_equal(from_run, run("again", step_file(inpainting_run, 3)))

    exported = tmp_path / "inpainting.safetensors"
    assert main(["export", str(inpainting_run), str(exported)]) == EXIT_OK
    config = str(MODELS / "tiny-inpainting.yaml")
    assert np.array_equal(from_run, run("exported", exported, "--config", config))
    capsys.readouterr()

    base = ["sample", "--prompt", "x", *FAST, "--out", str(tmp_path / "e.png")]
    assert main([*base, "--checkpoint", str(inpainting_run)]) == EXIT_USAGE
    assert "--image and --mask" in capsys.readouterr().err
    with_inputs = [*base, "--image", str(image), "--mask", str(mask)]
    assert main([*with_inputs, "--checkpoint", str(exported)]) == EXIT_USAGE
    assert "--config" in capsys.readouterr().err
    base_config = str(MODELS / "tiny-base.yaml")
    assert main([*base, "--checkpoint", str(exported), "--config", base_config]) == EXIT_FAILURE
    assert "input channels" in capsys.readouterr().err  # the config does not fit the file


def test_sample_images_raw_weights_agree_across_sources(
    inpainting_run: Path, inpainting_inputs: tuple[Path, Path], tmp_path: Path
) -> None:
    """The Python API: raw weights from the run and from a --with-ema export (whose model_ema.*
    copy sampling then skips with use_ema=False) give the same images."""
    from sdtrain.launch.sample import load_image

    exported = export_run(inpainting_run, tmp_path / "both.ckpt", with_ema=True).path
    cfg = load_config([MODELS / "tiny-inpainting.yaml"])
    sources = [open_source(inpainting_run, use_ema=False), open_source(exported, cfg, False)]
    assert [s.weights for s in sources] == ["raw", "raw"]
    image, mask = (load_image(inpainting_inputs[0], 64), load_mask(inpainting_inputs[1], 64))
    outputs = [
        sample_images(s.build(), ["a", "b"], image=image, mask=mask, steps=3, seed=3, size=64)
        for s in sources
    ]
    assert outputs[0].shape == (2, 3, 64, 64)
    assert torch.equal(outputs[0], outputs[1])
    assert open_source(exported, cfg).weights == "ema"  # model_ema.* is used by default
