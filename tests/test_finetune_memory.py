"""Memory on one GPU (issue 14 §4), the parts testable on a CPU: the frozen autoencoder and text
encoder held in bf16 / fp16 (``model.frozen_dtype``) with float32 outputs for the UNet, only
while training (exports keep float32)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from test_lora import shards  # noqa: F401  (fixture)
from test_training import in_process_cfg

from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "configs" / "experiments"


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def test_frozen_parts_in_bf16_take_half_the_memory_and_give_float32() -> None:
    cfg = load_config([EXPERIMENTS / "tiny-base.yaml"])
    torch.manual_seed(0)
    model = StableDiffusion(cfg.model)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = model.encode_images(images, sample=False)
    context = model.text_encoder.encode(["a red circle", ""])
    before = parameter_bytes(model.autoencoder) + parameter_bytes(model.text_encoder)
    model.hold_frozen_in(torch.bfloat16)
    assert model.frozen_dtype == torch.bfloat16
    after = parameter_bytes(model.autoencoder) + parameter_bytes(model.text_encoder)
    assert after * 2 == before
    assert next(model.unet.parameters()).dtype == torch.float32, "the UNet is not frozen"
    half_latents = model.encode_images(images, sample=False)
    half_context = model.text_encoder.encode(["a red circle", ""])
    decoded = model.decode_latents(half_latents)
    assert half_latents.dtype == half_context.dtype == decoded.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: a few parts in a thousand per op
    assert (half_latents - latents).abs().max() < 0.05 * latents.abs().max()
    assert (half_context - context).abs().max() < 0.05 * context.abs().max()


class FrozenDtypeSeen(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []

    def on_train_batch_start(self, trainer, module, batch, idx) -> None:
        model = module.model
        self.seen.append((model.frozen_dtype, model.text_encoder.model.token_embedding.weight.dtype,
                          next(model.unet.parameters()).dtype))  # fmt: skip


def test_fit_trains_with_bf16_frozen_parts_and_exports_float32(
    shards: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    from sdtrain.launch.export import export_run
    from sdtrain.models.adapters.original import read_checkpoint
    from sdtrain.trainer.fit import fit

    cfg = in_process_cfg("tiny-base", shards, tmp_path / "run", "model.frozen_dtype=bfloat16",
                         "trainer.max_steps=2", "checkpoint.every_n_steps=2")  # fmt: skip
    seen = FrozenDtypeSeen()
    fit(cfg, callbacks=[seen])
    assert seen.seen == [(torch.bfloat16, torch.bfloat16, torch.float32)] * 2
    exported = read_checkpoint(export_run(tmp_path / "run", tmp_path / "out.safetensors").path)
    assert {v.dtype for v in exported.vae.values()} == {torch.float32}
    assert {v.dtype for v in exported.text.values() if v.is_floating_point()} == {torch.float32}
