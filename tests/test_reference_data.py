"""The reference data the conformance tests read is intact: every file matches its sha256."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path


def test_reference_files_match_published_checksums(reference_dir: Path) -> None:
    readme = (reference_dir / "README.md").read_text()
    sums = re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, flags=re.MULTILINE)
    assert len(sums) == 15
    for digest, name in sums:
        assert hashlib.sha256((reference_dir / name).read_bytes()).hexdigest() == digest, name
