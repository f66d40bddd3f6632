"""LoRA on the text encoder (``models.lora`` + ``models.adapters.lora``), for both towers (SD1's
HF-layout CLIP, SD2's OpenCLIP with its fused q/k/v): the adapter starts neutral and only it
trains, the split of peft's fused attention adapter into the q / k / v / out_proj modules of
LoRA files is exact (merging it into the original layout equals the adapted encoder), kohya and
diffusers files round-trip, separate q / k / v adapters (kohya's sd-scripts) merge exactly and
are refused by ``init_lora``, bad input is refused by name, and diffusers'
``StableDiffusionPipeline.load_lora_weights`` reads our files into the same text encoder and
UNet outputs as ours."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_diffusers import SD2_TINY, needs_pipelines, random_model

from sdtrain.errors import CheckpointError, ConfigError
from sdtrain.models.adapters import lora as layouts
from sdtrain.models.lora import (
    LoraConfig,
    adapter_state,
    adapter_weights,
    add_adapter,
    add_text_encoder_adapter,
    apply_lora_file,
    check_text_encoder_targets,
    merge_adapter,
    text_encoder_adapter_weights,
)
from sdtrain.models.text_encoders import FrozenTextEncoder, TextEncoderConfig
from sdtrain.models.unet import UNetModel
from sdtrain.trainer.experiment import load_config
from sdtrain.utils import files

ROOT = Path(__file__).resolve().parents[1]
KINDS = ["sd1-clip", "sd2-openclip"]
PROMPTS = ["a red circle on a white background", "a sks shape", ""]
WIDTH, RANK = 32, 4
Q0 = "text_model.encoder.layers.0.self_attn.q_proj"


def te_config(kind: str, width: int = WIDTH) -> TextEncoderConfig:
    if kind == "sd1-clip":
        return TextEncoderConfig(kind=kind, width=width, layers=2, heads=2)
    # SD2's shape: penultimate layer (the last block is stored but skipped), exact GELU, pad 0
    return TextEncoderConfig(kind=kind, width=width, layers=3, heads=2, layer="penultimate",
                             quick_gelu=False, pad_id=0, projection_dim=16)  # fmt: skip


def text_encoder(kind: str, seed: int = 0, width: int = WIDTH) -> FrozenTextEncoder:
    torch.manual_seed(seed)
    return FrozenTextEncoder(te_config(kind, width))


def randomise(module: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state(module).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def adapted(kind: str, targets=("attention", "mlp"), alpha: float = 2.0):
    """A text encoder with a random LoRA on ``targets``, and its base original-layout tensors."""
    te = text_encoder(kind)
    base = {k: v.clone() for k, v in te.original_state_dict().items()}
    add_text_encoder_adapter(te, LoraConfig(rank=RANK, alpha=alpha,
                                            text_encoder_targets=list(targets)))  # fmt: skip
    randomise(te)
    return te, base


def encode(te: FrozenTextEncoder) -> torch.Tensor:
    with torch.no_grad():
        return te(te.tokenize(PROMPTS))


def plain(kind: str, state: dict) -> FrozenTextEncoder:
    te = text_encoder(kind, seed=9)
    te.load_original_state_dict(state)
    return te


def tiny_unet() -> UNetModel:
    return UNetModel(load_config([ROOT / "configs/models/tiny-base.yaml"]).model.unet).eval()


# ---------------------------------------------------------------------------------------------
# The adapter on the encoder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_starts_neutral_and_only_it_trains(kind: str) -> None:
    te = text_encoder(kind)
    before = encode(te)
    targets = add_text_encoder_adapter(te, LoraConfig(rank=RANK, text_encoder_targets=["mlp"]))
    blocks = 2  # both SD1 blocks; SD2 leaves out its skipped last block
    assert len(targets) == 2 * blocks and targets[0] == "model.transformer.resblocks.0.mlp.c_fc"
    te = text_encoder(kind)
    targets = add_text_encoder_adapter(te, LoraConfig(rank=RANK))  # default: attention
    assert targets == [f"model.transformer.resblocks.{n}.attn" for n in range(blocks)]
    assert torch.equal(encode(te), before)
    trainable = {n for n, p in te.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state(te)) and len(trainable) == 4 * blocks
    randomise(te)
    frozen = {n: p.detach().clone() for n, p in te.named_parameters() if n not in trainable}
    for _ in range(3):
        out = te(te.tokenize(PROMPTS))
    assert (out.detach() - before).abs().max() > 1e-2
    out.square().mean().backward()
    assert all(te.get_parameter(n).grad.abs().max() > 0 for n in trainable)
    # peft merges the attention adapter in and out around each forward; the frozen weights
    # must come back bit for bit (else they drift and a resumed run is not bit-identical)
    now = dict(te.named_parameters())
    assert now.keys() - trainable == frozen.keys()
    assert all(torch.equal(now[n], frozen[n]) and not now[n].requires_grad for n in frozen)


@pytest.mark.parametrize("kind", KINDS)
def test_split_into_file_modules_is_exact_and_merges_like_peft(kind: str) -> None:
    te, base = adapted(kind)
    out = encode(te)
    lora = text_encoder_adapter_weights(te)
    assert len(lora) == 6 * 2 and {w.rank for w in lora.values()} == {RANK}
    # the fused in_proj adapter: q / k / v share its down and stack to its up
    fused = "model.transformer.resblocks.0.attn"
    state = adapter_state(te)
    down, up = state[f"{fused}.lora_A.default.weight"], state[f"{fused}.lora_B.default.weight"]
    q, k, v = (lora[f"text_model.encoder.layers.0.self_attn.{n}_proj"] for n in "qkv")
    assert all(torch.equal(w.down, down) for w in (q, k, v))
    assert torch.equal(torch.cat([q.up, k.up, v.up]), up)
    # merged into the original layout = the adapted encoder = peft's own merge
    merged = layouts.merge_text_encoder_into(base, lora, kind)
    diff = (encode(plain(kind, merged)) - out).abs().max().item()
    print(f"{kind}: merged vs adapted max abs diff {diff:.1e}")
    assert diff <= 1e-5
    by_peft = merge_adapter(te).original_state_dict()
    assert list(by_peft) == list(base) and not any(p.requires_grad for p in te.parameters())
    assert (encode(te) - out).abs().max() <= 1e-5
    for key in base:
        torch.testing.assert_close(merged[key], by_peft[key], rtol=0, atol=1e-6)
    # and by hand: W + (alpha / r) up @ down on q (SD2: the first third of the fused in_proj)
    if kind == "sd1-clip":
        key, rows = f"transformer.{Q0}.weight", slice(None)
    else:
        key, rows = "model.transformer.resblocks.0.attn.in_proj_weight", slice(0, WIDTH)
    expected = base[key][rows] + (2.0 / RANK) * up[:WIDTH] @ down
    torch.testing.assert_close(merged[key][rows], expected)
    untouched = "model.ln_final.weight" if kind == "sd2-openclip" else next(iter(base))
    assert torch.equal(merged[untouched], base[untouched])


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("kind", KINDS)
def test_files_round_trip(kind: str, layout: str, tmp_path: Path) -> None:
    te, base = adapted(kind)
    out = encode(te)
    path = tmp_path / "te.safetensors"
    layouts.write_lora(path, {}, layout, text_encoder=text_encoder_adapter_weights(te))  # type: ignore[arg-type]
    sd, _ = files.read_safetensors(path)
    if layout == "kohya":
        stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        assert sd[f"{stem}.lora_down.weight"].shape == (RANK, WIDTH)
        assert sd[f"{stem}.alpha"].item() == 2.0 and len(sd) == 3 * 12
    else:
        stem = f"text_encoder.{Q0}"
        assert sd[f"{stem}.lora_B.weight"].shape == (WIDTH, RANK) and len(sd) == 2 * 12
    assert layouts.lora_file_parts(path) == {"text_encoder"}
    # init_lora with another alpha: the adapter computes what the file's does
    again = plain(kind, base)
    cfg = LoraConfig(rank=RANK, alpha=8, text_encoder_targets=["attention", "mlp"])
    add_text_encoder_adapter(again, cfg, init_lora=str(path))
    diff = (encode(again) - out).abs().max().item()
    assert diff <= 1e-6, f"init_lora: {diff}"
    # sdtrain sample --lora: merged into a plain encoder (and a UNet the file leaves alone)
    target, unet = plain(kind, base), tiny_unet()
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    assert apply_lora_file(unet, str(path), text_encoder=target) == 12
    assert (encode(target) - out).abs().max() <= 1e-5
    assert all(torch.equal(v, unet_before[k]) for k, v in unet.state_dict().items())


@pytest.mark.parametrize("kind", KINDS)
def test_separate_qkv_downs_merge_exactly_and_init_lora_refuses_them(kind, tmp_path) -> None:
    te, base = adapted(kind, targets=("attention",))
    lora = text_encoder_adapter_weights(te)
    g = torch.Generator().manual_seed(5)
    k = "text_model.encoder.layers.0.self_attn.k_proj"
    lora[k] = layouts.LoraWeights(torch.randn(RANK, WIDTH, generator=g), lora[k].up, 1.0)
    path = tmp_path / "sd-scripts.safetensors"
    layouts.write_lora(path, {}, text_encoder=lora)
    target = plain(kind, base)
    apply_lora_file(tiny_unet(), str(path), 0.5, text_encoder=target)
    merged = target.original_state_dict()
    if kind == "sd1-clip":
        key, rows = f"transformer.{k}.weight", slice(None)
    else:
        key, rows = "model.transformer.resblocks.0.attn.in_proj_weight", slice(WIDTH, 2 * WIDTH)
    expected = base[key][rows] + 0.5 * (1.0 / RANK) * lora[k].up @ lora[k].down
    torch.testing.assert_close(merged[key][rows], expected)
    fresh = plain(kind, base)
    with pytest.raises(CheckpointError) as info:
        add_text_encoder_adapter(fresh, LoraConfig(rank=RANK), init_lora=str(path))
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj" in str(info.value)
    assert "different lora_down" in str(info.value) and "sd-scripts.safetensors" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_target_patterns_and_kinds_are_checked() -> None:
    with pytest.raises(ConfigError) as info:
        check_text_encoder_targets(
            te_config("sd1-clip"), LoraConfig(text_encoder_targets=["q_proj"])
        )
    text = str(info.value)
    assert "finetune.lora.text_encoder_targets" in text and "'q_proj'" in text
    assert "model.transformer.resblocks.0.attn" in text and "attention, mlp" in text
    with pytest.raises(ConfigError, match=r"finetune\.lora\.kind"):
        check_text_encoder_targets(te_config("sd1-clip"), LoraConfig(kind="loha"))
    # the SD2 encoder's skipped last block cannot be adapted
    with pytest.raises(ConfigError, match="resblocks"):
        skipped = LoraConfig(text_encoder_targets=[r".*resblocks\.2\.attn"])
        check_text_encoder_targets(te_config("sd2-openclip"), skipped)
    for bad in (
        "finetune.lora.text_encoder_targets=[]",
        "finetune.lora.text_encoder_targets=['(']",
    ):
        with pytest.raises(ConfigError, match=r"finetune\.lora\.text_encoder_targets"):
            load_config([ROOT / "configs/experiments/tiny-lora.yaml"], [bad])


def test_lora_files_that_do_not_fit_the_text_encoder_are_refused(tmp_path: Path) -> None:
    # an SD 2 text-encoder LoRA (wider, OpenCLIP) merged into an SD 1 encoder
    sd2, _ = adapted("sd2-openclip")
    wide = text_encoder("sd2-openclip", width=48)
    add_text_encoder_adapter(wide, LoraConfig(rank=RANK))
    sd2_file = tmp_path / "sd2-te.safetensors"
    layouts.write_lora(sd2_file, {}, text_encoder=text_encoder_adapter_weights(wide))
    with pytest.raises(CheckpointError) as info:
        apply_lora_file(tiny_unet(), str(sd2_file), text_encoder=text_encoder("sd1-clip"))
    assert "another model" in str(info.value) and "sd2-te.safetensors" in str(info.value)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in str(info.value)
    # more layers than the encoder has
    with pytest.raises(CheckpointError, match="name no weight"):
        layouts.merge_text_encoder_into(
            text_encoder("sd1-clip").original_state_dict(),
            {"text_model.encoder.layers.7.mlp.fc1": layouts.LoraWeights(
                torch.zeros(RANK, WIDTH), torch.zeros(4 * WIDTH, RANK), 1.0)},
            "sd1-clip",
        )  # fmt: skip
    # a text-encoder part with no text encoder to apply it to: an error, not silently dropped
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with pytest.raises(CheckpointError, match="no text encoder was given"):
        apply_lora_file(unet, str(sd2_file))
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    # modules the adapter does not have (an mlp LoRA into an attention-only adapter)
    mlp_file = tmp_path / "mlp.safetensors"
    layouts.write_lora(mlp_file, {}, text_encoder=text_encoder_adapter_weights(sd2))
    with pytest.raises(CheckpointError, match="lora_te_text_model_encoder_layers_0_mlp_fc1"):
        add_text_encoder_adapter(text_encoder("sd2-openclip"), LoraConfig(rank=RANK),
                                 init_lora=str(mlp_file))  # fmt: skip
    # another rank
    with pytest.raises(CheckpointError, match="shapes differ"):
        add_text_encoder_adapter(text_encoder("sd2-openclip"),
                                 LoraConfig(rank=2, text_encoder_targets=["attention", "mlp"]),
                                 init_lora=str(mlp_file))  # fmt: skip
    # a lora_te_ name that is no CLIP text module
    import safetensors.torch

    junk = tmp_path / "junk.safetensors"
    safetensors.torch.save_file({"lora_te_text_model_embeddings_x.lora_down.weight":
                                 torch.zeros(1, 2)}, str(junk))  # fmt: skip
    with pytest.raises(CheckpointError, match="lora_te_text_model_embeddings_x"):
        apply_lora_file(tiny_unet(), str(junk), text_encoder=text_encoder("sd1-clip"))


# ---------------------------------------------------------------------------------------------
# diffusers reads our files (UNet and text-encoder parts)
# ---------------------------------------------------------------------------------------------


@needs_pipelines
@pytest.mark.parametrize("kind", KINDS)
def test_diffusers_pipeline_loads_our_files(kind: str, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from sdtrain.models.adapters.diffusers import write_diffusers

    cfg = load_config([ROOT / "configs/models/tiny-base.yaml"],
                      SD2_TINY if kind == "sd2-openclip" else []).model  # fmt: skip
    model = random_model(cfg, seed=0).eval()
    write_diffusers(tmp_path / "model", cfg, **{
        k: v for k, v in model.original_parts().items() if k in ("unet", "vae", "text")
    })  # fmt: skip
    unet, te = model.unet, model.text_encoder
    add_adapter(unet, LoraConfig(rank=RANK, alpha=2, targets=["attention"]))
    add_text_encoder_adapter(te, LoraConfig(rank=RANK, alpha=2,
                                            text_encoder_targets=["attention", "mlp"]))  # fmt: skip
    randomise(unet, seed=4)
    randomise(te, seed=5)
    ids = te.tokenize(PROMPTS)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    context = torch.randn(2, 7, cfg.unet.context_dim, generator=g)
    with torch.no_grad():
        ours_text, ours_unet = te(ids), unet(x, t, context)
    to_diffusers = layouts.diffusers_module_path(cfg.unet)
    for layout in ("kohya", "diffusers"):
        path = tmp_path / f"{layout}.safetensors"
        layouts.write_lora(path, adapter_weights(unet), layout, to_diffusers,  # type: ignore[arg-type]
                           text_encoder=text_encoder_adapter_weights(te))  # fmt: skip
        assert layouts.lora_file_parts(path) == {"unet", "text_encoder"}
        pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model")  # offline
        with torch.no_grad():
            before = pipe.text_encoder(ids).last_hidden_state
        assert (before - ours_text).abs().max() > 1e-2, "without the LoRA the encoders differ"
        # our kohya UNet names are the original (sgm) module paths, which diffusers maps with
        # the UNet's config (as in tests/test_lora.py)
        pipe.load_lora_weights(str(path), unet_config=pipe.unet.config)
        with torch.no_grad():
            text = pipe.text_encoder(ids).last_hidden_state
            out = pipe.unet(x, t, encoder_hidden_states=context).sample
        text_diff = (text - ours_text).abs().max().item()
        unet_diff = (out - ours_unet).abs().max().item()
        print(
            f"{kind} {layout} file in diffusers: text encoder {text_diff:.1e}, UNet {unet_diff:.1e}"
        )
        assert text_diff <= 1e-4 and unet_diff <= 1e-4
