"""The LightningModule: wiring only. Encode -> noise -> UNet -> loss -> log; EMA after each step.

Every random draw of a training step (posterior sample, caption dropout, timesteps, noise) comes
from a generator seeded by ``(seed, global step, rank, micro-batch)``, so a resumed run repeats
exactly what an uninterrupted one does without saving any RNG state. The frozen autoencoder and
text encoder are not stored in training checkpoints: they come back from ``init_from``. With
``finetune.train_text_encoder`` the text encoder's trained weights (or its adapter's) are stored
and optimised as a second parameter group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist

from sdtrain.config.loader import to_yaml
from sdtrain.data.latents import text_fingerprint, vae_fingerprint
from sdtrain.data.pipeline import LOADER_STATE_KEY, LaionLoader
from sdtrain.data.transforms import to_model_images
from sdtrain.diffusion.loss import diffusion_loss, latent_weights, sample_noise
from sdtrain.errors import ConfigError, DataError
from sdtrain.models.autoencoder import DiagonalGaussian
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.ema import EMA
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.trainer.fsdp import full_parameters, global_norm
from sdtrain.trainer.prior import DreamBooth

log = logging.getLogger("sdtrain.trainer")
UNET_PREFIX = "model.unet."
TEXT_PREFIX = "model.text_encoder."
MAX_NONFINITE_LISTED = 1000


def step_generator(
    seed: int, step: int, rank: int, micro: int, device: torch.device
) -> torch.Generator:
    """A generator whose draws depend only on where in training they happen."""
    mixed = (seed * 1_000_003 + step) * 1_000_003 + rank * 4099 + micro
    return torch.Generator(device=device).manual_seed(mixed % (2**63))


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps: the run stops; the newest checkpoint taken before
    the streak is never rotated away and is where ``resume=auto`` continues."""


class LatentDiffusionModule(pl.LightningModule):
    """Trains ``model.unet`` (and the text encoder with ``finetune.train_text_encoder``);
    everything else is frozen."""

    def __init__(self, cfg: ExperimentConfig, model: StableDiffusion) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.ema = EMA(model.unet, cfg.ema) if cfg.ema.enabled else None
        self.strict_loading = False  # checkpoints hold the trained parts only
        self.data_states: dict[int, Any] = {}
        self._micro = 0
        self._step_skipped = False
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.nonfinite_steps: list[int] = []
        """The steps skipped as non-finite (the most recent ones), saved in every checkpoint."""
        self._fingerprints: dict[str, str] = {}
        """This run's VAE / text encoder fingerprints, against latent shards (``data.latents``)."""
        self._empty_context: torch.Tensor | None = None
        """The empty prompt's text context, for caption dropout with cached embeddings."""
        self.dreambooth: DreamBooth | None = None
        """Instance prompt and class images (``dreambooth:`` / ``prior:``), set by ``fit``."""

    # --- data -------------------------------------------------------------------------------

    def train_dataloader(self) -> LaionLoader:
        rank, world = self.global_rank, self.trainer.world_size
        state = self.data_states.get(rank)
        return LaionLoader(self.cfg.data, rank, world, state=state, attach_state=True)

    # --- optimisation -----------------------------------------------------------------------

    def trained_parts(self) -> list[torch.nn.Module]:
        """The modules whose parameters the optimiser steps: the UNet, and the text encoder when
        it trains (its weights, or with a LoRA its adapter): one parameter group each."""
        parts: list[torch.nn.Module] = [self.model.unet]
        if self.cfg.finetune.train_text_encoder:
            parts.append(self.model.text_encoder)
        return parts

    def trained_parameters(self) -> list[torch.nn.Parameter]:
        return [p for part in self.trained_parts() for p in part.parameters() if p.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.cfg.optim
        lrs = self.configured_lrs()
        groups = [
            {"params": [p for p in part.parameters() if p.requires_grad], "lr": lr}
            for part, lr in zip(self.trained_parts(), lrs, strict=True)
        ]
        adamw = adamw_class(optim.optimizer, self.device)
        # foreach: one kernel call per step for all tensors (same result as the per-tensor loop
        # torch picks on CPU, several times less Python overhead for a small UNet)
        extra = {"foreach": True} if adamw is torch.optim.AdamW else {}
        optimizer = adamw(
            groups,
            lr=lrs[0],
            betas=tuple(optim.betas),
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            **extra,
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, optim.lr_multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configured_lr(self) -> float:
        optim = self.cfg.optim
        return optim.lr * (self.global_batch_size() if optim.scale_lr else 1)

    def configured_lrs(self) -> list[float]:
        """The LR of each parameter group (``trained_parts``): the UNet's, then the text
        encoder's (``finetune.text_encoder_lr``, 0 = the same), scaled alike."""
        lr = self.configured_lr()
        if not self.cfg.finetune.train_text_encoder:
            return [lr]
        optim, te_lr = self.cfg.optim, self.cfg.finetune.text_encoder_lr
        return [lr, lr * te_lr / optim.lr if te_lr else lr]

    def on_fit_start(self) -> None:
        """DreamBooth: the class images are generated (by the model as it is before training)
        and read before the first batch."""
        if self.dreambooth is not None:
            strategy = self.trainer.strategy
            self.dreambooth.prepare(self.model, self.global_rank, self.trainer.world_size,
                                    strategy.barrier)  # fmt: skip

    def on_train_start(self) -> None:
        """After a resume, the LR follows the current config (a new stage may change it); the
        optimiser state, weights and EMA are kept."""
        lrs = self.configured_lrs()
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            groups = scheduler.optimizer.param_groups
            scheduler.base_lrs = list(lrs)
            scheduler.lr_lambdas = [self.cfg.optim.lr_multiplier] * len(groups)
            for group, lr in zip(groups, lrs, strict=True):
                group["initial_lr"] = lr
                group["lr"] = lr * self.cfg.optim.lr_multiplier(scheduler.last_epoch)
        if self.ema is not None:
            self.ema.to(self.device)

    def global_batch_size(self) -> int:
        t = self.cfg.trainer
        return t.num_nodes * t.devices * t.accumulate_grad_batches * self.cfg.data.batch_size

    # --- the step ---------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        data_state = batch.pop(LOADER_STATE_KEY, None)
        g = step_generator(
            self.cfg.seed, self.global_step, self.global_rank, self._micro, self.device
        )
        micro, accumulate = self._micro, self.cfg.trainer.accumulate_grad_batches
        self._micro = (self._micro + 1) % accumulate
        if self._micro == 0 and data_state is not None:
            # Checkpoints fall between optimiser steps, after the step's last micro-batch.
            self.data_states[self.global_rank] = data_state
        split = None
        if self.dreambooth is not None:  # instance prompt; class images appended
            batch, split = self.dreambooth.mix(batch, self.global_step, micro, accumulate)
        loss = self.diffusion_loss(batch, g, split)
        if not torch.isfinite(loss):
            self._count_nonfinite("loss")
            return None
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=len(batch["caption"]))
        return loss

    def diffusion_loss(
        self, batch: dict[str, Any], g: torch.Generator, split: int | None = None
    ) -> torch.Tensor:
        """The training loss of one batch, every random draw taken from ``g``; with ``split``
        (prior preservation) the samples from ``split`` on are class images: instance loss +
        ``prior.loss_weight`` x their loss."""
        model, cfg = self.model, self.cfg
        images, latents = self.encode_images(batch, g)  # (B, 3, H, W) or None; (B, 4, h, w)
        b = latents.shape[0]
        drop = torch.rand(b, generator=g, device=self.device) < cfg.trainer.text_dropout
        context = self.encode_text(batch, drop)  # (B, 77, D)
        # Mask / depth channels (inpainting: a posterior sample, drawn here, after the latents').
        cond = model.conditioning.from_batch(model, batch, images, latents, g)
        t = torch.randint(0, model.schedule.num_timesteps, (b,), generator=g, device=self.device)
        noise = sample_noise(latents, cfg.model.diffusion.offset_noise, g)
        noisy = model.schedule.q_sample(latents, t, noise)
        unet_in = cond.unet_input(noisy)
        if cfg.trainer.channels_last:
            unet_in = unet_in.contiguous(memory_format=torch.channels_last)
        prediction = model.unet(unet_in, t, context, **cond.kwargs)
        target = model.schedule.target(latents, t, noise)
        weights = None  # data.loss_mask: the loss over the pixels of each sample's mask file
        if "loss_mask" in batch:  # (B, 1, H, W); the instance samples only with class images
            weights = latent_weights(batch["loss_mask"].to(self.device), latents.shape[-2:])
        if split is None:
            return diffusion_loss(model.schedule, prediction, target, t, weights)
        own = diffusion_loss(model.schedule, prediction[:split], target[:split], t[:split], weights)
        prior = diffusion_loss(model.schedule, prediction[split:], target[split:], t[split:])
        self.log("train/instance_loss", own, on_step=True, batch_size=split)
        self.log("train/prior_loss", prior, on_step=True, batch_size=b - split)
        return own + cfg.prior.loss_weight * prior

    # --- encode: images (or their stored posterior) and captions -----------------------------

    def encode_images(
        self, batch: dict[str, Any], g: torch.Generator
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The batch's images in [-1, 1] (None when a latent batch holds none) and their scaled
        latents: encoded by the VAE, or with ``data.latents`` sampled from the stored posterior
        moments with ``g``, the same draw ``encode_images`` makes from the VAE's posterior."""
        model = self.model
        images = to_model_images(batch["image"].to(self.device)) if "image" in batch else None
        if not self.cfg.data.latents:
            assert images is not None
            return images, model.encode_images(images, generator=g)
        self._check_source(batch, "latent_vae", "VAE", self._vae_fingerprint)
        if images is None and model.conditioning.needs_pixels(self.cfg.model.depth):
            raise DataError(
                f"latent shard sample {batch['key'][0]} holds no cropped image, which a "
                f"{model.conditioning.description} model needs in every step: encode the shards "
                "with this model's config (sdtrain data encode ... --config ...)"
            )
        moments = batch["moments"].to(self.device, torch.float32)  # (B, 2C, h, w)
        latents = DiagonalGaussian(moments).sample(g)  # (B, C, h, w)
        return images, latents * model.config.autoencoder.scale_factor

    def encode_text(self, batch: dict[str, Any], drop: torch.Tensor) -> torch.Tensor:
        """Text context (B, T, D); captions where ``drop`` is set are the empty prompt. With
        ``data.text_embeddings`` from the batch, the empty prompt's embedding computed once.
        A training text encoder encodes with gradients, the dropped rows' empty prompt too."""
        model = self.model
        if not self.cfg.data.text_embeddings:
            captions = ["" if d else c for d, c in zip(drop.tolist(), batch["caption"],
                                                       strict=True)]  # fmt: skip
            with torch.set_grad_enabled(self.cfg.finetune.train_text_encoder):
                return model.text_encoder.encode(captions)
        self._check_source(batch, "latent_text", "text encoder", self._text_fingerprint)
        cached = batch["text_embedding"].to(self.device, torch.float32)  # (B, T, D)
        if self._empty_context is None:
            with torch.no_grad():
                self._empty_context = model.text_encoder.encode([""]).float()  # (1, T, D)
        return torch.where(drop[:, None, None], self._empty_context, cached)

    def _vae_fingerprint(self) -> str:
        scale = self.model.config.autoencoder.scale_factor
        return vae_fingerprint(self.model.autoencoder.state_dict(), scale)

    def _text_fingerprint(self) -> str:
        return text_fingerprint(self.model.text_encoder.state_dict())

    def _check_source(
        self, batch: dict[str, Any], field: str, what: str, ours: Callable[[], str]
    ) -> None:
        """Every sample's latents / embeddings were made by this run's frozen model."""
        if field not in self._fingerprints:
            self._fingerprints[field] = ours()  # hashing the weights: once per run
        mine = self._fingerprints[field]
        for key, theirs in zip(batch["key"], batch[field], strict=True):
            if theirs != mine:
                source = self.cfg.init_from or f"the seeded initialisation (seed {self.cfg.seed})"
                raise DataError(
                    f"latent shard sample {key} was made by the {what} {theirs}, but this run's "
                    f"{what} (from {source}) is {mine}: encode the shards again with this run's "
                    "config (sdtrain data encode SHARDS OUT --config ...), or train with the "
                    "config they were made with"
                )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.trained_parameters() if p.grad is not None]
        if not grads:  # the loss was non-finite: nothing to step with
            # ... or DeepSpeed ZeRO, which keeps the gradients in its own partitioned buffers.
            zero = isinstance(self.trainer.strategy, pl.strategies.DeepSpeedStrategy)
            self._step_skipped = not zero
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        norm = global_norm(norm, self)  # FSDP: each rank holds shards of the gradients
        if not torch.isfinite(norm) and self.cfg.trainer.precision != "16-mixed":
            # fp16's GradScaler skips overflowing steps itself; elsewhere we skip the step.
            optimizer.zero_grad(set_to_none=True)
            self._step_skipped = True
            self._count_nonfinite("gradient")
            return
        self.log("train/grad_norm", norm, on_step=True)
        self.nonfinite_in_a_row = 0

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimiser step, then the EMA update: before any batch-end hook (checkpoints)."""
        self._step_skipped = False
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None and not self._step_skipped:
            with full_parameters(self):  # FSDP: the EMA is of the whole weights
                self.ema.update(self.model.unet)
        lrs = self.lr_schedulers().get_last_lr()
        self.log("train/lr", lrs[0], prog_bar=True, on_step=True)
        if len(lrs) > 1:  # finetune.train_text_encoder
            self.log("train/text_encoder_lr", lrs[1], on_step=True)

    def _count_nonfinite(self, what: str) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.nonfinite_steps = [
            *self.nonfinite_steps[-(MAX_NONFINITE_LISTED - 1) :],
            self.global_step,
        ]
        log.warning("step %d: non-finite %s, step skipped", self.global_step, what)
        limit = self.cfg.trainer.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            first = self.nonfinite_steps[-min(self.nonfinite_in_a_row, len(self.nonfinite_steps))]
            raise NonFiniteError(
                f"{self.nonfinite_in_a_row} consecutive steps had a non-finite {what} (steps "
                f"{first}-{self.global_step}, trainer.max_nonfinite_steps={limit}); stopping. "
                "Lower the learning rate, use bf16 instead of fp16, or check the data."
            )

    # --- checkpoints ------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The trainable weights only: the UNet, or with a LoRA its adapter (the frozen base
        # weights come back from init_from, like the autoencoder and text encoder), and a
        # training text encoder's weights (with a LoRA its adapter's).
        lora, te = self.cfg.finetune.method == "lora", self.cfg.finetune.train_text_encoder
        prefixes = (UNET_PREFIX, TEXT_PREFIX) if te else (UNET_PREFIX,)
        trained = {
            prefix + name
            for prefix, part in zip(prefixes, self.trained_parts(), strict=True)
            for name, p in part.named_parameters()
            if p.requires_grad
        }
        checkpoint["state_dict"] = {
            k: v
            for k, v in checkpoint["state_dict"].items()
            if k.startswith(prefixes) and (not lora or k in trained)
        }
        checkpoint["sdtrain"] = {
            "config": to_yaml(self.cfg),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "data": gather_data_states(self.data_states.get(self.global_rank)),
            "nonfinite_total": self.nonfinite_total,
            "nonfinite": {
                "in_a_row": self.nonfinite_in_a_row,
                "total": self.nonfinite_total,
                "steps": list(self.nonfinite_steps),
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extra = checkpoint.get("sdtrain", {})
        if self.ema is not None and extra.get("ema") is not None:
            self.ema.load_state_dict(extra["ema"])
        self.nonfinite_total = int(extra.get("nonfinite_total", 0))
        record = extra.get("nonfinite") or {}
        self.nonfinite_in_a_row = int(record.get("in_a_row", 0))
        self.nonfinite_steps = [int(step) for step in record.get("steps", [])]
        states = extra.get("data") or []
        self.data_states = {rank: s for rank, s in enumerate(states) if s is not None}


def adamw_class(name: str, device: torch.device) -> Any:
    """``torch.optim.AdamW``, or bitsandbytes' 8-bit AdamW (CUDA only, optional install)."""
    if name == "adamw":
        return torch.optim.AdamW
    if device.type != "cuda":
        raise ConfigError(
            f"optim.optimizer=adamw8bit needs a CUDA device (this run trains on {device.type}); "
            "use optim.optimizer=adamw",
            key="optim.optimizer",
        )
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "optim.optimizer=adamw8bit needs bitsandbytes, which is not installed: "
            "pip install bitsandbytes (or use optim.optimizer=adamw)",
            key="optim.optimizer",
        ) from None
    return bitsandbytes.optim.AdamW8bit


def gather_data_states(own: Any) -> list[Any]:
    """Every rank's loader position, indexed by rank (one entry without distribution)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [own]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, own)
    return states


def effective_batch_line(module: LatentDiffusionModule) -> str:
    t, d = module.cfg.trainer, module.cfg.data
    total = module.global_batch_size()
    return (
        f"global batch {total} = {t.num_nodes} node(s) x {t.devices} device(s) x "
        f"{t.accumulate_grad_batches} accumulation x {d.batch_size} per device"
    )
