"""Hostile and broken inputs, and interrupts, through the real CLI (issue 8).

One table (:data:`CASES`) drives ``qcompile.cli.main`` over every kind of unusable input: truncated,
random, empty and mislabelled model files, opsets too new / too old / from an unknown domain, shapes
(dynamic without ``--input-shape``, wrong rank, unknown input, non-positive, huge), declared sizes
with no data behind them, external data escaping the model's folder, pickled checkpoints, impossible
search budgets and targets this machine cannot serve.  Every row asserts the exit code (2: the input
is unusable), a message naming the problem (file / op / node / value / dimension / opset), no
traceback, that nothing was written (the output's parent folder is still empty: no temporary or
staging folder left beside it), and for the huge shapes that nothing near their size was allocated.

The rest interrupts cache writes (latency cache, tuning database, third-party model cache) and the
CLI itself with KeyboardInterrupt: a cache file is then its old or its new complete content, never a
partial one, and the CLI exits 130 with one short line.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qcompile.cli import main

DIGITS = "qcompile.models.digits:digits_cnn"
SEARCH_SMALL = ["--pop", "4", "--generations", "1", "--ranks-per-layer", "1", "--bits", "8", "--finalists", "1",
                "--rounds", "1", "--threads", "1", "--num-calib", "4"]
HUGE = "1x3x100000x100000"  # 3e10 elements: 112 GiB as float32
MiB = 1 << 20


# ---------------------------------------------------------------------------- model builders
def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits=(), opset=17, ir_version=8, extra_opsets=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets], ir_version=ir_version)


def _relu(shape=(1, 3, 8, 8), **kw):
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu1")], [_vi("x", list(shape))],
                  [_vi("y", list(shape))], **kw)


def _conv_bytes():
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 3, 3, 3)).astype(np.float32), "w")
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv1")], [_vi("x", [1, 3, 8, 8])],
                  [_vi("y", [1, 16, 6, 6])], [w]).SerializeToString()


def _save(d: Path, name: str, model: onnx.ModelProto) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(model, d / name)
    return d / name


def _write(d: Path, name: str, data: bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)
    return d / name


def _external(d: Path, location: str, dims=(16, 3, 3, 3), data_bytes: int | None = None) -> Path:
    """``d/sub/m.onnx`` whose conv weight ``w`` lives in external data at ``location``; with
    ``data_bytes`` a ``sub/w.bin`` of that many bytes is written (the declared dims may need more)."""
    sub = d / "sub"
    sub.mkdir(parents=True, exist_ok=True)
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=list(dims))
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    if data_bytes is not None:
        (sub / "w.bin").write_bytes(b"\0" * data_bytes)
    (d / "secret.bin").write_bytes(b"\0" * 4 * 16 * 27)  # exactly the weight's size: only the path is wrong
    m = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv1")], [_vi("x", [1, 3, 8, 8])],
               [_vi("y", [1, 16, 6, 6])], [w])
    return _save(sub, "m.onnx", m)


def _symlinked_external(d: Path) -> Path:
    path = _external(d, "w.bin")
    (path.parent / "w.bin").symlink_to(d / "secret.bin")  # inside by name, outside once resolved
    return path


def _huge_constant(d: Path, raw: bytes | None) -> Path:
    """An initializer declaring 2^40 elements (4 TiB as float32) with no data, or only ``raw``."""
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20])
    if raw is not None:
        big.raw_data = raw
    m = _model([helper.make_node("ReduceSum", ["big"], ["s"], name="sum_big", keepdims=0),
                helper.make_node("Add", ["x", "s"], ["y"], name="add")], [_vi("x", [1])], [_vi("y", [1])], [big])
    return _save(d, "huge_const.onnx", m)


def _huge_intermediate(d: Path) -> Path:
    shape = numpy_helper.from_array(np.array([1, 3, 100000, 100000], np.int64), "shape")
    m = _model([helper.make_node("Expand", ["x", "shape"], ["y"], name="big_expand")], [_vi("x", [1, 3, 1, 1])],
               [_vi("y", [1, 3, 100000, 100000])], [shape])
    return _save(d, "expand.onnx", m)


def _unknown_domain(d: Path) -> Path:
    m = _model([helper.make_node("Relu", ["x"], ["r"], name="relu1"),
                helper.make_node("Warp", ["r"], ["y"], name="warp_1", domain="acme.vision")],
               [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 3, 8, 8])], extra_opsets=[helper.make_opsetid("acme.vision", 1)])
    return _save(d, "vendor.onnx", m)


def _unconvertible(d: Path) -> Path:
    """Opset 7 BatchNormalization with ``spatial=0`` (per-element statistics): ONNX's version converter
    has no upgrade for it."""
    ins = [_vi("x", [1, 2])] + [_vi(n, [2]) for n in ("scale", "bias", "mean", "var")]
    bn = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn7", spatial=0)
    return _save(d, "bn7.onnx", _model([bn], ins, [_vi("y", [1, 2])], opset=7, ir_version=3))


def _torch_zip(d: Path) -> Path:
    import torch

    d.mkdir(parents=True, exist_ok=True)
    torch.save({"conv.weight": torch.zeros(2, 2)}, d / "weights.bin")  # torch.save's zip format, misnamed
    return d / "weights.bin"


def _host_has(flag: str) -> bool:
    try:
        return any(flag in line.split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("flags"))
    except OSError:
        return True


def _fake_latency(monkeypatch) -> None:
    """Deterministic per-graph 'latencies' (proportional to weight bytes): the search logic runs for real,
    without timing anything (the table checks refusals, not measurements)."""
    from qcompile.search import latency_cache

    def fake(graphs, backend, threads=None):
        return {k: 1e-6 + 1e-9 * sum(c.nbytes for c in g.constants.values()) for k, g in graphs.items()}

    monkeypatch.setattr(latency_cache, "_measure_interleaved", fake)


# ---------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    build: Callable[[Path, pytest.MonkeyPatch], list]  # (input folder, monkeypatch) -> argv without -o
    needles: list[str]  # substrings of stderr, each naming the problem
    rc: int = 2
    huge: bool = False  # also assert that nothing near the declared size was allocated
    marks: list = field(default_factory=list)


def _compile(path_fn, *extra):
    return lambda d, mp: ["compile", path_fn(d), *extra]


def _dynamic_with_shape(shape: str):
    """``compile`` of a relu model with dynamic N, H, W, given ``--input-shape shape``."""
    return _compile(lambda d: _save(d, "dyn.onnx", _relu(("N", 3, "H", "W"))), "--input-shape", shape)


def _no_rpc(mp):
    for var in ("QCOMPILE_RPC", "QCOMPILE_RPC_TRACKER", "QCOMPILE_RPC_KEY"):
        mp.delenv(var, raising=False)


CASES = [
    # --- unreadable files
    Case("truncated", _compile(lambda d: _write(d, "trunc.onnx", _conv_bytes()[:200])),
         ["trunc.onnx", "not a readable ONNX model", "truncated or corrupt"]),
    Case("random-bytes", _compile(lambda d: _write(d, "random.onnx", np.random.default_rng(1).bytes(4096))),
         ["random.onnx", "not a readable ONNX model"]),
    Case("garbage-protobuf", _compile(lambda d: _write(d, "broken.onnx", b"\x08\x07garbage-not-a-model" * 10)),
         ["broken.onnx", "not a readable ONNX model"]),
    Case("zero-bytes", _compile(lambda d: _write(d, "empty.onnx", b"")), ["empty.onnx", "is empty (0 bytes)"]),
    Case("missing-file", _compile(lambda d: d / "nope.onnx"), ["nope.onnx", "does not exist"]),
    Case("ir-version-too-new", _compile(lambda d: _save(d, "ir99.onnx", _relu(ir_version=99))),
         ["ir99.onnx", "ir_version 99"]),
    # --- opsets and domains
    Case("opset-too-new", _compile(lambda d: _save(d, "future.onnx", _relu(opset=99))),
         ["future.onnx", "opset 99, newer than the newest", f"opset {onnx.defs.onnx_opset_version()}"]),
    Case("opset-too-old", _compile(lambda d: _save(d, "ancient.onnx", _relu(opset=1))),
         ["ancient.onnx", "opset 1, older than the oldest supported (opset 7"]),
    Case("opset-cannot-be-upgraded", _compile(_unconvertible),
         ["bn7.onnx", "cannot upgrade opset 7 to 13", "spatial"]),
    Case("unknown-domain", _compile(_unknown_domain), ["unsupported op 'acme.vision::Warp'", "node 'warp_1'"]),
    # --- shapes
    Case("dynamic-without-input-shape", _compile(lambda d: _save(d, "dyn.onnx", _relu(("N", 3, "H", "W")))),
         ["input 'x' has dynamic dimension(s) 0 ('N'), 2 ('H'), 3 ('W')", "--input-shape x=1x3xHxW"]),
    Case("torch-factory-without-shapes", lambda d, mp: ["compile", "torch.nn:Identity"],
         ["model 'torch.nn:Identity' gives no example inputs", "--input-shape"]),
    Case("input-shape-wrong-rank",
         _dynamic_with_shape("x=1x3x8"),
         ["input 'x' has rank 4", "1x3x8 has rank 3"]),
    Case("input-shape-unknown-input",
         _dynamic_with_shape("image=1x3x8x8"),
         ["given for ['image']", "the model's inputs are ['x']"]),
    Case("input-shape-contradicts-model",
         _dynamic_with_shape("x=1x4x8x8"),
         ["input 'x' dimension 1 is fixed to 3", "says 4"]),
    Case("input-shape-negative",
         _dynamic_with_shape("x=1x3x-8x8"),
         ["bad --input-shape 'x=1x3x-8x8'", "dimension 2 is -8"]),
    Case("input-shape-zero",
         _dynamic_with_shape("x=1x3x0x8"),
         ["bad --input-shape 'x=1x3x0x8'", "dimension 2 is 0"]),
    Case("input-shape-not-a-number", lambda d, mp: ["compile", DIGITS, "--input-shape", "image=1xAx8"],
         ["bad --input-shape 'image=1xAx8'"]),
    # --- huge declared sizes: refused on shapes, nothing allocated
    Case("huge-input-shape",
         _dynamic_with_shape(f"x={HUGE}"),
         ["--input-shape x", HUGE, "30,000,000,000 elements", "over the limit"], huge=True),
    Case("huge-input-shape-torch", lambda d, mp: ["compile", DIGITS, "--input-shape", f"image={HUGE}"],
         ["--input-shape image", HUGE, "over the limit"], huge=True),
    Case("huge-declared-input", _compile(lambda d: _save(d, "huge.onnx", _relu((1, 3, 100000, 100000)))),
         ["huge.onnx", "input 'x' has shape " + HUGE, "over the limit"], huge=True),
    Case("huge-intermediate", _compile(_huge_intermediate),
         ["expand.onnx", "'y' (output of node 'big_expand') has shape " + HUGE, "over the limit"], huge=True),
    Case("huge-constant-without-data", _compile(lambda d: _huge_constant(d, None)),
         ["huge_const.onnx", "constant 'big' has shape 1048576x1048576", "1,099,511,627,776 elements"], huge=True),
    Case("huge-constant-short-data", _compile(lambda d: _huge_constant(d, b"\0" * 64)),
         ["huge_const.onnx", "constant 'big' has shape 1048576x1048576"], huge=True),
    Case("huge-external-constant", _compile(lambda d: _external(d, "w.bin", dims=(1 << 20, 1 << 20), data_bytes=64)),
         ["m.onnx", "constant 'w' has shape 1048576x1048576"], huge=True),
    # --- external data
    Case("external-data-dotdot", _compile(lambda d: _external(d, "../secret.bin")),
         ["m.onnx", "tensor 'w'", "'../secret.bin', which is outside the model's folder"]),
    Case("external-data-deep-dotdot", _compile(lambda d: _external(d, "../../../../etc/passwd")),
         ["tensor 'w'", "'../../../../etc/passwd', which is outside the model's folder"]),
    Case("external-data-absolute", _compile(lambda d: _external(d, str(d / "secret.bin"))),
         ["tensor 'w'", "secret.bin', which is outside the model's folder"]),
    Case("external-data-symlink", _compile(_symlinked_external),
         ["tensor 'w'", "'w.bin', which is outside the model's folder"]),
    Case("external-data-missing", _compile(lambda d: _external(d, "w.bin")),
         ["external data file 'w.bin' for tensor 'w' is missing"]),
    Case("external-data-too-short", _compile(lambda d: _external(d, "w.bin", data_bytes=100)),
         ["tensor 'w' declares shape 16x3x3x3 (1,728 bytes of data)", "'w.bin' is 100 bytes"]),
    # --- checkpoints: never unpickled
    Case("torch-checkpoint-pt", _compile(lambda d: _write(d, "model.pt", pickle.dumps({"w": [1.0]}))),
         ["model.pt", "pickled torch checkpoint", "never unpickles"]),
    Case("pickle-named-onnx", _compile(lambda d: _write(d, "model.onnx", pickle.dumps({"w": [1.0]}))),
         ["model.onnx", "looks like a Python pickle", "never unpickles"]),
    Case("torch-zip-checkpoint", _compile(_torch_zip), ["weights.bin", "zipped torch checkpoint", "never unpickles"]),
    # --- budgets
    Case("search-impossible-latency",
         lambda d, mp: (_fake_latency(mp), ["search", DIGITS, "--budget", "latency=0.001x", *SEARCH_SMALL])[1],
         ["latency budget 0.001x", "cannot be met", "generation 1/1"]),
    Case("search-impossible-memory",
         lambda d, mp: (_fake_latency(mp), ["search", DIGITS, "--budget", "memory=0.001x", *SEARCH_SMALL])[1],
         ["memory budget 0.001x", "cannot be met", "nothing was measured"]),
    Case("search-bad-budget", lambda d, mp: ["search", DIGITS, "--budget", "latency=-2x"],
         ["--budget latency=-2x", "must be positive"]),
    Case("search-bad-budget-key", lambda d, mp: ["search", DIGITS, "--budget", "speed=2x"],
         ["bad --budget item 'speed=2x'"]),
    # --- outputs that cannot be written: refused before any work
    Case("output-on-a-virtual-fs", lambda d, mp: ["compile", DIGITS, "-o", "/proc/qcompile-nope/out"],
         ["cannot write the output '/proc/qcompile-nope/out'", "nothing can be created in '/proc'"],
         marks=[pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")]),
    Case("output-below-a-file",
         lambda d, mp: ["compile", DIGITS, "-o", _write(d, "file.txt", b"user data") / "out"],
         ["cannot write the output", "file.txt' is a file, not a folder"]),
    # --- targets
    Case("unknown-target", _compile(lambda d: _save(d, "ok.onnx", _relu()), "-t", "gpu9000"),
         ["unknown target 'gpu9000'", "tvm-x86"]),
    Case("arm64-without-board",
         lambda d, mp: (_no_rpc(mp), ["compile", _save(d, "ok.onnx", _relu()), "-t", "tvm-arm64"])[1],
         ["tvm-arm64 runs on a remote board", "QCOMPILE_RPC"]),
    Case("arm64-board-unreachable",
         lambda d, mp: (_no_rpc(mp), mp.setenv("QCOMPILE_RPC", "127.0.0.1:9"),
                        ["compile", _save(d, "ok.onnx", _relu()), "-t", "tvm-arm64"])[2],
         ["cannot reach the arm64 device", "127.0.0.1:9"]),
    Case("arm64-board-address-malformed",
         lambda d, mp: (_no_rpc(mp), mp.setenv("QCOMPILE_RPC", "nonsense"),
                        ["compile", _save(d, "ok.onnx", _relu()), "-t", "tvm-arm64"])[2],
         ["QCOMPILE_RPC='nonsense' is not host:port"]),
    Case("x86-unknown-mcpu",
         _compile(lambda d: _save(d, "ok.onnx", _relu()), "-t", "tvm-x86", "--mcpu", "nonsense-cpu"),
         ["LLVM does not know the x86 CPU 'nonsense-cpu'"]),
    Case("x86-mcpu-this-cpu-cannot-run",
         _compile(lambda d: _save(d, "ok.onnx", _relu()), "-t", "tvm-x86", "--mcpu", "sapphirerapids"),
         ["cannot run code for 'sapphirerapids'", "it lacks"],
         marks=[pytest.mark.skipif(_host_has("amx_tile"), reason="this CPU can run sapphirerapids code")]),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_hostile_input_is_refused_by_name_and_nothing_is_written(case, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))  # reproducers and latencies stay here
    args = case.build(tmp_path / "in", monkeypatch)
    parent = tmp_path / "run"
    parent.mkdir()
    out = parent / "out"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if case.huge:
        tracemalloc.start()
    try:
        rc = main([str(a) for a in args] + ([] if "-o" in args else ["-o", str(out)]))
    finally:
        if case.huge:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    err = capsys.readouterr().err
    assert rc == case.rc, err
    for needle in case.needles:
        assert needle in err, (needle, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert not out.exists() and list(parent.iterdir()) == []  # nothing partial, no temporary sibling
    assert not (tmp_path / "cache" / "repro").exists()  # an input error is not a qcompile bug: no reproducer
    if case.huge:  # the declared tensor is >= 1 GiB; nothing of that order was allocated
        assert peak < 64 * MiB, peak
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0 < 512 * MiB


def test_the_tensor_limit_is_configurable(tmp_path, monkeypatch, capsys):
    """The limit is on shapes, so a small one turns an ordinary model away by name; the default takes it."""
    path = _save(tmp_path, "ok.onnx", _relu())
    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QCOMPILE_MAX_TENSOR_ELEMENTS", "100")
    assert main(["inspect", str(path)]) == 2
    assert "input 'x' has shape 1x3x8x8: 192 elements" in capsys.readouterr().err
    monkeypatch.delenv("QCOMPILE_MAX_TENSOR_ELEMENTS")
    assert main(["inspect", str(path)]) == 0


# ---------------------------------------------------------------------------- interrupts
def _interrupt(*_a, **_k):
    raise KeyboardInterrupt


@pytest.mark.parametrize("point", ["mid-write", "fsync", "replace"])
def test_interrupted_atomic_write_keeps_the_old_file(tmp_path, monkeypatch, point):
    """Every cache file goes through ``atomic_write``: Ctrl-C at any point leaves the old content."""
    from qcompile import cache

    path = tmp_path / "c" / "latency.json"
    cache.atomic_write(path, '{"old": 1}')
    if point == "mid-write":
        real_fdopen = os.fdopen

        class HalfFile:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])
                self.f.flush()
                raise KeyboardInterrupt

        monkeypatch.setattr(cache.os, "fdopen", lambda fd, mode: HalfFile(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(cache.os, point, _interrupt)
    with pytest.raises(KeyboardInterrupt):
        cache.atomic_write(path, json.dumps({"new": list(range(1000))}))
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["latency.json"]  # no temporary file left


def test_interrupted_search_exits_130_and_keeps_the_latency_cache_valid(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second latency measurement of `qcompile search`: exit 130 with one line, the cache
    holds exactly the first batch's complete entries, and nothing is written at OUT."""
    from qcompile.search import latency_cache

    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    calls = []

    def measure(graphs, backend, threads=None):
        calls.append(len(graphs))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {k: 1e-6 for k in graphs}

    monkeypatch.setattr(latency_cache, "_measure_interleaved", measure)
    parent = tmp_path / "run"
    parent.mkdir()
    rc = main(["search", DIGITS, "-o", str(parent / "out"), *SEARCH_SMALL])
    err = capsys.readouterr().err
    assert rc == 130 and err.strip().splitlines()[-1] == "qcompile: interrupted" and "Traceback" not in err
    assert list(parent.iterdir()) == []
    [cache_file] = (tmp_path / "cache" / "latency").glob("*.json")
    doc = json.loads(cache_file.read_text())
    assert len(doc["entries"]) == calls[0] and all("seconds" in e for e in doc["entries"].values())
    assert not [p for p in cache_file.parent.iterdir() if p.name.endswith(".tmp")]


def test_interrupted_compile_exits_130_without_traceback_or_output(tmp_path, monkeypatch, capsys):
    from qcompile.backends import onnxruntime_backend

    def build(self, graph, out_dir, options=None):
        (Path(out_dir) / "model.onnx").write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(onnxruntime_backend.OnnxRuntimeBackend, "build", build)
    parent = tmp_path / "run"
    parent.mkdir()
    assert main(["compile", DIGITS, "-o", str(parent / "out")]) == 130
    assert capsys.readouterr().err == "qcompile: interrupted\n"
    assert list(parent.iterdir()) == []
    assert not (tmp_path / "cache" / "repro").exists()  # Ctrl-C is not a bug report


def test_interrupted_model_fetch_leaves_no_partial_model(tmp_path, monkeypatch):
    """The third-party model cache: an interrupt while extracting leaves the old folder (here: an earlier,
    corrupt copy) untouched and no staging folder; one between removing the old copy and renaming the new
    one leaves no folder at all (the next call fetches again), never a partial one."""
    from qcompile.models import thirdparty as T

    package = T.RAPIDOCR
    dest = tmp_path / "models" / package.replace("==", "-")
    dest.mkdir(parents=True)
    (dest / "ch_ppocr_mobile_v2.0_cls_infer.onnx").write_bytes(b"old, corrupt copy")
    monkeypatch.setattr(T, "_download_wheel", lambda pkg, into: _write(into, "fake.whl", b"PK"))

    def extract_half(wheel, pkg, members, staging):
        (staging / members[0].file_name).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "_extract", extract_half)
    with pytest.raises(KeyboardInterrupt):
        T.fetch_package(package, tmp_path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [dest.name]
    assert (dest / "ch_ppocr_mobile_v2.0_cls_infer.onnx").read_bytes() == b"old, corrupt copy"

    def extract_complete(wheel, pkg, members, staging):
        for m in members:
            (staging / m.file_name).write_bytes(b"new")

    monkeypatch.setattr(T, "_extract", extract_complete)
    monkeypatch.setattr(T.os, "replace", _interrupt)
    with pytest.raises(KeyboardInterrupt):
        T.fetch_package(package, tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_torn_tuning_database_is_repaired_and_loads(tmp_path):
    """A tuning run killed in the middle of MetaSchedule's append leaves a torn last line, which would make
    MetaSchedule refuse the whole database; ``repair_database`` keeps every complete entry."""
    import tvm
    from tvm import te
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    from qcompile.backends.tvm import tuning

    a = te.placeholder((8,), name="a")
    f = te.create_prim_func([a, te.compute((8,), lambda i: a[i] * 2.0, name="b")])
    mod = tvm.IRModule({"main": f})
    db = ms.database.JSONDatabase(work_dir=str(tmp_path))
    w = db.commit_workload(mod)
    db.commit_tuning_record(ms.database.TuningRecord(Schedule(mod).trace, w, [1e-6], tvm.target.Target("llvm"),
                                                     ms.arg_info.ArgInfo.from_prim_func(f)))
    del db
    wpath, rpath = tmp_path / "database_workload.json", tmp_path / "database_tuning_record.json"
    intact = (wpath.read_text(), rpath.read_text())
    with open(wpath, "a") as fw, open(rpath, "a") as fr:
        fw.write('["12345", {"root": 1, "nodes": [')  # torn appends
        fr.write('[1, [[[], []], [1e-06')
    with pytest.raises(Exception):  # what the torn files do to MetaSchedule
        ms.database.JSONDatabase(work_dir=str(tmp_path))
    logged = []
    tuning.repair_database(tmp_path, logged.append)
    assert (wpath.read_text(), rpath.read_text()) == intact and "dropped 1 workload and 1 record" in logged[0]
    db = ms.database.JSONDatabase(work_dir=str(tmp_path))
    assert db.has_workload(mod) and len(db) == 1  # the complete workload and record survived
    tuning.repair_database(tmp_path, logged.append)  # intact files: untouched, nothing logged
    assert len(logged) == 1
    (tmp_path / "choices.json").write_text('{"abc": {"use": "tun')  # torn by a pre-atomic version
    assert tuning._read_choices(tmp_path / "choices.json") == {}
