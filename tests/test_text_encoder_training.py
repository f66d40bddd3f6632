"""``finetune.train_text_encoder``: the text encoder trains with the UNet (its weights with
``method: full``, an adapter on it with ``method: lora``), is stored in the training
checkpoints, resumes exactly and is exported; the configs where it cannot work are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import fit_command, in_process_cfg, kill_at_checkpoint, run_fit

from sdtrain.errors import ConfigError
from sdtrain.models.text_encoders import FrozenTextEncoder
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"
TE_PREFIX = "model.text_encoder."


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from sdtrain.data.synthetic import SyntheticSpec, write_synthetic_shards

    out = tmp_path_factory.mktemp("te-shards")
    write_synthetic_shards(out, SyntheticSpec(samples=16, per_shard=8, min_side=64, max_side=96))
    return str(out)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """A tiny base model whose UNet is not fresh: a fresh one's zero output conv passes no
    gradient back to the text encoder."""
    from test_lora import write_tiny_base

    return write_tiny_base(tmp_path_factory.mktemp("te-base") / "base.safetensors")


# weight_decay 0: whatever moves the text encoder's weights is a gradient that reached them
STEPS = ("trainer.max_steps=2", "checkpoint.every_n_steps=2", "optim.warmup_steps=0",
         "optim.weight_decay=0", "optim.lr=1e-3")  # fmt: skip


def te_cfg(shards: str, run: Path, base: Path, *overrides: str):
    return in_process_cfg("tiny-base", shards, run, f"init_from={base}",
                          "finetune.train_text_encoder=true", *STEPS, *overrides)  # fmt: skip


def checkpoint(run: Path, step: int = 2) -> dict:
    return torch.load(run / "checkpoints" / f"step={step:08d}.ckpt", weights_only=True)


def encoder_from_original(cfg, text: dict) -> FrozenTextEncoder:
    encoder = FrozenTextEncoder(cfg.model.text_encoder)
    encoder.load_original_state_dict(text)
    return encoder


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("experiment", "overrides", "named"),
    [
        ("tiny-base", ["data.latents=true", "data.text_embeddings=true"], "data.text_embeddings"),
        ("tiny-base", ["trainer.strategy=fsdp"], "fsdp"),
        ("tiny-x4-upscaler", [], "x4 upscaler"),
    ],
)
def test_text_encoder_training_is_refused_where_it_cannot_work(
    experiment: str, overrides: list[str], named: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([EXPERIMENTS / f"{experiment}.yaml"],
                    ["finetune.train_text_encoder=true", *overrides])  # fmt: skip
    text = str(info.value)
    assert "finetune.train_text_encoder" in text and named in text


def test_first_stage_training_refuses_it(tmp_path: Path) -> None:
    from sdtrain.trainer.first_stage import train_first_stage

    cfg = in_process_cfg("tiny-base", str(tmp_path), tmp_path / "run",
                         "finetune.train_text_encoder=true")  # fmt: skip
    with pytest.raises(ConfigError, match=r"finetune\.train_text_encoder"):
        train_first_stage(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("override", "key"),
    [("finetune.lora.kind=loha", "finetune.lora.kind"),
     ("finetune.lora.text_encoder_targets=[attn9]", "finetune.lora.text_encoder_targets")],
)  # fmt: skip
def test_a_text_encoder_lora_is_checked_when_the_config_loads(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config([EXPERIMENTS / "tiny-lora-te.yaml"], [override])
    assert key in str(info.value)


@pytest.mark.parametrize("overrides", [["finetune.text_encoder_lr=1e-4"],
                                       ["finetune.train_text_encoder=true",
                                        "finetune.text_encoder_lr=-1"]])  # fmt: skip
def test_text_encoder_lr_is_checked(overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"finetune\.text_encoder_lr"):
        load_config([EXPERIMENTS / "tiny-base.yaml"], overrides)


# ---------------------------------------------------------------------------------------------
# The step: captions encoded with gradients, dropped ones through the current encoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trains", [True, False])
def test_captions_and_dropped_captions_see_the_current_encoder(trains: bool) -> None:
    from sdtrain.models.stable_diffusion import StableDiffusion
    from sdtrain.trainer.fit import train_text_encoder
    from sdtrain.trainer.module import LatentDiffusionModule

    cfg = load_config([EXPERIMENTS / "tiny-base.yaml"],
                      [f"finetune.train_text_encoder={str(trains).lower()}"])  # fmt: skip
    torch.manual_seed(0)
    model = StableDiffusion(cfg.model)
    if trains:
        train_text_encoder(model, cfg)
    module = LatentDiffusionModule(cfg, model)
    module.train()
    assert model.text_encoder.training is trains
    batch = {"caption": ["a red circle", "a blue square"]}
    drop = torch.tensor([True, False])
    context = module.encode_text(batch, drop)  # (2, 77, D)
    assert context.requires_grad is trains
    with torch.no_grad():
        empty = model.text_encoder.encode([""])
        torch.testing.assert_close(context[0:1], empty, rtol=0, atol=0)
        model.text_encoder.model.ln_final.bias.add_(0.5)  # the encoder "trained"
        moved = model.text_encoder.encode([""])
    assert (moved - empty).abs().max() > 1e-3
    again = module.encode_text(batch, drop)
    torch.testing.assert_close(again[0:1], moved, rtol=0, atol=0)  # no cached empty prompt
    if trains:
        weights = torch.randn(again[0].shape, generator=torch.Generator().manual_seed(0))
        (again[0] * weights).sum().backward()  # the dropped row alone
        grad = model.text_encoder.model.positional_embedding.grad
        assert grad is not None and grad.abs().max() > 0


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_training_text_encoder_stays_float32_under_frozen_dtype(method: str) -> None:
    from sdtrain.models.stable_diffusion import StableDiffusion
    from sdtrain.trainer.fit import train_text_encoder

    experiment = "tiny-base" if method == "full" else "tiny-lora-te"
    cfg = load_config([EXPERIMENTS / f"{experiment}.yaml"], ["finetune.train_text_encoder=true"])
    model = StableDiffusion(cfg.model)
    train_text_encoder(model, cfg)
    model.hold_frozen_in(torch.bfloat16)
    assert model.frozen_dtype == torch.bfloat16
    assert {p.dtype for p in model.text_encoder.parameters()} == {torch.float32}
    trained = {n for n, p in model.text_encoder.named_parameters() if p.requires_grad}
    assert trained and all(("lora_" in n) == (method == "lora") for n in trained)


# ---------------------------------------------------------------------------------------------
# Full fine-tuning with the text encoder
# ---------------------------------------------------------------------------------------------


def test_full_text_encoder_trains_is_checkpointed_and_exported(
    shards: str, base_file: Path, tmp_path: Path
) -> None:
    from sdtrain.launch.export import export_run
    from sdtrain.models.adapters.diffusers import read_diffusers
    from sdtrain.models.adapters.original import read_checkpoint
    from sdtrain.trainer.fit import fit

    base = read_checkpoint(base_file)
    te_lr = ("finetune.text_encoder_lr=5e-3", "checkpoint.every_n_steps=1")
    cfg = te_cfg(shards, tmp_path / "te", base_file, *te_lr)
    fit(cfg)
    ckpt = checkpoint(tmp_path / "te")
    te = {k.removeprefix(TE_PREFIX): v for k, v in ckpt["state_dict"].items()
          if k.startswith(TE_PREFIX)}  # fmt: skip
    initial = encoder_from_original(cfg, base.text).state_dict()
    assert te.keys() == initial.keys()
    moved = [k for k in te if not torch.equal(te[k], initial[k])]
    # gradients reached every block (weight decay is 0), not just the token embedding
    assert "model.token_embedding.weight" in moved and "model.ln_final.weight" in moved
    assert any(".resblocks.0." in k for k in moved) and any(".resblocks.1." in k for k in moved)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-3, 5e-3] and len(groups[1]["params"]) == len(te)
    assert set(ckpt["sdtrain"]["ema"]["shadow"]) == {  # the EMA covers the UNet only
        k.removeprefix("model.unet.") for k in ckpt["state_dict"] if k.startswith("model.unet.")
    }

    # The export (EMA UNet by default) holds the text encoder as trained.
    out = export_run(tmp_path / "te", tmp_path / "te.safetensors")
    assert out.weights == "ema"
    exported = read_checkpoint(out.path)
    trained = FrozenTextEncoder(cfg.model.text_encoder)
    trained.load_state_dict(te)
    expected = trained.original_state_dict()
    assert exported.text.keys() == expected.keys()
    assert all(torch.equal(exported.text[k], expected[k]) for k in expected)
    folder = export_run(tmp_path / "te", tmp_path / "te-diffusers", format="diffusers").path
    in_folder = read_diffusers(folder).checkpoint.text
    assert all(torch.equal(in_folder[k], expected[k]) for k in expected if k in in_folder)
    assert len(in_folder) >= len(expected) - 1  # the legacy position_ids may be left out

    # Resumed from its step-1 checkpoint, step 2 comes out bit-identical (the text encoder's
    # weights and AdamW state restored, not taken again from init_from).
    step1 = tmp_path / "te" / "checkpoints" / "step=00000001.ckpt"
    fit(te_cfg(shards, tmp_path / "resumed", base_file, *te_lr, f"resume={step1}"))
    again = checkpoint(tmp_path / "resumed")
    assert again["state_dict"].keys() == ckpt["state_dict"].keys()
    assert all(torch.equal(v, again["state_dict"][k]) for k, v in ckpt["state_dict"].items())
    shadow, shadow_again = ckpt["sdtrain"]["ema"]["shadow"], again["sdtrain"]["ema"]["shadow"]
    assert all(torch.equal(v, shadow_again[k]) for k, v in shadow.items())

    # Changing train_text_encoder on resume is refused (it changes what the checkpoint holds).
    with pytest.raises(ConfigError, match="cannot resume"):
        fit(te_cfg(shards, tmp_path / "te", base_file, "resume=auto", "trainer.max_steps=3",
                   "finetune.train_text_encoder=false"))  # fmt: skip


@pytest.mark.parametrize("trains", [False])  # True: the fit above, and this passes with it
def test_one_step_moves_the_text_encoder_only_when_it_trains(
    trains: bool, shards: str, base_file: Path, tmp_path: Path
) -> None:
    """One optimiser step by hand (no fit): without train_text_encoder no gradient reaches the
    encoder, it is in no parameter group, stays bit-equal and stays out of the checkpoint."""
    from sdtrain.data.pipeline import LaionLoader
    from sdtrain.trainer.fit import build_module
    from sdtrain.trainer.module import step_generator

    cfg = te_cfg(shards, tmp_path, base_file, f"finetune.train_text_encoder={str(trains).lower()}")
    module = build_module(cfg)
    module.train()
    encoder = module.model.text_encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    optimizer = module.configure_optimizers()["optimizer"]
    assert len(optimizer.param_groups) == (2 if trains else 1)
    batch = next(iter(LaionLoader(cfg.data, 0, 1)))
    module.diffusion_loss(batch, step_generator(0, 0, 0, 0, module.device)).backward()
    optimizer.step()
    moved = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert bool(moved) is trains
    assert all(p.grad is None for p in encoder.parameters()) is not trains
    saved = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(saved)
    assert any(k.startswith(TE_PREFIX) for k in saved["state_dict"]) is trains


# ---------------------------------------------------------------------------------------------
# LoRA on the UNet and the text encoder
# ---------------------------------------------------------------------------------------------

PROMPTS = ["a red circle above a blue square", "", "a painting of a lighthouse"]


def lora_te_cfg(shards: str, run: Path, base: Path, *overrides: str):
    return in_process_cfg("tiny-lora-te", shards, run, f"init_from={base}", *STEPS,
                          "optim.lr=1e-2", "finetune.text_encoder_lr=2e-2", *overrides)  # fmt: skip


@pytest.fixture(scope="module")
def lora_te_run(shards: str, base_file: Path, tmp_path_factory) -> Path:
    from sdtrain.trainer.fit import fit

    run = tmp_path_factory.mktemp("lora-te") / "run"
    fit(lora_te_cfg(shards, run, base_file))
    return run


def base_model(base: Path):
    """The base model of ``base`` (plain, no adapter), as ``sdtrain sample --config`` opens it."""
    from sdtrain.launch.sample import open_source

    cfg = load_config([EXPERIMENTS / "tiny-base.yaml"])
    return open_source(base, cfg).build()


def context(encoder: FrozenTextEncoder) -> torch.Tensor:
    with torch.no_grad():
        return encoder.encode(PROMPTS)  # (3, 77, D)


def test_lora_te_trains_and_stores_only_the_two_adapters(lora_te_run: Path) -> None:
    ckpt = checkpoint(lora_te_run)
    keys = list(ckpt["state_dict"])
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in keys)
    te_keys = [k for k in keys if k.startswith(TE_PREFIX)]
    unet_keys = [k for k in keys if k.startswith("model.unet.")]
    assert te_keys and unet_keys and len(te_keys) + len(unet_keys) == len(keys)
    assert any(ckpt["state_dict"][k].abs().max() > 0 for k in te_keys if ".lora_B." in k)
    size = (lora_te_run / "checkpoints" / "step=00000002.ckpt").stat().st_size
    assert size < 1_000_000, size  # the text encoder's 1.6 M weights are not in it
    shadow = ckpt["sdtrain"]["ema"]["shadow"]
    assert set(shadow) == {k.removeprefix("model.unet.") for k in unet_keys}
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert [g["lr"] for g in groups] == [1e-2, 2e-2] and len(groups[1]["params"]) == len(te_keys)


def test_lora_te_export_merge_and_sample_equal_the_runs_encoder(
    lora_te_run: Path, base_file: Path, tmp_path: Path
) -> None:
    from sdtrain.launch.export import export_run, rebuild_model
    from sdtrain.launch.export_lora import export_lora
    from sdtrain.launch.sample import _build, open_source
    from sdtrain.models.adapters.original import read_checkpoint
    from sdtrain.models.lora import apply_lora_file
    from sdtrain.trainer.checkpoints import read_training_checkpoint

    ckpt = read_training_checkpoint(lora_te_run)
    adapted = context(rebuild_model(ckpt, "raw").text_encoder)
    plain = context(base_model(base_file).text_encoder)
    assert (adapted - plain).abs().max() > 1e-3, "the text-encoder adapter did not move"

    kohya = export_lora(lora_te_run, tmp_path / "kohya.safetensors")
    assert kohya.text_encoder_modules > 0
    keys = set(load_file(kohya.path))
    assert any(k.startswith("lora_te_") for k in keys) and any(
        k.startswith("lora_unet_") for k in keys
    )
    assert all(k.startswith(("lora_te_", "lora_unet_")) for k in keys)
    diffusers = export_lora(lora_te_run, tmp_path / "diffusers.safetensors", layout="diffusers")
    dkeys = set(load_file(diffusers.path))
    assert any(k.startswith("text_encoder.") for k in dkeys) and any(
        k.startswith("unet.") for k in dkeys
    )
    for path in (kohya.path, diffusers.path):  # each file applied to the plain base
        model = base_model(base_file)
        apply_lora_file(model.unet, str(path), 1.0, text_encoder=model.text_encoder)
        torch.testing.assert_close(context(model.text_encoder), adapted, rtol=0, atol=1e-5)

    # --merge: cond_stage_model.* holds the adapter merged in; same context as the adapter
    merged = read_checkpoint(export_run(lora_te_run, tmp_path / "merged.safetensors", merge=True,
                                        use_ema=False).path)  # fmt: skip
    cfg = load_config([EXPERIMENTS / "tiny-base.yaml"])
    torch.testing.assert_close(context(encoder_from_original(cfg, merged.text)), adapted,
                               rtol=0, atol=1e-5)  # fmt: skip
    # sdtrain sample --lora on the base applies the text-encoder part too
    sampled = _build(open_source(base_file, cfg), "cpu", kohya.path, 1.0)
    torch.testing.assert_close(context(sampled.text_encoder), adapted, rtol=0, atol=1e-5)


def test_init_lora_continues_the_text_encoder_part(
    lora_te_run: Path, shards: str, base_file: Path, tmp_path: Path
) -> None:
    from sdtrain.launch.export import rebuild_model
    from sdtrain.launch.export_lora import export_lora
    from sdtrain.trainer.checkpoints import read_training_checkpoint
    from sdtrain.trainer.fit import build_module

    adapted = context(rebuild_model(read_training_checkpoint(lora_te_run), "raw").text_encoder)
    path = export_lora(lora_te_run, tmp_path / "lora.safetensors", use_ema=False).path
    module = build_module(lora_te_cfg(shards, tmp_path / "next", base_file, f"init_lora={path}"))
    torch.testing.assert_close(context(module.model.text_encoder), adapted, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="init_lora") as info:
        build_module(lora_te_cfg(shards, tmp_path / "unet-only", base_file, f"init_lora={path}",
                                 "finetune.train_text_encoder=false",
                                 "finetune.text_encoder_lr=0"))  # fmt: skip
    assert "train_text_encoder" in str(info.value)


# ---------------------------------------------------------------------------------------------
# SIGKILL + resume=auto
# ---------------------------------------------------------------------------------------------


def final_state(run: Path, step: int) -> tuple[dict, dict]:
    ckpt = checkpoint(run, step)
    return ckpt["state_dict"], ckpt["sdtrain"]["ema"]["shadow"]


def test_lora_te_sigkill_and_resume_is_bit_identical(
    shards: str, base_file: Path, tmp_path: Path
) -> None:
    """LoRA on both, the riskier case: two adapters restored by name (Lightning's non-strict
    load, as the full text encoder's weights are), two parameter groups, and peft's attention
    adapter, which re-registers the frozen base weights on every forward."""
    steps = (f"init_from={base_file}", "trainer.max_steps=3", "checkpoint.every_n_steps=2",
             "data.num_workers=2", "optim.lr=1e-2")  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_fit("tiny-lora-te", shards, straight, *steps)
    target = killed / "checkpoints" / "step=00000002.ckpt"
    kill_at_checkpoint(fit_command("tiny-lora-te", shards, killed, *steps), target)
    assert target.exists(), "the run never reached its step-2 checkpoint"
    assert not (killed / "checkpoints" / "step=00000003.ckpt").exists(), "killed too late"
    run_fit("tiny-lora-te", shards, killed, *steps, "resume=auto")
    (a, ema_a), (b, ema_b) = final_state(straight, 3), final_state(killed, 3)
    assert a.keys() == b.keys() and any(k.startswith(TE_PREFIX) for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    halfway, _ = final_state(killed, 2)
    assert any(not torch.equal(halfway[k], a[k]) for k in a if k.startswith(TE_PREFIX))
