"""Tests for sdtrain.models.adapters.original and sdtrain.utils.files: the original Stable
Diffusion checkpoint layout on disk.

Key names come from the reference manifests (made by the original code), weights from the tiny
reference fixtures, so a passing test means the files we write are key-for-key original ones.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from conftest import find_reference_dir, load_gzipped_safetensors
from torch import Tensor, nn

from sdtrain.errors import CheckpointError
from sdtrain.models.adapters.original import (
    EMA_PREFIX,
    SCHEDULE_BUFFERS,
    TEXT_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    OriginalCheckpoint,
    build_original_state_dict,
    deflatten_ema,
    ema_name_map,
    flatten_ema,
    flatten_ema_key,
    load_state_dict_strict,
    read_checkpoint,
    summarize,
    widen_input_channels,
    write_checkpoint,
    write_weights_safetensors,
)

MANIFESTS = ("sd15", "sd15-inpainting", "sd2-base", "sd2-v", "sd2-inpainting", "sd2-depth")
SUFFIXES = (".ckpt", ".safetensors")


# ---------------------------------------------------------------------------------------------
# Reference data
# ---------------------------------------------------------------------------------------------


def reference_dir() -> Path:
    """The reference folder found by conftest; skip the test when absent."""
    path = find_reference_dir()
    if path is None:
        pytest.skip("reference data not found (set SDTRAIN_REFERENCE to its folder)")
    return path


@cache
def _manifest(name: str) -> dict:
    return json.loads((reference_dir() / "manifests" / f"{name}.json").read_text())


def manifest_unet_keys(name: str) -> list[str]:
    keys = _manifest(name)["keys"]
    return [k.removeprefix(UNET_PREFIX) for k in keys if k.startswith(UNET_PREFIX)]


@cache
def _gz_weights(name: str) -> dict[str, Tensor]:
    return load_gzipped_safetensors(reference_dir() / "tiny" / name)


def tiny_part(name: str, prefix: str) -> dict[str, Tensor]:
    weights = _gz_weights(name)
    assert all(k.startswith(prefix) for k in weights)
    return {k.removeprefix(prefix): v.clone() for k, v in weights.items()}


def tiny_schedule() -> dict[str, Tensor]:
    path = reference_dir() / "schedule" / "schedule_linear_1000.safetensors"
    raw = safetensors.torch.load_file(path)
    return {name: raw[f"{name}.float32"] for name in SCHEDULE_BUFFERS}


def tiny_sd1_text() -> dict[str, Tensor]:
    """SD1 text key names from the manifest with tiny stand-in tensors (the real tower is 123M)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key in _manifest("sd15")["keys"]:
        if key.startswith(TEXT_PREFIX):
            out[key.removeprefix(TEXT_PREFIX)] = torch.randn(3, generator=gen)
    out["transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return out


def tiny_parts() -> dict[str, dict[str, Tensor]]:
    unet = tiny_part("unet_sd1_weights.safetensors.gz", UNET_PREFIX)
    return {
        "unet": unet,
        "vae": tiny_part("vae_weights.safetensors.gz", VAE_PREFIX),
        "text": tiny_sd1_text(),
        "ema": {k: v * 0.5 + 1 / 256 for k, v in unet.items()},
        "schedule": tiny_schedule(),
    }


def bits_equal(a: Tensor, b: Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    )


def assert_part_equal(got: dict[str, Tensor], want: dict[str, Tensor]) -> None:
    # safetensors does not keep insertion order, so compare as mappings.
    assert sorted(got) == sorted(want)
    bad = [k for k in want if not bits_equal(got[k], want[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


def raw_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with safetensors.safe_open(str(path), "pt") as handle:
            return list(handle.keys())
    return list(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])


# ---------------------------------------------------------------------------------------------
# EMA names
# ---------------------------------------------------------------------------------------------


def test_flattening_gives_the_manifest_ema_keys() -> None:
    manifest = _manifest("sd15-inpainting")
    unet_keys = manifest_unet_keys("sd15-inpainting")
    assert len(unet_keys) == 686
    want = list(manifest["ema_keys"])
    assert want[:2] == ["model_ema.decay", "model_ema.num_updates"]
    assert [EMA_PREFIX + flatten_ema_key(k) for k in unet_keys] == want[2:]
    assert flatten_ema_key("input_blocks.0.0.weight") == "diffusion_modelinput_blocks00weight"


@pytest.mark.parametrize("name", MANIFESTS)
def test_ema_names_round_trip_without_collisions(name: str) -> None:
    unet_keys = manifest_unet_keys(name)
    mapping = ema_name_map(unet_keys)
    assert len(mapping) == len(unet_keys) == 686
    ema = {k: torch.tensor(float(i)) for i, k in enumerate(unet_keys)}
    assert deflatten_ema(flatten_ema(ema), unet_keys) == ema


def test_ema_collision_and_unknown_names_are_errors() -> None:
    with pytest.raises(CheckpointError, match=r"'a\.bc'.*'ab\.c'"):
        ema_name_map(["a.bc", "ab.c"])
    with pytest.raises(CheckpointError, match="diffusion_modelnope"):
        deflatten_ema({"diffusion_modelnope": torch.zeros(1)}, ["a.b"])


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_is_bit_identical(tmp_path: Path, suffix: str) -> None:
    parts = tiny_parts()
    path = tmp_path / f"model{suffix}"
    meta = {"config": json.dumps({"in_channels": 4})}
    written = write_checkpoint(
        path, **parts, global_step=1234, extra_metadata=meta, ema_decay=0.999, ema_num_updates=7
    )
    assert written == path
    assert sorted(os.listdir(tmp_path)) == [path.name]

    ckpt = read_checkpoint(path)
    for name, want in parts.items():
        assert_part_equal(getattr(ckpt, name), want)
    assert ckpt.global_step == 1234
    assert ckpt.metadata["config"] == meta["config"]
    assert ckpt.other == {}
    assert bits_equal(ckpt.ema_meta["decay"], torch.tensor(0.999, dtype=torch.float32))
    assert bits_equal(ckpt.ema_meta["num_updates"], torch.tensor(7, dtype=torch.int32))

    want_keys = [
        *SCHEDULE_BUFFERS,
        *(UNET_PREFIX + k for k in parts["unet"]),
        "model_ema.decay",
        "model_ema.num_updates",
        *(EMA_PREFIX + "diffusion_model" + k.replace(".", "") for k in parts["ema"]),
        *(VAE_PREFIX + k for k in parts["vae"]),
        *(TEXT_PREFIX + k for k in parts["text"]),
    ]
    assert sorted(raw_keys(path)) == sorted(want_keys)
    if suffix == ".ckpt":
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert set(raw) == {"state_dict", "global_step", "metadata"}
        assert list(raw["state_dict"]) == want_keys  # original state_dict() order
        assert raw["global_step"] == 1234


@pytest.mark.parametrize("name", ["sd15-inpainting", "sd2-depth"])
def test_full_manifest_layout_splits_and_rejoins_exactly(tmp_path: Path, name: str) -> None:
    manifest = _manifest(name)
    shapes = {**manifest["keys"], **manifest.get("ema_keys", {})}
    gen = torch.Generator().manual_seed(1)

    def stand_in(shape: list[int]) -> Tensor:
        # Real shapes where cheap; a single value otherwise keeps the test fast.
        return torch.randn(shape if torch.Size(shape).numel() <= 100_000 else [1], generator=gen)

    flat = {key: stand_in(shape) for key, shape in shapes.items()}
    if "model_ema.num_updates" in flat:
        flat["model_ema.num_updates"] = torch.tensor(3, dtype=torch.int32)
    source = tmp_path / "original.ckpt"
    torch.save({"state_dict": flat, "global_step": 5, "epoch": 1}, source)

    ckpt = read_checkpoint(source)
    has_ema = "ema_keys" in manifest
    counts = {p: len(getattr(ckpt, p)) for p in ("unet", "vae", "schedule", "ema", "ema_meta")}
    assert counts == {
        "unet": 686,
        "vae": 248,
        "schedule": 12,
        "ema": 686 if has_ema else 0,
        "ema_meta": 2 if has_ema else 0,
    }
    assert len(ckpt.text) == (197 if name.startswith("sd15") else 294)
    assert ckpt.other == {} and ckpt.global_step == 5
    assert ckpt.unet["input_blocks.0.0.weight"].shape[1] == (9 if has_ema else 5)

    rebuilt = build_original_state_dict(
        unet=ckpt.unet,
        vae=ckpt.vae,
        text=ckpt.text,
        ema=ckpt.ema or None,
        schedule=ckpt.schedule,
        ema_num_updates=3,
    )
    assert sorted(rebuilt) == sorted(flat)
    assert [k for k in rebuilt if not k.startswith(EMA_PREFIX)] == list(manifest["keys"])
    if has_ema:
        assert [k for k in rebuilt if k.startswith(EMA_PREFIX)] == list(manifest["ema_keys"])
    assert all(bits_equal(rebuilt[k], flat[k]) for k in flat if k != "model_ema.decay")


def test_flat_dict_without_lightning_wrapper_is_accepted(tmp_path: Path) -> None:
    unet = tiny_part("unet_sd1_weights.safetensors.gz", UNET_PREFIX)
    flat = {UNET_PREFIX + k: v for k, v in unet.items()}
    flat["lvlb_weights"] = torch.ones(1000)
    path = tmp_path / "weights.pt"
    torch.save(flat, path)
    ckpt = read_checkpoint(path)
    assert_part_equal(ckpt.unet, unet)
    assert list(ckpt.other) == ["lvlb_weights"] and ckpt.global_step is None


def test_ema_only_file_needs_unet_keys(tmp_path: Path) -> None:
    unet = tiny_part("unet_sd1_weights.safetensors.gz", UNET_PREFIX)
    flat = {EMA_PREFIX + flatten_ema_key(k): v for k, v in unet.items()}
    path = tmp_path / "ema.safetensors"
    safetensors.torch.save_file(flat, path)
    with pytest.raises(CheckpointError, match=r"ema\.safetensors"):
        read_checkpoint(path)
    assert_part_equal(read_checkpoint(path, unet_keys=list(unet)).ema, unet)


def test_shared_and_strided_tensors_are_written(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    unet = {"a.weight": base, "b.weight": base, "c.weight": base.t(), "d.bias": base[0, 1:3]}
    for suffix in SUFFIXES:
        ckpt = read_checkpoint(write_checkpoint(tmp_path / f"s{suffix}", unet=unet))
        assert all(torch.equal(ckpt.unet[k], v) for k, v in unet.items())
    assert base.flatten().tolist() == list(range(12))  # inputs untouched


def test_write_weights_safetensors_keeps_keys_and_metadata(tmp_path: Path) -> None:
    sd = {"conv.weight": torch.randn(2, 3), "conv.bias": torch.zeros(2, dtype=torch.float16)}
    path = write_weights_safetensors(tmp_path / "w.safetensors", sd, {"note": "hi"})
    with safetensors.safe_open(str(path), "pt") as handle:
        assert handle.metadata()["note"] == "hi"
        assert all(bits_equal(handle.get_tensor(k), v) for k, v in sd.items())


def test_write_rejects_bad_inputs(tmp_path: Path) -> None:
    unet = {"x.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"schedule buffer.*betaz"):
        write_checkpoint(tmp_path / "a.ckpt", unet=unet, schedule={"betaz": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"a\.ckpt.*no UNet counterpart.*y\.weight"):
        write_checkpoint(tmp_path / "a.ckpt", unet=unet, ema={"y.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"\.bin"):
        write_checkpoint(tmp_path / "a.bin", unet=unet)
    assert os.listdir(tmp_path) == []


def test_summarize_counts_parts(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "m.ckpt", **tiny_parts(), global_step=9)
    text = summarize(read_checkpoint(path))
    assert "global_step 9" in text and "in_channels: 4" in text and "CLIP (SD1" in text
    assert "unet        286 tensors" in text
    assert isinstance(read_checkpoint(path), OriginalCheckpoint)


# ---------------------------------------------------------------------------------------------
# Refusing unsafe or broken files
# ---------------------------------------------------------------------------------------------


def _write_marker(path: str) -> str:
    Path(path).write_text("pickled code ran")
    return path


class _RunsCodeOnLoad:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (_write_marker, (self.marker,))


class _PlainObject:
    pass


@pytest.mark.parametrize("payload", ["reduce", "object"])
def test_pickle_that_needs_code_is_refused_and_not_run(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "marker.txt"
    extra = _RunsCodeOnLoad(marker) if payload == "reduce" else _PlainObject()
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": extra}, path)

    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert "evil.ckpt" in message and "refus" in message and ".safetensors" in message
    assert not marker.exists()
    if payload == "reduce":  # the payload is live: an unsafe load would have run it
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_released_lightning_checkpoint_layout_loads_without_running_lightning(
    tmp_path: Path,
) -> None:
    """Old Lightning checkpoints key ``callbacks`` by the callback class and may hold numpy
    scalars; both are data, so they load, with the class replaced by an inert stand-in."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    path = tmp_path / "released.ckpt"
    unet = {"input_blocks.0.0.weight": torch.ones(2, 4, 3, 3)}
    torch.save(
        {
            "state_dict": {UNET_PREFIX + k: v for k, v in unet.items()},
            "global_step": np.int64(470000),
            "epoch": 2,
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {ModelCheckpoint: {"best_model_path": "last.ckpt"}},
        },
        path,
    )
    ckpt = read_checkpoint(path)
    assert ckpt.global_step == 470000
    assert torch.equal(ckpt.unet["input_blocks.0.0.weight"], unet["input_blocks.0.0.weight"])


def _half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_truncated_file_is_an_error_naming_it(tmp_path: Path, suffix: str) -> None:
    path = write_checkpoint(tmp_path / f"cut{suffix}", unet=tiny_parts()["unet"], global_step=1)
    _half(path)
    with pytest.raises(CheckpointError, match=f"cut{suffix}"):
        read_checkpoint(path)


def test_truncated_legacy_torch_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.ones(500)}}, path, _use_new_zipfile_serialization=False)
    assert read_checkpoint(path).other.keys() == {"w"}
    _half(path)
    with pytest.raises(CheckpointError, match=r"legacy\.ckpt"):
        read_checkpoint(path)


@pytest.mark.parametrize("suffix", [*SUFFIXES, ".pt"])
def test_empty_and_garbage_files_are_errors(tmp_path: Path, suffix: str) -> None:
    empty = tmp_path / f"empty{suffix}"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"empty{suffix}.*empty"):
        read_checkpoint(empty)
    garbage = tmp_path / f"garbage{suffix}"
    garbage.write_bytes(b"not a checkpoint at all " * 10)
    with pytest.raises(CheckpointError, match=f"garbage{suffix}"):
        read_checkpoint(garbage)


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.ckpt.*not found"):
        read_checkpoint(tmp_path / "nope.ckpt")
    odd = tmp_path / "weights.bin"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"weights\.bin.*'\.bin'"):
        read_checkpoint(odd)


def test_not_a_checkpoint_object_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match=r"list\.pt.*state_dict"):
        read_checkpoint(path)
    path = tmp_path / "mixed.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1), "n": 3}}, path)
    with pytest.raises(CheckpointError, match=r"mixed\.ckpt.*'n' is a int"):
        read_checkpoint(path)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def _fail_midway(target: str) -> None:
    with open(target, "wb") as handle:
        handle.write(b"partial bytes")
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_failed_write_keeps_previous_file_and_leaves_no_temp(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_checkpoint(tmp_path / f"model{suffix}", unet={"w": torch.ones(4)}, global_step=1)
    before = path.read_bytes()
    if suffix == ".ckpt":
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: _fail_midway(f))
    else:
        monkeypatch.setattr(safetensors.torch, "save_file", lambda t, f, *a, **k: _fail_midway(f))

    with pytest.raises(CheckpointError, match=f"model{suffix}.*disk full"):
        write_checkpoint(path, unet={"w": torch.zeros(4)}, global_step=2)
    with pytest.raises(CheckpointError, match="disk full"):
        write_checkpoint(tmp_path / f"fresh{suffix}", unet={"w": torch.zeros(4)})

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]
    monkeypatch.undo()
    assert read_checkpoint(path).global_step == 1


# ---------------------------------------------------------------------------------------------
# Widening the input conv
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [9, 5])
def test_widen_input_channels(in_channels: int) -> None:
    unet = tiny_part("unet_sd1_weights.safetensors.gz", UNET_PREFIX)
    key = "input_blocks.0.0.weight"
    old = unet[key].clone()
    wide = widen_input_channels(unet, in_channels)
    assert wide[key].shape == (32, in_channels, 3, 3)
    assert torch.equal(wide[key][:, :4], old)
    assert torch.count_nonzero(wide[key][:, 4:]) == 0
    assert torch.equal(unet[key], old)  # the input dict is left alone
    assert list(wide) == list(unet)
    assert all(wide[k] is unet[k] for k in unet if k != key)


def test_widen_equal_copies_and_narrowing_fails() -> None:
    unet = {"input_blocks.0.0.weight": torch.randn(8, 9, 3, 3), "out.weight": torch.randn(2)}
    same = widen_input_channels(unet, 9)
    assert same == unet and same is not unet
    with pytest.raises(CheckpointError, match=r"narrow.*9 to 4"):
        widen_input_channels(unet, 4)
    with pytest.raises(CheckpointError, match=r"missing\.weight"):
        widen_input_channels(unet, 12, key="missing.weight")


# ---------------------------------------------------------------------------------------------
# Strict loading into modules
# ---------------------------------------------------------------------------------------------


def _small_net(device: str | None = None) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, device=device), nn.GroupNorm(2, 8, device=device))
    net.register_buffer("position_ids", torch.arange(3, device=device), persistent=False)
    return net


def test_load_state_dict_strict_loads_a_matching_dict() -> None:
    source = {k: torch.randn_like(v) for k, v in _small_net().state_dict().items()}
    net = _small_net()
    load_state_dict_strict(net, source, source="model.ckpt", what="UNet")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in source.items())
    # A legacy file still carrying a buffer the module keeps non-persistent is fine.
    load_state_dict_strict(net, {**source, "position_ids": torch.arange(3)}, source="x", what="t")


def test_load_state_dict_strict_assigns_onto_meta() -> None:
    source = {k: torch.randn_like(v) for k, v in _small_net().state_dict().items()}
    net = _small_net(device="meta")
    load_state_dict_strict(net, source, source="model.ckpt", what="UNet")
    assert not any(p.is_meta for p in net.parameters())
    assert torch.equal(net[0].weight, source["0.weight"])


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape"])
def test_load_state_dict_strict_names_file_part_and_keys(problem: str) -> None:
    net = _small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sd = {k: torch.randn_like(v) for k, v in before.items()}
    if problem == "missing":
        del sd["1.bias"]
        pattern = r"1 missing: 1\.bias \[8\]"
    elif problem == "unexpected":
        sd.update({f"extra.{i}": torch.zeros(i + 1) for i in range(8)})
        pattern = r"8 unexpected: extra\.0 \[1\], .*extra\.4 \[5\] and 3 more"
    else:
        sd["0.weight"] = torch.zeros(8, 9, 3, 3)
        pattern = r"0\.weight file \[8, 9, 3, 3\] vs model \[8, 4, 3, 3\]"

    with pytest.raises(CheckpointError, match=r"^/runs/a/last\.ckpt: UNet weights .*" + pattern):
        load_state_dict_strict(net, sd, source="/runs/a/last.ckpt", what="UNet")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())


def test_error_is_a_value_error_with_the_path() -> None:
    err = CheckpointError("bad", "/x/y.ckpt")
    assert isinstance(err, ValueError) and str(err) == "/x/y.ckpt: bad"
    assert str(CheckpointError("bad").at("z.ckpt")) == "z.ckpt: bad"
