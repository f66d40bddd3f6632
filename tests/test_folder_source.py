"""``data.source: folder``: a folder of images read directly — captions and metadata from
sidecars, the filters where metadata exists, masks from ``<name>.mask.png``, ``data.repeats``,
corrupt files counted, the empty-folder error, the split across ranks and workers, exact
resumption (in-process position, and SIGKILL + ``resume=auto`` of a LoRA fit), ``data stats``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_training import env, kill_at_checkpoint

from sdtrain.data.config import DataConfig, FilterConfig, ImageConfig, MaskConfig
from sdtrain.data.pipeline import LaionLoader, WorkerPosition, WorkerStream, plan_shards
from sdtrain.errors import ConfigError
from sdtrain.launch.cli import EXIT_OK, main
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"


def write_image(path: Path, seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    """A smooth random picture (PNG, lossless, so pixels can be compared)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    array = np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def image_folder(root: Path, count: int, height: int = 64, width: int = 64) -> Path:
    """``count`` images ``img<i>.png`` with captions ``picture <i>``, half in a subfolder."""
    for i in range(count):
        folder = root / "sub" if i % 2 else root
        write_image(folder / f"img{i}.png", i, height, width)
        (folder / f"img{i}.txt").write_text(f"picture {i}\n")
    return root


def folder_cfg(folder: Path, **changes) -> DataConfig:
    base = {
        "source": "folder",
        "folder": str(folder),
        "batch_size": 2,
        "num_workers": 0,
        "resampled": False,
        "shuffle_buffer": 0,
        "image": ImageConfig(size=64),
        "filters": FilterConfig(min_size=64),
    }
    return DataConfig(**{**base, **changes})


def one_pass(cfg: DataConfig) -> tuple[list[dict], LaionLoader]:
    """Every sample of one pass (epoch mode) as a dict of its own tensors, and the loader."""
    loader = LaionLoader(cfg)
    samples = []
    for batch in loader:
        for i in range(len(batch["key"])):
            samples.append({k: v[i] for k, v in batch.items()})
    return samples, loader


# ---------------------------------------------------------------------------------------------
# Captions, metadata, filters
# ---------------------------------------------------------------------------------------------


def test_captions_keys_and_what_counts_as_an_image(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "set", 4)
    (folder / "img0.txt").write_text("  a   spaced\n caption \t")
    write_image(folder / "nocap.png", 10)
    (folder / "nocap.json").write_text(json.dumps({"caption": "from the json"}))
    write_image(folder / "alone.jpg", 11)  # no caption anywhere: counted, skipped
    write_image(folder / ".hidden.png", 12)
    write_image(folder / ".cache" / "x.png", 13)
    write_image(folder / "img2.mask.png", 14)  # a sidecar, not an image
    (folder / "notes.txt").write_text("not a sample")
    samples, loader = one_pass(folder_cfg(folder))
    captions = {s["key"]: s["caption"] for s in samples}
    assert captions == {
        "img0": "a spaced caption",
        "sub/img1": "picture 1",
        "img2": "picture 2",
        "sub/img3": "picture 3",
        "nocap": "from the json",
    }
    stats = loader.stats
    assert stats.seen == 6 and stats.kept == 5
    assert dict(stats.errors) == {"missing_caption": 1}
    assert "set/alone.jpg" in stats.recent_errors[0]
    # the pixels are the file's (same size as the output: no resampling)
    expected = np.array(Image.open(folder / "sub" / "img1.png"))
    by_key = {s["key"]: s for s in samples}
    assert torch.equal(by_key["sub/img1"]["image"], torch.from_numpy(expected).permute(2, 0, 1))


def test_filters_apply_where_metadata_exists(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    scores = {"low": 4.0, "high": 6.0, "none": None}
    for i, (name, score) in enumerate(scores.items()):
        write_image(folder / f"{name}.png", i)
        (folder / f"{name}.txt").write_text(name)
        if score is not None:
            (folder / f"{name}.json").write_text(json.dumps({"AESTHETIC_SCORE": score}))
    write_image(folder / "small.png", 5, 48, 80)  # below min_size by its header's size
    (folder / "small.txt").write_text("small")
    write_image(folder / "blocked.png", 6)
    (folder / "blocked.txt").write_text("a forbidden word")
    filters = FilterConfig(min_size=64, blocklist=["forbidden"])
    samples, loader = one_pass(folder_cfg(folder, filters=filters))
    assert sorted(s["key"] for s in samples) == ["high", "none"]
    assert dict(loader.stats.rejected) == {"aesthetic": 1, "size": 1, "blocklist": 1}
    assert loader.stats.missing == Counter()


def test_corrupt_files_are_counted_and_skipped(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "set", 3)
    (folder / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (folder / "garbage.txt").write_text("garbage")
    whole = (folder / "img0.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[: len(whole) // 2])  # header fine, pixels cut
    (folder / "cut.txt").write_text("cut")
    (folder / "meta.png").write_bytes((folder / "img0.png").read_bytes())
    (folder / "meta.txt").write_text("bad json")
    (folder / "meta.json").write_text("{not json")
    samples, loader = one_pass(folder_cfg(folder))
    assert sorted(s["key"] for s in samples) == ["img0", "img2", "sub/img1"]
    assert dict(loader.stats.errors) == {"bad_image": 2, "bad_json": 1}
    assert loader.stats.seen == 6
    named = " ".join(loader.stats.recent_errors)
    assert "set/garbage.jpg" in named and "set/cut.png" in named and "set/meta.png" in named


def test_a_share_of_broken_files_does_not_stop_a_stream_but_a_broken_folder_does(
    tmp_path: Path,
) -> None:
    import itertools

    from sdtrain.data.shards import DataError

    folder = image_folder(tmp_path / "set", 3)
    (folder / "broken.png").write_bytes(b"broken")
    (folder / "broken.txt").write_text("broken")
    cfg = folder_cfg(folder, resampled=True, num_workers=4, batch_size=1)
    plan = plan_shards(cfg)
    assert plan.workers == 4  # one file per stream and epoch: some epochs hold only the broken one
    for worker in range(4):
        stream = WorkerStream(cfg, plan, worker, WorkerPosition())
        batches = list(itertools.islice(stream.batches(), 12))
        assert len(batches) == 12
    assert stream.stats.errors["bad_image"] >= 1
    for path in folder.rglob("img*.png"):
        path.write_bytes(b"broken too")
    stream = WorkerStream(cfg, plan, 0, WorkerPosition())
    with pytest.raises(DataError, match="no sample of 1 passed the filters"):
        next(stream.batches())
    assert stream.pos.epoch == 19  # 20 empty passes in a row


def test_a_folder_without_images_is_an_error_naming_it(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "instance"
    empty.mkdir()
    (empty / "a.txt").write_text("a caption without its image")
    with pytest.raises(ConfigError, match=r"instance holds no images \(looked for \*\.jpeg"):
        plan_shards(folder_cfg(empty))
    with pytest.raises(ConfigError, match="does not exist"):
        plan_shards(folder_cfg(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="no folder is set"):
        plan_shards(DataConfig(source="folder"))
    # through the CLI: one line naming the folder, no traceback
    run = tmp_path / "run"
    argv = ["fit", "--config", str(EXPERIMENTS / "tiny-lora-folder.yaml"),
            f"data.folder={empty}", f"run.dir={run}", "logging.wandb=false"]  # fmt: skip
    assert main(argv) != EXIT_OK
    err = capsys.readouterr().err
    assert f"{empty} holds no images" in err and "*.png" in err and "Traceback" not in err


def test_config_rules_of_the_folder_source(tmp_path: Path) -> None:
    from sdtrain.trainer.fit import dry_run

    folder = image_folder(tmp_path / "set", 3)
    masks_off = ["data.source=folder", f"data.folder={folder}", "data.masks.enabled=false"]
    with pytest.raises(ConfigError, match="trains on masks") as info:
        load_config([EXPERIMENTS / "tiny-inpainting.yaml"], masks_off)
    assert info.value.key == "data.masks.enabled"
    with pytest.raises(ConfigError, match="latent shards are shards") as info:
        load_config([EXPERIMENTS / "tiny-lora-folder.yaml"], ["data.latents=true"])
    assert info.value.key == "data.source"
    latents = ["data.source=shards", "data.latents=true"]
    with pytest.raises(ConfigError, match="augmentations run on decoded images") as info:
        load_config([EXPERIMENTS / "tiny-lora-folder.yaml"], latents)
    assert info.value.key == "data.augment"
    cfg = load_config([EXPERIMENTS / "tiny-lora-folder.yaml"],
                      [f"data.folder={folder}", f"run.dir={tmp_path / 'run'}"])  # fmt: skip
    text = dry_run(cfg)
    assert "6 image(s) for 1 rank(s) x 2 worker(s)" in text  # 3 images x data.repeats 2
    assert "members ['json', 'png', 'txt']" in text


# ---------------------------------------------------------------------------------------------
# Masks, repeats, the split
# ---------------------------------------------------------------------------------------------


def test_mask_files_replace_generated_masks_and_move_with_the_image(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "set", 2)
    left = np.zeros((32, 32), np.uint8)  # half the image's resolution: resized nearest
    left[:, :16] = 255
    Image.fromarray(left).save(folder / "img0.mask.png")
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(folder / "sub" / "img1.mask.png")
    masks = MaskConfig(enabled=True, full_mask_p=0.0)
    for flip_p, side in ((0.0, slice(0, 32)), (1.0, slice(32, 64))):
        cfg = folder_cfg(folder, masks=masks, image=ImageConfig(size=64, flip_p=flip_p))
        by_key = {s["key"]: s for s in one_pass(cfg)[0]}
        expected = torch.zeros(1, 64, 64, dtype=torch.uint8)
        expected[..., side] = 1
        assert torch.equal(by_key["img0"]["mask"], expected)
        assert not by_key["sub/img1"]["mask"].any()  # all below 128: keep everything
        # the image flipped with its mask
        original = torch.from_numpy(np.array(Image.open(folder / "img0.png"))).permute(2, 0, 1)
        image = by_key["img0"]["image"]
        assert torch.equal(image, original.flip(2) if flip_p else original)
    # without a mask file the generated mask is used
    (folder / "img0.mask.png").unlink()
    by_key = {s["key"]: s for s in one_pass(folder_cfg(folder, masks=masks))[0]}
    generated = by_key["img0"]["mask"]
    assert generated.any() and not torch.equal(generated, expected)


def test_repeats_read_every_image_that_many_times_with_their_own_crops(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "set", 3, height=64, width=112)  # random crops differ
    samples, _ = one_pass(folder_cfg(folder, repeats=3))
    assert Counter(s["key"] for s in samples) == {"img0": 3, "sub/img1": 3, "img2": 3}
    lefts = {int(s["crop_top_left"][1]) for s in samples if s["key"] == "img0"}
    assert len(lefts) > 1, "each repeat draws its own crop"
    with pytest.raises(ConfigError, match="repeats"):
        folder_cfg(folder, repeats=0)


def test_the_file_list_is_split_across_ranks_and_workers(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "set", 10)
    cfg = folder_cfg(folder, num_workers=2, shuffle_buffer=4)
    seen: dict[tuple[int, int], list[str]] = {}
    for rank in (0, 1):
        plan = plan_shards(cfg, rank, 2)
        assert plan.workers == 2
        for worker in (0, 1):
            stream = WorkerStream(cfg, plan, worker, WorkerPosition())
            seen[rank, worker] = [k for b in stream.batches() for k in b["key"]]
    keys = [k for part in seen.values() for k in part]
    assert sorted(keys) == sorted(f"{'sub/' if i % 2 else ''}img{i}" for i in range(10))
    assert all(len(part) in (2, 3) for part in seen.values())


def test_the_loader_resumes_at_its_position_in_the_shuffled_list(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "set", 7, height=64, width=96)
    augment = [{"name": "ColorJitter", "brightness": 0.3, "p": 1.0},
               {"name": "Affine", "rotate": [-20, 20], "p": 1.0}]  # fmt: skip
    cfg = folder_cfg(folder, resampled=True, repeats=2, shuffle_buffer=3, augment=augment,
                     masks=MaskConfig(enabled=True))  # fmt: skip
    straight = LaionLoader(cfg)
    batches = iter(straight)
    for _ in range(5):  # mid-epoch: 10 of 14 samples
        next(batches)
    state = json.loads(json.dumps(straight.position()))  # as a checkpoint stores it
    expected = [next(batches) for _ in range(6)]  # into the next epoch
    resumed = iter(LaionLoader(cfg, state=state))
    for want in expected:
        got = next(resumed)
        assert got["key"] == want["key"]
        for name in ("image", "mask", "crop_top_left"):
            assert torch.equal(got[name], want[name]), name


def test_loss_masks_from_files(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "set", 2)
    top = np.zeros((64, 64), np.uint8)
    top[:16] = 255
    Image.fromarray(top).save(folder / "img0.mask.png")
    by_key = {s["key"]: s for s in one_pass(folder_cfg(folder, loss_mask=True))[0]}
    expected = torch.zeros(1, 64, 64, dtype=torch.uint8)
    expected[:, :16] = 1
    assert torch.equal(by_key["img0"]["loss_mask"], expected)
    assert torch.equal(by_key["sub/img1"]["loss_mask"], torch.ones(1, 64, 64, dtype=torch.uint8))
    assert "mask" not in by_key["img0"]  # the inpainting input is data.masks' business
    with pytest.raises(ConfigError, match="latent shards hold no mask files"):
        DataConfig(shards=["x.tar"], latents=True, loss_mask=True)


def test_the_masked_loss_averages_over_the_masked_pixels_only() -> None:
    from sdtrain.diffusion.loss import diffusion_loss, latent_weights
    from sdtrain.diffusion.schedule import DiffusionConfig, NoiseSchedule

    schedule = NoiseSchedule(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    mask = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    mask[0, :, :32] = 1  # sample 0: the top half counts; sample 1: nothing counts
    weights = latent_weights(mask, (8, 8))
    assert torch.equal(weights[0, 0, :4], torch.ones(4, 8)) and not weights[0, 0, 4:].any()
    expected = ((prediction[0, :, :4] - target[0, :, :4]) ** 2).mean() / 2  # batch mean, 0 for #1
    loss = diffusion_loss(schedule, prediction, target, t, weights)
    assert torch.allclose(loss, expected)
    changed = prediction.clone()
    changed[0, :, 4:] += 10  # outside the mask: no effect
    changed[1] += 10
    assert torch.allclose(diffusion_loss(schedule, changed, target, t, weights), expected)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(
        diffusion_loss(schedule, prediction, target, t, ones),
        diffusion_loss(schedule, prediction, target, t),
    )


def test_a_fit_with_data_loss_mask_weighs_the_loss_by_the_files(
    tmp_path: Path, monkeypatch
) -> None:
    import sdtrain.trainer.module as module
    from sdtrain.trainer.fit import fit

    folder = image_folder(tmp_path / "set", 2)
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    for key in ("img0", "sub/img1"):
        Image.fromarray(left).save(folder / f"{key}.mask.png")
    seen = []
    original = module.diffusion_loss

    def recording(schedule, prediction, target, t, pixel_weights=None):
        seen.append(pixel_weights)
        return original(schedule, prediction, target, t, pixel_weights)

    monkeypatch.setattr(module, "diffusion_loss", recording)
    cfg = load_config([EXPERIMENTS / "tiny-lora-folder.yaml"],
                      [f"data.folder={folder}", f"run.dir={tmp_path / 'run'}", "data.augment=[]",
                       "data.loss_mask=true", "data.num_workers=0", "logging.wandb=false",
                       "trainer.max_steps=1", "checkpoint.every_n_steps=1"])  # fmt: skip
    fit(cfg)
    assert seen and seen[0] is not None
    weights = seen[0]
    assert weights.shape == (4, 1, 8, 8)  # 2 images x data.repeats 2, data.batch_size 4
    assert (weights[..., :4] == 1).all() and not weights[..., 4:].any()
    assert (tmp_path / "run" / "checkpoints" / "step=00000001.ckpt").exists()


# ---------------------------------------------------------------------------------------------
# Training end to end, data stats
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """A tiny base model whose UNet is not fresh (a fresh zero output conv passes no gradient
    back to a LoRA)."""
    from test_lora import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("folder-base") / "base.safetensors")


def folder_fit(folder: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "sdtrain.launch.cli", "fit",
        "--config", str(EXPERIMENTS / "tiny-lora-folder.yaml"),
        f"data.folder={folder}", f"run.dir={run_dir}", "logging.wandb=false",
        "trainer.deterministic=true", *overrides,
    ]  # fmt: skip


def adapter(run_dir: Path, step: int) -> tuple[dict, dict]:
    ckpt = torch.load(run_dir / "checkpoints" / f"step={step:08d}.ckpt", weights_only=True)
    return ckpt["state_dict"], ckpt["sdtrain"]["ema"]["shadow"]


def test_sigkill_and_resume_on_a_folder_is_bit_identical(base_file: Path, tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "set", 6, height=64, width=80)
    steps = ("trainer.max_steps=4", "checkpoint.every_n_steps=2", "data.num_workers=2",
             f"init_from={base_file}")  # fmt: skip
    straight = tmp_path / "straight"
    result = subprocess.run(folder_fit(folder, straight, *steps), env=env(), capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    killed = tmp_path / "killed"
    target = killed / "checkpoints" / "step=00000002.ckpt"
    kill_at_checkpoint(folder_fit(folder, killed, *steps), target)
    assert target.exists(), "the run never reached its step-2 checkpoint"
    assert not (killed / "checkpoints" / "step=00000004.ckpt").exists(), "killed too late"
    result = subprocess.run(folder_fit(folder, killed, *steps, "resume=auto"), env=env(),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (lora_a, ema_a), (lora_b, ema_b) = adapter(straight, 4), adapter(killed, 4)
    assert lora_a.keys() == lora_b.keys() and len(lora_a) == 2 * 56
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert any(v.abs().max() > 0 for k, v in lora_a.items() if ".lora_B." in k)
    # the saved data position is the position in the shuffled file list
    ckpt = torch.load(target, weights_only=True)
    text = json.dumps(ckpt["sdtrain"], default=str)
    assert "shard_pos" in text


def test_data_stats_on_a_folder(tmp_path: Path, capsys) -> None:
    folder = image_folder(tmp_path / "set", 4)
    (folder / "bad.png").write_bytes(b"broken")
    (folder / "bad.txt").write_text("bad")
    (folder / "sub" / "img3.json").write_text(json.dumps({"pwatermark": 0.9}))
    argv = ["data", "stats", str(folder), "data.source=folder", "data.filters.min_size=64",
            "--size", "64", "--json", "--workers", "0"]  # fmt: skip
    assert main(argv) == EXIT_OK
    stats = json.loads(capsys.readouterr().out)
    assert stats["seen"] == 5 and stats["kept"] == 3
    assert stats["rejected"] == {"watermark": 1} and stats["errors"] == {"bad_image": 1}
