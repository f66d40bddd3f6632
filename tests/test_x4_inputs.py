"""Bad inputs to an x4 upscaler, through ``sdtrain sample`` (issue 17): a low-res image whose
size is not the configured fraction of the target and a noise level outside [0,
max_noise_level] exit 2 (usage), a 4-channel base checkpoint given as an upscaler exits 1 (a
checkpoint error), each with one line naming the value; nothing is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.launch.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from sdtrain.models.adapters.original import write_checkpoint
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import load_config

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
TINY_X4 = MODELS / "tiny-x4-upscaler.yaml"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("x4-inputs")
    torch.manual_seed(0)
    x4 = StableDiffusion(load_config([TINY_X4]).model)
    base = StableDiffusion(load_config([MODELS / "tiny-base.yaml"]).model)
    low = folder / "low.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)).save(low)
    return {
        "x4": write_checkpoint(folder / "x4.ckpt", **x4.original_parts()),
        "base": write_checkpoint(folder / "base.ckpt", **base.original_parts()),
        "low": low,
    }


def sample(files: dict[str, Path], out: Path, *args: str, checkpoint: str = "x4") -> list[str]:
    return ["sample", "--checkpoint", str(files[checkpoint]), "--config", str(TINY_X4),
            "--image", str(files["low"]), "--prompt", "a", "--steps", "1", "--out", str(out),
            *args]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "checkpoint", "code", "message"),
    [
        (["--size", "48"], "x4", EXIT_USAGE, "--size 48 is not 4x the 8 px input"),
        (["--noise-level", "351"], "x4", EXIT_USAGE, "noise level 351 is outside [0, 350]"),
        (["--noise-level", "-1"], "x4", EXIT_USAGE, "noise level -1 is outside [0, 350]"),
        (
            [],
            "base",
            EXIT_FAILURE,
            "4 input channels but 'tiny-x4-upscaler' is an x4 upscaler model with 7",
        ),
    ],
    ids=["size-not-4x", "level-above", "level-below", "base-checkpoint"],
)
def test_bad_input_is_named(files, tmp_path, capsys, args, checkpoint, code, message) -> None:
    out = tmp_path / "up.png"
    assert main(sample(files, out, *args, checkpoint=checkpoint)) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_the_same_call_with_good_inputs_works(files, tmp_path) -> None:
    out = tmp_path / "up.png"
    assert main(sample(files, out, "--size", "32", "--noise-level", "350")) == EXIT_OK
    with Image.open(out) as image:
        assert image.size == (32, 32)
