"""What an eval writes: ``metrics.csv``, ``metrics.json``, ``fid_vs_clip.png`` and the table it
prints. The plot is the model cards' figure: FID against CLIP score, one curve per checkpoint,
each point labelled with its guidance scale. With random features the axes say so."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from sdtrain.evaluation.run import COLUMNS
from sdtrain.utils import files


def write_metrics(out: Path, rows: Sequence[dict[str, object]]) -> list[Path]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    written = [files.write_text(out / "metrics.csv", buffer.getvalue())]
    written.append(files.write_json(out / "metrics.json", list(rows)))
    written.append(plot_fid_vs_clip(out / "fid_vs_clip.png", rows))
    return written


def plot_fid_vs_clip(path: Path, rows: Sequence[dict[str, object]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    random = any("random" in str(row["features"]) for row in rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for name in dict.fromkeys(str(row["checkpoint"]) for row in rows):
        mine = [row for row in rows if row["checkpoint"] == name]
        xs = [float(str(row["clip_score"])) for row in mine]
        ys = [float(str(row["fid"])) for row in mine]
        ax.plot(xs, ys, marker="o", label=Path(name).name)
        for row, x, y in zip(mine, xs, ys, strict=True):
            label = f"{float(str(row['scale'])):g}"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    first = rows[0]
    what = "random features: not FID / CLIP score" if random else "FID vs CLIP score"
    ax.set_xlabel("CLIP score (random CLIP)" if random else "CLIP score")
    ax.set_ylabel("Frechet distance (random Inception)" if random else "FID")
    ax.set_title(f"{what}; {first['sampler']} {first['steps']} steps, N={first['num']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def log_wandb(
    out: Path, rows: Sequence[dict[str, object]], settings: dict[str, object], project: str
) -> None:
    """One wandb run (``job_type`` eval, files under ``OUT/wandb``): the settings as its config,
    the rows as a table, the FID-vs-CLIP plot as an image and each row's figures in the summary.
    ``WANDB_MODE=offline`` works without network."""
    import wandb

    run = wandb.init(project=project, name=out.resolve().name, dir=str(out), job_type="eval",
                     config={"eval": settings}, reinit="create_new")  # fmt: skip
    try:
        table = wandb.Table(columns=list(COLUMNS), data=[[row[c] for c in COLUMNS] for row in rows])
        run.log({"eval/metrics": table,
                 "eval/fid_vs_clip": wandb.Image(str(out / "fid_vs_clip.png"))})  # fmt: skip
        for row in rows:
            name = f"{Path(str(row['checkpoint'])).name}/scale{float(str(row['scale'])):g}"
            for key in ("fid", "kid", "kid_std", "clip_score"):
                run.summary[f"eval/{name}/{key}"] = row[key]
    finally:
        run.finish()


def format_table(rows: Sequence[dict[str, object]]) -> str:
    """The rows as a fixed-width table, the features named above it."""
    lines = [f"features: {rows[0]['features']}" if rows else "no rows"]
    lines.append(f"{'checkpoint':<28} {'scale':>5} {'fid':>10} {'kid':>9} {'kid_std':>9} "
                 f"{'clip':>7} {'seconds':>8}")  # fmt: skip
    for row in rows:
        v = {key: float(str(row[key])) for key in ("scale", "fid", "kid", "kid_std", "clip_score",
                                              "seconds")}  # fmt: skip
        name = Path(str(row["checkpoint"])).name[:28]
        lines.append(
            f"{name:<28} {v['scale']:>5g} {v['fid']:>10.3f} {v['kid']:>9.5f} "
            f"{v['kid_std']:>9.5f} {v['clip_score']:>7.3f} {v['seconds']:>8.1f}"
        )
    return "\n".join(lines)
