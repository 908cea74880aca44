"""Artifact directories: atomic creation, file hashes, manifest I/O, reproducers.

An artifact directory is built under a hidden temporary sibling and renamed into
place only after it has been written *and* numerically verified, so a failed
compile leaves nothing at ``OUT``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator

from qcompile.errors import InputError

MANIFEST = "manifest.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(directory: Path, files: list[str]) -> dict[str, dict[str, Any]]:
    return {f: {"sha256": sha256_file(directory / f), "bytes": (directory / f).stat().st_size}
            for f in sorted(files)}


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_manifest(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"'{out_dir}' is not a qcompile artifact directory (no {MANIFEST})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"corrupt manifest '{path}': {e}") from e


def tool_versions() -> dict[str, str]:
    import numpy

    import qcompile

    versions = {"qcompile": qcompile.__version__, "python": platform.python_version(), "numpy": numpy.__version__}
    for mod in ("torch", "onnx", "onnxruntime", "onnxscript"):
        m = sys.modules.get(mod)
        if m is not None:
            versions[mod] = getattr(m, "__version__", "?")
    return versions


@contextlib.contextmanager
def atomic_directory(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out`` on success.

    ``out`` must not exist unless ``force``; on any exception (KeyboardInterrupt included, also one
    that arrives between moving an old ``out`` aside and renaming the new one into place) the
    temporary directory is removed and ``out`` is as it was.
    """
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"output '{out}' already exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    try:
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        # an interrupt (or error) between the two renames: put the old artifact back, drop the new one
        if old is not None and old.exists() and not out.exists():
            os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_reproducer(directory: Path, *, model_onnx: bytes | None, original_spec: str, pipeline: str,
                     target: str, extra_args: list[str], error: BaseException) -> Path:
    """Write pipeline text, the input model and the error so a failing compile can be replayed."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pipeline.txt").write_text(pipeline + "\n")
    (directory / "error.txt").write_text("".join(traceback.format_exception(error)))
    model_arg = original_spec
    if model_onnx is not None:
        (directory / "input.onnx").write_bytes(model_onnx)
        model_arg = "input.onnx"
    args = " ".join(extra_args)
    (directory / "replay.sh").write_text(
        "#!/bin/sh\n# Replays the failing compile recorded here.\ncd \"$(dirname \"$0\")\"\n"
        f"exec qcompile compile {model_arg} -p \"$(cat pipeline.txt)\" -t {target} -o replay-out --force {args}\n")
    (directory / "replay.sh").chmod(0o755)
    return directory
