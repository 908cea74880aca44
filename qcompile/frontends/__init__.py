"""Model loading: one entry point for ONNX files and torch factories.

``load_model(spec)`` accepts

* a path to an ``.onnx`` file (any standard opset-11+ CNN; dynamic dims are
  specialised with ``input_shapes``);
* ``package.module:factory`` — a callable returning an ``nn.Module`` (or a
  ``(module, example_inputs)`` tuple).  Example inputs come from the tuple, the
  module's ``example_inputs`` attribute, or ``input_shapes``.  A module may offer
  ``calibration_data()`` (real samples, numpy ``(N, ...)``) and ``input_names``.

It returns a :class:`LoadedModel`: the IR graph plus a *reference* runner that
executes the ORIGINAL model (onnxruntime on the original file, or the torch
module itself), so compiled artifacts are verified against the user's model,
not against our own import of it.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from qcompile.errors import InputError, ModelLoadError, ShapeError
from qcompile.ir.graph import Graph

Feed = dict[str, np.ndarray]


@dataclass
class LoadedModel:
    graph: Graph
    reference: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]
    calibration: list[Feed] = field(default_factory=list)
    calibration_source: str = ""
    spec: str = ""
    dataset: str = ""  # the model's labelled data set (``dataset`` attribute: digits, mnist), for accuracy checks


DEFAULT_MAX_TENSOR_ELEMENTS = 1 << 28
"""Largest tensor (elements) a model may declare or compute: 1 GiB as float32, e.g. 1x64x2048x2048.
``$QCOMPILE_MAX_TENSOR_ELEMENTS`` overrides it.  Checked on shapes alone, before anything is allocated,
so a hostile or mistyped shape (1x3x100000x100000) fails with its name instead of exhausting memory."""

_ITEMSIZE = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2, "int16": 2}


def max_tensor_elements() -> int:
    text = os.environ.get("QCOMPILE_MAX_TENSOR_ELEMENTS", "")
    try:
        return int(text) if text else DEFAULT_MAX_TENSOR_ELEMENTS
    except ValueError:
        raise InputError(f"QCOMPILE_MAX_TENSOR_ELEMENTS must be an integer, not '{text}'") from None


def check_tensor_size(what: str, shape: Sequence[int], dtype: str = "float32", hint: str = "") -> None:
    """ShapeError naming ``what`` when a tensor of ``shape`` would exceed :func:`max_tensor_elements`
    (computed with Python integers: no overflow, nothing allocated)."""
    n = math.prod(int(d) for d in shape)
    limit = max_tensor_elements()
    if n > limit:
        gib = n * _ITEMSIZE.get(dtype, 1) / 2**30
        raise ShapeError(f"{what} has shape {'x'.join(str(int(d)) for d in shape)}: {n:,} elements "
                         f"({gib:,.3g} GiB as {dtype}), over the limit of {limit:,} elements per tensor; "
                         f"{hint or 'give smaller input shapes (--input-shape)'}, or raise "
                         "QCOMPILE_MAX_TENSOR_ELEMENTS if the machine really has the memory")


def check_graph_sizes(graph: Graph) -> None:
    """:func:`check_tensor_size` for every input, computed value and constant of ``graph`` (inputs
    first, then in node order, naming the producing node)."""
    for name in graph.inputs:
        t = graph.types[name]
        check_tensor_size(f"input '{name}'", t.shape, t.dtype)
    for node in graph.nodes:
        for out in node.outputs:
            if out in graph.types:
                t = graph.types[out]
                check_tensor_size(f"value '{out}' (output of node '{node.name}', {node.op})", t.shape, t.dtype)


def parse_input_shapes(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """``["x=1x3x48x192"]`` -> ``{"x": (1, 3, 48, 192)}`` (ShapeError for a shape over
    :func:`max_tensor_elements`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise InputError(f"bad --input-shape '{item}': expected NAME=D1xD2x... with positive integers, "
                             "e.g. x=1x3x48x192") from None
        bad = [k for k, d in enumerate(shape) if d <= 0]
        if bad:
            raise InputError(f"bad --input-shape '{item}': dimension {bad[0]} is {shape[bad[0]]}; every dimension "
                             "must be a positive integer, e.g. x=1x3x48x192")
        check_tensor_size(f"--input-shape {name}", shape)
        shapes[name] = shape
    return shapes


def synthetic_feeds(graph: Graph, n: int = 4, seed: int = 0) -> list[Feed]:
    """Standard-normal float inputs (integers: zeros) shaped exactly like the graph inputs."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n):
        feed = {}
        for name in graph.inputs:
            t = graph.types[name]
            if t.dtype.startswith("float"):
                feed[name] = rng.standard_normal(t.shape).astype(t.dtype)
            else:
                feed[name] = np.zeros(t.shape, t.dtype)
        feeds.append(feed)
    return feeds


def feeds_from_samples(graph: Graph, samples: np.ndarray | Mapping[str, np.ndarray], limit: int) -> list[Feed]:
    """Split sample arrays ``(N, ...)`` into per-call feeds shaped like the graph inputs (batch b:
    consecutive groups of b samples)."""
    if not isinstance(samples, Mapping):
        if len(graph.inputs) != 1:
            raise InputError(f"model has inputs {graph.inputs}; give calibration data as .npz keyed by input name")
        samples = {graph.inputs[0]: samples}
    missing = [i for i in graph.inputs if i not in samples]
    if missing:
        raise InputError(f"calibration data lacks inputs {missing} (has {sorted(samples)})")
    counts = set()
    for name in graph.inputs:
        t = graph.types[name]
        arr = np.asarray(samples[name])
        if tuple(arr.shape[1:]) != t.shape[1:]:
            raise ShapeError(f"calibration data for input '{name}' has sample shape {tuple(arr.shape[1:])}, "
                             f"the model expects {t.shape[1:]}")
        counts.add(arr.shape[0] // t.shape[0])
    n = min(min(counts), limit)
    if n == 0:
        raise InputError("calibration data holds fewer samples than one model batch")
    feeds = []
    for k in range(n):
        feed = {}
        for name in graph.inputs:
            b = graph.types[name].shape[0]
            feed[name] = np.ascontiguousarray(np.asarray(samples[name])[k * b:(k + 1) * b]).astype(
                graph.types[name].dtype)
        feeds.append(feed)
    return feeds


def load_calibration_file(path: str | Path) -> np.ndarray | dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"calibration file '{p}' does not exist")
    try:
        data = np.load(p, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read calibration file '{p}': {e}") from e
    if isinstance(data, np.lib.npyio.NpzFile):
        return {k: data[k] for k in data.files}
    return data


def check_model_spec(spec: str) -> None:
    """Fail fast (ModelLoadError) when ``spec`` cannot name a model, without loading it:
    an ONNX path that does not exist, or a ``module:factory`` that does not resolve."""
    if spec.endswith(".onnx"):
        if not Path(spec).is_file():
            raise ModelLoadError(f"ONNX model '{spec}' does not exist")
    else:
        _resolve_factory(spec)


def _resolve_factory(spec: str) -> Callable[..., Any]:
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ModelLoadError(f"cannot import module '{mod_name}' for model '{spec}': {e}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelLoadError(f"module '{mod_name}' has no attribute '{attr}' (model '{spec}')")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelLoadError(f"'{spec}' is not callable; expected a factory returning an nn.Module")
    return obj


def _load_torch_spec(spec: str, input_shapes: dict[str, tuple[int, ...]], num_calibration: int) -> LoadedModel:
    import torch

    from qcompile.frontends.torch_frontend import load_torch

    made = _resolve_factory(spec)()
    example = None
    if isinstance(made, tuple) and len(made) == 2:
        made, example = made
    if not isinstance(made, torch.nn.Module):
        raise ModelLoadError(f"factory '{spec}' returned {type(made).__name__}, expected torch.nn.Module")
    model = made.eval()
    names = list(getattr(model, "input_names", []) or [])
    if not names:
        names = [p for p in inspect.signature(model.forward).parameters][: max(1, len(input_shapes))]
    if input_shapes:
        unknown = set(input_shapes) - set(names)
        if unknown:
            raise ShapeError(f"--input-shape names {sorted(unknown)} are not inputs of '{spec}' (inputs: {names})")
        example = tuple(torch.zeros(input_shapes[n]) for n in names)
    elif example is None:
        example = getattr(model, "example_inputs", None)
    if example is None:
        raise ShapeError(f"model '{spec}' gives no example inputs: pass --input-shape NAME=1x3x224x224 "
                         "or set an `example_inputs` attribute on the module")
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    graph = load_torch(model, example, input_names=names[: len(example)], name=spec.split(":")[-1])
    graph.meta.setdefault("source", {})["spec"] = spec

    def reference(feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode():
            out = model(*[torch.from_numpy(np.asarray(feed[n])) for n in graph.inputs])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.detach().numpy() for o in outs]

    loaded = LoadedModel(graph, reference, spec=spec, dataset=str(getattr(model, "dataset", "") or ""))
    calib = getattr(model, "calibration_data", None)
    if callable(calib):
        loaded.calibration = feeds_from_samples(graph, calib(), limit=num_calibration)
        loaded.calibration_source = f"{spec} calibration_data() (real samples)"
    return loaded


def _load_onnx_spec(spec: str, input_shapes: dict[str, tuple[int, ...]]) -> LoadedModel:
    from qcompile.backends.onnxruntime_backend import run_onnx_file
    from qcompile.frontends.onnx_frontend import load_onnx

    graph = load_onnx(spec, input_shapes or None)

    def reference(feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return run_onnx_file(spec, dict(feed))

    return LoadedModel(graph, reference, spec=spec)


def load_model(spec: str, input_shapes: dict[str, tuple[int, ...]] | None = None,
               calibration: str | Path | None = None, num_calibration: int = 16) -> LoadedModel:
    """Load ``spec`` (``.onnx`` path or ``module:factory``) into the IR with a reference runner.

    Calibration feeds: from ``calibration`` (.npy / .npz), else the model's own
    ``calibration_data()``, else ``num_calibration`` synthetic normal samples
    (recorded as such in manifests).
    """
    input_shapes = dict(input_shapes or {})
    path = Path(spec)
    if spec.endswith((".pt", ".pth", ".ckpt", ".pkl")):
        raise ModelLoadError(f"'{spec}' looks like a pickled torch checkpoint; qcompile never unpickles files "
                             "(unpickling runs arbitrary code). Give `module:factory` that builds the model "
                             "and loads its weights, or export it to ONNX.")
    if spec.endswith(".onnx") or path.suffix == ".onnx" or (path.exists() and ":" not in spec):
        loaded = _load_onnx_spec(spec, input_shapes)
    elif ":" in spec:
        loaded = _load_torch_spec(spec, input_shapes, num_calibration)
    else:
        raise ModelLoadError(f"model '{spec}' is neither an existing .onnx file nor 'module:factory'")
    check_graph_sizes(loaded.graph)  # before any feed is allocated
    if calibration is not None:
        loaded.calibration = feeds_from_samples(loaded.graph, load_calibration_file(calibration),
                                                limit=num_calibration)
        loaded.calibration_source = f"file {calibration}"
    if not loaded.calibration:
        loaded.calibration = synthetic_feeds(loaded.graph, n=min(num_calibration, 4))
        loaded.calibration_source = "synthetic standard-normal inputs (seed 0): no calibration data given"
    return loaded
