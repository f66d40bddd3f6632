"""Checkpoint faults and resume mistakes, through the command line (``sdtrain.launch.cli.main``):
a damaged newest checkpoint, fallback, divergence with ``keep_last``, a full disk during a save,
temp files of dead writers, unwritable places, a changed model on resume and files that are not
training checkpoints. Each case checks the exit code and the one message, never a traceback."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.launch.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, main
from sdtrain.trainer.checkpoints import choose_resume, step_checkpoints
from sdtrain.utils import files

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reliability-shards")
    write_synthetic_shards(out, SyntheticSpec(samples=24, per_shard=6, min_side=64, max_side=96))
    return out


def fit_args(run: Path, shards: Path, *overrides: str, experiment: str = "tiny-base") -> list[str]:
    return [
        "fit", "--config", str(EXPERIMENTS / f"{experiment}.yaml"), f"data.shards=[{shards}]",
        f"run.dir={run}", "logging.wandb=false", "data.num_workers=0", "data.batch_size=2",
        "checkpoint.every_n_steps=2", "checkpoint.keep_last=3", *overrides,
    ]  # fmt: skip


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.fixture(scope="module")
def base_run(shards: Path, tmp_path_factory) -> Path:
    """A healthy tiny-base run with step=2 and step=4 checkpoints."""
    run = tmp_path_factory.mktemp("runs") / "base"
    assert main(fit_args(run, shards, "trainer.max_steps=4")) == EXIT_OK
    return run


def copy_run(base_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step={step:08d}.ckpt"


def flip_bytes(path: Path) -> None:
    """XOR bytes in the middle of the file (tensor data); the zip still opens."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist()


# ---------------------------------------------------------------------------------------------
# Integrity and fallback
# ---------------------------------------------------------------------------------------------


def test_byte_flip_in_newest_checkpoint_is_refused_and_resume_falls_back(
    base_run: Path, shards: Path, tmp_path: Path, capsys
) -> None:
    run = copy_run(base_run, tmp_path)
    newest = ckpt(run, 4)
    flip_bytes(newest)
    for args in (
        ["checkpoint", "inspect", str(newest)],
        ["export", str(newest), str(tmp_path / "out.safetensors")],
        ["sample", "--checkpoint", str(newest), "--prompt", "x", "--out", str(tmp_path / "s.png"),
         "--steps", "2", "--size", "64"],
    ):  # fmt: skip
        code, _, err = run_cli(capsys, args)
        assert code == EXIT_FAILURE and "does not match its integrity record" in err, err
        assert str(newest) in err
    code, _, err = run_cli(capsys, fit_args(run, shards, "trainer.max_steps=6", f"resume={newest}"))
    assert code == EXIT_USAGE and "integrity record" in err and "resume" in err

    code, out, _ = run_cli(capsys, fit_args(run, shards, "trainer.max_steps=6", "resume=auto"))
    assert code == EXIT_OK
    assert "skipped step=00000004.ckpt: does not match its integrity record" in out
    assert f"resume from: {ckpt(run, 2)}" in out
    assert (run / "checkpoints" / "skipped" / "step=00000004.ckpt").is_file()
    assert [s for s, _ in step_checkpoints(run / "checkpoints")] == [2, 4, 6]
    assert files.verify_integrity(ckpt(run, 4)) and files.verify_integrity(ckpt(run, 6))


@pytest.mark.parametrize("fault", ["truncated", "empty", "stray", "not-training"])
def test_resume_auto_takes_the_newest_checkpoint_that_verifies(
    base_run: Path, tmp_path: Path, fault: str
) -> None:
    run = copy_run(base_run, tmp_path)
    folder = run / "checkpoints"
    bad = ckpt(run, 4)
    if fault == "truncated":
        bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
        reason = "truncated"
    elif fault == "empty":
        bad.write_bytes(b"")
        reason = "empty"
    elif fault == "stray":
        bad = ckpt(run, 6)
        bad.write_bytes(os.urandom(2048))
        reason = "not a checkpoint"
    else:
        bad = ckpt(run, 6)
        torch.save({"state_dict": {"w": torch.zeros(1)}}, bad)
        reason = "not a training checkpoint"
    choice = choose_resume(folder)
    expected = ckpt(run, 2) if fault in ("truncated", "empty") else ckpt(run, 4)
    assert choice.path == expected
    assert [p for p, _ in choice.skipped] == [bad] and reason in choice.skipped[0][1]


def test_resume_auto_stops_when_no_checkpoint_verifies(
    base_run: Path, shards: Path, tmp_path: Path, capsys
) -> None:
    run = copy_run(base_run, tmp_path)
    flip_bytes(ckpt(run, 4))
    ckpt(run, 2).write_bytes(b"")
    code, _, err = run_cli(capsys, fit_args(run, shards, "trainer.max_steps=6", "resume=auto"))
    assert code == EXIT_USAGE and "no checkpoint in" in err
    assert (
        "step=00000004.ckpt: does not match" in err and "step=00000002.ckpt: file is empty" in err
    )


# ---------------------------------------------------------------------------------------------
# Divergence and keep_last
# ---------------------------------------------------------------------------------------------


def test_divergence_keeps_the_checkpoint_before_the_streak_and_resume_takes_it(
    base_run: Path, shards: Path, tmp_path: Path, capsys
) -> None:
    run = copy_run(base_run, tmp_path)
    diverge = ("optim.lr=1e30", "optim.warmup_steps=0", "trainer.max_steps=60",
               "checkpoint.keep_last=2", "trainer.max_nonfinite_steps=8",
               "resume=auto")  # fmt: skip
    code, _, err = run_cli(capsys, fit_args(run, shards, *diverge))
    assert code == EXIT_FAILURE and "consecutive steps had a non-finite" in err, err
    match = re.search(r"before these steps, (step=\d{8}\.ckpt), is kept", err)
    assert match, err
    kept = run / "checkpoints" / match.group(1)
    assert kept.is_file() and files.read_integrity(kept)["nonfinite_in_a_row"] == 0
    later = [p for s, p in step_checkpoints(run / "checkpoints") if p.name > kept.name]
    assert len(later) == 2, "keep_last=2 newer checkpoints, plus the one before the streak"
    for path in later:
        record = torch.load(path, weights_only=True)["sdtrain"]["nonfinite"]
        assert record["in_a_row"] > 0 and record["steps"], record
        assert files.read_integrity(path)["nonfinite_in_a_row"] == record["in_a_row"]

    step = int(kept.name[5:13])
    code, out, _ = run_cli(
        capsys, fit_args(run, shards, f"trainer.max_steps={step + 2}", "resume=auto")
    )
    assert code == EXIT_OK and f"resume from: {kept}" in out
    assert all(f"skipped {p.name}: taken during" in out for p in later)
    weights = torch.load(ckpt(run, step + 2), weights_only=True)["state_dict"]
    assert all(torch.isfinite(w).all() and w.abs().max() < 1e6 for w in weights.values())


# ---------------------------------------------------------------------------------------------
# Disk full, temp files, unwritable places
# ---------------------------------------------------------------------------------------------


def test_no_space_during_a_save_names_the_file_and_the_intact_checkpoint(
    base_run: Path, shards: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    run = copy_run(base_run, tmp_path)
    real_save = torch.save

    def save(obj, target, *args, **kwargs):
        if ".step=00000006.ckpt" in str(target):
            Path(target).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    code, _, err = run_cli(capsys, fit_args(run, shards, "trainer.max_steps=8", "resume=auto"))
    assert code == EXIT_FAILURE
    assert (
        f"no space left on device while writing {ckpt(run, 6)}; the previous checkpoint "
        "step=00000004.ckpt is intact" in err
    ), err
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")) == []


def test_stale_temp_files_are_removed_at_start_and_keep_last_counts_checkpoints(
    base_run: Path, shards: Path, tmp_path: Path, capsys
) -> None:
    run = copy_run(base_run, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    host = files.temp_path(run / "x").name.split(".")[2]
    pid = int(dead.stdout)
    stale = [
        run / "checkpoints" / f".step=00000006.ckpt.{pid}.tmp",
        run / "checkpoints" / f".step=00000008.ckpt.{host}.{pid}.0123abcd.tmp",
        run / f".config.yaml.{host}.{pid}.0123abcd.tmp",
    ]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    code, out, _ = run_cli(
        capsys,
        fit_args(run, shards, "trainer.max_steps=8", "checkpoint.keep_last=2", "resume=auto"),
    )
    assert code == EXIT_OK and "removed 3 temp file(s) left by writers that died" in out
    assert not any(p.exists() for p in stale)
    assert [s for s, _ in step_checkpoints(run / "checkpoints")] == [6, 8]
    names = sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_file())
    assert names == [f"step={s:08d}.ckpt{x}" for s in (6, 8) for x in ("", ".integrity.json")]


def test_unwritable_run_folder_and_outputs_exit_2_before_any_work(
    base_run: Path, shards: Path, tmp_path: Path, capsys
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, _, err = run_cli(capsys, fit_args(blocker, shards, "trainer.max_steps=2"))
    assert code == EXIT_USAGE and f"the run folder {blocker} is a file" in err
    for args in (
        ["export", str(base_run), str(blocker / "x.safetensors")],
        ["sample", "--checkpoint", str(base_run), "--prompt", "x", "--out", str(blocker / "x.png"),
         "--steps", "2", "--size", "64"],
    ):  # fmt: skip
        code, _, err = run_cli(capsys, args)
        assert code == EXIT_USAGE and f"{blocker} is a file, not a folder" in err, err

    from test_files import tmpfs

    with tmpfs(tmp_path / "ro", read_only=True) as folder:
        code, _, err = run_cli(capsys, fit_args(folder / "run", shards, "trainer.max_steps=2"))
        assert code == EXIT_USAGE and "the file system is read-only" in err, err
        code, _, err = run_cli(capsys, ["export", str(base_run), str(folder / "x.ckpt")])
        assert code == EXIT_USAGE and "read-only" in err and "x.ckpt" in err


# ---------------------------------------------------------------------------------------------
# Operator mistakes on resume (issue 12)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "experiment", "expected"),
    [
        (["model.unet.num_res_blocks=2"], "tiny-base",
         ["model.unet.num_res_blocks: 1 in step=00000004.ckpt, 2 in the config"]),
        (["model.unet.model_channels=64"], "tiny-base",
         ["model.unet.model_channels: 32 in step=00000004.ckpt, 64 in the config"]),
        (["ema.enabled=false"], "tiny-base",
         ["ema.enabled: True in step=00000004.ckpt, False in the config"]),
        ([], "tiny-inpainting",
         ["model.conditioning: txt2img in step=00000004.ckpt, inpainting in the config",
          "model.unet.in_channels: 4 in step=00000004.ckpt, 9 in the config"]),
    ],
)  # fmt: skip
def test_resume_with_a_changed_model_names_each_difference(
    base_run: Path, shards: Path, tmp_path: Path, capsys, overrides, experiment, expected
) -> None:
    run = copy_run(base_run, tmp_path)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*"))
    args = fit_args(run, shards, "trainer.max_steps=6", "resume=auto", *overrides,
                    experiment=experiment)  # fmt: skip
    code, _, err = run_cli(capsys, args)
    assert code == EXIT_USAGE, err
    assert all(line in err for line in expected), err
    assert "keep the old value" in err and "new run folder" in err and "init_from=" in err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.rglob("*")) == before


def test_resume_from_an_exported_file_says_it_is_not_a_training_checkpoint(
    base_run: Path, shards: Path, tmp_path: Path, capsys
) -> None:
    for suffix in (".safetensors", ".ckpt"):
        exported = tmp_path / f"exported{suffix}"
        assert main(["export", str(base_run), str(exported)]) == EXIT_OK
        args = fit_args(tmp_path / "new", shards, "trainer.max_steps=2", f"resume={exported}")
        code, _, err = run_cli(capsys, args)
        assert code == EXIT_USAGE and "is not a training checkpoint" in err, err
        assert f"init_from={exported}" in err and "pytorch-lightning_version" not in err


def test_random_bytes_as_a_checkpoint_say_so_without_unsafe_advice(
    base_run: Path, shards: Path, tmp_path: Path, capsys
) -> None:
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(os.urandom(4096))
    cases = [
        (["export", str(junk), str(tmp_path / "x.ckpt")], EXIT_FAILURE),
        (["sample", "--checkpoint", str(junk), "--prompt", "x", "--out", str(tmp_path / "x.png"),
          "--steps", "2", "--size", "64"], EXIT_FAILURE),
        (fit_args(tmp_path / "new", shards, "trainer.max_steps=2", f"resume={junk}"), EXIT_USAGE),
    ]  # fmt: skip
    for args, expected in cases:
        code, _, err = run_cli(capsys, args)
        assert code == expected and f"{junk}: is not a checkpoint" in err, err
        assert "weights_only" not in err


# ---------------------------------------------------------------------------------------------
# Permissions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_every_file_sdtrain_writes_respects_the_umask(
    shards: Path, tmp_path: Path, capsys, mask: int
) -> None:
    old = os.umask(mask)
    try:
        run = tmp_path / "run"
        assert main(fit_args(run, shards, "trainer.max_steps=2")) == EXIT_OK
        exported = [tmp_path / "e.ckpt", tmp_path / "e.safetensors"]
        for out in exported:
            assert main(["export", str(run), str(out)]) == EXIT_OK
        converted = [tmp_path / "c.safetensors", tmp_path / "c.ckpt"]
        assert main(["checkpoint", "convert", str(exported[0]), str(converted[0])]) == EXIT_OK
        assert main(["checkpoint", "convert", str(exported[1]), str(converted[1])]) == EXIT_OK
        png = tmp_path / "s.png"
        args = ["sample", "--checkpoint", str(run), "--prompt", "x", "--out", str(png),
                "--steps", "2", "--size", "64", "--seed", "1"]  # fmt: skip
        assert main(args) == EXIT_OK
    finally:
        os.umask(old)
    capsys.readouterr()
    written = [ckpt(run, 2), files.integrity_path(ckpt(run, 2)), run / "config.yaml",
               *exported, *converted, png]  # fmt: skip
    expected = 0o666 & ~mask
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    assert modes == {p.name: oct(expected) for p in written}
