"""Frozen CLIP text encoders that turn prompts into the cross-attention context of the UNet.

Both Stable Diffusion generations condition on a CLIP text tower, stored in two different
checkpoint layouts under ``cond_stage_model.``:

- SD1 (``sd1-clip``): OpenAI CLIP ViT-L/14 as a Hugging Face ``CLIPTextModel`` under
  ``transformer.text_model.*``, with separate q/k/v projections, QuickGELU, features from the last
  layer plus ``final_layer_norm``, and prompts padded with the end-of-text id 49407.
- SD2 (``sd2-openclip``): OpenCLIP ViT-H/14 under ``model.*`` in open_clip's own names, with a
  fused ``in_proj``, exact GELU, features from the penultimate layer plus ``ln_final``, prompts
  padded with 0, and an unused ``text_projection`` / ``logit_scale`` kept so checkpoints
  round-trip.

One module, built from open_clip's ``TextTransformer`` (no vision tower), serves both; the layout
difference lives only in ``load_original_state_dict`` / ``original_state_dict``, which read and
write the checkpoint keys without the ``cond_stage_model.`` prefix, strictly and in the original
order. The encoder is frozen (no gradients, eval mode) unless training asks for it
(``finetune.train_text_encoder``: ``train_weights`` for full training, ``follow_train_mode`` for an
adapter on it).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer
from torch import Tensor, nn

from sdtrain.errors import ConfigError
from sdtrain.utils.checks import require_finite

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "FrozenTextEncoder",
    "TextEncoderConfig",
    "TextStateDictError",
    "build_text_encoder",
    "tokenize_prompts",
]

# Special ids of the OpenAI CLIP BPE vocabulary bundled with open_clip (same ids in both SDs).
BOS_ID = 49406
EOS_ID = 49407
_BPE_VOCAB_SIZE = 49408

# The HF layout's legacy buffer: saved by transformers <= 4.30, non-persistent afterwards.
_POSITION_IDS_KEY = "transformer.text_model.embeddings.position_ids"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class TextEncoderConfig:
    """Size and behaviour of the frozen text tower; YAML keys are exactly these field names."""

    kind: Literal["sd1-clip", "sd2-openclip"] = "sd1-clip"
    """Checkpoint layout: ``sd1-clip`` = HF ``CLIPTextModel`` keys under
    ``transformer.text_model.*``; ``sd2-openclip`` = open_clip keys under ``model.*``."""

    width: int = 768
    """Token feature size, which is also the UNet's cross-attention ``context_dim``."""

    layers: int = 12
    """Number of transformer blocks stored in the checkpoint (all of them, even if skipped)."""

    heads: int = 12
    """Attention heads per block; ``width`` must be divisible by it."""

    context_length: int = 77
    """Tokens per prompt, BOS and EOS included; also the positional-embedding length."""

    vocab_size: int = 49408
    """Rows of the token embedding; at least the 49408 ids of the bundled BPE tokenizer."""

    mlp_ratio: float = 4.0
    """MLP hidden size as a multiple of ``width``."""

    layer: Literal["last", "penultimate"] = "last"
    """Which block's output feeds ``ln_final``: ``last`` (SD1) or ``penultimate`` (SD2, the
    final block is stored but skipped)."""

    quick_gelu: bool = True
    """``x * sigmoid(1.702 x)`` as in OpenAI CLIP ViT-L/14 (SD1); False = exact erf GELU as in
    OpenCLIP ViT-H/14 (SD2)."""

    pad_id: int = 49407
    """Id written after EOS: SD1 pads with the end-of-text id 49407, SD2 with 0. Padded positions
    are attended to, so this changes the context the UNet sees."""

    projection_dim: int = 0
    """Columns of ``text_projection`` (SD2: 1024, stored with ``logit_scale``; both unused but
    kept so checkpoints round-trip). 0 = no projection and no ``logit_scale`` (SD1)."""

    def __post_init__(self) -> None:
        require_finite(self)
        if self.kind not in ("sd1-clip", "sd2-openclip"):
            raise ConfigError(
                f"unknown text encoder kind {self.kind!r}; choose 'sd1-clip' or 'sd2-openclip'",
                key="kind",
            )
        if self.layer not in ("last", "penultimate"):
            raise ConfigError(
                f"unknown layer {self.layer!r}; choose 'last' or 'penultimate'", key="layer"
            )
        for name in ("width", "layers", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"must be positive, got {getattr(self, name)}", key=name)
        if self.width % self.heads != 0:
            raise ConfigError(
                f"width {self.width} is not divisible by heads {self.heads}", key="heads"
            )
        if self.layer == "penultimate" and self.layers < 2:
            raise ConfigError(
                f"layer 'penultimate' skips the final block and needs layers >= 2, "
                f"got {self.layers}",
                key="layers",
            )
        # BOS + at least one prompt token + EOS.
        if self.context_length < 3:
            raise ConfigError(
                f"must be at least 3 (BOS, one token, EOS), got {self.context_length}",
                key="context_length",
            )
        # The bundled tokenizer emits ids up to EOS_ID; a smaller table would index out of range.
        if self.vocab_size < _BPE_VOCAB_SIZE:
            raise ConfigError(
                f"the bundled BPE tokenizer emits ids up to {EOS_ID}, so vocab_size must be "
                f">= {_BPE_VOCAB_SIZE}, got {self.vocab_size}",
                key="vocab_size",
            )
        if not self.mlp_ratio > 0 or int(self.width * self.mlp_ratio) < 1:
            raise ConfigError(
                f"must give a hidden size of at least 1, got {self.mlp_ratio}", key="mlp_ratio"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(
                f"pad id {self.pad_id} is outside the vocabulary [0, {self.vocab_size})",
                key="pad_id",
            )
        if self.projection_dim < 0:
            raise ConfigError(
                f"must be >= 0 (0 = none), got {self.projection_dim}", key="projection_dim"
            )
        if self.kind == "sd1-clip" and self.projection_dim != 0:
            raise ConfigError(
                "the SD1 (HF CLIPTextModel) layout has no text_projection; set projection_dim 0",
                key="projection_dim",
            )


class TextStateDictError(ValueError):
    """A text-encoder state dict that does not match the expected original layout."""

    def __init__(
        self,
        message: str,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        mismatched: Sequence[str] = (),
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)
        super().__init__(message)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _bpe_tokenizer() -> SimpleTokenizer:
    # Reading and ranking the 49k BPE merges takes ~0.5 s; do it once per process.
    return SimpleTokenizer()


def tokenize_prompts(
    prompts: Sequence[str] | str, context_length: int = 77, pad_id: int = EOS_ID
) -> Tensor:
    """Token ids ``[B, context_length]`` (int64) with the CLIP BPE bundled in open_clip.

    Each row is BOS, the prompt's first ``context_length - 2`` tokens, EOS, then ``pad_id``. With
    ``pad_id=49407`` this equals HF ``CLIPTokenizer(truncation=True, padding="max_length")`` (SD1);
    with ``pad_id=0`` it equals ``open_clip.tokenize`` (SD2).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    tokenizer = _bpe_tokenizer()
    ids = torch.full((len(prompts), context_length), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        body = tokenizer.encode(prompt)[: context_length - 2]
        tokens = [BOS_ID, *body, EOS_ID]
        ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids


# --------------------------------------------------------------------------------------------
# Checkpoint layouts
# --------------------------------------------------------------------------------------------

# One entry per original tensor, in the original state_dict order:
# (original key, open_clip key inside FrozenTextEncoder, index of the q/k/v third of a fused
# in_proj tensor or None when the tensor maps whole).
_KeyPlan = list[tuple[str, str, int | None]]
_Q, _K, _V = 0, 1, 2


def _sd1_plan(layers: int) -> _KeyPlan:
    root = "transformer.text_model."
    plan: _KeyPlan = [
        (root + "embeddings.token_embedding.weight", "model.token_embedding.weight", None),
        (root + "embeddings.position_embedding.weight", "model.positional_embedding", None),
    ]
    for n in range(layers):
        hf = f"{root}encoder.layers.{n}."
        oc = f"model.transformer.resblocks.{n}."
        # HF registers k_proj, v_proj, q_proj in that order; open_clip fuses them as q, k, v.
        for proj, third in (("k_proj", _K), ("v_proj", _V), ("q_proj", _Q)):
            for kind in ("weight", "bias"):
                plan.append((f"{hf}self_attn.{proj}.{kind}", f"{oc}attn.in_proj_{kind}", third))
        for hf_name, oc_name in (
            ("self_attn.out_proj", "attn.out_proj"),
            ("layer_norm1", "ln_1"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
            ("layer_norm2", "ln_2"),
        ):
            for kind in ("weight", "bias"):
                plan.append((f"{hf}{hf_name}.{kind}", f"{oc}{oc_name}.{kind}", None))
    for kind in ("weight", "bias"):
        plan.append((f"{root}final_layer_norm.{kind}", f"model.ln_final.{kind}", None))
    return plan


def _sd2_plan(layers: int, projection: bool) -> _KeyPlan:
    # open_clip's CLIP registers its own parameters first, then transformer, token_embedding,
    # ln_final; the names are open_clip's own, so the mapping is the identity.
    names = ["positional_embedding"]
    if projection:
        names += ["text_projection", "logit_scale"]
    for n in range(layers):
        block = f"transformer.resblocks.{n}."
        for sub in ("ln_1", "attn.in_proj", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            if sub == "attn.in_proj":
                names += [block + "attn.in_proj_weight", block + "attn.in_proj_bias"]
            else:
                names += [f"{block}{sub}.weight", f"{block}{sub}.bias"]
    names += ["token_embedding.weight", "ln_final.weight", "ln_final.bias"]
    # logit_scale sits on FrozenTextEncoder itself; everything else on the TextTransformer.
    return [("model." + n, n if n == "logit_scale" else "model." + n, None) for n in names]


def _third_shape(shape: torch.Size, third: int | None) -> torch.Size:
    return shape if third is None else torch.Size((shape[0] // 3, *shape[1:]))


def _list_keys(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------


class FrozenTextEncoder(nn.Module):
    """A CLIP text tower, frozen by default: prompts -> token ids -> context ``[B, L, width]``."""

    def __init__(self, cfg: TextEncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = TextTransformer(
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            width=cfg.width,
            heads=cfg.heads,
            layers=cfg.layers,
            mlp_ratio=cfg.mlp_ratio,
            output_dim=cfg.projection_dim,  # 0 -> text_projection is None
            act_layer=QuickGELU if cfg.quick_gelu else nn.GELU,
            norm_layer=functools.partial(LayerNorm, eps=1e-5),
        )
        # open_clip keeps logit_scale on CLIP, not on the text tower; SD2 checkpoints carry it.
        self.logit_scale: nn.Parameter | None = None
        if cfg.projection_dim > 0:
            self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))
        # "penultimate" runs every block but the last; the last still exists so keys round-trip.
        self.num_active_blocks = cfg.layers - (1 if cfg.layer == "penultimate" else 0)
        self.trains = False
        """Whether ``train(mode)`` follows ``mode`` (set by ``train_weights`` /
        ``follow_train_mode``); otherwise the encoder stays in eval mode."""
        self.weights_train = False
        """Whether every weight takes gradients (``train_weights``)."""
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        """Eval mode whatever ``mode`` is, unless the encoder trains (``trains``)."""
        return super().train(mode and self.trains)

    def train_weights(self) -> None:
        """Every weight the context depends on takes gradients and ``train()`` follows the
        surrounding module (full text-encoder training); loading original weights later keeps
        this. Weights the context never uses (``penultimate``'s skipped last block, SD2's
        ``text_projection`` / ``logit_scale``) stay frozen: no gradient would reach them, which
        DDP without unused-parameter search refuses."""
        self.follow_train_mode()
        self.weights_train = True
        self._set_grad()

    def _set_grad(self) -> None:
        used = self.used_parameter_names() if self.weights_train else set()
        for name, param in self.named_parameters():
            param.requires_grad_(name in used)

    def used_parameter_names(self) -> set[str]:
        """The parameters ``forward`` uses."""
        unused = ("model.text_projection", "logit_scale")
        skipped = [f"model.transformer.resblocks.{i}." for i in
                   range(self.num_active_blocks, self.cfg.layers)]  # fmt: skip
        return {name for name, _ in self.named_parameters()
                if name not in unused and not name.startswith(tuple(skipped))}  # fmt: skip

    def follow_train_mode(self) -> None:
        """``train()`` follows the surrounding module (an adapter's dropout on the encoder);
        which parameters take gradients is left as it is."""
        self.trains = True

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    # ---- text -> context -------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str] | str) -> Tensor:
        """Token ids ``[B, context_length]`` (int64, CPU), padded with ``cfg.pad_id``."""
        return tokenize_prompts(prompts, self.cfg.context_length, self.cfg.pad_id)

    def forward(self, tokens: Tensor) -> Tensor:
        """Features ``[B, L, width]`` for token ids ``[B, L]``, ``L <= context_length``."""
        length = tokens.shape[1]
        if length > self.cfg.context_length:
            raise ValueError(f"got {length} tokens, context_length is {self.cfg.context_length}")
        m = self.model
        x = m.token_embedding(tokens)  # (B, L, D)
        x = x + m.positional_embedding[:length].to(x.dtype)  # (B, L, D)
        # Causal only: CLIP attends to padding too, which is why pad_id matters.
        mask = m.attn_mask[:length, :length]  # (L, L), -inf above the diagonal
        # open_clip's Transformer is batch-first, so blocks take (B, L, D) directly.
        for block in m.transformer.resblocks[: self.num_active_blocks]:
            x = block(x, attn_mask=mask)  # (B, L, D)
        return m.ln_final(x)  # (B, L, D)

    def encode(self, prompts: Sequence[str] | str) -> Tensor:
        """Context ``[B, context_length, width]`` (float32, whatever dtype the encoder is held
        in) for prompts, computed on the module's device."""
        return self(self.tokenize(prompts).to(self.device)).float()

    # ---- original checkpoint layout --------------------------------------------------------

    def _plan(self) -> _KeyPlan:
        if self.cfg.kind == "sd1-clip":
            return _sd1_plan(self.cfg.layers)
        return _sd2_plan(self.cfg.layers, projection=self.cfg.projection_dim > 0)

    def _original_shapes(self) -> Iterator[tuple[str, torch.Size]]:
        own = {name: p.shape for name, p in self.named_parameters()}
        for key, local, third in self._plan():
            yield key, _third_shape(own[local], third)
        if self.cfg.kind == "sd1-clip":
            yield _POSITION_IDS_KEY, torch.Size((1, self.cfg.context_length))

    def original_state_dict(self) -> dict[str, Tensor]:
        """The tensors in the original checkpoint layout, keys without ``cond_stage_model.``.

        Keys and order follow the original ``state_dict()``; SD1 includes the legacy
        ``position_ids`` buffer. Whole tensors share storage with the module; the SD1 q/k/v
        pieces of the fused projection are copies. Works on the ``meta`` device.
        """
        own = dict(self.named_parameters())
        out: dict[str, Tensor] = {}
        for key, local, third in self._plan():
            tensor = own[local].detach()
            out[key] = tensor if third is None else tensor.chunk(3)[third].clone()
        if self.cfg.kind == "sd1-clip":
            positions = torch.arange(self.cfg.context_length, device=self.device)
            out[_POSITION_IDS_KEY] = positions.unsqueeze(0)  # (1, L) int64
        return out

    def load_original_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load original-layout tensors (keys without ``cond_stage_model.``), strictly.

        Any missing, unexpected or mis-shaped key raises ``TextStateDictError`` before anything is
        written. SD1's legacy ``position_ids`` may be present (it must then be ``arange``) or
        absent. A module built on ``meta`` takes the given tensors over (cast to its dtype) and
        rebuilds its causal mask on their device.
        """
        self._check_keys(state_dict)
        if _POSITION_IDS_KEY in state_dict:
            self._check_position_ids(state_dict[_POSITION_IDS_KEY])

        # Reassemble the module's own tensors; the SD1 q/k/v thirds are concatenated q, k, v.
        whole: dict[str, Tensor] = {}
        thirds: dict[str, dict[int, Tensor]] = {}
        for key, local, third in self._plan():
            if third is None:
                whole[local] = state_dict[key]
            else:
                thirds.setdefault(local, {})[third] = state_dict[key]
        for local, parts in thirds.items():
            whole[local] = torch.cat([parts[_Q], parts[_K], parts[_V]], dim=0)

        on_meta = any(p.is_meta for p in self.parameters())
        if on_meta:
            # Nothing to copy into: adopt the tensors, keeping the dtype the module was built in.
            dtypes = {name: p.dtype for name, p in self.named_parameters()}
            whole = {name: t.to(dtypes[name]) for name, t in whole.items()}
        self.load_state_dict(whole, strict=True, assign=on_meta)
        if on_meta:
            # The non-persistent mask is not in any state dict, so it is still a meta tensor.
            self.model.attn_mask = self.model.build_causal_mask().to(self.device)
        # A frozen encoder stays frozen; a training one (train_weights) keeps training.
        self._set_grad()

    def _check_keys(self, state_dict: Mapping[str, Tensor]) -> None:
        expected = dict(self._original_shapes())
        missing = [k for k in expected if k not in state_dict and k != _POSITION_IDS_KEY]
        unexpected = [k for k in state_dict if k not in expected]
        mismatched = [
            f"{k} {list(state_dict[k].shape)} != {list(shape)}"
            for k, shape in expected.items()
            if k in state_dict and state_dict[k].shape != shape
        ]
        if not (missing or unexpected or mismatched):
            return
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_list_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_list_keys(unexpected)}")
        if mismatched:
            parts.append(f"wrong shape {len(mismatched)}: {_list_keys(mismatched)}")
        raise TextStateDictError(
            f"{self.cfg.kind} text encoder state dict does not match the original layout "
            f"(keys without 'cond_stage_model.'): " + "; ".join(parts),
            missing=missing,
            unexpected=unexpected,
            mismatched=mismatched,
        )

    def _check_position_ids(self, position_ids: Tensor) -> None:
        if position_ids.is_meta:
            return  # no values to check
        # Some converted checkpoints store the ids as floats; only the values matter.
        expected = torch.arange(self.cfg.context_length, dtype=torch.float64).unsqueeze(0)
        if not torch.equal(position_ids.detach().cpu().to(torch.float64), expected):
            raise TextStateDictError(
                f"{_POSITION_IDS_KEY} must hold arange({self.cfg.context_length}); positions are "
                f"implied by order, so any other value means a corrupted or foreign checkpoint",
                mismatched=[_POSITION_IDS_KEY],
            )


def build_text_encoder(
    cfg: TextEncoderConfig, device: torch.device | str | None = None
) -> FrozenTextEncoder:
    """Build a randomly initialised, frozen encoder; ``device="meta"`` allocates no memory."""
    if device is None:
        return FrozenTextEncoder(cfg)
    with torch.device(device):
        return FrozenTextEncoder(cfg)
