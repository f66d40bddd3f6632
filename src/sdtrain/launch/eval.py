"""``sdtrain eval``: open the checkpoints, check the options, run ``evaluation.run.evaluate`` and
write ``metrics.csv`` / ``metrics.json`` / ``fid_vs_clip.png`` (rank 0), and log them to wandb
when asked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sdtrain.errors import ConfigError
from sdtrain.evaluation.report import format_table, log_wandb, write_metrics
from sdtrain.evaluation.run import EvalConfig, EvalModel, EvalResult, check_model, evaluate
from sdtrain.launch.sample import open_source
from sdtrain.trainer.experiment import ExperimentConfig
from sdtrain.utils import files


def run_eval(
    checkpoints: Sequence[str], cfg: EvalConfig, out: str | Path, *,
    config: ExperimentConfig | None = None, use_ema: bool | None = None,
    wandb_project: str | None = None,
) -> EvalResult:  # fmt: skip
    """Everything ``sdtrain eval`` does; returns the rows (empty on ranks other than 0).
    ``wandb_project``: also log the rows, the plot and the settings to that wandb project."""
    if not checkpoints:
        raise ConfigError("pass at least one --checkpoint")
    if len(set(checkpoints)) != len(checkpoints):
        raise ConfigError("a --checkpoint is given twice")
    out = Path(out)
    problem = files.cannot_write(out / "metrics.csv")
    if problem:
        raise ConfigError(f"{problem}; choose another --out")
    models = []
    for checkpoint in checkpoints:
        source = open_source(checkpoint, config, use_ema)
        check_model(source.config.model, str(checkpoint), cfg.size, cfg.steps)
        step = f", step {source.global_step}" if source.global_step is not None else ""
        models.append(EvalModel(str(checkpoint), source.build, f"{source.weights} weights{step}"))
    result = evaluate(cfg, models, out)
    if result.rows:
        write_metrics(out, result.rows)
        ref = result.reference
        if ref is not None:
            print(
                f"reference: {ref.features.shape[0]} images ({ref.unreadable} unreadable skipped, "
                f"{ref.resized} resized to {cfg.size}){' from the cache' if ref.cached else ''}"
            )
        print(format_table(result.rows))
        print(f"wrote {out / 'metrics.csv'}, metrics.json, fid_vs_clip.png, grids/")
        if wandb_project:
            settings = {
                **cfg.settings(),
                "reference": cfg.reference,
                "checkpoints": list(checkpoints),
            }
            log_wandb(out, result.rows, settings, wandb_project)
            print(f"logged to wandb project {wandb_project} ({out / 'wandb'})")
    return result
