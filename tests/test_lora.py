"""LoRA (and LoHa / LoKr) through peft: config checks, the file layouts, merging, training that
stores only the adapter, exact resumption, export (kohya, diffusers, merged), ``init_lora=``,
``sdtrain sample --lora`` and a diffusers cross-check of the exported adapter."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_training import fit_command, in_process_cfg, kill_at_checkpoint, run_fit

from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.models.adapters import lora as layouts
from sdtrain.models.lora import (
    LoraConfig,
    adaptable_modules,
    adapter_state,
    adapter_weights,
    add_adapter,
    merge_adapter,
)
from sdtrain.models.unet import UNetModel
from sdtrain.trainer.experiment import load_config
from sdtrain.utils import files

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
TO_Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards

    out = tmp_path_factory.mktemp("lora-shards")
    write_synthetic_shards(out, SyntheticSpec(samples=24, per_shard=12, min_side=64, max_side=96))
    return str(out)


def tiny_unet(*overrides: str, seed: int = 0) -> UNetModel:
    cfg = load_config([EXPERIMENTS / "tiny-base.yaml"], overrides).model.unet
    torch.manual_seed(seed)
    unet = UNetModel(cfg)
    with torch.no_grad():  # the zero-initialised output conv would hide every difference
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet.eval()


def unet_inputs(unet: UNetModel, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 7, unet.config.context_dim, generator=g)
    return x, t, context


def randomise_adapter(unet: UNetModel, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(unet).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_a_target_pattern_matching_nothing_lists_the_modules() -> None:
    with pytest.raises(ConfigError) as info:
        load_config([EXPERIMENTS / "tiny-lora.yaml"], ["finetune.lora.targets=[attention,attn3]"])
    text = str(info.value)
    assert "finetune.lora.targets" in text and "'attn3'" in text
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q" in text


@pytest.mark.parametrize(
    "override",
    ["finetune.lora.rank=0", "finetune.lora.alpha=0", "finetune.lora.dropout=1.0",
     "finetune.lora.kind=ia3", "finetune.lora.targets=[]", "finetune.lora.targets=['(']"],
)  # fmt: skip
def test_lora_numbers_and_choices_are_range_checked(override: str) -> None:
    with pytest.raises(ConfigError, match=r"finetune\.lora"):
        load_config([EXPERIMENTS / "tiny-lora.yaml"], [override])


def test_init_lora_needs_a_lora_run() -> None:
    with pytest.raises(ConfigError, match="init_lora"):
        load_config([EXPERIMENTS / "tiny-base.yaml"], ["init_lora=x.safetensors"])


def test_every_target_group_matches_modules_of_the_tiny_unet() -> None:
    paths = adaptable_modules(tiny_unet())
    expected = {
        "attention": 8 * 7,  # 7 transformer blocks x attn1/attn2 x to_q/k/v/out.0
        "proj": 2 * 7,
        "feedforward": 2 * 7,
    }
    from sdtrain.models.lora import resolve_targets

    for group, count in expected.items():
        assert len(resolve_targets(paths, [group])) == count, group
    assert TO_Q in resolve_targets(paths, ["attention"])
    assert len(resolve_targets(paths, ["resblock"])) > 0


# ---------------------------------------------------------------------------------------------
# Adapters on the UNet
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_adapter_starts_neutral_and_only_it_trains(kind: str) -> None:
    unet = tiny_unet()
    inputs = unet_inputs(unet)
    with torch.no_grad():
        before = unet(*inputs)
    targets = add_adapter(unet, LoraConfig(kind=kind, rank=4, alpha=4))
    assert len(targets) == 56
    with torch.no_grad():
        torch.testing.assert_close(unet(*inputs), before, rtol=0, atol=1e-6)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and set(trainable) == set(adapter_state(unet))
    assert all(".base_layer." not in n for n in trainable)
    randomise_adapter(unet)
    with torch.no_grad():
        assert (unet(*inputs) - before).abs().max() > 1e-3


def test_merged_unet_equals_the_adapted_one_and_the_formula() -> None:
    unet = tiny_unet()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    add_adapter(unet, LoraConfig(rank=4, alpha=2, targets=["attention", "proj", "resblock"]))
    randomise_adapter(unet)
    inputs = unet_inputs(unet)
    lora = adapter_weights(unet)
    with torch.no_grad():
        adapted = unet(*inputs)
    merged = merge_adapter(unet)
    assert set(merged.state_dict()) == set(base), "the original keys are back"
    with torch.no_grad():
        torch.testing.assert_close(merged(*inputs), adapted, rtol=0, atol=1e-5)
    # W + (alpha / r) up @ down, computed here by hand
    conv = "input_blocks.1.0.in_layers.2"
    for path in (TO_Q, conv):
        up, down = lora[path].up, lora[path].down
        delta = (up.flatten(1) @ down.flatten(1)).reshape(base[f"{path}.weight"].shape)
        expected = base[f"{path}.weight"] + (2 / 4) * delta
        torch.testing.assert_close(merged.state_dict()[f"{path}.weight"], expected)


# ---------------------------------------------------------------------------------------------
# File layouts
# ---------------------------------------------------------------------------------------------


def test_kohya_layout_names_and_round_trip() -> None:
    unet = tiny_unet()
    add_adapter(unet, LoraConfig(rank=4, alpha=3))
    randomise_adapter(unet)
    lora = adapter_weights(unet)
    sd = layouts.to_kohya(lora)
    stem = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    assert sd[f"{stem}.lora_down.weight"].shape == (4, 32)
    assert sd[f"{stem}.lora_up.weight"].shape == (32, 4)
    assert sd[f"{stem}.alpha"].item() == 3.0 and sd[f"{stem}.alpha"].dtype == torch.float32
    assert len(sd) == 3 * 56
    back = layouts.from_kohya(sd, adaptable_modules(tiny_unet()))
    assert back.keys() == lora.keys()
    assert all(torch.equal(back[k].up, lora[k].up) and back[k].alpha == 3.0 for k in lora)


def test_lora_files_that_do_not_fit_are_refused_by_name(tmp_path: Path) -> None:
    from sdtrain.models.lora import apply_lora_file

    unet = tiny_unet()
    add_adapter(unet, LoraConfig(rank=4, alpha=4))
    lora = adapter_weights(unet)
    stray = tmp_path / "stray.safetensors"
    layouts.write_lora(stray, {"input_blocks.9.9.nothing": next(iter(lora.values()))})
    with pytest.raises(CheckpointError, match="lora_unet_input_blocks_9_9_nothing"):
        apply_lora_file(tiny_unet(), str(stray))
    # A LoRA of a wider model (as SD 2's 1024-wide context on SD 1.5's 768)
    wide = tiny_unet("model.unet.context_dim=64", "model.text_encoder.width=64")
    add_adapter(wide, LoraConfig(rank=4, alpha=4, targets=[r".*attn2\.to_k"]))
    other = tmp_path / "other-model.safetensors"
    layouts.write_lora(other, adapter_weights(wide))
    with pytest.raises(CheckpointError) as info:
        apply_lora_file(tiny_unet(), str(other))
    assert "attn2_to_k" in str(info.value) and "another model" in str(info.value)
    assert "other-model.safetensors" in str(info.value)
    junk = tmp_path / "junk.safetensors"
    layouts.write_lora(junk, lora)
    sd = layouts.to_kohya(lora)
    import safetensors.torch

    safetensors.torch.save_file({"model.weird": sd[next(iter(sd))]}, str(junk))
    with pytest.raises(CheckpointError, match="not a UNet LoRA file"):
        apply_lora_file(tiny_unet(), str(junk))


# ---------------------------------------------------------------------------------------------
# Training, checkpoints, resumption
# ---------------------------------------------------------------------------------------------


def write_tiny_base(path: Path) -> Path:
    """Write the tiny base model (tiny-base.yaml, seed 0) with its UNet's weights nudged off
    their init to ``path``: a fresh UNet's zero output conv passes no gradient back to a LoRA or
    the text encoder. Shared by the fine-tuning tests' base-model fixtures."""
    from sdtrain.models.adapters.original import write_checkpoint
    from sdtrain.models.stable_diffusion import StableDiffusion

    cfg = load_config([EXPERIMENTS / "tiny-base.yaml"])
    torch.manual_seed(0)
    model = StableDiffusion(cfg.model)
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return write_checkpoint(path, **model.original_parts())


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """A tiny base model whose UNet is not fresh: a fresh one's zero output conv passes no
    gradient back, so a LoRA on it could never learn (a LoRA always starts from a trained model)."""
    return write_tiny_base(tmp_path_factory.mktemp("lora-base") / "base.safetensors")


def lora_cfg(experiment: str, shards: str, run: Path, base: Path, *overrides: str):
    return in_process_cfg(
        experiment, shards, run, "finetune.method=lora", "finetune.lora.rank=4",
        "finetune.lora.alpha=4", "optim.lr=1e-3", "optim.warmup_steps=0", f"init_from={base}",
        *overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def depth_shards(tmp_path_factory) -> str:
    from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards

    out = tmp_path_factory.mktemp("lora-depth-shards")
    spec = SyntheticSpec(samples=12, per_shard=6, min_side=64, max_side=96, depth=True)
    write_synthetic_shards(out, spec)
    return str(out)


@pytest.mark.parametrize(
    ("experiment", "objective"),
    [("tiny-base", "eps"), ("tiny-inpainting", "v"), ("tiny-depth", "eps")],
)
def test_lora_trains_each_model_kind_and_stores_only_the_adapter(
    experiment: str, objective: str, shards: str, depth_shards: str, base_file: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    from sdtrain.trainer.fit import fit

    data = depth_shards if experiment == "tiny-depth" else shards
    objective_set = f"model.diffusion.parameterization={objective}"
    cfg = lora_cfg(experiment, data, tmp_path, base_file, "trainer.max_steps=2",
                   "checkpoint.every_n_steps=2", objective_set)  # fmt: skip
    fit(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "step=00000002.ckpt", weights_only=True)
    keys = list(ckpt["state_dict"])
    assert len(keys) == 2 * 56
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in keys)
    shadow = ckpt["sdtrain"]["ema"]["shadow"]
    assert set(shadow) == {k.removeprefix("model.unet.") for k in keys}
    # B starts at zero; after two steps the adapter has moved
    ups = [v for k, v in ckpt["state_dict"].items() if ".lora_B." in k]
    assert any(v.abs().max() > 0 for v in ups)
    assert ckpt["optimizer_states"][0]["state"], "the optimiser state is kept"


def test_lora_checkpoint_is_much_smaller_than_a_full_one(
    shards: str, base_file: Path, tmp_path: Path
) -> None:
    from sdtrain.trainer.fit import fit

    steps = ("trainer.max_steps=1", "checkpoint.every_n_steps=1")
    fit(in_process_cfg("tiny-base", shards, tmp_path / "full", *steps))
    fit(lora_cfg("tiny-base", shards, tmp_path / "lora", base_file, *steps))
    full = (tmp_path / "full/checkpoints/step=00000001.ckpt").stat().st_size
    lora = (tmp_path / "lora/checkpoints/step=00000001.ckpt").stat().st_size
    print(f"tiny checkpoint sizes: full {full:,} bytes, LoRA rank 4 {lora:,} bytes")
    assert lora * 10 < full


def test_resume_refuses_a_changed_adapter(shards: str, base_file: Path, tmp_path: Path) -> None:
    from sdtrain.trainer.fit import fit

    steps = ("trainer.max_steps=1", "checkpoint.every_n_steps=1")
    fit(lora_cfg("tiny-base", shards, tmp_path, base_file, *steps))
    for change in ("finetune.lora.rank=8", "finetune.lora.kind=loha",
                   "finetune.lora.targets=[attention,proj]", "finetune.method=full"):  # fmt: skip
        with pytest.raises(ConfigError, match="cannot resume") as info:
            fit(lora_cfg("tiny-base", shards, tmp_path, base_file, "trainer.max_steps=2",
                         "resume=auto", change))  # fmt: skip
        assert change.split("=")[0] in str(info.value)


def final_adapter(run_dir: Path, step: int) -> tuple[dict, dict]:
    ckpt = torch.load(run_dir / "checkpoints" / f"step={step:08d}.ckpt", weights_only=True)
    return ckpt["state_dict"], ckpt["sdtrain"]["ema"]["shadow"]


def test_lora_sigkill_and_resume_is_bit_identical(
    shards: str, base_file: Path, tmp_path: Path
) -> None:
    steps = ("trainer.max_steps=6", "checkpoint.every_n_steps=2", "data.num_workers=2",
             f"init_from={base_file}")  # fmt: skip
    straight = tmp_path / "straight"
    run_fit("tiny-lora", shards, straight, *steps)
    killed = tmp_path / "killed"
    target = killed / "checkpoints" / "step=00000002.ckpt"
    kill_at_checkpoint(fit_command("tiny-lora", shards, killed, *steps), target)
    assert target.exists(), "the run never reached its step-2 checkpoint"
    assert not (killed / "checkpoints" / "step=00000006.ckpt").exists(), "killed too late"
    run_fit("tiny-lora", shards, killed, *steps, "resume=auto")
    (lora_a, ema_a), (lora_b, ema_b) = final_adapter(straight, 6), final_adapter(killed, 6)
    assert lora_a.keys() == lora_b.keys() and len(lora_a) == 2 * 56
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert any(v.abs().max() > 0 for k, v in lora_a.items() if ".lora_B." in k)


# ---------------------------------------------------------------------------------------------
# Export, init_lora, sample --lora
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_run(shards: str, tmp_path_factory) -> Path:
    """A tiny base model exported to a file (its UNet perturbed, so that its output is not the
    near-zero of a fresh one), and a 2-step LoRA run on it with a large learning rate."""
    from sdtrain.launch.export import export_run
    from sdtrain.models.adapters.original import read_checkpoint, write_checkpoint
    from sdtrain.trainer.fit import fit

    root = tmp_path_factory.mktemp("lora-run")
    steps = ("trainer.max_steps=2", "checkpoint.every_n_steps=2")
    fit(in_process_cfg("tiny-base", shards, root / "base", *steps))
    exported = read_checkpoint(export_run(root / "base", root / "trained.safetensors").path)
    g = torch.Generator().manual_seed(0)
    unet = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in exported.unet.items()}
    parts = {"vae": exported.vae, "text": exported.text, "schedule": exported.schedule}
    write_checkpoint(root / "base.safetensors", unet=unet, **parts)
    fit(lora_cfg("tiny-base", shards, root / "lora", root / "base.safetensors", *steps,
                 "finetune.lora.alpha=2", "finetune.lora.targets=[attention,proj]",
                 "optim.lr=1e-2"))  # fmt: skip
    return root


@pytest.fixture
def cli(capsys) -> Callable[..., subprocess.CompletedProcess]:
    """``sdtrain ARGS`` in-process (no interpreter and torch start-up per call, ~10 CPU s each):
    its exit code and what it printed, as a finished process."""
    from sdtrain.launch.cli import main

    def run(*args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as stop:  # argparse's usage errors
            code = stop.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run


def test_export_lora_merge_and_sample_agree(lora_run: Path, tmp_path: Path, cli) -> None:
    from sdtrain.launch.export import export_run
    from sdtrain.launch.export_lora import export_lora
    from sdtrain.models.adapters.original import read_checkpoint
    from sdtrain.trainer.checkpoints import read_training_checkpoint

    run = lora_run / "lora"
    kohya = export_lora(run, tmp_path / "lora.safetensors").path  # EMA by default
    assert_ema_exported(kohya, run)
    # The raw adapter from here on: an EMA of two steps is still close to zero.
    kohya = export_lora(run, tmp_path / "raw.safetensors", use_ema=False).path
    diffusers = export_lora(run, tmp_path / "d.safetensors", False, layout="diffusers").path
    merged = export_run(run, tmp_path / "merged.safetensors", use_ema=False, merge=True).path
    sd, meta = files.read_safetensors(kohya)
    assert len(sd) == 3 * (56 + 14) and meta["sdtrain_adapter"] == "lora"
    ckpt = read_training_checkpoint(run)
    stem = "lora_unet_" + TO_Q.replace(".", "_")
    assert torch.equal(sd[f"{stem}.lora_up.weight"], ckpt.unet[f"{TO_Q}.lora_B.default.weight"])
    assert sd[f"{stem}.alpha"].item() == 2.0
    # merged = base + (alpha / r) up @ down, by hand
    base = read_checkpoint(lora_run / "base.safetensors").unet
    full = read_checkpoint(merged).unet
    up, down = sd[f"{stem}.lora_up.weight"], sd[f"{stem}.lora_down.weight"]
    torch.testing.assert_close(full[f"{TO_Q}.weight"], base[f"{TO_Q}.weight"] + 0.5 * up @ down)
    untouched = "input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(full[untouched], base[untouched])
    # sample --lora on the base = sampling the merged file (either layout)
    from sdtrain.launch.sample import sample_to_file
    from sdtrain.trainer.experiment import ExperimentConfig

    model = ExperimentConfig(model=load_config([ROOT / "configs/models/tiny-base.yaml"]).model)
    options = {"config": model, "steps": 2, "seed": 3, "size": 64, "scale": 3.0}
    base = lora_run / "base.safetensors"

    def sample(src: Path, name: str, **kw) -> torch.Tensor:
        out = tmp_path / f"{name}.png"
        return sample_to_file(src, "a red circle", out, **options, **kw).images

    merged_images = sample(merged, "merged")
    for path in (kohya, diffusers):
        diff = (sample(base, path.stem, lora=path) - merged_images).abs().max()
        assert diff <= 1e-4, f"{path.name}: {diff}"
    plain = sample(base, "plain")
    assert torch.equal(sample(base, "zero", lora=kohya, lora_scale=0.0), plain)
    assert (plain - merged_images).abs().max() > 1e-3, "the adapter changes the samples"
    by_cli = cli("sample", "--checkpoint", str(base), "--config", "tiny-base", "--prompt", "a",
                 "--steps", "1", "--size", "64", "--lora", str(kohya), "--lora-scale", "0.5",
                 "--out", str(tmp_path / "cli.png"))  # fmt: skip
    assert by_cli.returncode == 0, by_cli.stderr[-2000:]
    bad = cli(
        "sample",
        "--checkpoint",
        str(base),
        "--config",
        "tiny-base",
        "--prompt",
        "a",
        "--lora-scale",
        "nan",
        "--lora",
        str(kohya),
        "--out",
        str(tmp_path / "x.png"),
    )
    assert bad.returncode == 2 and "--lora-scale" in bad.stderr


def assert_ema_exported(path: Path, run: Path) -> None:
    from sdtrain.trainer.checkpoints import read_training_checkpoint

    sd, _ = files.read_safetensors(path)
    ema = read_training_checkpoint(run).ema
    stem = "lora_unet_" + TO_Q.replace(".", "_")
    assert torch.equal(sd[f"{stem}.lora_up.weight"], ema[f"{TO_Q}.lora_B.default.weight"])


def test_export_flags_refuse_what_does_not_apply(lora_run: Path, tmp_path: Path, cli) -> None:
    plain = cli("export", str(lora_run / "lora"), str(tmp_path / "x.safetensors"))
    assert plain.returncode == 2 and "--lora" in plain.stderr and "--merge" in plain.stderr
    assert "Traceback" not in plain.stderr
    full = cli("export", str(lora_run / "base"), str(tmp_path / "y.safetensors"), "--merge")
    assert full.returncode == 2 and "full fine-tuning" in full.stderr
    lora = cli("export", str(lora_run / "base"), str(tmp_path / "y.safetensors"), "--lora")
    assert lora.returncode == 2 and "full fine-tuning" in lora.stderr
    ckpt = cli("export", str(lora_run / "lora"), str(tmp_path / "y.ckpt"), "--lora")
    assert ckpt.returncode == 2 and ".safetensors" in ckpt.stderr
    ok = cli("export", str(lora_run / "lora"), str(tmp_path / "z.safetensors"), "--lora",
             "--lora-format", "diffusers", "--no-ema")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "diffusers layout" in ok.stdout and "raw adapter" in ok.stdout


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_init_lora_continues_from_an_exported_file(
    layout: str, lora_run: Path, shards: str, tmp_path: Path
) -> None:
    from sdtrain.launch.export_lora import export_lora
    from sdtrain.trainer.fit import build_module

    path = export_lora(lora_run / "lora", tmp_path / "a.safetensors", layout=layout).path
    # a different alpha in the new run: the adapter still computes what the file's does
    cfg = lora_cfg("tiny-base", shards, tmp_path / "run", lora_run / "base.safetensors",
                   f"init_lora={path}", "finetune.lora.alpha=4",
                   "finetune.lora.targets=[attention,proj]")  # fmt: skip
    module = build_module(cfg)
    exported = layouts.read_lora(path, adaptable_modules(tiny_unet()),
                                 layouts.diffusers_module_path(cfg.model.unet))  # fmt: skip
    loaded = adapter_weights(module.model.unet)
    for key in (TO_Q, "output_blocks.3.1.proj_out"):
        torch.testing.assert_close(loaded[key].delta(), exported[key].delta())
    assert module.ema.shadow[f"{TO_Q}.lora_B.default.weight"].abs().max() > 0


def test_init_lora_with_other_targets_is_refused(lora_run: Path, shards: str, tmp_path) -> None:
    from sdtrain.launch.export_lora import export_lora
    from sdtrain.trainer.fit import build_module

    path = export_lora(lora_run / "lora", tmp_path / "a.safetensors").path
    base = lora_run / "base.safetensors"
    cfg = lora_cfg("tiny-base", shards, tmp_path / "run", base, f"init_lora={path}")  # attention
    with pytest.raises(CheckpointError, match="proj_in"):
        build_module(cfg)
    cfg = lora_cfg("tiny-base", shards, tmp_path / "run", base, f"init_lora={path}",
                   "finetune.lora.rank=8", "finetune.lora.targets=[attention,proj]")  # fmt: skip
    with pytest.raises(CheckpointError, match="shapes differ"):
        build_module(cfg)


# ---------------------------------------------------------------------------------------------
# diffusers reads the exported adapter
# ---------------------------------------------------------------------------------------------

TINY_DIFFUSERS_UNET = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
    "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D"] * 2,
    "up_block_types": ["CrossAttnUpBlock2D"] * 2, "cross_attention_dim": 32,
    "attention_head_dim": 2, "use_linear_projection": False, "norm_num_groups": 32,
    "flip_sin_to_cos": True, "freq_shift": 0,
}  # fmt: skip


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_diffusers_loads_the_exported_adapter(layout: str, tmp_path: Path) -> None:
    pytest.importorskip("peft")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = tiny_unet()
    base = {f"model.diffusion_model.{k}": v.clone() for k, v in unet.state_dict().items()}
    add_adapter(unet, LoraConfig(rank=4, alpha=2, targets=["attention", "proj", "feedforward"]))
    randomise_adapter(unet)
    path = tmp_path / "lora.safetensors"
    to_diffusers = layouts.diffusers_module_path(unet.config)
    layouts.write_lora(path, adapter_weights(unet), layout, to_diffusers)  # type: ignore[arg-type]

    theirs = diffusers.UNet2DConditionModel(**TINY_DIFFUSERS_UNET)
    theirs.load_state_dict(convert_ldm_unet_checkpoint(base, dict(theirs.config)))
    x, t, context = unet_inputs(unet)
    with torch.no_grad():
        ours = unet(x, t, context)
        before = theirs(x, t, encoder_hidden_states=context).sample
    assert (ours - before).abs().max() > 1e-3, "without the LoRA diffusers' UNet differs"
    pipeline = diffusers.StableDiffusionPipeline
    state, alphas, metadata = pipeline.lora_state_dict(
        str(path), unet_config=theirs.config, return_lora_metadata=True
    )
    pipeline.load_lora_into_unet(state, alphas, theirs, metadata=metadata)
    with torch.no_grad():
        out = theirs(x, t, encoder_hidden_states=context).sample
    diff = (ours - out).abs().max().item()
    print(f"{layout} LoRA in diffusers: max abs diff {diff:.2e}")
    assert diff <= 1e-4


def test_adamw8bit_is_a_clear_error_without_cuda_or_bitsandbytes(monkeypatch) -> None:
    import builtins

    from sdtrain.trainer.module import adamw_class

    assert adamw_class("adamw", torch.device("cpu")) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        adamw_class("adamw8bit", torch.device("cpu"))
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        adamw_class("adamw8bit", torch.device("cuda"))
