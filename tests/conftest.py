"""Shared pytest fixtures: where the reference data about the original checkpoints lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE_CANDIDATES = (REPO.parent / "shared" / "reference", REPO / "tests" / "reference")


def find_reference_dir() -> Path | None:
    """``$SDTRAIN_REFERENCE``, else ``../shared/reference`` beside the checkout, else the
    verbatim copy committed in ``tests/reference``."""
    env = os.environ.get("SDTRAIN_REFERENCE")
    candidates = (Path(env),) if env else REFERENCE_CANDIDATES
    return next((path for path in candidates if (path / "manifests").is_dir()), None)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The reference folder; tests that need it skip, naming where they looked, without it."""
    path = find_reference_dir()
    if path is None:
        looked = os.environ.get("SDTRAIN_REFERENCE") or ", ".join(map(str, REFERENCE_CANDIDATES))
        pytest.skip(f"reference data not found (looked in {looked}; set SDTRAIN_REFERENCE)")
    return path


def load_gzipped_safetensors(path: Path) -> dict:
    """A ``*.safetensors.gz`` reference weights file as a dict of tensors."""
    import gzip

    import safetensors.torch

    with gzip.open(path, "rb") as handle:
        return safetensors.torch.load(handle.read())
