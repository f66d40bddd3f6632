"""Diffusers model folders in and out (``models.adapters.diffusers``): original -> diffusers ->
original is bit-identical, our key mapping equals diffusers' own converter, the diffusers
pipeline on an exported tiny model draws the same pictures as ``sdtrain sample``, ``init_from``
a folder works for every experiment config, and bad folders get errors naming the fault.

The tests that run diffusers / transformers skip (with the reason) when those are not installed;
everything else needs neither.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards
from sdtrain.errors import CheckpointError
from sdtrain.launch.cli import EXIT_FAILURE, EXIT_OK, main
from sdtrain.models.adapters.diffusers import read_diffusers, read_model_weights, write_diffusers
from sdtrain.models.adapters.original import read_checkpoint
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.models.text_encoders import tokenize_prompts
from sdtrain.trainer.experiment import load_config
from sdtrain.utils import files

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
MODELS = ROOT / "configs" / "models"
HAVE_PIPELINES = all(importlib.util.find_spec(m) for m in ("diffusers", "transformers"))
needs_pipelines = pytest.mark.skipif(
    not HAVE_PIPELINES, reason="diffusers and transformers are not installed (pip install .[bench])"
)
# An SD2-shaped tiny model: OpenCLIP text tower (penultimate layer, exact GELU, pad 0, projection),
# linear proj_in/out, fixed head width, v objective.
SD2_TINY = [
    "model.name=tiny-sd2",
    "model.text_encoder.kind=sd2-openclip",
    "model.text_encoder.layers=3",
    "model.text_encoder.layer=penultimate",
    "model.text_encoder.quick_gelu=false",
    "model.text_encoder.pad_id=0",
    "model.text_encoder.projection_dim=32",
    "model.unet.use_linear_in_transformer=true",
    "model.unet.num_heads=-1",
    "model.unet.num_head_channels=16",
    "model.diffusion.parameterization=v",
]


def model_config(name: str, overrides: list[str] | None = None):
    return load_config([MODELS / f"{name}.yaml"], overrides or []).model


def random_model(cfg, seed: int = 0) -> StableDiffusion:
    torch.manual_seed(seed)
    model = StableDiffusion(cfg)
    # Random non-zero biases and norms, so a swapped key cannot hide behind a default value.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def write_folder(cfg, out: Path, seed: int = 0, ema: bool = True) -> dict:
    parts = random_model(cfg, seed).original_parts()
    ema_sd = {k: v + 1 for k, v in parts["unet"].items()} if ema else None
    write_diffusers(
        out,
        cfg,
        unet=parts["unet"],
        vae=parts["vae"],
        text=parts["text"],
        ema=ema_sd,
        ema_decay=0.999,
        ema_num_updates=7,
        global_step=5,
    )
    return {**parts, "ema": ema_sd}


def assert_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, overrides",
    [("tiny-base", []), ("tiny-inpainting", []), ("tiny-depth", []), ("tiny-base", SD2_TINY)],
)
def test_original_to_diffusers_to_original_is_bit_identical(name, overrides, tmp_path) -> None:
    cfg = model_config(name, overrides)
    parts = random_model(cfg).original_parts(ema=None)
    first = tmp_path / "first.safetensors"
    from sdtrain.models.adapters.original import write_checkpoint

    ema = {k: v * 0.5 for k, v in parts["unet"].items()}
    write_checkpoint(first, **parts, ema=ema, global_step=11, ema_decay=0.995, ema_num_updates=3)
    args = [*(["--config", str(MODELS / f"{name}.yaml"), *overrides])]
    assert main(["checkpoint", "convert", str(first), str(tmp_path / "folder"), *args]) == EXIT_OK
    assert (tmp_path / "folder" / "model_index.json").is_file()
    assert (tmp_path / "folder" / "unet_ema").is_dir()
    back = tmp_path / "back.safetensors"
    assert main(["checkpoint", "convert", str(tmp_path / "folder"), str(back)]) == EXIT_OK
    a, _ = files.read_safetensors(first)
    b, _ = files.read_safetensors(back)
    assert_identical(dict(sorted(a.items())), dict(sorted(b.items())))
    assert read_checkpoint(back).global_step == 11


def test_folder_config_is_the_model_config(tmp_path) -> None:
    for overrides in ([], SD2_TINY):
        cfg = model_config("tiny-base", overrides)
        out = tmp_path / str(len(overrides))
        write_folder(cfg, out)
        read = read_diffusers(out)
        assert dataclasses.replace(read.config, name=cfg.name) == dataclasses.replace(
            cfg, autoencoder=read.config.autoencoder
        )
        assert read.config.autoencoder.ddconfig.ch_mult == cfg.autoencoder.ddconfig.ch_mult
        assert read.differences == []
        assert read.parameterization == cfg.diffusion.parameterization
        assert read.checkpoint.global_step == 5
        assert float(read.checkpoint.ema_meta["decay"]) == pytest.approx(0.999)


def test_half_precision_files_and_variants(tmp_path) -> None:
    cfg = model_config("tiny-base")
    parts = random_model(cfg).original_parts()
    out = tmp_path / "fp16"
    write_diffusers(
        out, cfg, unet=parts["unet"], vae=parts["vae"], text=parts["text"], dtype="fp16"
    )
    weights, _ = files.read_safetensors(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    # As published (`variant="fp16"`): only `*.fp16.safetensors` files.
    for component, stem in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        (out / component / f"{stem}.safetensors").rename(
            out / component / f"{stem}.fp16.safetensors"
        )
    for variant in ("fp16", None):
        unet = read_diffusers(out, variant=variant).checkpoint.unet
        for key, value in parts["unet"].items():
            assert torch.equal(unet[key], value.half()), key


# ---------------------------------------------------------------------------------------------
# diffusers itself
# ---------------------------------------------------------------------------------------------


@needs_pipelines
@pytest.mark.parametrize("overrides", [[], SD2_TINY], ids=["sd1", "sd2"])
def test_mapping_equals_diffusers_converter_and_towers_agree(overrides, tmp_path) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    cfg = model_config("tiny-inpainting", overrides)
    parts = write_folder(cfg, tmp_path / "m")
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "m", subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tmp_path / "m", subfolder="vae")
    full = {"model.diffusion_model." + k: v for k, v in parts["unet"].items()}
    full |= {"first_stage_model." + k: v for k, v in parts["vae"].items()}
    for theirs, ours in (
        (convert_ldm_unet_checkpoint(full, unet.config), unet.state_dict()),
        (convert_ldm_vae_checkpoint(full, vae.config), vae.state_dict()),
    ):
        assert set(theirs) == set(ours)
        for key, value in ours.items():
            assert torch.equal(theirs[key].reshape(value.shape), value), key
    # The text tower and tokenizer as transformers reads them compute what ours does.
    model = random_model(cfg)
    text = CLIPTextModel.from_pretrained(tmp_path / "m", subfolder="text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "m", subfolder="tokenizer")
    prompts = ["a red circle above a blue square", ""]
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    ours_ids = tokenize_prompts(prompts, 77, cfg.text_encoder.pad_id)
    assert torch.equal(torch.tensor(ids), ours_ids)
    with torch.no_grad():
        hidden = text(ours_ids).last_hidden_state
        torch.testing.assert_close(hidden, model.text_encoder(ours_ids), atol=1e-5, rtol=1e-5)
        x = torch.randn(2, cfg.unet.in_channels, 8, 8)
        t = torch.tensor([10, 900])
        torch.testing.assert_close(
            unet(x, t, hidden).sample, model.unet(x, t, hidden), atol=1e-5, rtol=1e-4
        )


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    from sdtrain.trainer.fit import fit

    shards = tmp_path_factory.mktemp("diffusers-shards")
    write_synthetic_shards(shards, SyntheticSpec(samples=16, per_shard=8, min_side=64, max_side=96))
    overrides = [
        f"data.shards=[{shards}]",
        f"run.dir={tmp_path_factory.mktemp('runs') / 'b'}",
        "trainer.max_steps=2",
        "checkpoint.every_n_steps=2",
        "logging.wandb=false",
        "data.num_workers=0",
        "data.batch_size=2",
    ]
    return fit(load_config([EXPERIMENTS / "tiny-base.yaml"], overrides))


def test_export_diffusers_and_sample_from_it(base_run, tmp_path, capsys) -> None:
    out = tmp_path / "exported"
    assert main(["export", str(base_run), str(out), "--format", "diffusers"]) == EXIT_OK
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    for component in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / component).is_dir()
    pngs = {}
    for name, src in (("run", base_run), ("folder", out)):
        png = tmp_path / f"{name}.png"
        argv = [
            "sample",
            "--checkpoint",
            str(src),
            "--prompt",
            "a red circle",
            "--seed",
            "3",
            "--steps",
            "8",
            "--size",
            "64",
            "--out",
            str(png),
        ]
        assert main(argv) == EXIT_OK, capsys.readouterr().err
        pngs[name] = np.asarray(Image.open(png))
    assert np.array_equal(pngs["run"], pngs["folder"])


@needs_pipelines
def test_diffusers_pipeline_equals_sdtrain_sample(base_run, tmp_path, capsys) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "exported"
    assert main(["export", str(base_run), str(out), "--format", "diffusers"]) == EXIT_OK
    pipe = StableDiffusionPipeline.from_pretrained(out)  # offline: everything is in the folder
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.safety_checker is None
    png = tmp_path / "ours.png"
    argv = [
        "sample",
        "--checkpoint",
        str(out),
        "--prompt",
        "a red circle",
        "--seed",
        "3",
        "--steps",
        "10",
        "--scale",
        "7.5",
        "--size",
        "64",
        "--out",
        str(png),
    ]
    assert main(argv) == EXIT_OK, capsys.readouterr().err
    ours = np.asarray(Image.open(png)).astype(int)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    image = pipe(
        "a red circle",
        height=64,
        width=64,
        num_inference_steps=10,
        guidance_scale=7.5,
        eta=0.0,
        latents=latents,
        output_type="np",
    ).images[0]
    theirs = (image * 255).round().astype(int)
    diff = np.abs(theirs - ours).max()
    print(f"pipeline vs sdtrain sample: max difference {diff} of 255")
    assert diff <= 1


@needs_pipelines
@pytest.mark.parametrize("name", ["tiny-inpainting", "tiny-depth"])
def test_inpainting_and_depth_pipelines_load(name, tmp_path) -> None:
    import diffusers

    cfg = model_config(name)
    write_folder(cfg, tmp_path / name, ema=False)
    cls = getattr(
        diffusers, json.loads((tmp_path / name / "model_index.json").read_text())["_class_name"]
    )
    # The depth pipeline has no optional components: without the DPT depth estimator (sdtrain
    # takes depth maps from the data) it is loaded with both set to None and given depth_map.
    no_estimator = {"depth_estimator": None, "feature_extractor": None}
    pipe = cls.from_pretrained(tmp_path / name, **(no_estimator if "Depth" in cls.__name__ else {}))
    assert pipe.unet.config.in_channels == cfg.unet.in_channels


# ---------------------------------------------------------------------------------------------
# init_from a folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("experiment", ["tiny-base", "tiny-inpainting", "tiny-depth"])
def test_init_from_a_diffusers_folder(experiment, tmp_path) -> None:
    from sdtrain.trainer.fit import build_module

    parts = write_folder(model_config("tiny-base"), tmp_path / "base")  # 4-channel UNet
    cfg = load_config([EXPERIMENTS / f"{experiment}.yaml"], [f"init_from={tmp_path / 'base'}"])
    module = build_module(cfg)
    unet = module.model.unet.state_dict()
    for key, value in parts["unet"].items():
        if key == "input_blocks.0.0.weight":
            assert torch.equal(unet[key][:, :4], value)
            assert not unet[key][:, 4:].any()  # widened with zeros (inpainting 9, depth 5)
        else:
            assert torch.equal(unet[key], value), key
    assert_identical(dict(module.model.autoencoder.state_dict()), parts["vae"])
    assert_identical(module.model.text_encoder.original_state_dict(), parts["text"])


# ---------------------------------------------------------------------------------------------
# Bad folders
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    write_folder(model_config("tiny-base"), tmp_path / "m", ema=False)
    return tmp_path / "m"


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def inspect_error(folder: Path, capsys) -> str:
    assert main(["checkpoint", "inspect", str(folder)]) == EXIT_FAILURE
    return capsys.readouterr().err


def test_missing_component(folder, capsys) -> None:
    shutil.rmtree(folder / "vae")
    err = inspect_error(folder, capsys)
    assert "vae/" in err and "missing" in err
    index = json.loads((folder / "model_index.json").read_text())
    del index["text_encoder"]
    (folder / "model_index.json").write_text(json.dumps(index))
    err = inspect_error(folder, capsys)
    assert "model_index.json" in err and "'text_encoder'" in err


def test_unknown_class_name(folder, capsys) -> None:
    edit_json(folder / "model_index.json", _class_name="StableDiffusionXLPipeline")
    err = inspect_error(folder, capsys)
    assert "model_index.json" in err and "StableDiffusionXLPipeline" in err
    edit_json(
        folder / "model_index.json",
        _class_name="StableDiffusionPipeline",
        unet=["diffusers", "UNet2DModel"],
    )
    err = inspect_error(folder, capsys)
    assert "'unet'" in err and "UNet2DModel" in err


def test_components_that_contradict_each_other(folder, capsys) -> None:
    edit_json(folder / "unet" / "config.json", cross_attention_dim=64)
    err = inspect_error(folder, capsys)
    assert "unet/config.json cross_attention_dim" in err and "64" in err
    assert "text_encoder/config.json hidden_size" in err and "32" in err


def test_weights_that_do_not_fit_the_config(folder, capsys) -> None:
    edit_json(folder / "unet" / "config.json", layers_per_block=2)
    err = inspect_error(folder, capsys)
    assert "diffusion_pytorch_model.safetensors" in err and "do not fit" in err
    assert "missing: down_blocks.0.resnets.1." in err


def test_folder_that_differs_from_the_model_config(folder) -> None:
    cfg = model_config("tiny-base", ["model.unet.model_channels=64"])
    with pytest.raises(CheckpointError, match=r"model\.unet\.model_channels is 64 in the config"):
        read_model_weights(folder, cfg)
    v_cfg = model_config("tiny-base", ["model.diffusion.parameterization=v"])
    read_model_weights(folder, v_cfg)  # fine-tuning eps -> v starts from eps weights
    with pytest.raises(CheckpointError, match="prediction_type"):
        read_model_weights(folder, v_cfg, same_objective=True)
