"""The ``sdtrain`` command: smoke run, config printing, checkpoint tools, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.launch.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main


@pytest.mark.parametrize("model", ["tiny-base", "tiny-inpainting"])
def test_smoke_writes_decoded_images(tmp_path: Path, model: str, capsys) -> None:
    assert main(["smoke", "--config", model, "--out", str(tmp_path)]) == EXIT_OK
    stats = json.loads((tmp_path / "smoke.json").read_text())
    assert stats["model"] == model and stats["latent_shape"] == "1x4x8x8"
    for name in ("input", "reconstruction", "noisy", "denoised"):
        with Image.open(tmp_path / f"{name}.png") as image:
            assert image.size == (64, 64)
    if model == "tiny-inpainting":
        with Image.open(tmp_path / "mask.png") as mask:
            values = set(np.unique(np.asarray(mask)).tolist())
        assert values == {0, 255}
    assert "model:" in (tmp_path / "config.yaml").read_text()
    assert "wrote" in capsys.readouterr().out


def test_config_prints_resolved_yaml_with_overrides(capsys) -> None:
    assert main(["config", "--config", "sd2-v", "seed=3"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "parameterization: v" in out and "seed: 3" in out


def test_config_errors_exit_2_and_name_the_key(capsys) -> None:
    assert main(["config", "--config", "sd15", "model.unet.contxt_dim=3"]) == EXIT_USAGE
    assert "model.unet.contxt_dim" in capsys.readouterr().err
    assert main(["config", "--config", "no-such-model"]) == EXIT_USAGE


def test_checkpoint_inspect_and_convert(tmp_path: Path, capsys) -> None:
    from sdtrain.models.adapters.original import read_checkpoint, write_checkpoint
    from sdtrain.models.stable_diffusion import build_stable_diffusion
    from sdtrain.trainer.experiment import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config([root / "configs/models/tiny-base.yaml"])
    model = build_stable_diffusion(cfg.model)
    src = write_checkpoint(tmp_path / "base.ckpt", **model.original_parts())
    assert main(["checkpoint", "inspect", str(src)]) == EXIT_OK
    assert "unet" in capsys.readouterr().out.lower()
    dst = tmp_path / "inpaint.safetensors"
    assert main(["checkpoint", "convert", str(src), str(dst), "--in-channels", "9"]) == EXIT_OK
    widened = read_checkpoint(dst).unet["input_blocks.0.0.weight"]
    assert widened.shape[1] == 9 and torch.count_nonzero(widened[:, 4:]) == 0
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(src.read_bytes()[:1000])
    assert main(["checkpoint", "inspect", str(truncated)]) == EXIT_FAILURE
    assert "truncated.ckpt" in capsys.readouterr().err


def test_fit_in_process_gives_the_callers_signal_handlers_back(tmp_path: Path, capsys) -> None:
    """``main`` turns SIGTERM / SIGINT into a stop while a fit starts up; called in-process (as
    tests do), it puts the caller's handlers back when it returns and when it raises."""
    import signal

    def callers(signum: int, frame: object) -> None:
        raise AssertionError("not expected to run")

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for sig in saved:
            signal.signal(sig, callers)
        missing = tmp_path / "missing.yaml"
        assert main(["fit", "--config", str(missing)]) == EXIT_USAGE  # returns
        assert "missing.yaml" in capsys.readouterr().err
        assert all(signal.getsignal(sig) is callers for sig in saved)
        with pytest.raises(SystemExit):  # raises (argparse)
            main(["fit", "--no-such-option"])
        assert all(signal.getsignal(sig) is callers for sig in saved)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_console_script_help_runs() -> None:
    exe = Path(sys.executable).parent / "sdtrain"
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "sdtrain.launch.cli"]
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    for sub in ("smoke", "config", "checkpoint"):
        assert sub in result.stdout


def test_every_option_of_every_subcommand_is_documented() -> None:
    import argparse

    from sdtrain.launch.cli import build_parser

    undocumented = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{path} {name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                undocumented.append(f"{path} {action.option_strings or action.dest}")

    walk(build_parser(), "sdtrain")
    assert not undocumented
