"""First-stage training: the AutoencoderKL that maps images to the latents the UNet denoises.

Objective: the original ``LPIPSWithDiscriminator`` without its two parts that need downloaded or
adversarial networks: an L1 (or, optionally, squared) reconstruction loss summed per image plus
``kl_weight`` x the KL of the posterior to N(0, I) (summed per image), averaged over the batch.
LPIPS needs pretrained VGG weights and the patch GAN starts late in the original schedule (50k+
steps); for the flat-coloured scenes of ``sdtrain demo`` reconstruction + KL is enough. The decoder
sees posterior samples, as in the original.

The result is written in the original layout (``first_stage_model.*``) together with the frozen
text encoder of the model config (``cond_stage_model.*``, seeded random initialisation unless
``init_from`` provides one), so a UNet run can start from it with ``init_from=<that file>`` and
every later stage shares the same autoencoder and text encoder. The latent scale factor is
measured as the original ``scale_by_std`` does (1 / std of the encoded latents) and returned, for
``model.autoencoder.scale_factor`` of the UNet runs.

Layering as ``fit``: ``train_first_stage(cfg)`` -> ``AutoencoderModule`` + Lightning trainer (CSV /
wandb loggers from the config, progress bar) -> ``write_first_stage`` -> ``latent_scale``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar

from sdtrain.config.loader import to_yaml
from sdtrain.data.pipeline import LaionLoader
from sdtrain.data.transforms import masked_images, to_model_images
from sdtrain.errors import ConfigError
from sdtrain.models.adapters.diffusers import read_model_weights
from sdtrain.models.adapters.original import write_checkpoint
from sdtrain.models.autoencoder import AutoencoderKL
from sdtrain.models.text_encoders import FrozenTextEncoder, TextStateDictError
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.trainer.module import step_generator

FIRST_STAGE_FILE = "first_stage.ckpt"


@dataclass
class FirstStageLoss:
    """The first-stage objective: reconstruction error summed per image + ``kl_weight`` x KL."""

    reconstruction: Literal["l1", "l2"] = "l1"
    """Absolute (the original) or squared error. Squared error learns the colours of small flat
    shapes several times faster (``sdtrain demo`` uses it)."""
    kl_weight: float = 1e-6
    """Weight of the KL term (the original kl-f8 / kl-f4 configs: 1e-6)."""
    masked_fraction: float = 0.0
    """Share of each batch shown as its inpainting input ``image x (1 - mask)`` (grey where
    masked; needs ``data.masks.enabled``), so that the encoder also learns the masked images an
    inpainting UNet is conditioned on. LAION's variety covers them for the original; a narrow
    dataset may need them shown (``sdtrain demo`` leaves this at 0: at its step counts 0.3 did
    not make the inpainting UNet keep more of its input)."""


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


class AutoencoderModule(pl.LightningModule):
    """Trains ``autoencoder`` on the configured shards: encode -> sample -> decode -> L1 + KL."""

    def __init__(self, cfg: ExperimentConfig, loss: FirstStageLoss) -> None:
        super().__init__()
        self.cfg = cfg
        self.loss_cfg = loss
        self.autoencoder = AutoencoderKL(cfg.model.autoencoder)

    def train_dataloader(self) -> LaionLoader:
        return LaionLoader(self.cfg.data, self.global_rank, self.trainer.world_size)

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.cfg.optim
        optimizer = torch.optim.AdamW(
            self.autoencoder.parameters(),
            lr=optim.lr,
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            foreach=True,  # as LatentDiffusionModule: the per-tensor loop's result, less overhead
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.lr_multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        g = step_generator(self.cfg.seed, self.global_step, self.global_rank, 0, self.device)
        images = to_model_images(batch["image"].to(self.device))  # (B, 3, H, W) in [-1, 1]
        b = images.shape[0]
        if self.loss_cfg.masked_fraction > 0:
            masked = masked_images(images, batch["mask"].to(self.device))  # (B, 3, H, W)
            pick = torch.rand(b, generator=g, device=self.device) < self.loss_cfg.masked_fraction
            images = torch.where(pick[:, None, None, None], masked, images)
        posterior = self.autoencoder.encode(images)  # over (B, z, H/f, W/f)
        reconstruction = self.autoencoder.decode(posterior.sample(g))  # (B, 3, H, W)
        error = (images - reconstruction).abs()  # (B, 3, H, W)
        if self.loss_cfg.reconstruction == "l2":
            rec = error.pow(2).sum(dim=(1, 2, 3)).mean()
        else:
            rec = error.sum(dim=(1, 2, 3)).mean()
        kl = posterior.kl().mean()
        loss = rec + self.loss_cfg.kl_weight * kl
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=b)
        self.log("train/l1", error.mean(), prog_bar=True, on_step=True, batch_size=b)
        self.log("train/kl", kl, on_step=True, batch_size=b)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=True)
        return loss


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


@dataclass
class FirstStageResult:
    """What ``train_first_stage`` produced."""

    run_dir: Path
    checkpoint: Path
    """Original-layout file: ``first_stage_model.*`` + ``cond_stage_model.*``."""
    scale_factor: float
    """1 / std of the encoded training latents (for ``model.autoencoder.scale_factor``)."""
    l1: float
    """Mean absolute reconstruction error in [-1, 1] units on held batches at the end."""


def train_first_stage(
    cfg: ExperimentConfig, loss: FirstStageLoss | None = None, measure_batches: int = 4
) -> FirstStageResult:
    """Train the autoencoder of ``cfg.model`` for ``cfg.trainer.max_steps`` on ``cfg.data``;
    write the original-layout checkpoint into the run folder and measure the latent scale."""
    from sdtrain.trainer.fit import build_loggers, finish_loggers, run_dir

    if cfg.finetune.train_text_encoder:
        raise ConfigError(
            "makes no sense here: first-stage training trains the autoencoder alone (the text "
            "encoder is written with it as initialised); set finetune.train_text_encoder=false",
            key="finetune.train_text_encoder",
        )
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")
    folder = run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    loss = loss or FirstStageLoss()
    if loss.masked_fraction > 0 and not cfg.data.masks.enabled:
        raise ConfigError("masked_fraction > 0 needs masks: set data.masks.enabled: true",
                          key="data.masks.enabled")  # fmt: skip
    module = AutoencoderModule(cfg, loss)
    text_encoder = FrozenTextEncoder(cfg.model.text_encoder)  # seeded like the autoencoder
    if cfg.init_from:
        ckpt = read_model_weights(cfg.init_from, cfg.model)
        if ckpt.text:
            try:
                text_encoder.load_original_state_dict(ckpt.text)
            except TextStateDictError as err:
                raise ValueError(f"{cfg.init_from}: text encoder: {err}") from err
        if ckpt.vae:
            module.autoencoder.load_state_dict(ckpt.vae)
    t = cfg.trainer
    trainer = pl.Trainer(
        accelerator=t.accelerator,
        devices=1,
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        gradient_clip_val=t.gradient_clip_val or None,
        logger=build_loggers(cfg, folder),
        callbacks=[TQDMProgressBar()],  # as fit: progress shows in log files
        enable_checkpointing=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        default_root_dir=str(folder),
        enable_model_summary=False,
    )
    print(f"sdtrain first stage: {cfg.model.name} autoencoder -> {folder}")
    try:
        trainer.fit(module)
    finally:
        finish_loggers(trainer)
    autoencoder = module.autoencoder.cpu().eval()
    scale, l1 = measure(autoencoder, cfg, measure_batches)
    checkpoint = write_checkpoint(
        folder / FIRST_STAGE_FILE,
        unet={},
        vae={k: v.detach() for k, v in autoencoder.state_dict().items()},
        text=text_encoder.original_state_dict(),
        global_step=trainer.global_step,
        extra_metadata={"sdtrain_model": cfg.model.name, "sdtrain_scale_factor": f"{scale:.6g}"},
    )
    return FirstStageResult(folder, checkpoint, scale, l1)


@torch.no_grad()
def measure(autoencoder: AutoencoderKL, cfg: ExperimentConfig, batches: int) -> tuple[float, float]:
    """(1 / std of posterior samples, mean L1 of mode reconstructions) over the first
    ``batches`` batches of a fresh pass over the data, in the original ``scale_by_std`` manner."""
    data = dataclasses.replace(cfg.data, num_workers=0)
    latents, errors = [], []
    g = torch.Generator().manual_seed(cfg.seed)
    for i, batch in enumerate(LaionLoader(data)):
        if i == batches:
            break
        images = to_model_images(batch["image"])  # (B, 3, H, W)
        posterior = autoencoder.encode(images)
        latents.append(posterior.sample(g).flatten())
        errors.append((autoencoder.decode(posterior.mode()) - images).abs().mean())
    std = torch.cat(latents).std().item()
    return 1.0 / std, torch.stack(errors).mean().item()
