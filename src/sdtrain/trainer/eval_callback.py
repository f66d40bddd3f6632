"""FID / KID / CLIP score during training: the ``eval:`` section (``evaluation/training.py``).

Every ``eval.every_n_steps`` optimiser steps, rank 0 runs ``sdtrain eval``'s machinery
(``evaluation.run.evaluate``) on the current weights (EMA when ``eval.use_ema``), with the UNet in
eval mode and the RNG states put back afterwards, as ``ValidationCallback`` does; the other ranks
go on to the next step and wait there. The reference features are computed once per run: at the
start of training (so that missing weights or a bad reference fail before the first step), cached
in ``RUN/eval/cache`` and kept in memory.

Each eval is one "checkpoint" ``step=NNNNNNNN`` of the eval folder ``RUN/eval/<settings>/``
(chunks, grids, ``eval.json``, ``metrics.csv`` of every eval with these settings); a resumed run
that evaluates a step again reuses the chunks already written. ``RUN/eval/metrics.csv`` holds one
row per step and scale (the ``sdtrain eval`` columns after ``step``), and the loggers (CSV next to
the loss, wandb) get ``eval/fid_scale<S>``, ``eval/kid_scale<S>``, ``eval/kid_std_scale<S>``,
``eval/clip_score_scale<S>``.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from sdtrain.evaluation.reference import ReferenceFeatures
from sdtrain.evaluation.report import write_metrics
from sdtrain.evaluation.run import COLUMNS, EvalModel, Rank, evaluate, warm_extractors
from sdtrain.evaluation.training import settings_tag
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.trainer.module import LatentDiffusionModule
from sdtrain.trainer.validation import evaluation_weights, preserved_rng
from sdtrain.utils import files

log = logging.getLogger("sdtrain.trainer")


def eval_callbacks(cfg: ExperimentConfig, run_dir: Path) -> list[Callback]:
    """``[EvalCallback]`` when ``eval.every_n_steps`` > 0, else nothing."""
    return [EvalCallback(cfg, run_dir)] if cfg.eval.every_n_steps > 0 else []


INT_COLUMNS = ("step", "steps", "num", "size", "seed", "reference_num")
FLOAT_COLUMNS = ("scale", "fid", "kid", "kid_std", "clip_score", "seconds")


def _typed(row: dict[str, str]) -> dict[str, object]:
    """A row read back from CSV with its numbers as numbers again."""
    out: dict[str, object] = dict(row)
    for key in INT_COLUMNS:
        out[key] = int(row[key])
    for key in FLOAT_COLUMNS:
        out[key] = float(row[key])
    return out


def metric_name(key: str, scale: float) -> str:
    return f"eval/{key}_scale{scale:g}"


class EvalCallback(Callback):
    def __init__(self, cfg: ExperimentConfig, run_dir: Path) -> None:
        cfg.eval.check_files()
        self.cfg = cfg
        self.root = Path(run_dir).resolve() / "eval"
        self.settings = cfg.eval.eval_config(cfg.data.image.size, self.root / "cache")
        self.folder = self.root / settings_tag(self.settings)
        self._reference: ReferenceFeatures | None = None
        self._last_step = -1
        self._rows: list[dict[str, object]] = []

    # --- Lightning hooks --------------------------------------------------------------------

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.reference(pl_module.device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        every = self.cfg.eval.every_n_steps
        if step == 0 or step == self._last_step or step % every:
            return
        self._last_step = step  # several micro-batches end at the same optimiser step
        if trainer.is_global_zero:
            assert isinstance(pl_module, LatentDiffusionModule)
            metrics = self.evaluate(pl_module, step)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    # --- the work ---------------------------------------------------------------------------

    def reference(self, device: torch.device) -> ReferenceFeatures:
        """The reference features, computed (or read from the cache) once."""
        if self._reference is None:
            self._reference = warm_extractors(self.settings, device)
        return self._reference

    def evaluate(self, module: LatentDiffusionModule, step: int) -> dict[str, float]:
        """One eval of the current weights; returns the metrics logged for ``step``."""
        reference = self.reference(module.device)
        name = str(self.root.parent / f"step={step:08d}")
        model = EvalModel(name, lambda device: module.model, f"training weights, step {step}")
        with preserved_rng(module.device), evaluation_weights(module, self.cfg.eval.use_ema):
            result = evaluate(self.settings, [model], self.folder, device=module.device,
                              rank=Rank(), reference=reference)  # fmt: skip
        rows = [{"step": step, **row} for row in result.rows]
        self._rows = [r for r in self._read_rows() if int(str(r["step"])) != step] + rows
        write_metrics(self.folder, [{k: v for k, v in r.items() if k != "step"}
                                    for r in self._rows])  # fmt: skip
        self._write_csv()
        metrics = {}
        for row in rows:
            scale = float(str(row["scale"]))
            for key in ("fid", "kid", "kid_std", "clip_score"):
                metrics[metric_name(key, scale)] = float(str(row[key]))
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return metrics

    def _read_rows(self) -> list[dict[str, object]]:
        """This run's rows so far (those of an earlier, resumed process too)."""
        if self._rows:
            return self._rows
        path = self.root / "metrics.csv"
        if not path.is_file():
            return []
        with path.open() as handle:
            return [_typed(row) for row in csv.DictReader(handle)]

    def _write_csv(self) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["step", *COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(self._rows, key=lambda r: int(str(r["step"]))))
        files.write_text(self.root / "metrics.csv", buffer.getvalue())
