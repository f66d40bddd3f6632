"""Shared pytest fixtures: where the reference data about the original checkpoints lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The shared reference folder: ``$SDTRAIN_REFERENCE``, else ``<repo>/../shared/reference``.

    Tests that need it are skipped, with the places looked at, when it cannot be found.
    """
    env = os.environ.get("SDTRAIN_REFERENCE")
    default = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
    path = Path(env) if env else default
    if not path.is_dir():
        pytest.skip(
            f"reference data not found at {path} "
            "(set SDTRAIN_REFERENCE to the shared/reference folder)"
        )
    return path


def load_gzipped_safetensors(path: Path) -> dict:
    """A ``*.safetensors.gz`` reference weights file as a dict of tensors."""
    import gzip

    import safetensors.torch

    with gzip.open(path, "rb") as handle:
        return safetensors.torch.load(handle.read())
