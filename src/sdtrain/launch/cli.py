"""The ``sdtrain`` command: one entry point, one subcommand per job.

Subcommands: ``fit``, ``sample``, ``eval``, ``export``, ``data make-shards|stats|preview|bench``,
``smoke`` (end-to-end model check), ``config`` (validate and print a resolved config) and
``checkpoint inspect|convert`` (original-layout files). ``slurm`` arrives with the launch issue.

Exit codes: 0 ok, 2 usage or config error (and a run folder another run holds), 1 run failure,
128 + N a run stopped by signal N (143 SIGTERM, 130 SIGINT, 138 SIGUSR1) after checkpointing.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from sdtrain.config.resolve import resolve_config_path
from sdtrain.errors import ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _add_config_args(parser: argparse.ArgumentParser, default: Sequence[str] = ()) -> None:
    parser.add_argument(
        "--config",
        nargs="+",
        default=list(default),
        metavar="YAML",
        help="config files merged in order (paths, or shipped model names such as tiny-base, "
        "sd15, sd15-inpainting, sd2-base, sd2-v, sd2-inpainting, sd2-depth)"
        + (f"; default: {' '.join(default)}" if default else ""),
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides applied after the files, e.g. model.diffusion.parameterization=v seed=3",
    )


def _add_allocation_args(parser: argparse.ArgumentParser) -> None:
    """What ``sdtrain slurm submit`` and ``slurm eval`` ask SLURM for."""
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per node, one task each (0: CPU job)"
    )
    parser.add_argument(
        "--tasks-per-node",
        type=int,
        default=0,
        help="tasks (training processes) per node; default: one per GPU",
    )
    parser.add_argument("--cpus-per-task", type=int, default=8, help="CPUs per task (default 8)")
    parser.add_argument("--time", default="24:00:00", help="time limit (default 24:00:00)")
    parser.add_argument(
        "--signal-seconds",
        type=int,
        default=300,
        help="send SIGUSR1 this many seconds before the time limit: checkpoint + requeue",
    )
    parser.add_argument("--partition", default="", help="partition")
    parser.add_argument("--account", default="", help="account to charge")
    parser.add_argument("--qos", default="", help="quality of service")
    parser.add_argument("--constraint", default="", help="node features, e.g. a100")
    parser.add_argument("--job-name", default="", help="job name (default: the run name)")
    parser.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="a further #SBATCH option, e.g. --sbatch-arg=--exclusive (repeatable)",
    )


def _slurm_options(args: argparse.Namespace):
    from sdtrain.launch.slurm import SlurmOptions

    return SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        time=args.time,
        signal_seconds=args.signal_seconds,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        job_name=args.job_name,
        sbatch_args=args.sbatch_arg,
    )


def _load(args: argparse.Namespace):
    from sdtrain.trainer.experiment import load_config

    # `--config a.yaml k=v` puts the overrides into --config's list: split them off again.
    files = [item for item in args.config if "=" not in item]
    overrides = [item for item in args.config if "=" in item] + list(args.overrides)
    if not files:
        raise ConfigError("no config given: pass --config FILE [FILE ...]")
    return load_config([resolve_config_path(p) for p in files], overrides)


# ---------------------------------------------------------------------------------------------
# Subcommands
# ---------------------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    from sdtrain.config.loader import to_yaml

    cfg = _load(args)
    print(to_yaml(cfg), end="")
    return EXIT_OK


def cmd_fit(args: argparse.Namespace) -> int:
    from sdtrain.trainer.fit import fit

    cfg = _load(args)
    if args.print_config:
        from sdtrain.config.loader import to_yaml

        print(to_yaml(cfg), end="")
        return EXIT_OK
    if args.dry_run:
        from sdtrain.trainer.fit import dry_run

        print(dry_run(cfg))
        return EXIT_OK
    fit(cfg)
    return EXIT_OK


def cmd_slurm_submit(args: argparse.Namespace) -> int:
    from sdtrain.launch.slurm import submit

    files = [item for item in args.config if "=" not in item]
    overrides = [item for item in args.config if "=" in item] + list(args.overrides)
    if not files:
        raise ConfigError("no config given: pass --config FILE [FILE ...]")
    options = _slurm_options(args)
    paths = [resolve_config_path(p) for p in files]
    script, path, job = submit(paths, overrides, options, dry_run=args.dry_run)
    if args.dry_run:
        print(script, end="")
        print(f"# (dry run: would be written to {path} and submitted with sbatch)")
    else:
        print(f"submitted job {job}: {path}")
    return EXIT_OK


def cmd_slurm_eval(args: argparse.Namespace) -> int:
    from sdtrain.launch.slurm import submit_eval

    words = list(args.eval_args)
    words = words[1:] if words[:1] == ["--"] else words
    if not words:
        raise ConfigError("pass the sdtrain eval options after --, e.g. -- --checkpoint runs/a ...")
    try:  # the options are checked here, on the login node, not when the job starts
        eval_args = build_parser().parse_args(["eval", *words])
    except SystemExit:
        raise ConfigError("the options after -- are not valid sdtrain eval options") from None
    _eval_config(eval_args)
    for checkpoint in eval_args.checkpoint:
        if not Path(checkpoint).exists():
            raise ConfigError(f"--checkpoint {checkpoint} does not exist (paths are relative to "
                              f"{Path.cwd()}, where the job starts)")  # fmt: skip
    script, path, job = submit_eval(Path(eval_args.out), words, _slurm_options(args),
                                    dry_run=args.dry_run)  # fmt: skip
    if args.dry_run:
        print(script, end="")
        print(f"# (dry run: would be written to {path} and submitted with sbatch)")
    else:
        print(f"submitted eval job {job}: {path}")
    return EXIT_OK


def cmd_slurm_status(args: argparse.Namespace) -> int:
    from sdtrain.launch.slurm import status

    print(status(Path(args.run)))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from sdtrain.launch.demo import run_demo

    run_demo(args.out, quick=args.quick, seed=args.seed, overwrite=args.overwrite)
    return EXIT_OK


def cmd_smoke(args: argparse.Namespace) -> int:
    from sdtrain.launch.smoke import run_smoke

    cfg = _load(args)
    run_smoke(cfg, out_dir=Path(args.out), image_path=args.image, prompt=args.prompt)
    return EXIT_OK


def cmd_checkpoint_inspect(args: argparse.Namespace) -> int:
    from sdtrain.models.adapters.diffusers import (
        folder_summary,
        is_diffusers_folder,
        read_diffusers,
    )
    from sdtrain.models.adapters.original import read_checkpoint, summarize

    if is_diffusers_folder(args.path):
        print(folder_summary(read_diffusers(args.path)))
    else:
        print(summarize(read_checkpoint(args.path)))
    return EXIT_OK


def cmd_checkpoint_convert(args: argparse.Namespace) -> int:
    from sdtrain.launch.export import convert_checkpoint

    model = _load(args).model if args.config or args.overrides else None
    written = convert_checkpoint(
        args.src, args.dst, to=args.to, model=model,
        in_channels=args.in_channels, ema=args.ema, dtype=args.dtype,
    )  # fmt: skip
    print(written)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from sdtrain.launch.export import export_run

    if args.lora or args.lora_format:
        from sdtrain.launch.export_lora import export_lora

        if args.merge or args.with_ema or args.format != "original" or args.dtype:
            raise ConfigError("--lora writes the adapter alone: it takes no --merge, "
                              "--with-ema, --format or --dtype")  # fmt: skip
        print(export_lora(args.src, args.out, args.ema, args.lora_format or "kohya").summary())
        return EXIT_OK
    exported = export_run(args.src, args.out, use_ema=args.ema, with_ema=args.with_ema,
                          format=args.format, dtype=args.dtype, merge=args.merge)  # fmt: skip
    print(exported.summary())
    return EXIT_OK


def cmd_sample(args: argparse.Namespace) -> int:
    from sdtrain.launch.sample import sample_to_file

    result = sample_to_file(
        args.checkpoint, args.prompt, args.out,
        config=_load(args) if args.config or args.overrides else None, use_ema=args.ema,
        negative_prompt=args.negative_prompt, image=args.image, mask=args.mask,
        sampler=args.sampler, steps=args.steps, scale=args.scale, eta=args.eta, seed=args.seed,
        size=args.size, n=args.n, device=args.device, keep_unmasked=args.keep_unmasked,
        lora=args.lora, lora_scale=args.lora_scale, noise_level=args.noise_level,
        depth=args.depth, strength=args.strength,
    )  # fmt: skip
    print(result.summary())
    return EXIT_OK


def _eval_config(args: argparse.Namespace):
    from sdtrain.evaluation.extractors import ExtractorConfig
    from sdtrain.evaluation.run import EvalConfig

    try:
        scales = tuple(float(s) for s in args.scales.split(",") if s.strip())
    except ValueError:
        raise ConfigError(
            f"--scales must be numbers separated by commas, got {args.scales!r}"
        ) from None
    extractors = ExtractorConfig(
        inception_weights=args.inception_weights, clip_model=args.clip_model,
        clip_weights=args.clip_weights, seed=args.extractor_seed, antialias=args.fid_antialias,
        inception_features=args.inception_features,
    )  # fmt: skip
    cfg = EvalConfig(
        prompts=args.prompts, reference=args.reference, scales=scales, sampler=args.sampler,
        steps=args.steps, size=args.size, num=args.num, seed=args.seed, batch=args.batch,
        with_replacement=args.with_replacement, reference_num=args.reference_num,
        negative_prompt=args.negative_prompt, extractors=extractors, cache_dir=args.cache_dir,
    )  # fmt: skip
    return cfg


def cmd_eval(args: argparse.Namespace) -> int:
    from sdtrain.launch.eval import run_eval

    cfg = _eval_config(args)
    config = _load(args) if args.config or args.overrides else None
    run_eval(args.checkpoint, cfg, args.out, config=config, use_ema=args.ema,
             wandb_project=args.wandb_project if args.wandb else None)  # fmt: skip
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdtrain",
        description="Train Stable Diffusion base and inpainting checkpoints "
        "(key-for-key compatible with the original .ckpt files).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = sub.add_parser(
        "fit",
        help="train a UNet (base, inpainting or depth) as the config says",
        description="Train the configured model on WebDataset shards. Resume an interrupted run "
        "with resume=auto (newest complete checkpoint in the run folder) or resume=PATH.",
    )
    _add_config_args(fit)
    fit.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    fit.add_argument(
        "--dry-run",
        action="store_true",
        help="build everything (models on the meta device, data pipeline opened, strategy "
        "resolved) and print the plan without training",
    )
    fit.set_defaults(func=cmd_fit)

    slurm = sub.add_parser("slurm", help="submit training jobs to SLURM and follow them")
    slurm_sub = slurm.add_subparsers(dest="action", required=True, metavar="ACTION")
    submit = slurm_sub.add_parser(
        "submit",
        help="render the batch script for a run and submit it with sbatch",
        description="Resolve the config, snapshot it into the run folder, render a batch script "
        "whose allocation matches the trainer (nodes x tasks per node = trainer.num_nodes x "
        "trainer.devices), write it to RUN/slurm/train.sbatch and sbatch it. The job resumes "
        "from the run's newest checkpoint whenever it (re)starts.",
    )
    _add_config_args(submit)
    _add_allocation_args(submit)
    submit.add_argument(
        "--dry-run", action="store_true", help="print the script without writing or submitting"
    )
    submit.set_defaults(func=cmd_slurm_submit)
    slurm_eval = slurm_sub.add_parser(
        "eval",
        help="render a batch script for sdtrain eval and submit it with sbatch",
        description="Check the sdtrain eval options given after --, render OUT/slurm/eval.sbatch "
        "(srun: one eval rank per task, the ranks split the chunks, rank 0 writes the metrics) "
        "and sbatch it. Submitting it again continues a stopped eval (its finished chunks are "
        "kept, so no warning signal is sent: --signal-seconds is not used).",
    )
    _add_allocation_args(slurm_eval)
    slurm_eval.add_argument(
        "--dry-run", action="store_true", help="print the script without writing or submitting"
    )
    slurm_eval.add_argument(
        "eval_args", nargs=argparse.REMAINDER, metavar="-- EVAL_OPTIONS",
        help="sdtrain eval options, e.g. -- --checkpoint runs/a --prompts p.txt ... --out DIR",
    )  # fmt: skip
    slurm_eval.set_defaults(func=cmd_slurm_eval)
    slurm_status = slurm_sub.add_parser(
        "status", help="show a run's SLURM jobs and its newest checkpoint"
    )
    slurm_status.add_argument("run", help="run folder")
    slurm_status.set_defaults(func=cmd_slurm_status)

    demo = sub.add_parser(
        "demo",
        help="train a tiny text-to-image and inpainting model end to end on CPU, no downloads",
        description="Generate captioned scene shards (with samples the filters drop), train a "
        "tiny autoencoder, a text-conditioned base UNet (interrupted and resumed), an "
        "inpainting UNet and a v-objective variant, export original-layout checkpoints, sample "
        "prompt and inpainting grids and write OUT/report.md. About 15 minutes on 2 CPU cores; "
        "--quick about 3.",
    )
    demo.add_argument(
        "--out", default="runs/demo", help="run folder, not yet holding a demo (default: runs/demo)"
    )
    demo.add_argument(
        "--quick", action="store_true", help="fewer samples and steps (about 3 minutes)"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of data, weights and samples")
    demo.add_argument(
        "--overwrite", action="store_true", help="delete an earlier demo run in OUT first"
    )
    demo.set_defaults(func=cmd_demo)

    smoke = sub.add_parser(
        "smoke",
        help="build a configured model, encode an image, run one denoising step, decode it",
        description="End-to-end check of the models on CPU: build the configured (by default "
        "tiny, randomly initialised) model, encode an image with the autoencoder, noise it, run "
        "the UNet once with the prompt's text features and write the decoded images.",
    )
    _add_config_args(smoke, default=["tiny-base"])
    smoke.add_argument("--out", default="runs/smoke", help="output folder (default: runs/smoke)")
    smoke.add_argument("--image", default=None, help="input image (default: a drawn test scene)")
    smoke.add_argument(
        "--prompt",
        default="a red circle above a blue square on a white background",
        help="prompt for the text encoder",
    )
    smoke.set_defaults(func=cmd_smoke)

    config = sub.add_parser(
        "config",
        help="validate config files + overrides and print the resolved config",
        description="Merge the config files in order, apply key=value overrides, check the "
        "result against the schema and print it as YAML.",
    )
    _add_config_args(config)
    config.set_defaults(func=cmd_config)

    ckpt = sub.add_parser("checkpoint", help="inspect or convert original-layout checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="action", required=True, metavar="ACTION")
    inspect = ckpt_sub.add_parser(
        "inspect", help="list the parts of a .ckpt / .safetensors file (UNet, VAE, text, EMA)"
    )
    inspect.add_argument("path", help="checkpoint file or diffusers folder")
    inspect.set_defaults(func=cmd_checkpoint_inspect)
    convert = ckpt_sub.add_parser(
        "convert",
        help="rewrite a checkpoint (.ckpt <-> .safetensors), optionally widening the UNet input",
        description="Read an original-layout checkpoint (never executing pickled code) and write "
        "it in the original layout to DST; the suffix of DST picks the format.",
    )
    convert.add_argument("src", help="input .ckpt / .safetensors or diffusers folder")
    convert.add_argument(
        "dst", help="output .ckpt / .safetensors or new diffusers folder (written atomically)"
    )
    convert.add_argument(
        "--to",
        choices=("original", "diffusers"),
        default=None,
        help="output layout (default: original for a .ckpt/.safetensors DST, else diffusers); "
        "original -> diffusers needs --config with the model config",
    )
    convert.add_argument(
        "--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="cast the weights"
    )
    convert.add_argument(
        "--in-channels",
        type=int,
        default=0,
        help="widen the UNet input conv to this many channels (9 inpainting, 5 depth) with "
        "zero-initialised extra channels, EMA too",
    )
    convert.add_argument(
        "--no-ema", dest="ema", action="store_false", help="leave the EMA weights out"
    )
    _add_config_args(convert)
    convert.set_defaults(func=cmd_checkpoint_convert)

    export = sub.add_parser(
        "export",
        help="write a run's checkpoint as one original-layout .ckpt / .safetensors",
        description="Rebuild the run's model (frozen autoencoder and text encoder from its "
        "init_from or seeded init) and write UNet, VAE, text encoder and schedule in the "
        "original layout. By default the EMA weights become the UNet, as in released files.",
    )
    export.add_argument("src", help="run folder (its newest step checkpoint) or step=N.ckpt")
    export.add_argument(
        "out", help="output .ckpt / .safetensors (the suffix picks), or a folder (diffusers)"
    )
    export.add_argument(
        "--format",
        choices=("original", "diffusers"),
        default="original",
        help="original single file (default) or a diffusers folder with model_index.json",
    )
    export.add_argument(
        "--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="cast the weights"
    )
    weights = export.add_mutually_exclusive_group()
    weights.add_argument(
        "--ema", action="store_true", default=None, help="UNet = EMA (default when there is one)"
    )
    weights.add_argument("--no-ema", dest="ema", action="store_false", help="UNet = raw weights")
    export.add_argument(
        "--with-ema", action="store_true", help="raw UNet plus the EMA stored as model_ema.*"
    )
    export.add_argument(
        "--lora",
        action="store_true",
        help="LoRA runs: write the adapter alone (.safetensors; kohya / A1111 layout, which "
        "ComfyUI and A1111 read)",
    )
    export.add_argument(
        "--lora-format",
        choices=("kohya", "diffusers"),
        default=None,
        help="with --lora: kohya (default) or diffusers (what load_lora_weights reads)",
    )
    export.add_argument(
        "--merge",
        action="store_true",
        help="LoRA runs: a full original-layout checkpoint with the adapter merged into the "
        "base weights (W + alpha/r * up @ down)",
    )
    export.set_defaults(func=cmd_export)

    smp = sub.add_parser(
        "sample",
        help="text-to-image or inpainting samples from a run or an original-layout checkpoint",
        description="Sample with DDIM or PLMS and classifier-free guidance (the negative prompt "
        "is the unconditional side). A run folder or step checkpoint carries its config; an "
        "original-layout file needs --config with its model config.",
    )
    smp.add_argument(
        "--checkpoint",
        required=True,
        help="run folder, step=N.ckpt, original .ckpt/.safetensors or diffusers folder",
    )
    smp.add_argument("--prompt", required=True, help="the text prompt")
    smp.add_argument("--negative-prompt", default="", help="unconditional prompt (default: '')")
    smp.add_argument(
        "--image",
        default=None,
        help="inpainting: the image to repaint; x4 upscaler: the low-res input; depth model: "
        "depth-to-image from it (its depth from the checkpoint's MiDaS, or --depth)",
    )
    smp.add_argument(
        "--depth",
        default=None,
        help="depth model: a depth map of --image's size (16/8-bit PNG or .npy, larger = nearer) "
        "instead of MiDaS",
    )
    smp.add_argument(
        "--strength",
        type=float,
        default=None,
        help="depth-to-image: how far --image's latents are noised, 0..1 (default 0.8)",
    )
    smp.add_argument(
        "--noise-level",
        type=int,
        default=None,
        help="x4 upscaler: noise added to the low-res input, 0..max_noise_level (default 20)",
    )
    smp.add_argument("--mask", default=None, help="inpainting: mask image, white = repaint")
    smp.add_argument(
        "--keep-unmasked",
        action="store_true",
        help="inpainting: hold the latents the mask does not touch to the image's while sampling "
        "(the original DDIMSampler's mask/x0); default: the model repaints the whole picture",
    )
    smp.add_argument(
        "--sampler", choices=("ddim", "plms"), default="ddim", help="sampler (default ddim)"
    )
    smp.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    smp.add_argument("--scale", type=float, default=7.5, help="guidance scale (default 7.5)")
    smp.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    smp.add_argument("--seed", type=int, default=None, help="default: drawn and printed")
    smp.add_argument("--size", type=int, default=None, help="pixels (default: training size)")
    smp.add_argument("--n", type=int, default=1, help="images; more than one makes a grid")
    smp.add_argument("--out", required=True, help="output .png")
    smp.add_argument(
        "--lora",
        default=None,
        metavar="FILE",
        help="a LoRA .safetensors (kohya / A1111 or diffusers layout) merged into the UNet",
    )
    smp.add_argument(
        "--lora-scale", type=float, default=1.0, help="strength of --lora (default 1.0)"
    )
    smp.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    weights = smp.add_mutually_exclusive_group()
    weights.add_argument(
        "--ema", action="store_true", default=None, help="EMA weights (default when there are any)"
    )
    weights.add_argument("--no-ema", dest="ema", action="store_false", help="raw weights")
    _add_config_args(smp)
    smp.set_defaults(func=cmd_sample)

    ev = sub.add_parser(
        "eval",
        help="FID, KID and CLIP score of checkpoints over guidance scales",
        description="Sample every checkpoint at every guidance scale on the same prompts and "
        "seeds, extract InceptionV3 / CLIP features and write OUT/metrics.csv, metrics.json, "
        "fid_vs_clip.png and a grid per scale. Re-running into the same OUT continues a killed "
        "eval. Weights are never downloaded (docs/evaluation.md).",
    )
    ev.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="run folder, step=N.ckpt, original file or diffusers folder (repeatable)",
    )
    ev.add_argument(
        "--prompts",
        required=True,
        help="prompts: a .txt file, a COCO captions .json or a shard set",
    )
    ev.add_argument("--reference", required=True, help="real images: a folder or a shard set")
    ev.add_argument("--scales", default="1.5,2,3,4,5,6,7,8", help="guidance scales (a,b,...)")
    ev.add_argument("--sampler", choices=("plms", "ddim"), default="plms", help="default plms")
    ev.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    ev.add_argument("--size", type=int, default=512, help="pixels (default 512)")
    ev.add_argument("--num", type=int, default=None, help="images per scale (default: prompts)")
    ev.add_argument("--seed", type=int, default=0, help="prompt draw and sampling seed")
    ev.add_argument("--batch", type=int, default=8, help="images per chunk (default 8)")
    ev.add_argument(
        "--with-replacement",
        action="store_true",
        help="draw prompts with replacement when there are fewer than --num",
    )
    ev.add_argument("--reference-num", type=int, default=None, help="reference images used")
    ev.add_argument("--negative-prompt", default="", help="unconditional prompt (default '')")
    ev.add_argument(
        "--inception-weights",
        default=None,
        help="pt_inception-2015-12-05 weights (default: torch-fidelity's cache)",
    )
    ev.add_argument("--clip-model", default="ViT-L-14", help="open_clip architecture")
    ev.add_argument("--clip-weights", default=None, help="the CLIP model's state dict file")
    ev.add_argument(
        "--extractor-seed",
        type=int,
        default=None,
        help="seeded random Inception/CLIP weights (tests and demos; not FID)",
    )
    ev.add_argument(
        "--fid-antialias",
        action="store_true",
        help="antialiased resize to 299 px (torchmetrics' default) instead of TF1's",
    )
    ev.add_argument(
        "--inception-features",
        type=int,
        default=2048,
        choices=(64, 192, 768, 2048),
        help="Inception layer compared: 2048 (FID as published, default) or a cheaper earlier one",
    )
    ev.add_argument("--cache-dir", default=None, help="reference-feature cache folder")
    ev.add_argument("--out", required=True, help="output folder (re-use it to continue)")
    ev.add_argument(
        "--wandb",
        action="store_true",
        help="log the table, the plot and the settings to wandb (WANDB_MODE=offline works)",
    )
    ev.add_argument("--wandb-project", default="sdtrain", help="wandb project (default sdtrain)")
    ev_weights = ev.add_mutually_exclusive_group()
    ev_weights.add_argument("--ema", action="store_true", default=None, help="EMA weights")
    ev_weights.add_argument("--no-ema", dest="ema", action="store_false", help="raw weights")
    _add_config_args(ev)
    ev.set_defaults(func=cmd_eval)

    from sdtrain.launch.data_cli import add_data_commands

    add_data_commands(sub)
    return parser


@contextlib.contextmanager
def _stop_while_starting() -> Iterator[None]:
    """Until a run installs its own handlers (``trainer/preemption.py``: after the imports),
    SIGTERM / SIGINT end it with a message instead of silently. The handlers from before are
    back when the command returns or raises (``main`` called in-process keeps its caller's)."""
    import signal

    def stop(signum: int, frame: object) -> None:
        from sdtrain.errors import RunInterrupted

        name = signal.Signals(signum).name
        raise RunInterrupted(signum, f"stopped by {name} while starting up (nothing trained)")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            # None: a handler installed outside Python, which cannot be put back from here
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    from sdtrain.errors import RunInterrupted

    words = sys.argv[1:] if argv is None else list(argv)
    starting = words[:1] in (["fit"], ["demo"])
    with _stop_while_starting() if starting else contextlib.nullcontext():
        try:
            return _run(argv)
        except RunInterrupted as stop:
            print(f"sdtrain {words[0]}: {stop}", file=sys.stderr)
            return stop.exit_code


def _run(argv: Sequence[str] | None) -> int:
    from sdtrain.data.shards import DataError
    from sdtrain.errors import CheckpointError, RunFolderLocked, WriteError
    from sdtrain.trainer.module import NonFiniteError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"sdtrain: config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RunFolderLocked as err:
        print(f"sdtrain: {err}", file=sys.stderr)
        return EXIT_USAGE
    except WriteError as err:
        print(f"sdtrain: cannot write: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except CheckpointError as err:
        print(f"sdtrain: checkpoint error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except DataError as err:
        print(f"sdtrain: data error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except NonFiniteError as err:
        print(f"sdtrain: training stopped: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
