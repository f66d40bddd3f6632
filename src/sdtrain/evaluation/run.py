"""One eval: every checkpoint at every guidance scale, generated in resumable chunks.

Per (checkpoint, scale) the N prompts are cut into chunks of ``batch``; chunk ``i`` is sampled
with its own seed (from ``seed`` and ``i``, the same for every checkpoint and scale: the cards
compare checkpoints on the same prompts and start noise), its images go through InceptionV3 and
CLIP at once, and only the features (and the chunk's CLIP scores and seconds) are stored in
``OUT/chunks/<checkpoint>/scale=<s>/chunk-NNNNN.safetensors``. A chunk that exists is never
redone, so a killed eval re-run into the same OUT continues, and since each chunk depends only on
its own seed and prompts the numbers equal those of an uninterrupted run. ``OUT/eval.json``
records the settings; a re-run with other settings is refused.

Ranks (``RANK`` / ``WORLD_SIZE`` as torchrun and ``srun`` set them, ``SLURM_PROCID`` /
``SLURM_NTASKS`` too) split the chunks round-robin; every rank writes its own chunk files into
the shared OUT, rank 0 waits for all of them and computes and writes the metrics. No process
group is needed: the chunk files are the gather.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sdtrain.diffusion.samplers import SamplerName
from sdtrain.errors import ConfigError
from sdtrain.evaluation.extractors import ClipModel, ExtractorConfig, build_clip, build_inception
from sdtrain.evaluation.metrics import clip_score, fid_from_features, kid_from_features
from sdtrain.evaluation.prompts import load_prompts
from sdtrain.evaluation.reference import ReferenceFeatures, default_cache_dir, reference_features
from sdtrain.models.conditioning import conditioning_component
from sdtrain.models.config import ModelConfig
from sdtrain.models.sampling import check_size, sample_images
from sdtrain.models.stable_diffusion import StableDiffusion
from sdtrain.utils import files
from sdtrain.utils.images import image_grid, to_image
from sdtrain.utils.progress import progress

DEFAULT_SCALES = (1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0)
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"
"""tqdm's bar with the rate always in images/s (tqdm flips to s/img below 1 img/s) and the ETA."""
COLUMNS = ("checkpoint", "scale", "sampler", "steps", "num", "size", "seed", "fid", "kid",
           "kid_std", "clip_score", "seconds", "features", "reference_num")  # fmt: skip


@dataclass(frozen=True)
class EvalConfig:
    """What ``sdtrain eval`` measures and how."""

    prompts: str
    """A .txt file, a COCO captions .json or a shard spec (``evaluation.prompts``)."""
    reference: str
    """A folder or shard spec of real images (``evaluation.reference``)."""
    scales: tuple[float, ...] = DEFAULT_SCALES
    sampler: SamplerName = "plms"
    steps: int = 50
    size: int = 512
    num: int | None = None
    """Generated images per checkpoint and scale; None: one per prompt."""
    seed: int = 0
    batch: int = 8
    """Images per chunk (sampled together, classifier-free guidance batched)."""
    with_replacement: bool = False
    reference_num: int | None = None
    """Reference images used; None: all."""
    negative_prompt: str = ""
    extractors: ExtractorConfig = field(default_factory=ExtractorConfig)
    cache_dir: str | None = None
    """Reference-feature cache; None: $XDG_CACHE_HOME/sdtrain/eval."""
    grid_images: int = 16
    wait_seconds: float = 6 * 3600
    """Rank 0 waits this long for the other ranks' chunks."""

    def __post_init__(self) -> None:
        if not self.scales:
            raise ConfigError("--scales names no guidance scale")
        for s in self.scales:
            if not (math.isfinite(s) and s >= 0):
                raise ConfigError(f"--scales: {s} is not a finite number >= 0")
        for name in ("steps", "size", "batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.num is not None and self.num < 2:
            raise ConfigError(f"--num must be >= 2 (FID and KID need 2 images), got {self.num}")

    def settings(self) -> dict[str, object]:
        """What the stored chunks depend on: a re-run must agree on all of it."""
        out = asdict(self)
        for key in ("cache_dir", "wait_seconds", "scales", "reference", "reference_num"):
            out.pop(key)
        out["extractors"].pop("inception_weights")
        out["extractors"].pop("clip_weights")
        return out


@dataclass
class EvalModel:
    """A checkpoint to evaluate: ``build(device)`` makes the model only when a chunk is missing."""

    name: str
    build: Callable[[torch.device], StableDiffusion]
    description: str = ""


@dataclass
class Rank:
    rank: int = 0
    world: int = 1

    @staticmethod
    def from_env() -> Rank:
        env = os.environ
        rank = env.get("RANK", env.get("SLURM_PROCID", "0"))
        world = env.get("WORLD_SIZE", env.get("SLURM_NTASKS", "1"))
        return Rank(int(rank), int(world))


ImagesHook = Callable[["EvalModel", float, int, Tensor, Sequence[str]], None]
"""Sees each chunk generated in this call: (model, scale, chunk index, uint8 (b, 3, S, S) images,
their prompts). Chunks read back from an earlier run are not shown again."""


@dataclass
class EvalResult:
    rows: list[dict[str, object]]
    reference: ReferenceFeatures | None
    out: Path


def check_model(cfg: ModelConfig, what: str, size: int, steps: int) -> None:
    """A ConfigError naming ``what`` (a file, a run) unless the model is one eval can measure:
    text-to-image (prompts in, images out), ``size`` a valid sample size, ``steps`` at most its
    diffusion timesteps."""
    component = conditioning_component(cfg.conditioning)
    if component.sample_inputs:
        raise ConfigError(
            f"{what} is {component.article()} {component.description} model "
            f"(model.conditioning: {cfg.conditioning}, sampled from a prompt plus "
            f"{' and '.join(component.sample_inputs)}): eval measures text-to-image checkpoints "
            "(model.conditioning: txt2img), e.g. the base model it was trained from"
        )
    check_size(cfg, size, "--size")
    if steps > cfg.diffusion.timesteps:
        raise ConfigError(
            f"--steps {steps} must be at most the {cfg.diffusion.timesteps} diffusion timesteps of "
            f"{what} (model.diffusion.timesteps)"
        )


# ---------------------------------------------------------------------------------------------
# Chunks
# ---------------------------------------------------------------------------------------------


def chunk_seed(seed: int, index: int) -> int:
    """The sampling seed of chunk ``index``: independent of the chunking before it."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def model_tag(name: str) -> str:
    """A folder name for a checkpoint: readable stem plus a hash of the full path."""
    stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", Path(name.rstrip("/")).name)[:48] or "model"
    digest = hashlib.sha256(str(Path(name).resolve()).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def scale_dir(out: Path, model: EvalModel, scale: float) -> Path:
    return out / "chunks" / model_tag(model.name) / f"scale={scale:g}"


def chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:05d}.safetensors"


def to_uint8(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8, as a saved PNG would hold them."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@functools.lru_cache(maxsize=4)
def cached_inception(cfg: ExtractorConfig) -> torch.nn.Module:
    """``build_inception(cfg)``, built once per process (evals during training, benchmarks)."""
    return build_inception(cfg)


@functools.lru_cache(maxsize=4)
def cached_clip(cfg: ExtractorConfig) -> ClipModel:
    """``build_clip(cfg)``, built once per process."""
    return build_clip(cfg)


class _Extractors:
    """Built on first use (a finished eval re-run builds nothing) and kept for the process (an
    eval during training builds them once)."""

    def __init__(self, cfg: ExtractorConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        self._inception: torch.nn.Module | None = None
        self._clip: ClipModel | None = None

    @torch.no_grad()
    def inception(self, images: Tensor) -> Tensor:
        if self._inception is None:
            self._inception = cached_inception(self.cfg).to(self.device)
        return self._inception(images.to(self.device)).float().cpu()

    def clip(self) -> ClipModel:
        if self._clip is None:
            self._clip = cached_clip(self.cfg).to(self.device)
        return self._clip


def _generate_chunk(
    model: StableDiffusion, prompts: Sequence[str], cfg: EvalConfig, scale: float, index: int,
    extractors: _Extractors,
) -> tuple[dict[str, Tensor], Tensor]:  # fmt: skip
    start = time.perf_counter()
    device = model.schedule.alphas_cumprod.device
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        images = sample_images(
            model, list(prompts), negative_prompt=cfg.negative_prompt, sampler=cfg.sampler,
            steps=cfg.steps, scale=scale, seed=chunk_seed(cfg.seed, index), size=cfg.size,
        )  # fmt: skip
    pixels = to_uint8(images).cpu()  # (b, 3, S, S)
    clip = extractors.clip()
    scores = clip_score(clip.encode_images(pixels), clip.encode_texts(list(prompts))).cpu()
    tensors = {
        "inception": extractors.inception(pixels),  # (b, F)
        "clip_score": scores.float(),  # (b,)
        "seconds": torch.tensor([time.perf_counter() - start], dtype=torch.float64),
    }
    return tensors, pixels


def _write_grid(path: Path, pixels: Tensor) -> None:
    grid = to_image(image_grid(pixels.float() / 127.5 - 1.0))
    files.write_atomic(path, lambda tmp: grid.save(tmp, format="PNG"))


def generate(
    cfg: EvalConfig, models: Sequence[EvalModel], prompts: Sequence[str], out: Path,
    extractors: _Extractors, device: torch.device, rank: Rank, on_images: ImagesHook | None = None,
) -> None:  # fmt: skip
    """This rank's missing chunks of every checkpoint and scale."""
    n = len(prompts)
    chunks = range(math.ceil(n / cfg.batch))
    mine = [i for i in chunks if i % rank.world == rank.rank]
    for model_spec in models:
        model: StableDiffusion | None = None
        for scale in cfg.scales:
            folder = scale_dir(out, model_spec, scale)
            todo = [i for i in mine if not chunk_path(folder, i).is_file()]
            total = sum(len(range(i * cfg.batch, min(n, (i + 1) * cfg.batch))) for i in mine)
            left = sum(len(range(i * cfg.batch, min(n, (i + 1) * cfg.batch))) for i in todo)
            if not todo:
                continue
            if model is None:
                model = model_spec.build(device)
            folder.mkdir(parents=True, exist_ok=True)
            desc = f"{Path(model_spec.name).name} scale {scale:g}"
            with progress(total=total, initial=total - left, desc=desc, unit="img",
                          bar_format=BAR_FORMAT) as bar:  # fmt: skip
                for i in todo:
                    part = prompts[i * cfg.batch : (i + 1) * cfg.batch]
                    tensors, pixels = _generate_chunk(model, part, cfg, scale, i, extractors)
                    if i == 0:
                        grid = out / "grids" / model_tag(model_spec.name) / f"scale={scale:g}.png"
                        grid.parent.mkdir(parents=True, exist_ok=True)
                        _write_grid(grid, pixels[: cfg.grid_images])
                    files.write_safetensors(chunk_path(folder, i), tensors)
                    if on_images is not None:
                        on_images(model_spec, scale, i, pixels, part)
                    bar.update(len(part))
        del model


def _wait_for_chunks(cfg: EvalConfig, models: Sequence[EvalModel], n: int, out: Path) -> None:
    paths = [
        chunk_path(scale_dir(out, m, s), i)
        for m in models for s in cfg.scales for i in range(math.ceil(n / cfg.batch))
    ]  # fmt: skip
    deadline = time.monotonic() + cfg.wait_seconds
    while missing := [p for p in paths if not p.is_file()]:
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{len(missing)} chunk(s) of the other ranks are still missing after "
                f"{cfg.wait_seconds:g} s (first: {missing[0]}); re-run the eval into {out} to "
                "finish them"
            )
        time.sleep(2.0)


def _read_chunks(folder: Path, count: int) -> dict[str, Tensor]:
    parts = [files.read_safetensors(chunk_path(folder, i))[0] for i in range(count)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


# ---------------------------------------------------------------------------------------------
# The eval
# ---------------------------------------------------------------------------------------------


def _check_settings(cfg: EvalConfig, out: Path, prompts: Sequence[str], rank: Rank) -> None:
    record = {**cfg.settings(), "prompts_sha256": _digest(prompts)}
    path = out / "eval.json"
    if path.is_file():
        stored = files.read_json(path)
        if stored != record:
            assert isinstance(stored, dict)
            changed = sorted(k for k in record.keys() | stored.keys()
                             if stored.get(k) != record.get(k))  # fmt: skip
            raise ConfigError(
                f"{out} holds an eval with other settings ({', '.join(changed)} differ): re-run "
                "with the same options to continue it, or choose another --out"
            )
    elif rank.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        files.write_json(path, record)


def _digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


def evaluate(
    cfg: EvalConfig, models: Sequence[EvalModel], out: Path, *,
    device: torch.device | None = None, rank: Rank | None = None,
    reference: ReferenceFeatures | None = None, on_images: ImagesHook | None = None,
) -> EvalResult:  # fmt: skip
    """Generate what is missing, then (rank 0) compute one row per checkpoint and scale.

    ``reference``: features computed earlier for this config (an eval during training passes
    those of its first eval); None: from the cache or computed. ``on_images``: see
    ``ImagesHook``."""
    rank = rank or Rank.from_env()
    device = device or _default_device(rank)
    prompts = load_prompts(cfg.prompts, cfg.num, cfg.seed, cfg.with_replacement).texts
    if len(prompts) < 2:
        raise ConfigError(f"--prompts {cfg.prompts} gives {len(prompts)} prompt; FID needs 2")
    _check_settings(cfg, out, prompts, rank)
    extractors = _Extractors(cfg.extractors, device)
    if rank.rank == 0 and reference is None:  # first: a bad reference fails before any sampling
        reference = _reference(cfg, extractors)
    generate(cfg, models, prompts, out, extractors, device, rank, on_images)
    if rank.rank != 0:
        return EvalResult([], None, out)
    _wait_for_chunks(cfg, models, len(prompts), out)
    assert reference is not None
    count = math.ceil(len(prompts) / cfg.batch)
    rows = []
    for model in models:
        for scale in cfg.scales:
            chunks = _read_chunks(scale_dir(out, model, scale), count)
            kid = kid_from_features(reference.features, chunks["inception"], seed=cfg.seed)
            rows.append({
                "checkpoint": model.name, "scale": scale, "sampler": cfg.sampler,
                "steps": cfg.steps, "num": len(prompts), "size": cfg.size, "seed": cfg.seed,
                "fid": fid_from_features(reference.features, chunks["inception"]),
                "kid": kid.mean, "kid_std": kid.std,
                "clip_score": float(chunks["clip_score"].double().mean()),
                "seconds": float(chunks["seconds"].sum()),
                "features": cfg.extractors.describe(),
                "reference_num": int(reference.features.shape[0]),
            })  # fmt: skip
    return EvalResult(rows, reference, out)


def _reference(cfg: EvalConfig, extractors: _Extractors) -> ReferenceFeatures:
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    return reference_features(
        cfg.reference, cfg.size, cfg.reference_num, cfg.extractors.inception_id(),
        extractors.inception, cache, batch=cfg.batch,
    )  # fmt: skip


def warm_extractors(cfg: EvalConfig, device: torch.device) -> ReferenceFeatures:
    """Build both extractors (kept for the process) and return the reference features: what
    ``evaluate`` needs before its first chunk, so that missing weights or a bad reference fail
    now (an eval during training calls it before the first training step)."""
    extractors = _Extractors(cfg.extractors, device)
    extractors.clip()
    return _reference(cfg, extractors)


def _default_device(rank: Rank) -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", rank.rank)))
    return torch.device("cuda", local % torch.cuda.device_count())
