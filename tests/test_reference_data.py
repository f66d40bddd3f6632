"""The reference data the conformance tests read is intact: every file matches its sha256."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path


def test_reference_files_match_published_checksums(reference_dir: Path) -> None:
    readme = (reference_dir / "README.md").read_text()
    sums = re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, flags=re.MULTILINE)
    assert len(sums) == 21  # 15 original files + the x4 upscaler and MiDaS additions
    present = {
        f.relative_to(reference_dir).as_posix()
        for f in reference_dir.rglob("*")
        if f.is_file() and f.name not in ("README.md", "COPY.md")
    }
    assert {name for _, name in sums} == present
    for digest, name in sums:
        assert hashlib.sha256((reference_dir / name).read_bytes()).hexdigest() == digest, name
