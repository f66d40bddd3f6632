"""``sdtrain slurm eval``: the batch script of an eval job (rendered without a cluster), options
checked on the login node, and (where a SLURM cluster runs: slurm/local-cluster.sh) a two-task
CPU job whose rows equal a local single-process eval's."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import slurm_support
import torch
from slurm_support import wait_for_job
from test_evaluation import eval_args, without_seconds, write_images

from sdtrain.launch.cli import main

ROOT = Path(__file__).resolve().parents[1]
slurm_cluster = slurm_support.slurm_cluster


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    from sdtrain.models.adapters.original import write_checkpoint
    from sdtrain.models.stable_diffusion import build_stable_diffusion
    from sdtrain.trainer.experiment import load_config

    root = tmp_path_factory.mktemp("eval-slurm")
    torch.manual_seed(0)
    model = build_stable_diffusion(load_config([ROOT / "configs/models/tiny-base.yaml"]).model)
    ckpt = write_checkpoint(root / "tiny.safetensors", **model.original_parts())
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    ref = write_images(root / "ref", [(32, 32), (32, 32), (32, 32)])
    return {"checkpoint": ckpt, "prompts": prompts, "reference": ref, "root": root}


ALLOCATION = ["--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
              "--cpus-per-task", "1", "--time", "00:30:00", "--partition", "debug"]  # fmt: skip


def test_dry_run_renders_the_eval_job(inputs: dict[str, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "evals" / "a"
    args = eval_args(inputs, out)[1:]  # without the "eval" word
    assert main(["slurm", "eval", *ALLOCATION, "--dry-run", "--", *args]) == 0
    script = capsys.readouterr().out
    for line in ("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:30:00",
                 "--requeue", "--partition=debug", f"--chdir={Path.cwd()}",
                 f"--output={out.resolve()}/slurm/%j.out", "--job-name=eval-a"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, line
    assert "--gpus-per-node" not in script and "--signal" not in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    words = shlex.split(srun)
    assert words[:5] == ["srun", "--kill-on-bad-exit=1", sys.executable, "-m", "sdtrain.launch.cli"]
    assert words[5:] == ["eval", *args]  # the options exactly as given
    assert f"would be written to {out.resolve()}/slurm/eval.sbatch" in script
    assert not out.exists()  # a dry run writes nothing


def test_eval_options_are_checked_before_submitting(
    inputs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    args = eval_args(inputs, tmp_path / "out")[1:]
    bad_scales = [*args, "--scales", "1,x"]
    assert main(["slurm", "eval", *ALLOCATION, "--dry-run", "--", *bad_scales]) == 2
    assert "--scales must be numbers" in capsys.readouterr().err
    missing = [a if a != str(inputs["checkpoint"]) else "nope.ckpt" for a in args]
    assert main(["slurm", "eval", *ALLOCATION, "--dry-run", "--", *missing]) == 2
    assert "--checkpoint nope.ckpt does not exist" in capsys.readouterr().err
    assert main(["slurm", "eval", *ALLOCATION, "--dry-run"]) == 2
    assert "pass the sdtrain eval options after --" in capsys.readouterr().err


@pytest.mark.slow
def test_two_task_eval_job_gives_the_rows_of_one_process(
    slurm_cluster, inputs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    local, job_out = tmp_path / "local", tmp_path / "job"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's tasks (OMP_NUM_THREADS = 1 CPU per task)
    try:
        assert main(eval_args(inputs, local)) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    assert main(["slurm", "eval", *ALLOCATION, "--", *eval_args(inputs, job_out)[1:]]) == 0
    job = int(re.search(r"submitted eval job (\d+)", capsys.readouterr().out).group(1))
    state = wait_for_job(job, timeout=900)
    logs = "".join(p.read_text() for p in (job_out / "slurm").glob("*.out"))
    assert state == "COMPLETED", logs[-3000:]
    assert (job_out / "slurm" / "jobs").read_text().split() == [str(job)]
    assert without_seconds(job_out / "metrics.json") == without_seconds(local / "metrics.json")
    assert json.loads((job_out / "eval.json").read_text())["batch"] == 1
