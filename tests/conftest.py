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


# ---------------------------------------------------------------------------------------------
# Parallel runs (pytest-xdist: `make test` runs `pytest -n 2 --dist loadfile`)
# ---------------------------------------------------------------------------------------------

# Modules that run jobs on the one local SLURM cluster (slurm_support.slurm_cluster): one worker
# runs them all, one after another, as a serial run would.
SLURM_MODULES = frozenset({"test_eval_slurm.py", "test_slurm_cluster.py", "test_slurm_jobs.py"})
# The longest modules go first, so that no worker is left running one of them at the end.
LONG_MODULES = ("test_demo.py", "test_ddp.py", "test_data_reliability.py", "test_lora.py")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Each worker gets its share of the cores: one torch thread (and one per subprocess),
        # not one per core in every worker.
        import torch

        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long modules first (the order inside a module, and of the others, is kept)."""

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, when it is installed
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadfile`` with the SLURM modules as one file: a module's tests run on one worker
    (its module fixtures are built once), the SLURM modules on one worker together, in the
    collection order (long modules first). ``--dist loadgroup`` would say it with marks, but it
    does not group on pytest 9.2 (pytest-xdist issue 1386)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "slurm" if Path(module).name in SLURM_MODULES else module

    config.option.loadscopereorder = False  # keep the collection order
    return ModuleScheduling(config, log)
