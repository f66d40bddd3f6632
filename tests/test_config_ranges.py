"""Every numeric setting is range-checked when the config is loaded (issue 12).

Through the CLI, as an operator meets it: exit code 2, one ``config error`` line naming the full
key and where the value came from (the command line or the file), no traceback, nothing trained.
A table gives one out-of-range value per numeric field; a test walks the experiment schema so
that a numeric field added later without an entry (and a check) fails here. Each entry is checked
on its component dataclass (fast), and one entry per component goes through the CLI, which shows
the loader turns the field name into the full dotted key.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from sdtrain.errors import ConfigError
from sdtrain.launch.cli import EXIT_OK, EXIT_USAGE, main
from sdtrain.trainer.experiment import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = str(ROOT / "configs" / "experiments" / "tiny-base.yaml")

OUT_OF_RANGE: dict[str, str] = {
    # model.unet
    "model.unet.in_channels": "0",
    "model.unet.out_channels": "0",
    "model.unet.model_channels": "0",
    "model.unet.attention_resolutions": "[3]",
    "model.unet.num_res_blocks": "0",
    "model.unet.channel_mult": "[1,0]",
    "model.unet.num_heads": "0",
    "model.unet.num_head_channels": "0",
    "model.unet.transformer_depth": "0",
    "model.unet.context_dim": "0",
    "model.unet.dropout": "1.5",
    "model.unet.image_size": "0",
    "model.unet.num_heads_upsample": "-2",
    "model.unet.dims": "3",
    "model.unet.num_classes": "0",
    # model.upscale (x4 upscaler low-res conditioning)
    "model.upscale.factor": "0",
    "model.upscale.max_noise_level": "1000",
    "model.upscale.linear_start": "0.5",
    "model.upscale.linear_end": "2",
    "model.upscale.timesteps": "0",
    "model.upscale.noise_level": "-1",
    "model.upscale.max_input_size": "0",
    "model.upscale.degradation.blur_sigma": "-1",
    "model.upscale.degradation.noise_std": "-1",
    "model.upscale.degradation.jpeg_quality": "100",
    # model.autoencoder
    "model.autoencoder.embed_dim": "0",
    "model.autoencoder.scale_factor": "0",
    "model.autoencoder.ddconfig.z_channels": "0",
    "model.autoencoder.ddconfig.resolution": "0",
    "model.autoencoder.ddconfig.in_channels": "0",
    "model.autoencoder.ddconfig.out_ch": "0",
    "model.autoencoder.ddconfig.ch": "0",
    "model.autoencoder.ddconfig.ch_mult": "[1,0]",
    "model.autoencoder.ddconfig.num_res_blocks": "0",
    "model.autoencoder.ddconfig.attn_resolutions": "[0]",
    "model.autoencoder.ddconfig.dropout": "-0.1",
    # model.text_encoder
    "model.text_encoder.width": "0",
    "model.text_encoder.layers": "0",
    "model.text_encoder.heads": "0",
    "model.text_encoder.context_length": "2",
    "model.text_encoder.vocab_size": "10",
    "model.text_encoder.mlp_ratio": "0",
    "model.text_encoder.pad_id": "-1",
    "model.text_encoder.projection_dim": "-1",
    # model.diffusion
    "model.diffusion.timesteps": "1",
    "model.diffusion.linear_start": "0.5",
    "model.diffusion.linear_end": "2",
    "model.diffusion.cosine_s": "-1",
    "model.diffusion.offset_noise": "-1",
    "model.diffusion.min_snr_gamma": "-1",
    # data
    "data.shuffle_buffer": "-1",
    "data.batch_size": "0",
    "data.num_workers": "-1",
    "data.repeats": "0",
    "data.filters.aesthetic.value": ".nan",  # any finite threshold is meaningful
    "data.filters.watermark.value": ".inf",
    "data.filters.unsafe.value": "-.inf",
    "data.filters.min_size": "-1",
    "data.image.size": "0",
    "data.image.width": "12",
    "data.image.flip_p": "2",
    "data.buckets.step": "12",
    "data.buckets.min_ratio": "0",
    "data.buckets.max_ratio": "0.5",
    "data.buckets.sizes": "[[512,0]]",
    "data.buckets.max_upscale": "0.5",
    "data.masks.full_mask_p": "-0.5",
    "data.masks.lama_weights": "[-1,1,1]",
    "data.max_error_rate": "2",
    "data.error_rate_min_samples": "-1",
    "data.seed": "-1",
    # trainer
    "trainer.max_steps": "0",
    "trainer.accumulate_grad_batches": "0",
    "trainer.gradient_clip_val": "-1",
    "trainer.devices": "0",
    "trainer.num_nodes": "0",
    "trainer.text_dropout": "2",
    "trainer.max_nonfinite_steps": "0",
    "trainer.log_every_n_steps": "0",
    # optim
    "optim.lr": "0",
    "optim.betas": "[0.9,1.0]",
    "optim.eps": "-1",
    "optim.weight_decay": "-5",
    "optim.warmup_steps": "-1",
    "optim.warmup_start": "2",
    # ema, finetune, checkpoint, validation, root
    "ema.decay": "1.0",
    "finetune.lora.rank": "0",
    "finetune.lora.alpha": "0",
    "finetune.lora.dropout": "1.0",
    "finetune.text_encoder_lr": "-1",
    "checkpoint.every_n_steps": "0",
    "checkpoint.keep_last": "0",
    "validation.every_n_steps": "-1",
    "validation.steps": "0",
    "validation.guidance_scale": "-1",
    "validation.seed": "-1",
    "validation.image_size": "12",
    "validation.loss_batches": "0",
    "validation.loss_buckets": "0",
    # eval (FID / CLIP during training)
    "eval.every_n_steps": "-1",
    "eval.num": "1",
    "eval.scales": "[-1.0]",
    "eval.steps": "0",
    "eval.size": "-1",
    "eval.batch": "0",
    "eval.seed": "-1",
    "eval.reference_num": "-1",
    "eval.inception_features": "100",
    "eval.extractor_seed": "-2",
    # prior (DreamBooth prior preservation)
    "prior.num_images": "0",
    "prior.loss_weight": "-1",
    "prior.batch_size": "-1",
    "prior.sample_batch_size": "0",
    "prior.steps": "0",
    "prior.guidance_scale": "-1",
    "prior.seed": "-1",
    "seed": "-1",
}
"""One value outside the field's range for every numeric field of the experiment schema."""


def _numeric_fields(cls: type, prefix: str = "") -> dict[str, str]:
    """Dotted key -> ``"float"`` or ``"int"`` for every int / float (list, optional) field."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint, key = hints[field.name], f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hint):
            out.update(_numeric_fields(hint, f"{key}."))
            continue
        args = typing.get_args(hint) or (hint,)
        if typing.get_origin(hint) is typing.Literal or bool in args:
            continue
        leaves = {a for arg in args for a in (typing.get_args(arg) or (arg,))}
        if float in leaves:
            out[key] = "float"
        elif int in leaves:
            out[key] = "int"
    return out


NUMERIC = _numeric_fields(ExperimentConfig)
FLOATS = sorted(k for k, kind in NUMERIC.items() if kind == "float")


@pytest.fixture(scope="module")
def base() -> ExperimentConfig:
    return load_config([EXPERIMENT])


def _replace(cfg: ExperimentConfig, key: str, value: object) -> None:
    """Rebuild the dataclass holding ``key`` with ``value`` (its ``__post_init__`` runs again)."""
    *path, name = key.split(".")
    parent = cfg
    for part in path:
        parent = getattr(parent, part)
    dataclasses.replace(parent, **{name: value})


def _config_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run ``sdtrain`` with ``argv``; assert exit 2 with one config-error line; return it."""
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == EXIT_USAGE, (argv, captured.out, captured.err)
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdtrain: config error: "), captured.err
    return lines[0]


def test_the_table_covers_every_numeric_field() -> None:
    # A new numeric field needs a range check and an entry above.
    assert set(OUT_OF_RANGE) == set(NUMERIC)
    assert "optim.lr" in FLOATS and "optim.betas" in FLOATS and "seed" not in FLOATS


@pytest.mark.parametrize("key", sorted(OUT_OF_RANGE))
def test_out_of_range_value_is_a_config_error_naming_the_field(
    key: str, base: ExperimentConfig
) -> None:
    with pytest.raises(ConfigError) as caught:
        _replace(base, key, yaml.safe_load(OUT_OF_RANGE[key]))
    assert caught.value.key == key.rsplit(".", 1)[-1]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", FLOATS)
def test_non_finite_floats_are_rejected_everywhere(
    key: str, value: float, base: ExperimentConfig
) -> None:
    good = yaml.safe_load(OUT_OF_RANGE[key])
    # A list field gets the non-finite value as its first element.
    bad = [value, *good[1:]] if isinstance(good, list) else value
    with pytest.raises(ConfigError, match="must be a finite number") as caught:
        _replace(base, key, bad)
    assert caught.value.key == key.rsplit(".", 1)[-1]


def _one_key_per_component() -> list[str]:
    firsts: dict[str, str] = {}
    for key in sorted(OUT_OF_RANGE):
        firsts.setdefault(key.rpartition(".")[0], key)
    return sorted(firsts.values())


@pytest.mark.parametrize("key", _one_key_per_component())
def test_the_cli_names_the_full_key_and_the_command_line(key: str, capsys) -> None:
    line = _config_error(capsys, "config", "--config", EXPERIMENT, f"{key}={OUT_OF_RANGE[key]}")
    assert f"command line, key '{key}'" in line


def test_the_cli_rejects_non_finite_yaml_values(capsys) -> None:
    for override in ("model.diffusion.offset_noise=.nan", "optim.betas=[.inf,0.999]"):
        line = _config_error(capsys, "config", "--config", EXPERIMENT, override)
        assert f"key '{override.split('=')[0]}'" in line


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.log_every_n_steps=0", "must be >= 1, got 0"),
        ("optim.eps=-1", "must be > 0, got -1.0"),
        ("optim.lr=.inf", "must be a finite number, got inf"),
        ("optim.weight_decay=-5", "must be >= 0 (0 = none), got -5.0"),
    ],
)
def test_issue_cases_stop_fit_before_any_work(
    override: str, message: str, tmp_path: Path, capsys
) -> None:
    argv = ["fit", "--config", EXPERIMENT, f"run.root={tmp_path}", "data.shards=x.tar", override]
    line = _config_error(capsys, *argv)
    key = override.split("=")[0]
    assert f"command line, key '{key}': {message}" in line
    assert list(tmp_path.iterdir()) == []  # no run folder, no lock, no checkpoint


def test_a_value_from_a_file_names_that_file(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "mine.yaml"
    bad.write_text("optim:\n  weight_decay: -5\n")
    line = _config_error(capsys, "config", "--config", EXPERIMENT, str(bad))
    assert f"{bad}, key 'optim.weight_decay'" in line


def test_fit_without_data_shards_exits_2(tmp_path: Path, capsys) -> None:
    line = _config_error(
        capsys, "fit", "--config", EXPERIMENT, f"run.root={tmp_path}", "logging.wandb=false"
    )
    assert "data.shards" in line


def test_stage_changes_and_edge_values_still_load(capsys) -> None:
    # What a next training stage changes (issue 10: image size, batch, LR, data), and the
    # boundary values each range allows.
    overrides = [
        "data.image.size=128",
        "data.batch_size=16",
        "optim.lr=5e-6",
        "data.shards=[a.tar,b.tar]",
        "optim.weight_decay=0",
        "optim.warmup_steps=0",
        "optim.warmup_start=1",
        "model.unet.dropout=0",
        "model.unet.num_head_channels=-1",
        "validation.image_size=0",
        "validation.guidance_scale=0",
        "model.diffusion.cosine_s=0",
        "data.filters.aesthetic.value=-3.5",
        "seed=4294967295",
        "trainer.log_every_n_steps=1",
    ]
    assert main(["config", "--config", EXPERIMENT, *overrides]) == EXIT_OK
    out = capsys.readouterr().out
    assert "size: 128" in out and "lr: 5.0e-06" in out and "seed: 4294967295" in out
