"""``sdtrain fit``: set up the run folder, the model (fresh or ``init_from``), loggers, callbacks
and the Lightning trainer, then train — or continue from the newest complete checkpoint.

Layering: ``fit(cfg)`` -> ``prepare_run`` (folder, resume point) -> ``build_module`` (weights) ->
``build_trainer`` (strategy, precision, callbacks) -> ``Trainer.fit``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment
from pytorch_lightning.plugins.io import TorchCheckpointIO

from sdtrain.config.loader import to_dict, to_yaml
from sdtrain.errors import ConfigError
from sdtrain.models.checkpoint import CheckpointError, data_only_globals, read_checkpoint
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.trainer.module import LatentDiffusionModule, effective_batch_line
from sdtrain.trainer.preemption import PreemptionCallback, check_allocation, in_slurm_step
from sdtrain.trainer.validation import validation_callbacks

log = logging.getLogger("sdtrain.trainer")
CHECKPOINT_RE = re.compile(r"^step=(\d+)\.ckpt$")


# ---------------------------------------------------------------------------------------------
# Run folder and resumption
# ---------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """Where the run lives and which checkpoint (if any) it continues from."""

    dir: Path
    resume_from: Path | None

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"


def run_dir(cfg: ExperimentConfig) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    return Path(cfg.run.root) / (cfg.run.name or cfg.model.name)


def step_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete step checkpoints (atomic writes: a final name means a complete file), oldest
    first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def prepare_run(cfg: ExperimentConfig) -> RunPlan:
    """The run folder and the resume point; refuses to write over another run's checkpoints."""
    folder = run_dir(cfg)
    existing = step_checkpoints(folder / "checkpoints")
    resume = cfg.resume
    if resume == "auto":
        return RunPlan(folder, existing[-1][1] if existing else None)
    if resume:
        path = Path(resume)
        if not path.exists():  # a file, or a DeepSpeed checkpoint folder
            raise ConfigError(f"checkpoint {path} does not exist", key="resume")
        return RunPlan(folder, path)
    if existing:
        raise ConfigError(
            f"run folder {folder} already holds checkpoints (newest: step {existing[-1][0]}); "
            "pass resume=auto to continue that run, or set run.name / run.dir to start another",
            key="run.dir",
        )
    return RunPlan(folder, None)


# ---------------------------------------------------------------------------------------------
# Checkpoint files
# ---------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file, fsyncs and renames, so a crash mid-save never harms the
    previous checkpoint; reads with ``weights_only=True`` (no pickled code runs)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with tmp.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        try:
            with torch.serialization.safe_globals(data_only_globals()):
                return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"cannot be read as a training checkpoint: {err}", path) from err


class StepCheckpoint(Callback):
    """Saves ``step=NNNNNNNN.ckpt`` every N optimiser steps and at the end; keeps the newest K."""

    def __init__(self, folder: Path, every: int, keep: int) -> None:
        self.folder = folder
        self.every = every
        self.keep = keep
        self._saved_step = -1

    def save(self, trainer: pl.Trainer) -> None:
        """Checkpoint the current step (once) and prune old checkpoints."""
        step = trainer.global_step
        if step == self._saved_step or step == 0:
            return
        trainer.save_checkpoint(self.folder / f"step={step:08d}.ckpt", weights_only=False)
        self._saved_step = step
        if trainer.is_global_zero:
            for _, old in step_checkpoints(self.folder)[: -self.keep]:
                if old.is_dir():  # DeepSpeed saves a checkpoint as a folder
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)


class ThroughputMonitor(Callback):
    """Images per second and the fraction of wall time spent waiting for data."""

    def __init__(self) -> None:
        self._batch_end: float | None = None
        self._batch_start = 0.0
        self._wait = 0.0
        self._busy = 0.0
        self._images = 0
        self._window_start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, module: Any, batch: Any, idx: int) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self._wait += now - self._batch_end
        self._batch_start = now
        self._images += len(batch["caption"])

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
        now = time.perf_counter()
        self._busy += now - self._batch_start
        self._batch_end = now
        elapsed = now - self._window_start
        if elapsed >= 5.0 or trainer.global_step % trainer.log_every_n_steps == 0:
            world = trainer.world_size
            module.log("perf/images_per_s", self._images * world / elapsed, prog_bar=True)
            module.log(
                "perf/data_wait", self._wait / max(self._wait + self._busy, 1e-9), prog_bar=True
            )
            self._wait = self._busy = 0.0
            self._images = 0
            self._window_start = now


# ---------------------------------------------------------------------------------------------
# Model, loggers, trainer
# ---------------------------------------------------------------------------------------------


def build_module(cfg: ExperimentConfig) -> LatentDiffusionModule:
    """The model from scratch or ``init_from``; a narrower UNet is widened (EMA too)."""
    model = StableDiffusion(cfg.model)
    ema_init = None
    if cfg.init_from:
        ckpt = read_checkpoint(cfg.init_from)
        parts = tuple(
            p for p, w in (("unet", ckpt.unet), ("vae", ckpt.vae), ("text", ckpt.text)) if w
        )
        report = model.load_original(ckpt, parts=parts)
        ema_init = report.ema
        log.info("initialised %s from %s", ", ".join(report.loaded), cfg.init_from)
        if report.widened_from:
            log.info("widened the UNet input from %d to %d channels (extra channels zero)",
                     report.widened_from, cfg.model.unet.in_channels)  # fmt: skip
    model.unet.set_gradient_checkpointing(cfg.trainer.gradient_checkpointing)
    if cfg.trainer.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    module = LatentDiffusionModule(cfg, model)
    if ema_init is not None and module.ema is not None:
        module.ema.load_state_dict({"shadow": ema_init, "num_updates": 0})
    if cfg.trainer.compile:
        model.unet = torch.compile(model.unet)  # type: ignore[assignment]
    return module


def build_loggers(cfg: ExperimentConfig, folder: Path) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.logging.csv:
        # a new version folder per invocation: a resumed run never overwrites earlier metrics
        loggers.append(CSVLogger(save_dir=str(folder), name="logs"))
    if cfg.logging.wandb:
        loggers.append(
            WandbLogger(
                project=cfg.logging.wandb_project,
                name=folder.name,
                save_dir=str(folder),
                config=to_dict(cfg),
            )
        )
    return loggers


def deepspeed_strategy(stage: int, precision: str) -> pl.strategies.DeepSpeedStrategy:
    """ZeRO stage 2 or 3; bf16 through torch autocast with float32 weights, as without DeepSpeed.

    (Lightning's default, DeepSpeed's own bf16 mode, casts every weight to bf16, the frozen
    autoencoder too, and runs without autocast: the float32 images then fail the first conv.)
    """
    strategy = pl.strategies.DeepSpeedStrategy(stage=stage)
    if precision == "bf16-mixed":
        strategy.config["bf16"] = {"enabled": False}
        strategy.config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return strategy


def build_trainer(
    cfg: ExperimentConfig, plan: RunPlan, callbacks: Sequence[Callback] = ()
) -> pl.Trainer:
    t = cfg.trainer
    strategy: Any = t.strategy
    plugins: list[Any] = []
    if not t.strategy.startswith("deepspeed"):
        plugins.append(AtomicCheckpointIO())
    if t.strategy == "ddp":
        strategy = pl.strategies.DDPStrategy(find_unused_parameters=False)
    if t.strategy.startswith("deepspeed"):
        strategy = deepspeed_strategy(int(t.strategy[-1]), t.precision)
    if in_slurm_step():
        # Preemption is ours (PreemptionCallback): checkpoint in the run folder, then requeue.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    checkpoints = StepCheckpoint(
        plan.checkpoints, cfg.checkpoint.every_n_steps, cfg.checkpoint.keep_last
    )
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val or None,
        deterministic=t.deterministic,
        logger=build_loggers(cfg, plan.dir),
        callbacks=[
            checkpoints,
            PreemptionCallback(checkpoints.save),
            ThroughputMonitor(),
            *validation_callbacks(cfg, plan.dir),
            *callbacks,
        ],
        plugins=plugins,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        default_root_dir=str(plan.dir),
        enable_model_summary=False,
    )


def fit(cfg: ExperimentConfig, callbacks: Sequence[Callback] = ()) -> Path:
    """Train as configured (``callbacks`` join the trainer's own); returns the run folder."""
    # The frozen autoencoder and text encoder are in eval mode on purpose.
    warnings.filterwarnings(
        "ignore", message=r".*module\(s\) in eval mode at the start of training"
    )
    # Outside SLURM, Lightning warns whenever an `srun` binary exists on the machine.
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")
    check_allocation(cfg.trainer.devices, cfg.trainer.num_nodes)
    plan = prepare_run(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    plan.dir.mkdir(parents=True, exist_ok=True)
    module = build_module(cfg)
    trainer = build_trainer(cfg, plan, callbacks)
    if trainer.is_global_zero:
        (plan.dir / "config.yaml").write_text(to_yaml(cfg))
        print(f"sdtrain fit: {cfg.model.name} -> {plan.dir}")
        print(f"  {effective_batch_line(module)}")
        print(f"  resume from: {plan.resume_from or 'nothing (fresh start)'}")
    try:
        trainer.fit(module, ckpt_path=str(plan.resume_from) if plan.resume_from else None)
    finally:
        finish_loggers(trainer)
    return plan.dir


def finish_loggers(trainer: pl.Trainer) -> None:
    """Close the wandb run: Lightning leaves it open, and a second fit in this process would log
    into it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


# ---------------------------------------------------------------------------------------------
# Dry run
# ---------------------------------------------------------------------------------------------


def dry_run(cfg: ExperimentConfig) -> str:
    """Build everything without training: models on the meta device, the data pipeline opened
    (shards listed, split checked, first sample read), the strategy resolved. Returns the plan."""
    from sdtrain.data.pipeline import ShardPlan
    from sdtrain.data.shards import expand_shards, iter_samples
    from sdtrain.models.stable_diffusion import build_stable_diffusion

    plan = prepare_run(cfg)
    model = build_stable_diffusion(cfg.model, device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    t = cfg.trainer
    lines = [
        f"sdtrain fit --dry-run: {cfg.model.name} ({cfg.model.conditioning}, "
        f"{cfg.model.diffusion.parameterization} objective)",
        f"  run folder: {plan.dir}",
        f"  resume from: {plan.resume_from or 'nothing (fresh start)'}",
        f"  init from: {cfg.init_from or 'random initialisation'}",
        f"  parameters: UNet {count(model.unet):,} (trained), autoencoder "
        f"{count(model.autoencoder):,}, text encoder {count(model.text_encoder):,} (frozen)",
        f"  {global_batch_text(cfg)}",
        f"  steps: {t.max_steps:,}, LR {cfg.optim.lr:g} (warm-up {cfg.optim.warmup_steps:,} "
        f"steps), precision {t.precision}, accumulation {t.accumulate_grad_batches}",
        f"  strategy: {resolved_strategy(cfg)} on {t.num_nodes} node(s) x {t.devices} "
        f"{t.accelerator} device(s)",
        f"  checkpoints: every {cfg.checkpoint.every_n_steps:,} steps, newest "
        f"{cfg.checkpoint.keep_last} kept, in {plan.checkpoints}",
    ]
    if cfg.data.shards:
        urls = expand_shards(cfg.data.shards)
        shard_plan = ShardPlan(urls, cfg.data, 0, t.num_nodes * t.devices, cfg.data.num_workers)
        first = next(iter_samples(urls[shard_plan.worker_shards(0, 0)[0]]), None)
        members = sorted(first.members) if first else []
        lines.append(
            f"  data: {len(urls):,} shard(s) for {t.num_nodes * t.devices} rank(s) x "
            f"{max(cfg.data.num_workers, 1)} worker(s); first sample {first.key if first else '-'} "
            f"with members {members}; {cfg.data.image.height}x{cfg.data.image.out_width} px"
        )
    else:
        lines.append("  data: no shards configured (set data.shards)")
    return "\n".join(lines)


def global_batch_text(cfg: ExperimentConfig) -> str:
    t, d = cfg.trainer, cfg.data
    total = t.num_nodes * t.devices * t.accumulate_grad_batches * d.batch_size
    return (
        f"global batch {total} = {t.num_nodes} node(s) x {t.devices} device(s) x "
        f"{t.accumulate_grad_batches} accumulation x {d.batch_size} per device"
    )


def resolved_strategy(cfg: ExperimentConfig) -> str:
    t = cfg.trainer
    if t.strategy != "auto":
        return t.strategy
    return "ddp" if t.devices * t.num_nodes > 1 else "single device"
