"""Replace a marked block of a markdown file (benchmarks write their results this way)."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, key: str, title: str, body: str, level: str = "##") -> None:
    """Replace the block between ``<!-- key start -->`` and ``<!-- key end -->`` in ``path`` with
    ``body``; without those markers, append it as a new section titled ``title``."""
    start, end = f"<!-- {key} start -->", f"<!-- {key} end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = f"{text.rstrip()}\n\n{level} {title}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
