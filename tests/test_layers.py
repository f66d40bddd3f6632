"""The package's layers (docs/design.md): the import-linter contracts in pyproject.toml hold.

``lint-imports`` checks them (``make lint`` runs it too): no module imports from a higher layer,
``|`` siblings (data / diffusion, config / utils) never import each other, and no package has an
import cycle between its modules.
"""

from __future__ import annotations

from pathlib import Path

import grimp
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold(capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # lint-imports reads ./pyproject.toml
    code = lint_imports(no_cache=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 broken" in out


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
