"""Training checkpoints: the ``step=NNNNNNNN.ckpt`` files ``sdtrain fit`` writes and resumes from.

A step checkpoint is Lightning's training state (UNet weights under ``model.unet.*``, optimiser
and LR-scheduler state, loop counters) plus an ``sdtrain`` entry: the resolved config, the EMA
shadow, every rank's data position and the non-finite steps before it. Files are written and read
only through ``sdtrain.utils.files``: atomically, with the permissions the umask gives, never
running pickled code, and each with an integrity record ``step=N.ckpt.integrity.json`` (size,
sha256, global step, non-finite streak) that is checked before the file is used.

This module owns: the Lightning ``CheckpointIO`` (``AtomicCheckpointIO``), the saving callback
with its ``keep_last`` rotation (``StepCheckpoint``), listing a folder's checkpoints, choosing the
one ``resume=auto`` continues from (the newest that verifies and was not taken during a
non-finite streak), comparing a checkpoint's stored config with a new one, and reading a training
checkpoint for export and sampling (``read_training_checkpoint``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch import Tensor

from sdtrain.config.loader import build_dataclass
from sdtrain.errors import CheckpointError, ConfigError, WriteError
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.utils import files
from sdtrain.utils.files import PathLike

log = logging.getLogger("sdtrain.trainer")

CHECKPOINT_RE = re.compile(r"^step=(\d+)\.ckpt$")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")
TRAINING_UNET_PREFIX = "model.unet."
TRAINING_TEXT_PREFIX = "model.text_encoder."
# A run trained with trainer.compile=true saves the UNet from inside its OptimizedModule.
COMPILED_PREFIX = "_orig_mod."
SKIPPED_FOLDER = "skipped"
# How many of the most recent non-finite steps a checkpoint lists (the total is kept too).
MAX_LISTED_NONFINITE = 1000
Weights = Literal["ema", "raw"]


class NotATrainingCheckpoint(CheckpointError):
    """A readable torch file that was not written by ``sdtrain fit`` (e.g. an original .ckpt)."""


def checkpoint_name(step: int) -> str:
    return f"step={step:08d}.ckpt"


# An FSDP step checkpoint is a folder (trainer/fsdp.py): full.ckpt holds what a step file holds
# but the optimiser, gathered on rank 0; shard-R-of-W.pt each rank's weight and AdamW shards.
FSDP_FULL_FILE = "full.ckpt"


def fsdp_shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank}-of-{world_size}.pt"


def weights_file(path: Path) -> Path:
    """The file holding a step checkpoint's full weights: the checkpoint itself, or an FSDP
    checkpoint folder's ``full.ckpt``."""
    return path / FSDP_FULL_FILE if (path / FSDP_FULL_FILE).is_file() else path


def step_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Step checkpoints under their final names (atomic writes: a final name means the writer
    finished), oldest first. Temp files and integrity records never match."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def nonfinite_record(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """``{"in_a_row", "total", "steps"}`` of a checkpoint dict (zeros for older files)."""
    extra = checkpoint.get("sdtrain") or {}
    record = extra.get("nonfinite") if isinstance(extra, Mapping) else None
    if isinstance(record, Mapping):
        return {"in_a_row": int(record.get("in_a_row", 0)), "total": int(record.get("total", 0)),
                "steps": [int(s) for s in record.get("steps", [])]}  # fmt: skip
    total = int(extra.get("nonfinite_total", 0)) if isinstance(extra, Mapping) else 0
    return {"in_a_row": 0, "total": total, "steps": []}


def taken_during_streak(path: Path) -> int:
    """How many consecutive non-finite steps preceded ``path`` (0: healthy or no record)."""
    try:
        record = files.read_integrity(weights_file(path)) or {}
    except CheckpointError:
        return 0
    return int(record.get("nonfinite_in_a_row", 0) or 0)


def newest_healthy(folder: Path) -> Path | None:
    """The newest step checkpoint not taken during a non-finite streak."""
    for _, path in reversed(step_checkpoints(folder)):
        if taken_during_streak(path) == 0:
            return path
    return None


# ---------------------------------------------------------------------------------------------
# Writing: the CheckpointIO and the saving callback
# ---------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves through ``utils.files`` (temp file, fsync, rename; integrity record) so a crash
    mid-save never harms the previous checkpoint; loads with ``weights_only=True`` after checking
    the file against its record."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        path = Path(path)
        nonfinite = nonfinite_record(checkpoint)
        record = {
            "global_step": int(checkpoint.get("global_step", 0)),
            "nonfinite_in_a_row": nonfinite["in_a_row"],
            "nonfinite_total": nonfinite["total"],
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            files.save_torch(path, checkpoint, integrity=record)
        except (WriteError, OSError) as err:
            reason = err.reason if isinstance(err, WriteError) else files.describe_os_error(err)
            before = [p for _, p in step_checkpoints(path.parent) if p.name != path.name]
            intact = (
                f"the previous checkpoint {before[-1].name} is intact"
                if before
                else "no earlier checkpoint exists in this run"
            )
            raise CheckpointError(
                f"{reason} while writing {path}; {intact}. Free the "
                "space (or fix the folder) and continue with resume=auto"
            ) from None

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # Not memory-mapped: the optimiser keeps the loaded tensors as its state.
        obj = files.load_torch(path, map_location=map_location or "cpu", mmap=False)
        if not isinstance(obj, dict):
            raise NotATrainingCheckpoint("is not a training checkpoint", path)
        return obj


class StepCheckpoint(Callback):
    """Saves ``step=NNNNNNNN.ckpt`` every N optimiser steps and at the end; keeps the newest K,
    and always the newest one taken before a non-finite streak (the one to go back to)."""

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
        trainer.save_checkpoint(self.folder / checkpoint_name(step), weights_only=False)
        self._saved_step = step
        if trainer.is_global_zero:
            self.prune()

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep`` checkpoints and the newest healthy one."""
        found = [path for _, path in step_checkpoints(self.folder)]
        keep = set(found[-self.keep :])
        healthy = newest_healthy(self.folder)
        if healthy is not None:
            keep.add(healthy)
        removed = [path for path in found if path not in keep]
        for old in removed:
            remove_checkpoint(old)
        return removed

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)


def remove_checkpoint(path: Path) -> None:
    """A step checkpoint (file, or DeepSpeed / FSDP folder) and its integrity record."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    files.integrity_path(path).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from
# ---------------------------------------------------------------------------------------------


@dataclass
class ResumeChoice:
    """What ``resume=auto`` found in a run's checkpoint folder."""

    path: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Newer checkpoints passed over, each with the reason."""
    config_text: str | None = None
    """The resolved config stored in the chosen checkpoint (YAML)."""

    def lines(self) -> list[str]:
        return [f"skipped {path.name}: {reason}" for path, reason in self.skipped]


def open_training_checkpoint(path: Path) -> str:
    """Verify ``path`` (integrity record, then structure) and return its stored config (YAML).

    Raises ``CheckpointError`` (damaged, not a checkpoint) or ``NotATrainingCheckpoint``.
    """
    path = weights_file(path)
    if path.is_dir():  # a DeepSpeed checkpoint folder: its own format, not verified here
        return ""
    if path.suffix.lower() not in TORCH_SUFFIXES:
        raise NotATrainingCheckpoint(
            f"is not a training checkpoint (those are step=NNNNNNNN.ckpt files written by "
            f"sdtrain fit, this is a {path.suffix or 'suffix-less'} file)",
            path,
        )
    obj = files.load_torch(path)
    extra = obj.get("sdtrain") if isinstance(obj, Mapping) else None
    if (
        not isinstance(extra, Mapping)
        or not isinstance(extra.get("config"), str)
        or "pytorch-lightning_version" not in obj
    ):
        raise NotATrainingCheckpoint(
            "is not a training checkpoint written by sdtrain fit (it has no training state "
            "and no stored run config)",
            path,
        )
    return extra["config"]


def choose_resume(folder: Path) -> ResumeChoice:
    """The newest checkpoint in ``folder`` that verifies, passing over damaged ones and those
    taken during a non-finite streak (when an earlier healthy one exists). Raises
    ``ConfigError(key="resume")`` when checkpoints exist but none can be used."""
    found = step_checkpoints(folder)
    choice = ResumeChoice(None)
    during_streak: list[tuple[Path, str, int]] = []
    for _, path in reversed(found):
        try:
            text = open_training_checkpoint(path)
        except FileNotFoundError:
            continue  # removed meanwhile (another rank pruning)
        except CheckpointError as err:
            choice.skipped.append((path, err.message))
            continue
        streak = taken_during_streak(path)
        if streak:
            during_streak.append((path, text, streak))
            reason = f"taken during {streak} consecutive non-finite step(s) (diverged weights)"
            choice.skipped.append((path, reason))
            continue
        choice.path, choice.config_text = path, text
        return choice
    if during_streak:
        # Nothing healthy is left: weights of a skipped step are the ones before it, so the
        # oldest checkpoint of the streak is the least bad choice.
        path, text, _ = during_streak[-1]
        choice.skipped = [(p, r) for p, r in choice.skipped if p != path]
        choice.path, choice.config_text = path, text
        return choice
    if found:
        reasons = "; ".join(f"{p.name}: {reason}" for p, reason in choice.skipped)
        raise ConfigError(
            f"resume=auto: no checkpoint in {folder} can be used ({reasons}). Restore one from a "
            "backup, or start afresh in a new run folder (run.name / run.dir)",
            key="resume",
        )
    return choice


def set_aside(paths: list[Path], folder: Path) -> list[Path]:
    """Move passed-over checkpoints (and records) into ``folder/skipped/`` so the resumed run
    neither counts them in ``keep_last`` nor collides with their names; returns the new paths."""
    moved = []
    target = folder / SKIPPED_FOLDER
    for path in paths:
        if not path.exists():
            continue
        target.mkdir(exist_ok=True)
        dest = target / path.name
        n = 1
        while dest.exists():
            dest = target / f"{path.name}.{n}"
            n += 1
        os.replace(path, dest)
        record = files.integrity_path(path)
        if record.exists():
            os.replace(record, files.integrity_path(dest))
        moved.append(dest)
    return moved


# ---------------------------------------------------------------------------------------------
# What must not change across a resume
# ---------------------------------------------------------------------------------------------

# Dotted config keys (or key prefixes ending in ".") a resumed run must keep: they decide the
# shapes of the saved weights, optimiser state and EMA, or what the weights mean.
FROZEN_ON_RESUME: tuple[str, ...] = (
    "model.unet.",
    "model.conditioning",
    "model.diffusion.parameterization",
    "model.autoencoder.",
    "model.text_encoder.",
    "ema.enabled",
    "finetune.",  # method, adapter kind, rank, alpha, targets: what the stored adapter is
)
# ... except these, which change how training runs, not what the weights are.
FREE_ON_RESUME = frozenset(
    {"model.unet.dropout", "model.unet.use_checkpoint", "model.unet.use_fp16",
     "model.autoencoder.ddconfig.dropout", "finetune.lora.dropout", "finetune.text_encoder_lr"}
)  # fmt: skip


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _frozen(key: str) -> bool:
    if key in FREE_ON_RESUME:
        return False
    return any(key.startswith(p) if p.endswith(".") else key == p for p in FROZEN_ON_RESUME)


def resume_differences(
    stored: Mapping[str, Any], new: Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, new value)`` for every frozen key that differs (both configs as
    plain dicts)."""
    old_flat, new_flat = _flatten(stored), _flatten(new)
    keys = sorted(k for k in old_flat.keys() | new_flat.keys() if _frozen(k))
    return [
        (k, old_flat.get(k, "<unset>"), new_flat.get(k, "<unset>"))
        for k in keys
        if old_flat.get(k, "<unset>") != new_flat.get(k, "<unset>")
    ]


def check_resume_compatible(config_text: str, cfg_dict: Mapping[str, Any], path: Path) -> None:
    """Refuse (``ConfigError``, exit 2) a resume whose config changes what must not change."""
    if not config_text:
        return
    try:
        stored = OmegaConf.to_container(OmegaConf.create(config_text), resolve=True)
    except OmegaConfBaseException as err:
        raise CheckpointError(f"its stored config does not parse: {err}", path) from None
    if not isinstance(stored, Mapping):
        return
    diffs = resume_differences(stored, cfg_dict)
    if not diffs:
        return
    listed = "; ".join(f"{k}: {_show(old)} in {path.name}, {_show(new)} in the config"
                       for k, old, new in diffs[:8])  # fmt: skip
    more = f" and {len(diffs) - 8} more" if len(diffs) > 8 else ""
    raise ConfigError(
        f"cannot resume {path} with a changed model: {listed}{more}. These decide the shapes "
        "and meaning of the saved weights. Either keep the old value(s), start a new run folder "
        "(run.name / run.dir), or take only the weights with init_from= an exported file "
        "(sdtrain export) in a new run",
        key="resume",
    )


def _show(value: Any) -> str:
    return "unset" if value == "<unset>" else str(value)


# ---------------------------------------------------------------------------------------------
# Reading a training checkpoint for export and sampling
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainingCheckpoint:
    """What export and sampling need from one ``step=NNNNNNNN.ckpt``."""

    path: Path
    global_step: int | None
    config: ExperimentConfig
    """The resolved config the run trained with."""
    unet: dict[str, Tensor]
    """Raw UNet weights, keyed like ``UNetModel.state_dict()``; for a LoRA run the adapter
    weights only, keyed like the adapted UNet's (``<module path>.lora_A.default.weight`` ...)."""
    ema: dict[str, Tensor] | None
    """The EMA shadow (same keys, float32), or None when the run kept no EMA."""
    ema_decay: float = 0.9999
    ema_num_updates: int = 0
    text_encoder: dict[str, Tensor] = field(default_factory=dict)
    """The trained text encoder (``finetune.train_text_encoder``), keyed like
    ``FrozenTextEncoder.state_dict()`` (with a LoRA the adapter's tensors only); empty when it
    stayed frozen. The EMA never covers it: exports take these weights as trained."""

    @property
    def is_adapter(self) -> bool:
        """The run trained an adapter (``finetune.method: lora``), not the whole UNet."""
        return self.config.finetune.method == "lora"

    def pick(self, use_ema: bool | None, with_ema: bool = False) -> Weights:
        """Which weights become the UNet: EMA by default when there is one."""
        if use_ema and with_ema:
            raise ConfigError(
                "--with-ema keeps the raw weights as the UNet and adds the EMA as model_ema.*; "
                "it cannot be combined with --ema"
            )
        if (use_ema or with_ema) and self.ema is None:
            raise CheckpointError(
                "holds no EMA weights (the run had ema.enabled=false); export with --no-ema",
                self.path,
            )
        if use_ema is None:
            use_ema = self.ema is not None and not with_ema
        return "ema" if use_ema else "raw"

    def unet_weights(self, weights: Weights) -> dict[str, Tensor]:
        """The UNet state dict for ``weights``; EMA covers the trainable parameters only, any
        other entry keeps its raw value."""
        if weights == "raw":
            return dict(self.unet)
        assert self.ema is not None
        return {**self.unet, **self.ema}


def newest_checkpoint(src: PathLike) -> Path:
    """``src`` itself if it is a file, else the newest step checkpoint of a run folder
    (``RUN/checkpoints/step=*.ckpt``, or the ``checkpoints`` folder itself) that verifies."""
    path = Path(src)
    if path.is_file() or weights_file(path) != path:  # a file, or an FSDP checkpoint folder
        return path
    if not path.exists():
        raise CheckpointError("no such run folder or checkpoint file", path)
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not step_checkpoints(folder):
        raise CheckpointError(
            f"no complete step checkpoint (step=NNNNNNNN.ckpt) in {folder}; "
            "has the run saved one yet (checkpoint.every_n_steps)?",
            path,
        )
    try:
        choice = choose_resume(folder)
    except ConfigError as err:
        raise CheckpointError(err.message.removeprefix("resume=auto: "), path) from None
    for line in choice.lines():
        log.warning("%s", line)
    assert choice.path is not None
    return choice.path


def read_training_checkpoint(src: PathLike) -> TrainingCheckpoint:
    """Read a step checkpoint (or a run folder's newest that verifies) without running pickled
    code, after checking it against its integrity record."""
    path = weights_file(newest_checkpoint(src))
    if path.suffix.lower() not in TORCH_SUFFIXES:
        raise NotATrainingCheckpoint(
            "is not a training checkpoint (those are step=NNNNNNNN.ckpt torch files)", path
        )
    obj = files.load_torch(path)
    extra = obj.get("sdtrain") if isinstance(obj, Mapping) else None
    if not isinstance(extra, Mapping) or not isinstance(extra.get("config"), str):
        raise NotATrainingCheckpoint(
            "is not an sdtrain training checkpoint (no 'sdtrain' entry with the run's config); "
            "an original-layout file needs its model config instead",
            path,
        )
    state = obj.get("state_dict")
    unet = {
        key.removeprefix(TRAINING_UNET_PREFIX).removeprefix(COMPILED_PREFIX): value
        for key, value in (state or {}).items()
        if key.startswith(TRAINING_UNET_PREFIX)
    }
    if not unet:
        raise CheckpointError(f"holds no UNet weights ({TRAINING_UNET_PREFIX}*)", path)
    text_encoder = {
        key.removeprefix(TRAINING_TEXT_PREFIX): value
        for key, value in (state or {}).items()
        if key.startswith(TRAINING_TEXT_PREFIX)
    }
    ema_state = extra.get("ema")
    step = obj.get("global_step")
    return TrainingCheckpoint(
        path=path,
        global_step=int(step) if step is not None else None,
        config=config_from_yaml(extra["config"], path),
        unet=unet,
        ema=dict(ema_state["shadow"]) if ema_state else None,
        ema_decay=float(ema_state["decay"]) if ema_state else 0.9999,
        ema_num_updates=int(ema_state["num_updates"]) if ema_state else 0,
        text_encoder=text_encoder,
    )


def config_from_yaml(text: str, path: PathLike) -> ExperimentConfig:
    """The ``ExperimentConfig`` stored in a checkpoint, checked against today's schema."""
    source = f"{path} (stored config)"
    try:
        node = OmegaConf.create(text)
        merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), node)
        return build_dataclass(ExperimentConfig, merged, "", [(source, node)])  # type: ignore[arg-type]
    except (OmegaConfBaseException, ConfigError) as err:
        first = str(err).splitlines()[0]
        raise CheckpointError(f"its stored config does not load: {first}", path) from None
