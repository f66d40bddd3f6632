"""The package's layers (docs/design.md): the import-linter contracts in pyproject.toml hold.

``lint-imports`` checks them (``make lint`` runs it too): no module imports from a higher layer,
``|`` siblings (data / diffusion, config / utils) never import each other, and no package has an
import cycle between its modules.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold() -> None:
    # In a subprocess: lint-imports reconfigures logging, which would break later caplog tests.
    # It reads ./pyproject.toml.
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
         "sys.exit(lint_imports(no_cache=True))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_the_cycles_issue_10_named_are_gone() -> None:
    """Checked on the import graph directly, independently of the contract's wording."""
    graph = grimp.build_graph("sdtrain")

    def imports(a: str, b: str) -> bool:
        return graph.chain_exists(importer=a, imported=b, as_packages=True)

    for low, high in [
        ("sdtrain.trainer", "sdtrain.launch"),
        ("sdtrain.models", "sdtrain.trainer"),
        ("sdtrain.config", "sdtrain.trainer"),
        ("sdtrain.config", "sdtrain.models"),
        ("sdtrain.data", "sdtrain.models"),
        ("sdtrain.diffusion", "sdtrain.data"),
        ("sdtrain.data", "sdtrain.diffusion"),
    ]:
        assert not imports(low, high), f"{low} imports {high}"
    assert not imports("sdtrain.launch.demo", "sdtrain.launch.cli")
