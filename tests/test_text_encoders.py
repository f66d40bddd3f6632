"""Tests for the frozen SD1 / SD2 text encoders: tokens, checkpoint layouts and the forward maths.

Expectations come from outside the module under test: token ids and full-size key/shape/parameter
facts from the shared reference data (made with the original code), and forward passes written
here in plain torch straight from the checkpoint-layout weights.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdtrain.config.errors import ConfigError
from sdtrain.models.text_encoders import (
    FrozenTextEncoder,
    TextEncoderConfig,
    TextStateDictError,
    build_text_encoder,
)

PROMPTS = ["a photograph of an astronaut riding a horse", ""]
POSITION_IDS = "transformer.text_model.embeddings.position_ids"

SD1_FULL = TextEncoderConfig()
SD2_FULL = TextEncoderConfig(
    kind="sd2-openclip",
    width=1024,
    layers=24,
    heads=16,
    layer="penultimate",
    quick_gelu=False,
    pad_id=0,
    projection_dim=1024,
)
SD1_TINY = TextEncoderConfig(width=64, layers=2, heads=2)
SD2_TINY = TextEncoderConfig(
    kind="sd2-openclip",
    width=64,
    layers=2,
    heads=2,
    layer="penultimate",
    quick_gelu=False,
    pad_id=0,
    projection_dim=64,
)


# --------------------------------------------------------------------------------------------
# Independent weights and reference forwards
# --------------------------------------------------------------------------------------------


def _random(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, Tensor]:
    """Random float32 tensors; LayerNorm weights near 1 so activations stay in a sane range."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        value = 0.05 * torch.randn(shape, generator=gen)
        is_norm_weight = key.endswith(".weight") and ("norm" in key or ".ln_" in key)
        out[key] = 1.0 + value if is_norm_weight else value
    return out


def hf_layout(cfg: TextEncoderConfig, seed: int = 0) -> dict[str, Tensor]:
    """An SD1 ``CLIPTextModel`` state dict (no ``cond_stage_model.``), in HF registration order."""
    d, hidden, root = cfg.width, int(cfg.width * cfg.mlp_ratio), "transformer.text_model."
    shapes: dict[str, tuple[int, ...]] = {
        root + "embeddings.token_embedding.weight": (cfg.vocab_size, d),
        root + "embeddings.position_embedding.weight": (cfg.context_length, d),
    }
    for n in range(cfg.layers):
        layer = f"{root}encoder.layers.{n}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[f"{layer}self_attn.{proj}.weight"] = (d, d)
            shapes[f"{layer}self_attn.{proj}.bias"] = (d,)
        shapes[layer + "layer_norm1.weight"] = shapes[layer + "layer_norm1.bias"] = (d,)
        shapes[layer + "mlp.fc1.weight"], shapes[layer + "mlp.fc1.bias"] = (hidden, d), (hidden,)
        shapes[layer + "mlp.fc2.weight"], shapes[layer + "mlp.fc2.bias"] = (d, hidden), (d,)
        shapes[layer + "layer_norm2.weight"] = shapes[layer + "layer_norm2.bias"] = (d,)
    shapes[root + "final_layer_norm.weight"] = shapes[root + "final_layer_norm.bias"] = (d,)
    sd = _random(shapes, seed)
    sd[POSITION_IDS] = torch.arange(cfg.context_length).unsqueeze(0)
    return sd


def open_clip_layout(cfg: TextEncoderConfig, seed: int = 0) -> dict[str, Tensor]:
    """An SD2 open_clip state dict (no ``cond_stage_model.``), in the original CLIP order."""
    d, hidden = cfg.width, int(cfg.width * cfg.mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {
        "model.positional_embedding": (cfg.context_length, d),
        "model.text_projection": (d, cfg.projection_dim),
        "model.logit_scale": (),
    }
    for n in range(cfg.layers):
        block = f"model.transformer.resblocks.{n}."
        shapes[block + "ln_1.weight"] = shapes[block + "ln_1.bias"] = (d,)
        shapes[block + "attn.in_proj_weight"] = (3 * d, d)
        shapes[block + "attn.in_proj_bias"] = (3 * d,)
        shapes[block + "attn.out_proj.weight"], shapes[block + "attn.out_proj.bias"] = (d, d), (d,)
        shapes[block + "ln_2.weight"] = shapes[block + "ln_2.bias"] = (d,)
        shapes[block + "mlp.c_fc.weight"], shapes[block + "mlp.c_fc.bias"] = (hidden, d), (hidden,)
        shapes[block + "mlp.c_proj.weight"], shapes[block + "mlp.c_proj.bias"] = (d, hidden), (d,)
    shapes["model.token_embedding.weight"] = (cfg.vocab_size, d)
    shapes["model.ln_final.weight"] = shapes["model.ln_final.bias"] = (d,)
    return _random(shapes, seed)


def _attention(x: Tensor, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Causal multi-head attention from already projected q, k, v, all ``[B, L, D]``."""
    b, length, d = x.shape
    dh = d // heads

    def split(t: Tensor) -> Tensor:
        return t.reshape(b, length, heads, dh).transpose(1, 2)  # (B, H, L, dh)

    scores = split(q) @ split(k).transpose(-1, -2) * dh**-0.5  # (B, H, L, L)
    causal = torch.full((length, length), float("-inf"), dtype=x.dtype).triu(1)
    weights = torch.softmax(scores + causal, dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(b, length, d)  # (B, L, D)


def reference_sd1(sd: dict[str, Tensor], tokens: Tensor, cfg: TextEncoderConfig) -> Tensor:
    """HF CLIPTextModel ``last_hidden_state`` in float64, from HF-layout weights."""
    w = {k: v.double() for k, v in sd.items()}
    root, length, d = "transformer.text_model.", tokens.shape[1], cfg.width

    def linear(x: Tensor, name: str) -> Tensor:
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def norm(x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, (d,), w[name + ".weight"], w[name + ".bias"], eps=1e-5)

    x = w[root + "embeddings.token_embedding.weight"][tokens]
    x = x + w[root + "embeddings.position_embedding.weight"][:length]
    for n in range(cfg.layers):
        p = f"{root}encoder.layers.{n}."
        h = norm(x, p + "layer_norm1")
        q, k, v = (linear(h, f"{p}self_attn.{s}_proj") for s in "qkv")
        x = x + linear(_attention(h, q, k, v, cfg.heads), p + "self_attn.out_proj")
        h = linear(norm(x, p + "layer_norm2"), p + "mlp.fc1")
        h = h * torch.sigmoid(1.702 * h)  # quick_gelu
        x = x + linear(h, p + "mlp.fc2")
    return norm(x, root + "final_layer_norm")


def reference_open_clip(
    sd: dict[str, Tensor], tokens: Tensor, cfg: TextEncoderConfig, blocks: int
) -> Tensor:
    """open_clip text features in float64 after ``blocks`` resblocks and ``ln_final``."""
    w = {k: v.double() for k, v in sd.items()}
    length, d = tokens.shape[1], cfg.width

    def norm(x: Tensor, name: str) -> Tensor:
        return F.layer_norm(x, (d,), w[name + ".weight"], w[name + ".bias"], eps=1e-5)

    x = w["model.token_embedding.weight"][tokens] + w["model.positional_embedding"][:length]
    for n in range(blocks):
        p = f"model.transformer.resblocks.{n}."
        h = norm(x, p + "ln_1")
        qkv = h @ w[p + "attn.in_proj_weight"].T + w[p + "attn.in_proj_bias"]
        q, k, v = qkv.chunk(3, dim=-1)  # fused in q, k, v order
        attn = _attention(h, q, k, v, cfg.heads)
        x = x + attn @ w[p + "attn.out_proj.weight"].T + w[p + "attn.out_proj.bias"]
        h = norm(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"].T + w[p + "mlp.c_fc.bias"]
        h = F.gelu(h) if not cfg.quick_gelu else h * torch.sigmoid(1.702 * h)
        x = x + h @ w[p + "mlp.c_proj.weight"].T + w[p + "mlp.c_proj.bias"]
    return norm(x, "model.ln_final")


def _loaded(cfg: TextEncoderConfig, sd: dict[str, Tensor]) -> FrozenTextEncoder:
    encoder = build_text_encoder(cfg)
    encoder.load_original_state_dict(sd)
    return encoder


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "field"), [(SD1_TINY, "sd1_clip_tokenizer_ids"), (SD2_TINY, "sd2_open_clip_ids")]
)
def test_tokenize_matches_reference_ids(
    reference_dir: Path, cfg: TextEncoderConfig, field: str
) -> None:
    prompts = json.loads((reference_dir / "tokens.json").read_text())["prompts"]
    assert any(p["truncated"] for p in prompts)  # the truncation case is covered
    encoder = build_text_encoder(cfg, device="meta")  # the tokenizer needs no weights
    ids = encoder.tokenize([p["text"] for p in prompts])
    assert ids.dtype == torch.long
    assert ids.shape == (len(prompts), 77)
    assert ids.tolist() == [p[field] for p in prompts]
    # A bare string is one prompt, not a sequence of characters.
    assert encoder.tokenize(prompts[0]["text"]).tolist() == [prompts[0][field]]


# --------------------------------------------------------------------------------------------
# Full-size layouts against the manifests of the original checkpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("cfg", "manifest"), [(SD1_FULL, "sd15"), (SD2_FULL, "sd2-base")])
def test_full_size_layout_matches_manifest(
    reference_dir: Path, cfg: TextEncoderConfig, manifest: str
) -> None:
    facts = json.loads((reference_dir / "manifests" / f"{manifest}.json").read_text())
    prefix = "cond_stage_model."
    expected = [(k, shape) for k, shape in facts["keys"].items() if k.startswith(prefix)]

    encoder = build_text_encoder(cfg, device="meta")
    written = encoder.original_state_dict()
    assert [(prefix + k, list(t.shape)) for k, t in written.items()] == expected
    assert sum(p.numel() for p in encoder.parameters()) == facts["params"]["cond_stage_model"]

    # The causal mask exists but is never saved (SD2 manifest: non-persistent).
    assert "model.attn_mask" in dict(encoder.named_buffers())
    assert "model.attn_mask" not in encoder.state_dict()
    if cfg.kind == "sd1-clip":
        assert written[POSITION_IDS].dtype == torch.int64
    else:
        mask = facts["non_persistent_buffers"][prefix + "model.attn_mask"]
        assert list(encoder.model.attn_mask.shape) == mask["shape"]


# --------------------------------------------------------------------------------------------
# Tiny SD1: HF layout round trip and forward against an independent HF-style forward
# --------------------------------------------------------------------------------------------


def test_sd1_round_trip_is_bit_exact() -> None:
    sd = hf_layout(SD1_TINY)
    written = _loaded(SD1_TINY, sd).original_state_dict()
    assert list(written) == list(sd)
    for key, value in sd.items():
        assert written[key].dtype == value.dtype, key
        assert torch.equal(written[key], value), key


def test_sd1_forward_matches_hf_reference() -> None:
    sd = hf_layout(SD1_TINY, seed=1)
    encoder = _loaded(SD1_TINY, sd)
    tokens = encoder.tokenize(PROMPTS)
    # SD1 pads with the end-of-text id, and the padded positions are attended to.
    assert tokens[0, :10].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert (tokens[0, 10:] == 49407).all() and (tokens[1, 1:] == 49407).all()

    out = encoder(tokens)
    assert out.shape == (2, 77, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_sd1(sd, tokens, SD1_TINY).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder.encode(PROMPTS), out, atol=0, rtol=0)
    # Shorter sequences slice the positional embedding and the mask.
    short = tokens[:, :20]
    torch.testing.assert_close(
        encoder(short), reference_sd1(sd, short, SD1_TINY).float(), atol=1e-5, rtol=0
    )


def test_sd1_loads_without_legacy_position_ids() -> None:
    sd = hf_layout(SD1_TINY, seed=2)
    without = {k: v for k, v in sd.items() if k != POSITION_IDS}
    encoder = _loaded(SD1_TINY, without)
    tokens = encoder.tokenize(PROMPTS)
    torch.testing.assert_close(
        encoder(tokens), reference_sd1(sd, tokens, SD1_TINY).float(), atol=1e-5, rtol=0
    )
    # ... and still writes it back, as the original checkpoints hold it.
    assert torch.equal(encoder.original_state_dict()[POSITION_IDS], sd[POSITION_IDS])


def test_meta_built_encoder_takes_over_loaded_weights() -> None:
    sd = hf_layout(SD1_TINY, seed=3)
    encoder = build_text_encoder(SD1_TINY, device="meta")
    encoder.load_original_state_dict(sd)
    assert not any(t.is_meta for t in [*encoder.parameters(), *encoder.buffers()])
    causal = torch.full((77, 77), float("-inf")).triu(1)
    assert torch.equal(encoder.model.attn_mask, causal)
    assert not any(p.requires_grad for p in encoder.parameters())
    tokens = encoder.tokenize(PROMPTS)
    torch.testing.assert_close(encoder(tokens), _loaded(SD1_TINY, sd)(tokens), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Tiny SD2: open_clip layout, penultimate layer, exact GELU
# --------------------------------------------------------------------------------------------


def test_sd2_round_trip_is_bit_exact() -> None:
    sd = open_clip_layout(SD2_TINY)
    written = _loaded(SD2_TINY, sd).original_state_dict()
    assert list(written) == list(sd)
    for key, value in sd.items():
        assert torch.equal(written[key], value), key


def test_sd2_forward_skips_the_last_block() -> None:
    sd = open_clip_layout(SD2_TINY, seed=4)
    encoder = _loaded(SD2_TINY, sd)
    tokens = encoder.tokenize(PROMPTS)
    assert (tokens[0, 10:] == 0).all() and tokens[0, 9] == 49407

    out = encoder(tokens)
    expected = reference_open_clip(sd, tokens, SD2_TINY, blocks=1).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)

    # The final block is stored but unused: new weights there change nothing.
    changed = dict(sd)
    for key, value in open_clip_layout(SD2_TINY, seed=5).items():
        if key.startswith("model.transformer.resblocks.1."):
            changed[key] = value
    torch.testing.assert_close(_loaded(SD2_TINY, changed)(tokens), out, atol=0, rtol=0)

    # The same weights read out at the last layer run both blocks and give other features.
    last_cfg = TextEncoderConfig(**{**vars(SD2_TINY), "layer": "last"})
    last = _loaded(last_cfg, sd)(tokens)
    both = reference_open_clip(sd, tokens, last_cfg, blocks=2).float()
    torch.testing.assert_close(last, both, atol=1e-5, rtol=0)
    assert (last - out).abs().max() > 1e-2


def test_exact_gelu_and_quick_gelu_differ() -> None:
    sd = open_clip_layout(SD2_TINY, seed=6)
    quick_cfg = TextEncoderConfig(**{**vars(SD2_TINY), "quick_gelu": True})
    tokens = torch.tensor([[49406, 320, 8853, 49407, 0, 0]])
    quick = _loaded(quick_cfg, sd)(tokens)
    torch.testing.assert_close(
        quick, reference_open_clip(sd, tokens, quick_cfg, blocks=1).float(), atol=1e-5, rtol=0
    )
    assert (quick - _loaded(SD2_TINY, sd)(tokens)).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

_LN1 = "transformer.text_model.encoder.layers.1.layer_norm1.weight"


def _corrupt_missing(sd: dict[str, Tensor]) -> None:
    del sd[_LN1]


def _corrupt_unexpected(sd: dict[str, Tensor]) -> None:
    sd["transformer.text_model.encoder.layers.2.layer_norm1.weight"] = torch.ones(64)


def _corrupt_shape(sd: dict[str, Tensor]) -> None:
    sd[_LN1] = torch.ones(65)


def _corrupt_position_ids(sd: dict[str, Tensor]) -> None:
    sd[POSITION_IDS] = sd[POSITION_IDS].flip(-1)


@pytest.mark.parametrize(
    ("corrupt", "named"),
    [
        (_corrupt_missing, _LN1),
        (_corrupt_unexpected, "encoder.layers.2.layer_norm1.weight"),
        (_corrupt_shape, _LN1),
        (_corrupt_position_ids, POSITION_IDS),
    ],
)
def test_bad_state_dict_is_rejected_without_partial_load(
    corrupt: Callable[[dict[str, Tensor]], None], named: str
) -> None:
    encoder = _loaded(SD1_TINY, hf_layout(SD1_TINY, seed=7))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    sd = hf_layout(SD1_TINY, seed=8)
    corrupt(sd)
    with pytest.raises(TextStateDictError, match=named.replace(".", r"\.")):
        encoder.load_original_state_dict(sd)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_layouts_are_not_interchangeable() -> None:
    with pytest.raises(TextStateDictError, match=r"missing .*model\.positional_embedding"):
        build_text_encoder(SD2_TINY).load_original_state_dict(hf_layout(SD1_TINY))
    with pytest.raises(TextStateDictError, match="unexpected"):
        build_text_encoder(SD1_TINY).load_original_state_dict(open_clip_layout(SD2_TINY))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"kind": "sd3"}, "kind"),
        ({"layer": "first"}, "layer"),
        ({"width": 0}, "width"),
        ({"width": 100, "heads": 12}, "heads"),
        ({"projection_dim": 768}, "projection_dim"),
        ({"kind": "sd2-openclip", "projection_dim": -1}, "projection_dim"),
        ({"layer": "penultimate", "layers": 1}, "layers"),
        ({"pad_id": 49408}, "pad_id"),
        ({"pad_id": -1}, "pad_id"),
        ({"context_length": 2}, "context_length"),
        ({"vocab_size": 1000, "pad_id": 0}, "vocab_size"),
        ({"mlp_ratio": 0.0}, "mlp_ratio"),
    ],
)
def test_invalid_config_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        TextEncoderConfig(**overrides)
    assert info.value.key == field


def test_legal_non_default_config() -> None:
    # Non-default but legal: SD1 layout read at the penultimate layer ("clip skip"), short context.
    TextEncoderConfig(layer="penultimate", context_length=3)


# --------------------------------------------------------------------------------------------
# Frozen
# --------------------------------------------------------------------------------------------


def test_encoder_is_frozen_and_stays_in_eval_mode() -> None:
    encoder = _loaded(SD1_TINY, hf_layout(SD1_TINY, seed=9))
    parent = nn.ModuleDict({"text": encoder, "head": nn.Linear(64, 1)})
    parent.train()
    assert parent.training and parent["head"].training
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())

    out = parent["head"](encoder(encoder.tokenize(PROMPTS))).sum()
    out.backward()
    assert parent["head"].weight.grad is not None
    assert all(p.grad is None for p in encoder.parameters())
