"""``sdtrain sample`` with out-of-range options: exit code 2, one message naming the option, no
traceback, nothing written (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtrain.launch.cli import EXIT_OK, EXIT_USAGE, main
from sdtrain.models.adapters.original import write_checkpoint
from sdtrain.models.stable_diffusion import build_stable_diffusion
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = ROOT / "configs" / "models" / "tiny-base.yaml"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny base model in the original layout."""
    model = build_stable_diffusion(load_config([TINY_BASE]).model)
    path = tmp_path_factory.mktemp("sample-options") / "tiny.safetensors"
    write_checkpoint(path, **model.original_parts())
    return path


# Options refused before the checkpoint is even opened.
EARLY = [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "-3"], "--steps must be >= 1, got -3"),
    (["--scale", "-1"], "--scale must be a finite number >= 0, got -1.0"),
    (["--scale", "nan"], "--scale must be a finite number >= 0, got nan"),
    (["--scale", "inf"], "--scale must be a finite number >= 0, got inf"),
    (["--eta", "-0.5"], "--eta must be a finite number >= 0, got -0.5"),
    (["--eta", "nan"], "--eta must be a finite number >= 0, got nan"),
    (["--sampler", "plms", "--eta", "0.5"], "--eta must be 0 with --sampler plms"),
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be in [0, 2**64), got -1"),
    (["--seed", str(2**64)], "--seed must be in [0, 2**64)"),
    (["--size", "0"], "--size must be > 0, got 0"),
    (["--size", "-64"], "--size must be > 0, got -64"),
]
# Options refused once the model config is known (still before the model is built).
WITH_MODEL = [
    (["--size", "36"], "--size 36 must be a positive multiple of 16 for tiny-base"),
    (["--steps", "1001"], "--steps 1001 must be at most the model's 1000 diffusion timesteps"),
]


@pytest.mark.parametrize(("options", "message"), EARLY + WITH_MODEL, ids=lambda v: str(v))
def test_out_of_range_options_exit_2_with_one_message(
    checkpoint: Path, tmp_path: Path, capsys, options: list[str], message: str
) -> None:
    out = tmp_path / "out.png"
    source = checkpoint if (options, message) in WITH_MODEL else tmp_path / "missing.ckpt"
    args = ["sample", "--checkpoint", str(source), "--config", str(TINY_BASE), "--prompt", "x"]
    assert main([*args, "--out", str(out), *options]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_edge_values_are_accepted(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "edge.png"
    args = ["sample", "--checkpoint", str(checkpoint), "--config", str(TINY_BASE), "--prompt", "x"]
    edges = ["--steps", "1", "--scale", "0", "--seed", str(2**64 - 1), "--size", "16"]
    assert main([*args, "--out", str(out), *edges]) == EXIT_OK
    assert out.exists()


def test_inputs_the_model_cannot_use_are_named(checkpoint: Path, tmp_path: Path, capsys) -> None:
    depth_cfg = ROOT / "configs" / "models" / "tiny-depth.yaml"
    depth = tmp_path / "depth.safetensors"
    write_checkpoint(
        depth, **build_stable_diffusion(load_config([depth_cfg]).model).original_parts()
    )
    out = tmp_path / "out.png"
    pictures = ["--image", str(tmp_path / "i.png"), "--mask", str(tmp_path / "m.png")]
    cases = [
        (checkpoint, TINY_BASE, pictures, "tiny-base is a text-to-image model: --image/--mask are "
         "not used"),
        (depth, depth_cfg, [], "tiny-depth is a depth model: pass --depth (or --image)"),
    ]  # fmt: skip
    for source, config, extra, message in cases:
        args = ["sample", "--checkpoint", str(source), "--config", str(config), "--prompt", "x"]
        assert main([*args, "--out", str(out), *extra]) == EXIT_USAGE
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not out.exists()
