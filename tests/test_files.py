"""``sdtrain.utils.files``: permissions under the umask, integrity records, temp files of dead
writers, disk-full and not-a-checkpoint messages. Fast: no training here (see test_reliability)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch

from sdtrain.errors import CheckpointError, WriteError
from sdtrain.models.adapters.original import read_checkpoint, write_checkpoint
from sdtrain.utils import files


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def tmpfs(folder: Path, size: str = "256k", read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs mounted at ``folder`` (root only; the test is skipped elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


@pytest.mark.parametrize("mask", [0o022, 0o027])
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_written_files_get_the_mode_the_umask_gives(tmp_path: Path, mask: int, suffix: str) -> None:
    unet = {"w": torch.ones(3)}
    with umask(mask):
        path = write_checkpoint(tmp_path / f"m{suffix}", unet=unet)
        text = files.write_text(tmp_path / "config.yaml", "a: 1\n")
        record = files.save_torch(tmp_path / "step.ckpt", {"x": 1}, integrity={"global_step": 1})
    expected = 0o666 & ~mask  # 0o644 under 022, 0o640 under 027
    assert mode(path) == expected
    assert mode(text) == expected
    assert mode(record) == expected and mode(files.integrity_path(record)) == expected


def test_integrity_record_catches_a_byte_flip_and_truncation(tmp_path: Path) -> None:
    path = files.save_torch(tmp_path / "a.ckpt", {"w": torch.arange(4096.0)}, integrity={"n": 1})
    assert files.verify_integrity(path) is True
    assert files.read_integrity(path)["n"] == 1
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"a\.ckpt: does not match its integrity record"):
        files.load_torch(path)
    path.write_bytes(bytes(data[:1000]))
    with pytest.raises(CheckpointError, match=r"truncated"):
        files.load_torch(path)
    # A file without a record is not verified (False), and still opens.
    plain = files.save_torch(tmp_path / "b.ckpt", {"w": torch.ones(2)})
    assert files.verify_integrity(plain) is False and files.load_torch(plain)["w"].sum() == 2


def test_rewriting_without_a_record_removes_the_stale_one(tmp_path: Path) -> None:
    path = files.save_torch(tmp_path / "a.ckpt", {"w": 1}, integrity={})
    files.save_torch(path, {"w": 2})
    assert not files.integrity_path(path).exists() and files.load_torch(path) == {"w": 2}


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_random_bytes_are_not_a_checkpoint_and_no_unsafe_advice(
    tmp_path: Path, suffix: str
) -> None:
    for name, data in (("random", os.urandom(4096)), ("pickle-like", b"\x80" + os.urandom(999))):
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            read_checkpoint(path)
        message = str(info.value)
        assert str(path) in message and "not a checkpoint" in message
        assert "weights_only=False" not in message


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(dead.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = files.temp_path(tmp_path / "x").name.split(".")[2]
        old_style = tmp_path / f".step=00000004.ckpt.{dead_pid}.tmp"
        new_style = tmp_path / f".step=00000006.ckpt.{host}.{dead_pid}.0123abcd.tmp"
        alive = tmp_path / f".step=00000008.ckpt.{host}.{live.pid}.0123abcd.tmp"
        foreign = tmp_path / f".step=00000008.ckpt.otherhost.{dead_pid}.0123abcd.tmp"
        for path in (old_style, new_style, alive, foreign):
            path.write_bytes(b"partial")
        keep = tmp_path / "step=00000002.ckpt"
        keep.write_bytes(b"x")
        assert files.remove_stale_temp_files(tmp_path) == sorted([old_style, new_style])
        # A file of another machine is only stale once it has not changed for a while.
        past = os.stat(foreign).st_mtime - files.FOREIGN_TEMP_GRACE_S - 5
        os.utime(foreign, (past, past))
        assert files.remove_stale_temp_files(tmp_path) == [foreign]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, keep.name])
    finally:
        live.kill()
        live.wait()


def test_injected_enospc_names_the_file_and_keeps_the_previous(tmp_path: Path, monkeypatch) -> None:
    path = files.save_torch(tmp_path / "m.ckpt", {"w": 1})
    before = path.read_bytes()

    def full(obj, target, *args, **kwargs):
        Path(target).write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteError) as info:
        files.save_torch(path, {"w": 2})
    assert str(info.value).startswith(f"{path}: no space left on device while writing it")
    assert info.value.reason == "no space left on device"
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.ckpt"]


def test_real_full_disk_on_a_small_tmpfs(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", size="256k") as folder:
        small = write_checkpoint(folder / "small.safetensors", unet={"w": torch.ones(16)})
        before = small.read_bytes()
        for suffix in (".ckpt", ".safetensors"):
            with pytest.raises(WriteError, match="no space left on device") as info:
                write_checkpoint(folder / f"big{suffix}", unet={"w": torch.ones(200_000)})
            assert f"big{suffix}" in str(info.value)
        with pytest.raises(WriteError, match="no space left on device"):
            write_checkpoint(small, unet={"w": torch.ones(200_000)})
        assert small.read_bytes() == before
        assert sorted(os.listdir(folder)) == ["small.safetensors"]


def test_read_only_folder_is_a_clear_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", read_only=True) as folder:
        problem = files.cannot_write(folder / "x.png")
        assert problem is not None and "read-only" in problem and "x.png" in problem
        with pytest.raises(WriteError, match=r"x\.safetensors: the file system is read-only"):
            files.write_safetensors(folder / "x.safetensors", {"w": torch.ones(1)})
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "not a folder" in (files.cannot_write(blocker / "x.ckpt") or "")


def test_safetensors_round_trip_through_files(tmp_path: Path) -> None:
    path = files.write_safetensors(tmp_path / "w.safetensors", {"a": torch.ones(2)}, {"k": "v"})
    tensors, metadata = files.read_safetensors(path)
    assert torch.equal(tensors["a"], torch.ones(2)) and metadata == {"k": "v"}
    assert torch.equal(safetensors.torch.load_file(path)["a"], torch.ones(2))
