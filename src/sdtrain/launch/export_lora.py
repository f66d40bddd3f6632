"""``sdtrain export RUN OUT.safetensors --lora``: a LoRA run's adapter alone, as a file that
ComfyUI / A1111 (kohya layout) or diffusers (``--lora-format diffusers``) load on the base model.

The run is rebuilt as training built it (``launch.export.rebuild_model``) with the chosen adapter
weights (the EMA of the adapter by default when the run kept one); the layouts are
``models.adapters.lora``. A run with ``finetune.train_text_encoder`` adds its text-encoder
adapter (``lora_te_*`` keys, diffusers ``text_encoder.*``) as trained: the EMA covers the UNet's
adapter only. LoHa adapters are written in the LyCORIS naming (kohya layout only);
LoKr adapters export merged (``--merge``) only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdtrain.errors import ConfigError
from sdtrain.launch.export import rebuild_model
from sdtrain.models.adapters.lora import LoraFormat, diffusers_module_path, write_lora
from sdtrain.models.lora import (
    adapter_weights,
    has_adapter,
    lycoris_state,
    text_encoder_adapter_weights,
)
from sdtrain.trainer.checkpoints import Weights, read_training_checkpoint
from sdtrain.utils import files
from sdtrain.utils.files import PathLike

LORA_FORMATS = ("kohya", "diffusers")


@dataclass
class ExportedLora:
    """What ``export_lora`` wrote."""

    path: Path
    source: Path
    global_step: int | None
    weights: Weights
    layout: LoraFormat
    modules: int
    kind: str
    text_encoder_modules: int = 0

    def summary(self) -> str:
        which = "EMA" if self.weights == "ema" else "raw"
        te = (f" + {self.text_encoder_modules} text encoder modules"
              if self.text_encoder_modules else "")  # fmt: skip
        return (
            f"wrote {self.path}: {self.kind} adapter on {self.modules} UNet modules{te}, "
            f"{self.layout} layout, step {self.global_step}, {which} adapter weights "
            f"(source {self.source})"
        )


def export_lora(
    src: PathLike, out: PathLike, use_ema: bool | None = None, layout: str = "kohya"
) -> ExportedLora:
    """Write the adapter of a LoRA run's newest (or given) step checkpoint to ``out``."""
    out = Path(out)
    if layout not in LORA_FORMATS:
        raise ConfigError(f"--lora-format must be kohya or diffusers, got {layout!r}")
    if out.suffix.lower() != ".safetensors":
        raise ConfigError(f"output {out} must end in .safetensors (LoRA files are safetensors)")
    problem = files.cannot_write(out)
    if problem:
        raise ConfigError(f"{problem}; choose another output path")
    ckpt = read_training_checkpoint(src)
    if not ckpt.is_adapter:
        raise ConfigError(
            f"--lora exports an adapter, but {ckpt.path} is from a full fine-tuning run "
            "(finetune.method: full): export it without --lora"
        )
    kind = ckpt.config.finetune.lora.kind
    if kind == "lokr" or (kind == "loha" and layout == "diffusers"):
        raise ConfigError(
            f"a {kind} adapter cannot be written as a {layout}-layout file here; export it "
            "merged into the base model with --merge"
        )
    weights = ckpt.pick(use_ema)
    model = rebuild_model(ckpt, weights)
    unet = model.unet
    metadata = {
        "sdtrain_model": ckpt.config.model.name,
        "sdtrain_base": ckpt.config.init_from,
        "sdtrain_adapter": kind,
        "sdtrain_global_step": str(ckpt.global_step),
    }
    if kind == "loha":
        state = lycoris_state(unet)
        path = files.write_safetensors(out, state, {"format": "pt", **metadata})
        modules = len({key.split(".")[0] for key in state})
    else:
        lora = adapter_weights(unet)
        to_diffusers = diffusers_module_path(ckpt.config.model.unet)
        te_lora = (text_encoder_adapter_weights(model.text_encoder)
                   if has_adapter(model.text_encoder) else {})  # fmt: skip
        path = write_lora(out, lora, layout, to_diffusers, metadata,  # type: ignore[arg-type]
                          text_encoder=te_lora or None)  # fmt: skip
        modules, te_modules = len(lora), len(te_lora)
    return ExportedLora(path, ckpt.path, ckpt.global_step, weights, layout, modules, kind,  # type: ignore[arg-type]
                        te_modules)  # fmt: skip
