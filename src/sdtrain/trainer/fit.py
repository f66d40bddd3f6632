"""``sdtrain fit``: set up the run folder, the model (fresh or ``init_from``), loggers, callbacks
and the Lightning trainer, then train — or continue from the newest complete checkpoint.

Layering: ``fit(cfg)`` -> ``prepare_run`` (folder, resume point) -> ``build_module`` (weights) ->
``build_trainer`` (strategy, precision, callbacks) -> ``Trainer.fit``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.plugins.environments import SLURMEnvironment

from sdtrain.config.loader import to_dict, to_yaml
from sdtrain.data.buckets import BucketSet
from sdtrain.errors import CheckpointError, ConfigError, WriteError
from sdtrain.models.adapters.diffusers import read_model_weights
from sdtrain.models.adapters.lora import lora_file_parts
from sdtrain.models.lora import add_adapter, add_text_encoder_adapter
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.trainer.checkpoints import (
    AtomicCheckpointIO,
    NotATrainingCheckpoint,
    StepCheckpoint,
    check_resume_compatible,
    choose_resume,
    newest_healthy,
    open_training_checkpoint,
    set_aside,
    step_checkpoints,
)
from sdtrain.trainer.eval_callback import eval_callbacks
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.trainer.fsdp import fsdp_strategy
from sdtrain.trainer.module import LatentDiffusionModule, NonFiniteError, effective_batch_line
from sdtrain.trainer.preemption import (
    PreemptionCallback,
    RunInterrupted,
    StopSignals,
    check_allocation,
    in_slurm_step,
    signal_name,
)
from sdtrain.trainer.prior import DreamBooth, class_image_dir
from sdtrain.trainer.run_lock import RunLock
from sdtrain.trainer.validation import validation_callbacks
from sdtrain.utils import files

log = logging.getLogger("sdtrain.trainer")


# ---------------------------------------------------------------------------------------------
# Run folder and resumption
# ---------------------------------------------------------------------------------------------


@dataclass
class RunPlan:
    """Where the run lives and which checkpoint (if any) it continues from."""

    dir: Path
    resume_from: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Newer checkpoints ``resume=auto`` passed over, each with the reason."""

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"


def run_dir(cfg: ExperimentConfig) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    return Path(cfg.run.root) / (cfg.run.name or cfg.model.name)


def prepare_run(cfg: ExperimentConfig) -> RunPlan:
    """The run folder and the resume point, decided without changing anything on disk.

    Refuses (``ConfigError``, exit 2) to write over another run's checkpoints, to resume from a
    file that is not a training checkpoint or does not verify, and to resume with a model that
    differs from the checkpoint's. ``resume=auto`` passes over damaged checkpoints and those
    taken during a non-finite streak (see ``trainer.checkpoints.choose_resume``).
    """
    folder = run_dir(cfg)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"the run folder {folder} is a file, not a folder", key="run.dir")
    existing = step_checkpoints(folder / "checkpoints")
    resume = cfg.resume
    if resume == "auto":
        choice = choose_resume(folder / "checkpoints")
        if choice.path is not None:
            check_resume_compatible(choice.config_text or "", to_dict(cfg), choice.path)
        return RunPlan(folder, choice.path, choice.skipped)
    if resume:
        path = Path(resume)
        if not path.exists():  # a file, or a DeepSpeed checkpoint folder
            raise ConfigError(f"checkpoint {path} does not exist", key="resume")
        try:
            text = open_training_checkpoint(path)
        except NotATrainingCheckpoint as err:
            raise ConfigError(
                f"{err}. resume= continues a run from a step=NNNNNNNN.ckpt that sdtrain fit "
                f"wrote; to start a new run from these weights, pass init_from={path} instead",
                key="resume",
            ) from None
        except CheckpointError as err:
            raise ConfigError(str(err), key="resume") from None
        check_resume_compatible(text, to_dict(cfg), path)
        return RunPlan(folder, path)
    if existing:
        raise ConfigError(
            f"run folder {folder} already holds checkpoints (newest: step {existing[-1][0]}); "
            "pass resume=auto to continue that run, or set run.name / run.dir to start another",
            key="run.dir",
        )
    return RunPlan(folder, None)


def ready_run_folder(plan: RunPlan) -> list[str]:
    """Create the run folder, check it is writable, remove temp files of writers that died and
    set aside the checkpoints ``resume=auto`` passed over; returns lines to print.

    Every problem here is a ``ConfigError`` (exit 2): nothing has been trained yet.
    """
    try:
        plan.checkpoints.mkdir(parents=True, exist_ok=True)
        probe = files.write_text(plan.checkpoints / ".sdtrain-write-test", "")
        probe.unlink()
    except (OSError, WriteError) as err:
        reason = err.reason if isinstance(err, WriteError) else files.describe_os_error(err)
        raise ConfigError(
            f"cannot write in the run folder {plan.dir}: {reason}; "
            "choose another run.dir (or fix the folder's permissions / mount)",
            key="run.dir",
        ) from None
    lines = []
    removed = [*files.remove_stale_temp_files(plan.checkpoints)]
    removed += files.remove_stale_temp_files(plan.dir)
    if removed:
        lines.append(f"removed {len(removed)} temp file(s) left by writers that died")
    lines += [f"skipped {path.name}: {reason}" for path, reason in plan.skipped]
    newer = [path for path, _ in plan.skipped]
    if newer:
        moved = set_aside(newer, plan.checkpoints)
        if moved:
            lines.append(f"moved the skipped checkpoint(s) to {moved[0].parent}")
    return lines


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
        ckpt = read_model_weights(cfg.init_from, cfg.model)
        given = {"unet": ckpt.unet, "vae": ckpt.vae, "text": ckpt.text}
        if model.depth_estimator is not None:  # depth_model.* of a depth checkpoint
            given["depth"] = ckpt.depth
        parts = tuple(p for p, w in given.items() if w)
        report = model.load_original(ckpt, parts=parts)
        ema_init = report.ema
        log.info("initialised %s from %s", ", ".join(report.loaded), cfg.init_from)
        if report.widened_from:
            log.info("widened the UNet input from %d to %d channels (extra channels zero)",
                     report.widened_from, cfg.model.unet.in_channels)  # fmt: skip
    if model.depth_estimator is not None and cfg.model.depth.weights:
        model.load_depth_weights(cfg.model.depth.weights)
        log.info("depth estimator (MiDaS) from %s", cfg.model.depth.weights)
    elif model.depth_estimator is not None and cfg.init_from and not ckpt.depth:
        raise CheckpointError(
            "has no depth_model.* weights for the depth estimator (model.depth.source: midas): "
            "pass the MiDaS weights file with model.depth.weights=dpt_hybrid-midas-501f0c75.pt",
            cfg.init_from,
        )
    if cfg.finetune.method == "lora":
        if cfg.init_lora and not cfg.finetune.train_text_encoder:
            refuse_text_encoder_part(cfg.init_lora)
        # Only the adapter trains; its EMA starts from the adapter, not the file's EMA UNet.
        targets = add_adapter(model.unet, cfg.finetune.lora, cfg.init_lora)
        ema_init = None
        log.info("%s on %d UNet modules%s", cfg.finetune.lora.kind, len(targets),
                 f" from {cfg.init_lora}" if cfg.init_lora else "")  # fmt: skip
    if cfg.finetune.train_text_encoder:
        train_text_encoder(model, cfg)
    model.unet.set_gradient_checkpointing(cfg.trainer.gradient_checkpointing)
    if cfg.trainer.channels_last:
        model.unet.to(memory_format=torch.channels_last)
    module = LatentDiffusionModule(cfg, model)
    if ema_init is not None and module.ema is not None:
        module.ema.load_state_dict({"shadow": ema_init, "num_updates": 0})
    if cfg.trainer.compile:
        model.unet = torch.compile(model.unet)  # type: ignore[assignment]
    return module


def refuse_text_encoder_part(init_lora: str) -> None:
    """A LoRA file with a text-encoder part continues a run that trained the text encoder."""
    if "text_encoder" in lora_file_parts(init_lora):
        raise ConfigError(
            f"{init_lora} holds a text-encoder adapter (lora_te_* / text_encoder.* keys), which "
            "this run would leave out: set finetune.train_text_encoder=true to continue it too",
            key="init_lora",
        )


def train_text_encoder(model: StableDiffusion, cfg: ExperimentConfig) -> None:
    """``finetune.train_text_encoder``: every used weight of the text encoder trains (``full``),
    or an adapter on it (``lora``, from ``init_lora``'s text-encoder part when it has one)."""
    encoder = model.text_encoder
    if cfg.finetune.method == "full":
        encoder.train_weights()
        log.info("text encoder: its weights train")
        return
    targets = add_text_encoder_adapter(encoder, cfg.finetune.lora, cfg.init_lora)
    encoder.follow_train_mode()  # the adapter's dropout acts in training
    log.info("lora on %d text encoder modules", len(targets))


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
    cfg: ExperimentConfig,
    plan: RunPlan,
    callbacks: Sequence[Callback] = (),
    signals: StopSignals | None = None,
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
    if t.strategy == "fsdp":
        strategy = fsdp_strategy(t)  # UNet per block, frozen parts whole (trainer/fsdp.py)
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
            # tqdm, not rich (Lightning's pick when rich is installed): rich writes nothing to a
            # log file until the end, so SLURM logs would show no progress.
            TQDMProgressBar(),
            checkpoints,
            ThroughputMonitor(),
            *validation_callbacks(cfg, plan.dir),
            *eval_callbacks(cfg, plan.dir),  # the eval: section (off by default)
            *callbacks,
            # last: it acts once everything else is done with the step
            PreemptionCallback(checkpoints.save, signals, lambda: newest_step(plan.checkpoints)),
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
    """Train as configured (``callbacks`` join the trainer's own); returns the run folder.

    A signal (SIGTERM, SIGINT, SIGUSR1) stops the run with ``RunInterrupted`` after a checkpoint
    when it has trained since the last one (``trainer/preemption.py``); inside a SLURM step,
    SIGUSR1 / SIGTERM requeue the job instead and ``fit`` returns. While it runs, rank 0 holds the
    run folder's lock (``trainer/run_lock.py``): a second run on the folder fails at once.
    """
    # The frozen autoencoder and text encoder are in eval mode on purpose.
    warnings.filterwarnings(
        "ignore", message=r".*module\(s\) in eval mode at the start of training"
    )
    # Outside SLURM, Lightning warns whenever an `srun` binary exists on the machine.
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")
    folder = run_dir(cfg)
    with StopSignals() as signals:
        try:
            check_allocation(cfg.trainer.devices, cfg.trainer.num_nodes)
            if _launch_rank() == 0:
                RunLock(folder).check_free()  # a second run on the folder fails first
            from sdtrain.data.pipeline import check_shards

            check_shards(cfg.data, cfg.trainer.num_nodes * cfg.trainer.devices)
            # Every refusal (folder, resume point, changed model) before anything is written,
            # the lock file included; decided again under the lock if the folder changed.
            plan = prepare_run(cfg)
            listing = _checkpoint_listing(folder)
            # Only one process locks and tidies the folder; under srun every rank runs this.
            lock = RunLock(folder) if _launch_rank() == 0 else contextlib.nullcontext()
            with lock:
                if _checkpoint_listing(folder) != listing:
                    plan = prepare_run(cfg)
                return _fit(cfg, plan, callbacks, signals, getattr(lock, "notes", []))
        except RunInterrupted as stop:
            raise stop.with_message(stop_message(stop, folder)) from None


def _checkpoint_listing(folder: Path) -> list[tuple[str, int, int]]:
    """Name, size and mtime of every file in the run's checkpoint folder."""
    checkpoints = folder / "checkpoints"
    if not checkpoints.is_dir():
        return []
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoints.iterdir())


def _fit(
    cfg: ExperimentConfig,
    plan: RunPlan,
    callbacks: Sequence[Callback],
    signals: StopSignals,
    notes: list[str],
) -> Path:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    notes = [*notes, *ready_run_folder(plan)] if _launch_rank() == 0 else []
    module = build_module(cfg)
    # depth_model.* carried from init_from serve exports only, which rebuild from init_from:
    # not held in every rank's memory for the whole run (~490 MB for 512-depth-ema.ckpt).
    module.model.carried_depth = {}
    if cfg.model.frozen_dtype != "float32":  # training only: exports rebuild in float32
        module.model.hold_frozen_in(getattr(torch, cfg.model.frozen_dtype))
    if cfg.dreambooth.instance_prompt or cfg.prior.enabled:
        resuming = plan.resume_from is not None
        module.dreambooth = DreamBooth(cfg, class_image_dir(cfg.prior, plan.dir), resuming)
    trainer = build_trainer(cfg, plan, callbacks, signals)
    if trainer.is_global_zero:
        files.write_text(plan.dir / "config.yaml", to_yaml(cfg))
        print(f"sdtrain fit: {cfg.model.name} -> {plan.dir}")
        print(f"  {effective_batch_line(module)}")
        for line in notes:
            print(f"  {line}")
        print(f"  resume from: {plan.resume_from or 'nothing (fresh start)'}")
    try:
        trainer.fit(module, ckpt_path=str(plan.resume_from) if plan.resume_from else None)
    except NonFiniteError as err:
        kept = newest_healthy(plan.checkpoints)
        where = (
            f"The newest checkpoint from before these steps, {kept.name}, is kept; resume=auto "
            "continues from it (lower optim.lr first)."
            if kept is not None
            else "No checkpoint from before these steps exists."
        )
        raise NonFiniteError(f"{err} {where}") from None
    finally:
        finish_loggers(trainer)
    unfinished = trainer.global_step < cfg.trainer.max_steps
    if signals.stopped or (signals.received and unfinished):
        if signals.requeued:
            name = signal_name(signals.signum or signal.SIGTERM)
            print(f"sdtrain fit: stopped at step {trainer.global_step} for {name}; SLURM requeues "
                  "the job, which resumes from the newest checkpoint", file=sys.stderr)  # fmt: skip
            return plan.dir
        stop = signals.interrupted() if signals.received else None
        raise stop or RunInterrupted(signal.SIGTERM, "another rank was signalled",
                                     step=trainer.global_step)  # fmt: skip
    return plan.dir


def newest_step(folder: Path) -> int:
    """The step of the newest checkpoint in ``folder`` (0: none)."""
    found = step_checkpoints(folder)
    return found[-1][0] if found else 0


def stop_message(stop: RunInterrupted, folder: Path) -> str:
    """What a signalled run saved and how to continue it."""
    found = step_checkpoints(folder / "checkpoints")
    name = signal_name(stop.signum)
    where = f" at step {stop.step}" if stop.step is not None else " while setting up"
    text = f"stopped by {name}{where}"
    if stop.message:
        text += f" ({stop.message})"
    if found and stop.step is not None and found[-1][0] == stop.step:
        text += f"; checkpoint {found[-1][1]} written"
    elif found:
        text += f"; nothing trained since the newest checkpoint, {found[-1][1]}"
    else:
        text += "; no checkpoint (nothing was trained)"
    if stop.requeued:
        return text + "; SLURM requeues the job, which resumes from it"
    if found and (folder / "config.yaml").is_file():
        return text + f". Continue with: sdtrain fit --config {folder / 'config.yaml'} resume=auto"
    return text + ". Nothing to continue: start the run again"


def _launch_rank() -> int:
    """This process's global rank as the launcher set it (0 outside distributed launches)."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return int(os.environ.get("LOCAL_RANK", "0") or 0) + int(os.environ.get("NODE_RANK", "0") or 0)


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
    from sdtrain.data.pipeline import check_shards
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
        f"{count(model.autoencoder):,}, text encoder {count(model.text_encoder):,} "
        f"({text_encoder_role(cfg)})",
        f"  {global_batch_text(cfg)}",
        f"  steps: {t.max_steps:,}, LR {cfg.optim.lr:g} (warm-up {cfg.optim.warmup_steps:,} "
        f"steps), precision {t.precision}, accumulation {t.accumulate_grad_batches}",
        f"  strategy: {resolved_strategy(cfg)} on {t.num_nodes} node(s) x {t.devices} "
        f"{t.accelerator} device(s)",
        f"  checkpoints: every {cfg.checkpoint.every_n_steps:,} steps, newest "
        f"{cfg.checkpoint.keep_last} kept, in {plan.checkpoints}",
    ]
    if cfg.data.shards or cfg.data.source == "folder":
        shard_plan = check_shards(cfg.data, t.num_nodes * t.devices)
        urls = shard_plan.urls
        first = next(shard_plan.source.read(urls[shard_plan.worker_shards(0, 0)[0]]), None)
        members = sorted(first.members) if first else []
        lines.append(
            f"  data: {len(urls):,} {shard_plan.source.unit}(s) for "
            f"{t.num_nodes * t.devices} rank(s) x "
            f"{shard_plan.workers} worker(s); first sample {first.key if first else '-'} "
            f"with members {members}; {cfg.data.image.height}x{cfg.data.image.out_width} px"
        )
        if note := shard_plan.reduction_note():
            lines.append(f"  data: {note}")
        if cfg.data.buckets.enabled:
            image = cfg.data.image
            buckets = BucketSet(cfg.data.buckets, image.height, image.out_width).buckets
            lines.append(
                f"  data: {len(buckets)} aspect-ratio bucket(s) (w x h): "
                f"{', '.join(b.name for b in buckets)}; up to {cfg.data.buckets.max_upscale:g}x "
                "upscale"
            )
    else:
        lines.append("  data: no shards configured (set data.shards)")
    return "\n".join(lines)


def text_encoder_role(cfg: ExperimentConfig) -> str:
    if not cfg.finetune.train_text_encoder:
        return "frozen"
    what = "trained" if cfg.finetune.method == "full" else "adapter trained"
    te_lr = cfg.finetune.text_encoder_lr
    return f"{what}, LR {te_lr:g}" if te_lr else what


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
