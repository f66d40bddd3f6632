"""Progress bars for long commands: tqdm on stderr, so stdout stays for results."""

from __future__ import annotations

import sys
from typing import Any


def progress(**kwargs: Any) -> Any:
    """A tqdm bar on stderr (``total=``, ``desc=``, ``unit=`` ... as tqdm takes them)."""
    from tqdm import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kwargs)
