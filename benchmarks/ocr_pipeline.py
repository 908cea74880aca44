"""End-to-end OCR pipeline benchmark (issue 7): RapidOCR's PaddleOCR det -> cls -> rec.

The three pretrained ONNX models come from the rapidocr-onnxruntime 1.4.4 wheel
(``qcompile.models.thirdparty.fetch_rapidocr_models``).  This module is a minimal,
pure-numpy re-implementation of the PaddleOCR glue (written from reading
rapidocr's pre/post-processing, not copied) so the pipeline can be scored with
any per-model callables ``fn({"x": batch}) -> [outputs]``:

* data: text-line images rendered with DejaVuSans (shipped in the matplotlib
  wheel) via Pillow, black on white with slight gray noise; ground truth strings
  and their pixel boxes are known.
* det (DB): x = (img/255 - 0.5)/0.5, NCHW, static 1x3x320x320 (rapidocr would
  upscale to min side 736; we keep the static 320 input).  Threshold 0.3, 2x2
  dilation, connected components (scipy.ndimage.label), box score >= 0.5,
  axis-aligned box expanded by d = area*1.6/perimeter (the unclip offset).
* cls: every crop resized to height 48 keeping aspect (width <= 192), padded,
  normalised like det; a crop called '180' with score > 0.9 is rotated by 180
  degrees before rec, as rapidocr does (our lines are upright, so each such
  rotation is a cls error, counted, and costs rec accuracy: a compressed cls
  is scored by what it does to the text).
* rec: crop resized to height 48 keeping aspect, width <= 320, zero-padded to
  320 (static shape), normalised like det; CTC greedy decode with the character
  list from the rec model's metadata ('character'), blank at 0, ' ' appended.
* metric: character accuracy = 100 * (1 - sum(edit distance) / sum(len(gt)))
  over all GT lines; GT boxes are the rendered glyph bbox padded by 0.25 x line
  height per side (DB boxes carry a margin by design, the unclip; against tight
  glyph boxes short lines fall just under IoU 0.5).  A GT line is matched to a detected box by IoU > 0.5
  (greedy, one-to-one); an unmatched GT line costs len(gt); a per-line cost is
  capped at len(gt).  False-positive detections are not penalised (reported).

Colour order: rapidocr feeds BGR (cv2); our images are gray so BGR == RGB.

Run:  .venv/bin/python benchmarks/ocr_pipeline.py [--n 40] [--seed 0]      # original vs reference interpreter
      .venv/bin/python benchmarks/ocr_pipeline.py feasibility              # tvm-x86 fp32 / all-int8 per model
      .venv/bin/python benchmarks/ocr_pipeline.py search [--budget-latency 0.8 ...]
      .venv/bin/python benchmarks/ocr_pipeline.py recover --det-macs 0.6 [--rec-macs 0.7 ...]  # prune + distill

``search`` (issue 7): one compression search over the pipeline's models (``search_main``): calibration
images (seed 1) are distinct from the validation images (seed 0) that score finalists; per-layer latency
on the target is weighted by each model's calls per image; finalists run the real glue end to end.
Results go to ``--out`` (default benchmarks/results/ocr): search.json, search.png, feasibility.json.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

DET_SIZE = 320
CLS_SHAPE = (3, 48, 192)
REC_SHAPE = (3, 48, 320)
DET_THRESH, BOX_THRESH, UNCLIP_RATIO, MIN_SIZE = 0.3, 0.5, 1.6, 3
CLS_THRESH = 0.9
GT_PAD = 0.25  # GT box = glyph bbox padded by GT_PAD * line height on each side

WORDS = ("the be to of and a in that have it for not on with he as you do at this but his by from they we say "
         "her she or an will my one all would there their what so up out if about who get which go me when make "
         "can like time no just him know take people into year your good some could them see other than then now "
         "look only come its over think also back after use two how our work first well way even new want because "
         "any these give day most us open price total invoice order number date street model camera river table "
         "window green paper coffee market north south station garden music letter water yellow Hello World OCR "
         "Python Berlin London Paris Monday Friday March October Data Model Test Check Name City Road").split()


# ----------------------------------------------------------------------------- data

def _font_path() -> str:
    import matplotlib
    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


def _random_text(rng: np.random.Generator) -> str:
    toks = []
    for _ in range(int(rng.integers(1, 4))):
        r = rng.random()
        if r < 0.2:
            toks.append(str(int(rng.integers(0, 100000))))
        else:
            w = WORDS[int(rng.integers(len(WORDS)))]
            toks.append(w.capitalize() if rng.random() < 0.3 else w)
    return " ".join(toks)


def make_dataset(n: int = 40, seed: int = 0, size: int = DET_SIZE) -> list[dict]:
    """``n`` images (size x size x 3 uint8) with 1-3 text lines each; gt = [(text, (x0, y0, x1, y1))]."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    fp = _font_path()
    data = []
    for _ in range(n):
        img = Image.new("L", (size, size), 255)
        draw = ImageDraw.Draw(img)
        nlines = int(rng.integers(1, 4))
        band = size // nlines
        gt = []
        for li in range(nlines):
            for _attempt in range(20):
                font = ImageFont.truetype(fp, int(rng.integers(18, 27)))
                text = _random_text(rng)
                x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
                w, h = x1 - x0, y1 - y0
                # keep lines recognisable at the static 48x320 rec input (aspect <= ~6 after unclip)
                if w + 20 < size and w / max(h, 1) < 9.0:
                    break
            else:
                text = "ok"
                x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
                w, h = x1 - x0, y1 - y0
            px = int(rng.integers(10, size - w - 10 + 1))
            top, bot = li * band + 8, (li + 1) * band - h - 8
            py = int(rng.integers(top, max(top, bot) + 1))
            draw.text((px - x0, py - y0), text, fill=int(rng.integers(0, 40)), font=font)
            m = int(round(GT_PAD * h))  # annotation-style margin around the glyph box (see docstring)
            gt.append((text, (max(px - m, 0), max(py - m, 0), min(px + w + m, size), min(py + h + m, size))))
        arr = np.asarray(img, dtype=np.float32)
        arr = arr + rng.normal(0.0, 6.0, arr.shape)
        arr = np.clip(arr, 0, 255).astype(np.uint8)
        data.append({"image": np.repeat(arr[:, :, None], 3, axis=2), "gt": gt})
    return data


# ----------------------------------------------------------------------------- glue

def _norm(img_hwc: np.ndarray) -> np.ndarray:
    """uint8 HWC -> float32 CHW, (x/255 - 0.5)/0.5 (PaddleOCR det/cls/rec)."""
    return ((img_hwc.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)


def _resize(img_hwc: np.ndarray, w: int, h: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(img_hwc).resize((int(w), int(h)), Image.BILINEAR))


def det_preprocess(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    if (h, w) != (DET_SIZE, DET_SIZE):
        image = _resize(image, DET_SIZE, DET_SIZE)
    return _norm(image)[None]


def det_postprocess(prob: np.ndarray, src_hw: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """DB probability map (1,1,H,W) -> axis-aligned boxes (x0, y0, x1, y1) in source pixels, top-to-bottom."""
    from scipy import ndimage

    pred = prob.reshape(prob.shape[-2:])
    H, W = pred.shape
    mask = pred > DET_THRESH
    mask = ndimage.binary_dilation(mask, structure=np.ones((2, 2), bool))  # rapidocr use_dilation (2x2)
    labels, _ = ndimage.label(mask)
    boxes = []
    sh, sw = src_hw
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        bw, bh = x1 - x0, y1 - y0
        if min(bw, bh) < MIN_SIZE:
            continue
        if float(pred[y0:y1, x0:x1].mean()) < BOX_THRESH:  # 'fast' box score (mean prob in the box)
            continue
        d = bw * bh * UNCLIP_RATIO / (2.0 * (bw + bh))  # unclip offset of the rectangle
        ex0, ey0, ex1, ey1 = x0 - d, y0 - d, x1 + d, y1 + d
        if min(ex1 - ex0, ey1 - ey0) < MIN_SIZE + 2:
            continue
        boxes.append((int(np.clip(round(ex0 / W * sw), 0, sw)), int(np.clip(round(ey0 / H * sh), 0, sh)),
                      int(np.clip(round(ex1 / W * sw), 0, sw)), int(np.clip(round(ey1 / H * sh), 0, sh))))
    boxes.sort(key=lambda b: (b[1], b[0]))
    return boxes


def _resize_pad(crop: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    ch, cw = crop.shape[:2]
    rw = min(w, int(math.ceil(h * cw / float(ch))))
    out = np.zeros((c, h, w), np.float32)
    out[:, :, :rw] = _norm(_resize(crop, max(rw, 1), h))
    return out


def cls_preprocess(crop: np.ndarray) -> np.ndarray:
    return _resize_pad(crop, CLS_SHAPE)[None]


def rec_preprocess(crop: np.ndarray) -> np.ndarray:
    return _resize_pad(crop, REC_SHAPE)[None]


def load_characters(rec_path: str | Path) -> list[str]:
    """Character list from the rec model's metadata ('character'), blank at 0 and ' ' appended (as rapidocr)."""
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(rec_path), load_external_data=False).metadata_props}
    return ["blank"] + meta["character"].splitlines() + [" "]


def ctc_decode(logits: np.ndarray, chars: list[str]) -> tuple[str, float]:
    """Greedy CTC on (T, C) probabilities: collapse repeats, drop blank (0)."""
    idx = logits.argmax(axis=-1)
    prob = logits.max(axis=-1)
    keep = np.ones(len(idx), bool)
    keep[1:] = idx[1:] != idx[:-1]
    keep &= idx != 0
    text = "".join(chars[i] for i in idx[keep])
    return text, float(prob[keep].mean()) if keep.any() else 0.0


CHARS: list[str] = []  # filled by main() / set_characters()


def set_characters(chars: list[str]) -> None:
    CHARS[:] = chars


def run_image(fns: dict, image: np.ndarray, stats: dict | None = None) -> list[tuple[tuple[int, int, int, int], str]]:
    """One image through det -> cls -> rec; returns [(box, text)].  Call set_characters(load_characters(rec)) first."""
    if not CHARS:
        raise RuntimeError("character list not set: call set_characters(load_characters(<rec .onnx path>))")
    prob = fns["det"]({"x": det_preprocess(image)})[0]
    boxes = det_postprocess(prob, image.shape[:2])
    res = []
    for b in boxes:
        crop = image[b[1]:b[3], b[0]:b[2]]
        if crop.size == 0:
            continue
        cls_out = np.asarray(fns["cls"]({"x": cls_preprocess(crop)})[0])[0]
        label = int(cls_out.argmax())
        if stats is not None:
            stats["crops"] = stats.get("crops", 0) + 1
        if label == 1 and cls_out[label] > CLS_THRESH:
            crop = np.ascontiguousarray(crop[::-1, ::-1])
            if stats is not None:
                stats["cls_rot180"] = stats.get("cls_rot180", 0) + 1
        rec_out = np.asarray(fns["rec"]({"x": rec_preprocess(crop)})[0])[0]
        text, _score = ctc_decode(rec_out, CHARS)
        res.append((b, text.strip()))
    return res


def run_pipeline(fns: dict, images: list[np.ndarray]) -> list[list[str]]:
    """Recognised strings per image (top-to-bottom)."""
    return [[t for _, t in run_image(fns, im)] for im in images]


# ----------------------------------------------------------------------------- metric

def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def evaluate(fns: dict, dataset: list[dict]) -> dict:
    total_len = total_err = 0
    err_nospace = len_nospace = 0
    stats: dict = {"crops": 0, "cls_rot180": 0}
    matched = exact = 0
    examples, texts = [], []
    for item in dataset:
        dets = run_image(fns, item["image"], stats)
        texts.append([(list(b), t) for b, t in dets])
        used = set()
        for text, gbox in item["gt"]:
            best, bj = 0.5, None
            for j, (dbox, _) in enumerate(dets):
                if j not in used and (v := iou(gbox, dbox)) > best:
                    best, bj = v, j
            total_len += len(text)
            gns = text.replace(" ", "")
            len_nospace += len(gns)
            if bj is None:
                total_err += len(text)
                err_nospace += len(gns)
                if len(examples) < 8:
                    examples.append((text, None))
                continue
            used.add(bj)
            matched += 1
            pred = dets[bj][1]
            ed = min(levenshtein(pred, text), len(text))
            exact += ed == 0
            total_err += ed
            err_nospace += min(levenshtein(pred.replace(" ", ""), gns), len(gns))
            if ed and len(examples) < 8:
                examples.append((text, pred))
    n_gt = sum(len(d["gt"]) for d in dataset)
    return {"char_acc": 100.0 * (1.0 - total_err / max(total_len, 1)),
            "char_acc_ignoring_spaces": 100.0 * (1.0 - err_nospace / max(len_nospace, 1)), "gt_lines": n_gt,
            "detected": stats["crops"], "matched": matched, "exact_lines": exact,
            "cls_rot180_errors": stats["cls_rot180"], "examples": examples,
            "texts": texts}


def metric(fns: dict, dataset: list[dict]) -> float:
    """Character accuracy in percent (see module docstring)."""
    return evaluate(fns, dataset)["char_acc"]


# ----------------------------------------------------------------------------- main

INPUT_SHAPES = {"det": (1, 3, DET_SIZE, DET_SIZE), "cls": (1, *CLS_SHAPE), "rec": (1, *REC_SHAPE)}
FILES = {"det": "ch_PP-OCRv4_det_infer.onnx", "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
         "rec": "ch_PP-OCRv4_rec_infer.onnx"}


def ort_fn(path, threads: int = 1) -> callable:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    # idle ORT worker threads otherwise spin and steal the (2) cores from the torch reference runs
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name

    def run(feed):
        return sess.run(None, {name: np.ascontiguousarray(feed["x"], dtype=np.float32)})
    return run


def _median_ms(f, reps: int) -> float:
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def latency(fns: dict, dataset: list[dict], reps: int = 10) -> dict:
    rng = np.random.default_rng(0)
    out = {m: _median_ms(lambda m=m: fns[m]({"x": rng.standard_normal(INPUT_SHAPES[m]).astype(np.float32)}), reps)
           for m in ("det", "cls", "rec")}
    ims = [d["image"] for d in dataset[:reps]]
    ts = []
    for im in ims:
        t = time.perf_counter()
        run_image(fns, im)
        ts.append(time.perf_counter() - t)
    out["end_to_end_per_image"] = 1e3 * statistics.median(ts)
    return out


# ----------------------------------------------------------------------------- compressed pipelines

def capture_one_feed_at_a_time() -> None:
    """Make ``qcompile.factorize.layers.capture`` (calibration statistics of ``quantize``, bias correction)
    run the reference interpreter on one feed at a time instead of batches of 64.

    Workaround: the recognizer's attention reshapes to (1, 40, 3, 8, 15), transposes q/k/v to the front
    and reshapes the slices back to (1, 8, 40, 15); with a batch of crops the interpreter's batch
    rescaling of static reshapes cannot tell the batch axis there, so batched capture fails.  Batch-1
    feeds give the same statistics.  A no-op where ``capture`` already falls back to batch 1 for such
    graphs by itself (``qcompile.factorize.layers._batch_free``)."""
    from qcompile.factorize import layers

    if not hasattr(layers, "_batch_free"):
        layers.capture.__defaults__ = (1,)


def load_graphs(paths: dict) -> dict:
    """model -> the original graph at the benchmark's static shape, ``fold-bn,dead-code`` run."""
    from qcompile.frontends import load_model
    from qcompile.passes import PassManager, parse_pipeline
    from qcompile.search.finalists import PREPARE

    return {m: PassManager(parse_pipeline(PREPARE)).run(load_model(str(paths[f]), {"x": INPUT_SHAPES[m]}).graph)
            for m, f in FILES.items()}


def _recovery_args(ap: argparse.ArgumentParser) -> None:
    """The options of pruning a pipeline model and recovering it by distillation (``recover``, ``search``)."""
    ap.add_argument("--min-keep", type=float, default=0.1, help="prune-channels: every group keeps this fraction")
    ap.add_argument("--n-train", type=int, default=300, help="rendered training images (seed 2) for the recovery")
    ap.add_argument("--epochs", type=int, default=8, help="distill epochs per pruned model")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--dice", type=float, default=1.0, help="distill's soft-dice weight on det's probability map")
    ap.add_argument("--reuse", action="store_true",
                    help="load a pruned + recovered model an earlier run wrote (OUT/recovered/, named by model, "
                         "ratio and a hash of every option that made it) instead of training it again")


def recovery_text(args, model: str) -> str:
    """The ``distill`` pass that recovers a pruned ``model`` (the soft-dice term only for det's map)."""
    dice = f",dice={args.dice:g}" if model == "det" and args.dice else ""
    return f"distill{{epochs={args.epochs},lr={args.lr:g}{dice}}}"


def chain_key(args, det_ratios, prefix: str = "") -> str:
    """What the crops a chained cls / rec trains on depend on: the pruned dets (their ratios, recovery and
    min_keep), after ``prefix`` (e.g. whether the original det's crops are included)."""
    return (f"{prefix}det={','.join(f'{r:g}' for r in det_ratios)}:{recovery_text(args, 'det')}"
            f":min_keep={args.min_keep:g}" + (":progressive" if getattr(args, "progressive", False) else ""))


def progressive_key(args, ratios, r: float) -> str:
    """With ``--progressive``, what ``r``'s pruned model also depends on: the larger ratios below 1 it is cut
    from in steps ("" for the largest, which is pruned from the original as without it)."""
    steps = sorted((q for q in ratios if r < q < 1), reverse=True)
    return f"|progressive from {','.join(f'{q:g}' for q in steps)}" if args.progressive and steps else ""


def recovered_path(out: str, model: str, ratio: float, args, recovery: str, chain: str = "") -> Path:
    """Where the pruned + recovered ``model`` is kept (its folder is created): named by model and ratio,
    plus a hash of what made it (min_keep, the recovery pass, the training images, ``chain``: the
    :func:`chain_key` of the compressed dets whose crops cls / rec trained on)."""
    import hashlib

    key = (f"{model}|{ratio:g}|min_keep={args.min_keep:g}|{recovery}|n_train={args.n_train}|seed=2"
           + (f"|chain={chain}" if chain else ""))
    path = Path(out) / "recovered" / f"{model}-{ratio:g}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def calibration_feeds(det_fn, images: list[np.ndarray], max_crops: int = 32) -> dict[str, list[dict]]:
    """Per model, real batch-1 feeds ``{"x": ...}``: det gets the whole images; cls and rec get the crops
    the original detector (``det_fn``) finds on them, preprocessed as the glue does (at most ``max_crops``)."""
    feeds: dict[str, list[dict]] = {"det": [], "cls": [], "rec": []}
    for im in images:
        x = det_preprocess(im)
        feeds["det"].append({"x": x})
        for b in det_postprocess(det_fn({"x": x})[0], im.shape[:2]):
            crop = im[b[1]:b[3], b[0]:b[2]]
            if crop.size and len(feeds["rec"]) < max_crops:
                feeds["cls"].append({"x": cls_preprocess(crop)})
                feeds["rec"].append({"x": rec_preprocess(crop)})
    return feeds


def calls_per_image(fns: dict, images: list[np.ndarray]) -> dict[str, float]:
    """How often the glue calls each model per image (det once; cls and rec once per detected line)."""
    counts = {m: 0 for m in FILES}

    def counting(m):
        def run(feed):
            counts[m] += 1
            return fns[m](feed)
        return run
    run_pipeline({m: counting(m) for m in FILES}, images)
    return {m: c / max(len(images), 1) for m, c in counts.items()}


def end_to_end_runs(fn_sets: dict, images: list[np.ndarray]) -> dict:
    """name -> a no-argument call running the whole glue (det, cls and rec per line) over ``images``."""
    return {k: (lambda fns=fns: run_pipeline(fns, images)) for k, fns in fn_sets.items()}


def _machine(threads: int) -> str:
    """CPU model (as the latency cache names it), core count and runtime threads, for result files."""
    import os

    from qcompile.search.latency_cache import _cpu_model

    return f"{_cpu_model()}, nproc={os.cpu_count()}, threads={threads}"


def _write_result(res: dict, out: str, name: str) -> dict:
    """Record the load average in ``res``, write it as JSON to ``out/name`` and say so; returns ``res``."""
    import os

    res["loadavg"] = os.getloadavg()
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str))
    print(f"load average {res['loadavg']}; wrote {path}")
    return res


def feasibility(argv=None) -> dict:
    """Each original model compiled for tvm-x86 in fp32 and after ``quantize`` (all int8), timed interleaved
    per model against onnxruntime fp32 (the original file), plus the all-int8 pipeline's char accuracy and
    its end-to-end time: where the time goes, and whether the issue's 2.5x is reachable at all."""
    from qcompile.bench import interleaved
    from qcompile.models.thirdparty import fetch_rapidocr_models
    from qcompile.passes import PassContext, PassManager, parse_pipeline
    from qcompile.search.pipeline import target_fn

    ap = argparse.ArgumentParser(prog="ocr_pipeline.py feasibility")
    ap.add_argument("--n-calib", type=int, default=16)
    ap.add_argument("--n-val", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--number", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/ocr")
    args = ap.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    capture_one_feed_at_a_time()
    paths = fetch_rapidocr_models()
    set_characters(load_characters(paths[FILES["rec"]]))
    calib = [d["image"] for d in make_dataset(args.n_calib, seed=1)]
    val = make_dataset(args.n_val, seed=0)
    orig = {m: ort_fn(paths[f], args.threads) for m, f in FILES.items()}
    feeds = calibration_feeds(orig["det"], calib)
    graphs = load_graphs(paths)
    t0 = time.perf_counter()
    int8 = {m: PassManager(parse_pipeline("quantize")).run(g, PassContext(calibration=feeds[m])) for m, g in graphs.items()}
    res: dict = {"machine": _machine(args.threads), "quantize_s": time.perf_counter() - t0, "models": {}}
    fns = {"onnxruntime fp32": orig}
    build: dict = {}
    for name, gs in (("tvm-x86 fp32", graphs), ("tvm-x86 int8", int8)):
        t0 = time.perf_counter()
        fns[name] = {m: target_fn(g, "tvm-x86", args.threads) for m, g in gs.items()}
        build[name] = time.perf_counter() - t0
    res["tvm_build_s"] = build
    for m in FILES:
        feed = feeds[m][0]
        runs = {k: (lambda f=f[m]: f(feed)) for k, f in fns.items()}
        med = {k: 1e3 * float(np.median(v)) for k, v in interleaved(runs, args.rounds, args.number).items()}
        res["models"][m] = med
        print(f"{m}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()), flush=True)
    res["calls_per_image"] = calls_per_image(orig, [d["image"] for d in val])
    ims = [d["image"] for d in val[:10]]
    e2e = {k: 1e3 * float(np.median(v)) / len(ims)
           for k, v in interleaved(end_to_end_runs(fns, ims), max(args.rounds // 2, 2), 1).items()}
    res["end_to_end_ms_per_image"] = e2e
    for k, f in fns.items():
        res.setdefault("char_acc", {})[k] = metric(f, val)
    for k in fns:
        print(f"{k}: char acc {res['char_acc'][k]:.2f} %, end to end {e2e[k]:.1f} ms/image", flush=True)
    print(f"calls per image: {res['calls_per_image']}")
    return _write_result(res, args.out, "feasibility.json")


def searched_layers(graph, min_macs: float, min_layers: int) -> str:
    """``layers=`` pattern of the conv/linear layers (constant weights) with at least ``min_macs`` MACs, and
    at least the ``min_layers`` largest: the layers whose latency matters (each is built and timed alone)."""
    from qcompile.factorize import layers as L

    nodes = sorted(L.targets(graph, ("conv2d", "linear"), "*", ""), key=lambda n: -L.node_macs(graph, n))
    keep = [n.name for k, n in enumerate(nodes) if k < min_layers or L.node_macs(graph, n) >= min_macs]
    return "|".join(keep)


def proxy_glue(feeds: dict[str, list[dict]], reference: dict) -> callable:
    """The search's proxy run: every model on its own real calibration feeds (det: whole images; cls, rec:
    the crops the original det finds), each model's outputs divided by the norm of the original's, so the
    search's relative L2 error is the RMS over the three models of their relative output errors (unscaled,
    det's 320x320 probability maps would outweigh rec's per-crop character probabilities)."""
    norms = {m: float(np.linalg.norm(np.concatenate([np.asarray(reference[m](f)[0]) for f in feeds[m]])))
             for m in FILES}

    def run(fns: dict) -> list[np.ndarray]:
        return [np.concatenate([np.asarray(fns[m](f)[0]) for f in feeds[m]]) / norms[m] / math.sqrt(len(FILES))
                for m in FILES]
    return run


def _measure_with_threads(threads: int):
    """LatencyCache ``measure_fn``: interleaved medians (3 rounds x 10 calls) at ``threads`` runtime threads."""
    def measure(graphs, backend):
        from qcompile.bench import interleaved
        from qcompile.factorize.latency import runner_for

        runs = {k: runner_for(g, backend, threads) for k, g in graphs.items()}
        return {k: float(np.median(v)) for k, v in interleaved(runs, 3, 10, settle=0.02).items()}
    return measure


def search_main(argv=None) -> dict:
    """One NSGA-II compression search over det, cls and rec together (qcompile.search.pipeline): per-layer
    int8/int4/Tucker-2 choices of the three models as one genome, latency measured per layer on the target,
    weighted by how often the glue calls each model per image; finalists scored by end-to-end character
    accuracy on validation images and timed running the real glue end to end."""
    import os
    import sys

    from qcompile.errors import SearchError
    from qcompile.frontends import load_model
    from qcompile.frontends.onnx_export import save_onnx
    from qcompile.models.thirdparty import fetch_rapidocr_models
    from qcompile.search import LatencyCache, SearchSpace, search
    from qcompile.search import pipeline as P
    from qcompile.search.finalists import choose, plot_front, report
    from qcompile.search.driver import ort_needs_reduce_range
    from qcompile.search.latency_cache import default_target
    from qcompile.search.nsga import Budget

    ap = argparse.ArgumentParser(prog="ocr_pipeline.py search", description=search_main.__doc__.split("\n")[0])
    ap.add_argument("-t", "--target", default="tvm-x86")
    ap.add_argument("--budget-latency", type=float, default=None,
                    help="end-to-end budget: per-image weighted per-layer latency / the fp32 pipeline's")
    ap.add_argument("--max-drop", type=float, default=1.0, help="max char-accuracy drop in points")
    ap.add_argument("--bits", default="8,4")
    ap.add_argument("--ranks", type=int, default=2, help="Tucker-2 ranks per k x k conv (0: none)")
    ap.add_argument("--min-macs", type=float, default=4e6, help="search conv/linear layers with >= this many MACs")
    ap.add_argument("--min-layers", type=int, default=4, help="... and at least this many of each model's largest")
    ap.add_argument("--n-calib", type=int, default=8, help="calibration images (seed 1; crops from the original det)")
    ap.add_argument("--max-crops", type=int, default=16)
    ap.add_argument("--n-val", type=int, default=40, help="validation images (seed 0) for the char accuracy")
    ap.add_argument("--n-time", type=int, default=10, help="validation images run per end-to-end timing call")
    ap.add_argument("--pop", type=int, default=12)
    ap.add_argument("--generations", type=int, default=6)
    ap.add_argument("--finalists", type=int, default=3)
    ap.add_argument("--max-points", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/ocr")
    for m in FILES:
        ap.add_argument(f"--prune-{m}", default="1",
                        help=f"{m}'s prune ratios (MAC fractions, comma-separated): a per-model gene; each pruned "
                             "model is recovered by distillation once, before the per-layer choices")
    _recovery_args(ap)
    ap.add_argument("--chain", action="store_true",
                    help="pruned cls / rec recover on the crops of the original det *and* of every pruned det "
                         "(what they will see in any point), not the original det's alone")
    ap.add_argument("--train-threads", type=int, default=2, help="torch threads while recovering pruned models")
    ap.add_argument("--progressive", action="store_true",
                    help="prune each ratio from the next larger ratio's recovered model (SearchSpace "
                         "prune_progressive), not from the original at once")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    capture_one_feed_at_a_time()
    t_start = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name, t0):
        phases[name] = time.perf_counter() - t0
        print(f"[{time.perf_counter() - t_start:7.0f} s] {name}: {phases[name]:.0f} s", flush=True)

    def progress(msg):
        print(f"[{time.perf_counter() - t_start:7.0f} s] {msg}", flush=True)

    t0 = time.perf_counter()
    paths = fetch_rapidocr_models()
    set_characters(load_characters(paths[FILES["rec"]]))
    calib_images = [d["image"] for d in make_dataset(args.n_calib, seed=1)]
    val = make_dataset(args.n_val, seed=0)
    val_images = [d["image"] for d in val]
    orig = {m: ort_fn(paths[f], args.threads) for m, f in FILES.items()}
    feeds = calibration_feeds(orig["det"], calib_images, args.max_crops)
    calls = calls_per_image(orig, val_images)
    graphs = load_graphs(paths)
    bits = tuple(int(b) for b in args.bits.split(",") if b)
    ratios = {m: tuple(float(r) for r in getattr(args, f"prune_{m}").split(",")) for m in FILES}
    chain = chain_key(args, [r for r in ratios["det"] if r < 1]) if args.chain and min(ratios["det"]) < 1 else ""
    train: dict[str, list] = {}  # recovery feeds, made only when some pruned model is not reused
    train_images: list[np.ndarray] = []
    chained = False

    def recovery_feeds(m: str) -> list[dict]:
        nonlocal chained
        if not train_images:
            train_images.extend(d["image"] for d in make_dataset(args.n_train, seed=2))
            train.update(calibration_feeds(orig["det"], train_images, max_crops=10 ** 6))
        if m != "det" and chain and not chained:  # det's space is built (FILES order): add what every pruned
            chained = True                          # det finds to cls's / rec's crops
            for r in (r for r in spaces["det"].prune_ratios if r < 1):
                det_r = P.target_fn(spaces["det"].pruned_graph(r), "onnxruntime", 1)
                for k, v in calibration_feeds(det_r, train_images, max_crops=10 ** 6).items():
                    if k != "det":
                        train[k] += v
            progress(f"--chain: cls / rec recover on {len(train['rec'])} crops (the original det's and every "
                     "pruned det's)")
        return train[m]

    spaces = {}
    reduce_range = ort_needs_reduce_range(args.target)  # int8 weights on the 7-bit grid without VNNI
    torch.set_num_threads(args.train_threads)
    for m, g in graphs.items():
        recovery = recovery_text(args, m)
        files = {r: recovered_path(args.out, m, r, args, recovery + progressive_key(args, ratios[m], r),
                                   chain=chain if m != "det" else "")
                 for r in ratios[m] if r < 1}
        given = {r: load_model(str(f), {"x": INPUT_SHAPES[m]}).graph for r, f in files.items()
                 if args.reuse and f.exists()}
        tp = time.perf_counter()
        spaces[m] = SearchSpace(g, feeds[m], bits=bits, ranks_per_layer=args.ranks, reduce_range=reduce_range,
                                layers=searched_layers(g, args.min_macs, args.min_layers), prune_ratios=ratios[m],
                                prune_options={"min_keep": args.min_keep}, prune_recovery=recovery, teacher=g,
                                recovery_feeds=recovery_feeds(m) if len(given) < len(files) else None,
                                pruned=given, prune_progressive=args.progressive)
        for r, f in files.items():
            if r not in given:
                save_onnx(spaces[m].pruned_graph(r), f)
            progress(f"{m} pruned at {r:g} ({'reused ' + str(f) if r in given else 'pruned and recovered'}): "
                     f"{spaces[m].prune_stats[r].get('mac_ratio', float('nan')):.3f} of the MACs")
        if files:
            phases[f"prune + recover {m}"] = time.perf_counter() - tp
    torch.set_num_threads(args.threads)
    space = P.PipelineSpace(spaces, proxy_glue(feeds, {m: P.reference_fn(g) for m, g in graphs.items()}))
    models = P.PipelineModels(graphs, feeds)
    progress(f"space: {len(space.layers)} layers ({', '.join(f'{m} {len(sp.layers)}' for m, sp in spaces.items())}), "
             f"{space.size} (layer, configuration) pairs; calls per image {calls}; calibration feeds "
             f"{ {m: len(v) for m, v in feeds.items()} }")
    phase("setup", t0)

    t0 = time.perf_counter()
    raw = LatencyCache(args.target, target=default_target(args.target, args.threads),
                       measure_fn=_measure_with_threads(args.threads))
    factors, anchors = P.anchor_factors(space, raw, calls)
    progress("latency factors (calls x anchor): " + ", ".join(f"{m}/{b}: {v:.3g}" for (m, b), v in factors.items()))
    phase("anchors (whole models fp32 / all-int8 / all-int4 and their layers, timed)", t0)

    t0 = time.perf_counter()
    budget = Budget(latency=args.budget_latency)
    result = search(None, None, space=space, backend=args.target, budget=budget, pop_size=args.pop,
                    generations=args.generations, seed=args.seed, cache=P.WeightedLatencyCache(raw, factors))
    phase("NSGA-II search", t0)
    progress(f"{result.message}; {result.pairs_measured}/{result.space_size} pairs measured, "
             f"{result.measurements} workloads timed, {result.evaluations} models evaluated")

    t0 = time.perf_counter()
    time_images = val_images[:args.n_time]
    doc: dict = {}
    try:
        finalists, base, timing, front_metric = P.evaluate(
            space, models, result, args.target, lambda fns: metric(fns, val), max_metric_drop=args.max_drop,
            count=args.finalists, max_points=args.max_points, rounds=args.rounds, number=1,
            time_run=lambda fns: run_pipeline(fns, time_images), threads=args.threads, onnxruntime_fns=orig,
            progress=progress)
    except SearchError as e:
        print(f"search failed: {e}")
        finalists, base, timing, front_metric = [], None, {}, [None] * len(result.front)
        doc["error"] = str(e)
    phase("finalists (end-to-end char accuracy, builds, end-to-end timing)", t0)
    wall = time.perf_counter() - t_start

    n = len(time_images)
    by_text = {json.dumps(space.pipelines(p), sort_keys=True): p for p in result.front}
    rows = []
    for f in finalists:
        alloc = P.allocation(space, by_text[f.pipeline])
        rows.append({"allocation": alloc, "char_acc": f.accuracy, "drop": f.acc_drop,
                     "ms_per_image": 1e3 * f.latency_s / n, "vs_onnxruntime_fp32": f.speedup_vs_onnxruntime,
                     "vs_tvm_fp32": 1.0 / f.latency_ratio, "predicted_latency_ratio": f.predicted_latency_ratio,
                     "memory_ratio": f.memory_ratio, "proxy_error": f.proxy_error, "pipelines": json.loads(f.pipeline)})
    chosen = None
    if finalists:
        try:
            chosen = choose(finalists, budget, args.max_drop)
        except SearchError as e:
            doc["choose_error"] = str(e)
    doc.update(report(result, finalists, chosen, base, timing, front_metric) if chosen else
               {"search": result.to_json(), "front_metric": front_metric})
    doc.update({"command": "python benchmarks/ocr_pipeline.py search " + " ".join(argv or sys.argv[2:]),
                "args": vars(args), "machine": _machine(args.threads), "calls_per_image": calls,
                "latency_factors": {f"{m}/{b}": v for (m, b), v in factors.items()}, "anchors": anchors,
                "layers": {m: [la.name for la in sp.layers] for m, sp in spaces.items()},
                "original_char_acc": base, "rows": rows, "timing_images": n, "phases_s": phases,
                "wall_s": wall, "loadavg": os.getloadavg()})
    if timing:
        doc["original_ms_per_image"] = {f"{args.target} fp32": 1e3 * timing["original_target_s"] / n,
                                        "onnxruntime fp32": 1e3 * timing["original_onnxruntime_s"] / n}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(doc, indent=1, default=str))
    if chosen:
        (out / "search.png").write_bytes(plot_front(result, finalists, chosen, base, front_metric))

    print(f"\noriginal pipeline: char acc {base}; per image: "
          + ", ".join(f"{k} {v:.1f} ms" for k, v in doc.get("original_ms_per_image", {}).items()))
    print("| allocation (per model: prune ratio, layers fp32/int8/int4/tucker2) | char acc | drop | ms/image "
          "| vs original files on onnxruntime fp32 | vs fold-bn on " + args.target + " fp32 | predicted ratio "
          "| weight bytes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        alloc = "; ".join(f"{m}{'' if a['prune'] == 1 else ' pruned ' + format(a['prune'], 'g')} "
                          f"{a['fp32']}/{a['int8']}/{a['int4']}/{a['tucker2']}" for m, a in r["allocation"].items())
        mark = " (chosen)" if chosen and r["pipelines"] == json.loads(chosen.pipeline) else ""
        print(f"| {alloc}{mark} | {r['char_acc']:.2f} | {r['drop']:.2f} | {r['ms_per_image']:.1f} | "
              f"{r['vs_onnxruntime_fp32']:.2f}x | {r['vs_tvm_fp32']:.2f}x | {r['predicted_latency_ratio']:.3f} | "
              f"{r['memory_ratio']:.3f} |")
    spent = ", ".join(f"{k.split(' (')[0]} {v:.0f}" for k, v in phases.items())
    print(f"search wall time {wall:.0f} s ({spent}); "
          f"load average {doc['loadavg']}; wrote {out / 'search.json'}")
    return doc


def recover_main(argv=None) -> dict:
    """Prune det / rec / cls and recover each by label-free distillation from the original (the ``distill``
    pass, on rendered training images, seed 2, none of them validation or calibration images), then score
    the pipeline's character accuracy on the validation images (seed 0) and time it end to end,
    interleaved with the original files on onnxruntime, every model compiled for ``--target``."""
    from qcompile.bench import interleaved
    from qcompile.factorize.layers import compute_macs
    from qcompile.models.thirdparty import fetch_rapidocr_models
    from qcompile.passes import PassContext, PassManager, parse_pipeline
    from qcompile.search.pipeline import target_fn

    ap = argparse.ArgumentParser(prog="ocr_pipeline.py recover", description=recover_main.__doc__.split("\n")[0])
    ap.add_argument("-t", "--target", default="onnxruntime")
    for m in FILES:
        ap.add_argument(f"--{m}-macs", type=float, default=1.0, help=f"{m}: keep this fraction of MACs (1: unpruned)")
    _recovery_args(ap)
    ap.add_argument("--n-val", type=int, default=40)
    ap.add_argument("--n-time", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/ocr")
    ap.add_argument("--chain", action="store_true",
                    help="train cls / rec on the crops the *compressed* det finds (what they see in the compressed "
                         "pipeline), not the original det's")
    args = ap.parse_args(argv)
    import torch

    from qcompile.frontends import load_model
    from qcompile.frontends.onnx_export import save_onnx
    torch.set_num_threads(args.threads)
    paths = fetch_rapidocr_models()
    set_characters(load_characters(paths[FILES["rec"]]))
    orig = {m: ort_fn(paths[f], args.threads) for m, f in FILES.items()}
    graphs = load_graphs(paths)
    train_images = [d["image"] for d in make_dataset(args.n_train, seed=2)]
    train = calibration_feeds(orig["det"], train_images, max_crops=10 ** 6)
    val = make_dataset(args.n_val, seed=0)
    res: dict = {"machine": _machine(args.threads), "args": vars(args), "models": {}}
    compressed = {}
    for m, g in graphs.items():
        r = getattr(args, f"{m}_macs")
        recovery = recovery_text(args, m)
        text = "" if r >= 1 else f"prune-channels{{macs={r:g},min_keep={args.min_keep:g}}},{recovery}"
        t0 = time.perf_counter()
        pm = PassManager(parse_pipeline(text))
        f = recovered_path(args.out, m, r, args, recovery,
                           chain=chain_key(args, [args.det_macs], "only ") if args.chain and m != "det" else "")
        if text and args.reuse and f.exists():
            compressed[m] = load_model(str(f), {"x": INPUT_SHAPES[m]}).graph
        else:
            compressed[m] = pm.run(g, PassContext(calibration=train[m], original=g)) if text else g
            if text:
                save_onnx(compressed[m], f)
        stats = {rec.name: rec.stats for rec in pm.records} if text else {}
        res["models"][m] = {"pipeline": pm.text if text else "", "seconds": time.perf_counter() - t0,
                            "mac_ratio": compute_macs(compressed[m]) / compute_macs(g), "train_feeds": len(train[m]),
                            "distill": {k: v for k, v in stats.get("distill", {}).items() if k != "history"}}
        print(f"{m}: {res['models'][m]}", flush=True)
        if m == "det" and args.chain and text:  # cls / rec (after det in FILES) train on the compressed det's crops
            train = calibration_feeds(target_fn(compressed["det"], "onnxruntime", args.threads), train_images,
                                      max_crops=10 ** 6)
            if len(train["rec"]) < 2:
                raise SystemExit(f"recover --chain: det pruned to {res['models']['det']['mac_ratio']:.3f} of its MACs "
                                 f"finds {len(train['rec'])} text lines on the {len(train_images)} training images, "
                                 "so cls / rec have no crops to recover on: its recovery failed "
                                 f"({res['models']['det']['distill']})")
    fns = {"onnxruntime fp32, original files": orig,
           f"{args.target}, fold-bn only": {m: target_fn(g, args.target, args.threads) for m, g in graphs.items()},
           f"{args.target}, pruned + distilled": {m: target_fn(g, args.target, args.threads)
                                                   for m, g in compressed.items()}}
    for k, f in fns.items():
        res.setdefault("char_acc", {})[k] = metric(f, val)
        print(f"{k}: char accuracy {res['char_acc'][k]:.2f} %", flush=True)
    for m in FILES:  # which compressed model costs what: only it swapped into the original pipeline
        if getattr(args, f"{m}_macs") < 1:
            res.setdefault("char_acc_only", {})[m] = metric({**orig, m: fns[f"{args.target}, pruned + distilled"][m]}, val)
            print(f"only {m} compressed: char accuracy {res['char_acc_only'][m]:.2f} %", flush=True)
    ims = [d["image"] for d in val[:args.n_time]]
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    per = interleaved(end_to_end_runs(fns, ims), args.rounds, 1, clock=clock)
    e2e = {k: 1e3 * float(np.median(v)) / len(ims) for k, v in per.items()}
    base = e2e["onnxruntime fp32, original files"]
    res["end_to_end_ms_per_image"] = e2e
    res["speedup_vs_onnxruntime_original"] = {k: base / v for k, v in e2e.items()}
    res["clock"] = "thread CPU time" if args.threads == 1 else "wall"
    for k in fns:
        print(f"{k}: {e2e[k]:.1f} ms/image ({res['clock']}), {base / e2e[k]:.2f}x, char acc {res['char_acc'][k]:.2f} %")
    return _write_result(res, args.out, "recover.json")


def main(argv=None) -> dict:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "feasibility":
        return feasibility(argv[1:])
    if argv and argv[0] == "search":
        return search_main(argv[1:])
    if argv and argv[0] == "recover":
        return recover_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/ocr")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads for torch and onnxruntime (default 1: with 2 torch threads on a busy "
                         "2-core box the reference ran ~50x slower, det 3.2 s vs 0.06 s per call)")
    ap.add_argument("--no-reference", action="store_true", help="only onnxruntime on the original files")
    args = ap.parse_args(argv)

    from qcompile.models.thirdparty import fetch_rapidocr_models

    import torch
    torch.set_num_threads(args.threads)
    paths = fetch_rapidocr_models()
    set_characters(load_characters(paths[FILES["rec"]]))
    data = make_dataset(args.n, args.seed)
    machine = _machine(args.threads)
    result = {"machine": machine, "n_images": args.n, "seed": args.seed, "gt_lines": sum(len(d["gt"]) for d in data), "threads": args.threads}

    variants = {"onnxruntime (original files)": {m: ort_fn(paths[f], args.threads) for m, f in FILES.items()}}
    if not args.no_reference:
        from qcompile.frontends import load_model
        from qcompile.passes import PassManager, parse_pipeline
        from qcompile.search.pipeline import reference_fn

        ref = {}
        t0 = time.perf_counter()
        for m, f in FILES.items():
            lm = load_model(str(paths[f]), {"x": INPUT_SHAPES[m]})
            g = PassManager(parse_pipeline("fold-bn,dead-code")).run(lm.graph)
            ref[m] = reference_fn(g)
        variants["qcompile reference (fold-bn,dead-code)"] = ref
        result["qcompile_load_seconds"] = time.perf_counter() - t0

    for name, fns in variants.items():
        t = time.perf_counter()
        ev = evaluate(fns, data)
        ev["eval_seconds"] = time.perf_counter() - t
        ev["latency_ms_batch1"] = latency(fns, data, args.reps)
        result[name] = ev
        print(f"== {name}")
        print(f"  char accuracy {ev['char_acc']:.2f} % (ignoring spaces {ev['char_acc_ignoring_spaces']:.2f} %) | GT lines {ev['gt_lines']}, detected boxes {ev['detected']}, "
              f"matched {ev['matched']}, exact lines {ev['exact_lines']}, cls rot180>0.9 errors {ev['cls_rot180_errors']}")
        lat = ev["latency_ms_batch1"]
        print("  latency (median ms, batch 1): " + ", ".join(f"{k} {v:.1f}" for k, v in lat.items()))
        for gt, pred in ev["examples"][:5]:
            print(f"    miss: gt={gt!r} pred={pred!r}")
    names = list(variants)
    if len(names) == 2:
        a, b = (result[n]["texts"] for n in names)
        pairs = [(x, y) for ia, ib in zip(a, b) for x, y in zip(ia, ib)]
        same_boxes = sum(len(ia) == len(ib) and all(x[0] == y[0] for x, y in zip(ia, ib)) for ia, ib in zip(a, b))
        same_text = sum(x[1] == y[1] for x, y in pairs)
        result["agreement"] = {"images_same_boxes": same_boxes, "lines_same_text": same_text, "lines": len(pairs)}
        print(f"agreement {names[1]} vs {names[0]}: images with identical boxes {same_boxes}/{len(a)}, "
              f"identical line strings {same_text}/{len(pairs)}")
    result["loadavg_at_end"] = __import__("os").getloadavg()
    print(f"machine: {machine}; load average at end {result['loadavg_at_end']} (latencies are noisy on a shared box)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ocr_pipeline.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out / 'ocr_pipeline.json'}")
    return result


if __name__ == "__main__":
    main()
