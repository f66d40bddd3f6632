"""Every shipped YAML validates; bad keys, types and combinations fail naming the key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdtrain.config.errors import ConfigError
from sdtrain.config.loader import to_yaml
from sdtrain.models.config import ModelConfig
from sdtrain.models.unet import UNetConfig
from sdtrain.trainer.experiment import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_are_shipped() -> None:
    names = {p.stem for p in (ROOT / "configs" / "models").glob("*.yaml")}
    expected = {"sd15", "sd15-inpainting", "sd2-base", "sd2-v", "sd2-inpainting", "sd2-depth"}
    assert expected | {"tiny-base", "tiny-inpainting"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_yaml_validates(path: Path) -> None:
    cfg = load_config([path])
    assert isinstance(cfg, ExperimentConfig)
    assert isinstance(cfg.model, ModelConfig) and isinstance(cfg.model.unet, UNetConfig)
    assert isinstance(cfg.model.unet.attention_resolutions, list)
    # the resolved config round-trips through YAML unchanged
    dumped = path.parent / "_dumped.yaml"
    try:
        dumped.write_text(to_yaml(cfg))
        assert load_config([dumped]) == cfg
    finally:
        dumped.unlink()


def test_files_merge_in_order_and_overrides_win(tmp_path: Path) -> None:
    extra = tmp_path / "v.yaml"
    extra.write_text("model:\n  diffusion:\n    parameterization: v\nseed: 5\n")
    cfg = load_config([ROOT / "configs/models/sd2-base.yaml", extra], ["seed=7"])
    assert cfg.model.diffusion.parameterization == "v"
    assert cfg.seed == 7
    assert cfg.model.unet.context_dim == 1024


def _error(paths, overrides=()) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(paths, overrides)
    return info.value


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text("model:\n  unet:\n    model_chanels: 64\n")
    err = _error([ROOT / "configs/models/tiny-base.yaml", bad])
    assert err.key == "model.unet.model_chanels" and err.source == str(bad)
    assert "typo.yaml" in str(err) and "model_chanels" in str(err)


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "type.yaml"
    bad.write_text("model:\n  unet:\n    num_res_blocks: two\n")
    err = _error([bad])
    assert err.key == "model.unet.num_res_blocks" and err.source == str(bad)


def test_closed_choice_rejects_other_values() -> None:
    err = _error([ROOT / "configs/models/sd15.yaml"], ["model.diffusion.parameterization=x0"])
    assert err.key == "model.diffusion.parameterization" and err.source == "command line"


def test_inconsistent_combination_names_key_and_the_file_that_set_it(tmp_path: Path) -> None:
    wider = tmp_path / "wide-text.yaml"
    wider.write_text("model:\n  text_encoder:\n    width: 1024\n    heads: 16\n")
    err = _error([ROOT / "configs/models/sd15.yaml", wider])
    assert err.key == "model.unet.context_dim"
    assert err.source == str(ROOT / "configs/models/sd15.yaml")
    assert "1024" in str(err)
    err = _error([ROOT / "configs/models/sd15.yaml"], ["model.conditioning=inpainting"])
    assert err.key == "model.unet.in_channels" and "needs 9" in str(err)
    err = _error(
        [ROOT / "configs/models/sd2-base.yaml"], ["model.diffusion.zero_terminal_snr=true"]
    )
    assert err.key == "model.diffusion.zero_terminal_snr"


def test_component_rule_names_full_key(tmp_path: Path) -> None:
    err = _error([ROOT / "configs/models/tiny-base.yaml"], ["model.unet.model_channels=48"])
    assert err.key == "model.unet.model_channels" and "multiple of 32" in str(err)


def test_malformed_inputs(tmp_path: Path) -> None:
    assert "no such config file" in str(_error([tmp_path / "missing.yaml"]))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    assert _error([broken]).source == str(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "mapping" in str(_error([listing]))
    assert "key=value" in str(_error([], ["seed"]))
