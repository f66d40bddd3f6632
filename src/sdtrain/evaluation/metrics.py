"""FID, KID and CLIP score from features: the distances are torchmetrics' own.

Features are computed once (``extractors``) and stored per chunk (``run``), so the metrics are
fed features, not images: torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` take a feature extractor module, and here that module is the
identity on (N, D) feature rows. KID draws its subsets with torch's global generator; it is
seeded (and restored afterwards) so the same features always give the same KID.

CLIP score is the definition torchmetrics' ``CLIPScore`` uses (Hessel et al. 2021, without the
2.5 weight): ``100 * max(cos(image, text), 0)`` averaged over pairs. torchmetrics computes it only
with Hugging Face CLIP models; sdtrain's CLIP models are open_clip's, so the definition is applied
to open_clip's embeddings here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


class _Features(nn.Module):
    """The identity on (N, D) feature rows, announcing D as torchmetrics asks."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: Tensor) -> Tensor:
        return x


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """Frechet distance between Gaussians fitted to (N, D) ``real`` and (M, D) ``fake``."""
    _need_two(real, fake, "FID")
    metric = FrechetInceptionDistance(feature=_Features(real.shape[1]))
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


@dataclass(frozen=True)
class Kid:
    mean: float
    std: float


def kid_from_features(
    real: Tensor, fake: Tensor, *, subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE, seed: int = 0,
) -> Kid:  # fmt: skip
    """Kernel Inception Distance: the unbiased MMD^2 with the cubic polynomial kernel, mean and
    std over ``subsets`` random subsets of ``min(subset_size, N, M)`` rows each."""
    _need_two(real, fake, "KID")
    size = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():  # "will save all extracted features": that is the point
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(
            feature=_Features(real.shape[1]), subsets=subsets, subset_size=size
        )
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return Kid(float(mean), float(std))


def clip_score(image_embeddings: Tensor, text_embeddings: Tensor) -> Tensor:
    """Per pair (N,): ``100 * max(cos(image_i, text_i), 0)``; the CLIP score is the mean."""
    image = nn.functional.normalize(image_embeddings.double(), dim=-1)
    text = nn.functional.normalize(text_embeddings.double(), dim=-1)
    return (100 * (image * text).sum(-1)).clamp(min=0)


def _need_two(real: Tensor, fake: Tensor, what: str) -> None:
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise ValueError(
            f"{what} needs at least 2 real and 2 generated images "
            f"(got {real.shape[0]} and {fake.shape[0]})"
        )
