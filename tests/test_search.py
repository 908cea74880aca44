"""Compression search (qcompile.search): workload-keyed latency cache, predictor, NSGA-II front.

Small on purpose: the bundled digits CNN on onnxruntime, tiny populations; every test uses its own
cache file under tmp_path.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qcompile.search import Budget, LatencyCache, LayerConfig, SearchSpace, non_dominated, search
from qcompile.search.nsga import dominates

DIGITS = "qcompile.models.digits:digits_cnn"


@pytest.fixture(scope="module")
def digits():
    from qcompile.frontends import load_model
    from qcompile.passes import PassManager, parse_pipeline

    m = load_model(DIGITS, num_calibration=8)
    graph = PassManager(parse_pipeline("fold-bn,dead-code")).run(m.graph)
    return graph, m.calibration, SearchSpace(graph, m.calibration)


def test_space_covers_layers_and_choices(digits):
    _, _, space = digits
    names = [la.name for la in space.layers]
    assert names == ["stem.0", "res_conv1.0", "res_conv2", "branch1.0", "branch3.0", "conv_out.0", "fc"]
    fc, conv = space.layer("fc"), space.layer("conv_out.0")
    assert [c.label for c in fc.choices] == ["fp32", "int8", "int4"]  # linear: no Tucker-2
    assert any(c.rank and c.bits == 8 for c in conv.choices)
    for c in conv.choices:
        assert LayerConfig.parse(c.label) == c
    g = space.layer_graph("conv_out.0", LayerConfig(8, conv.choices[-1].rank))
    assert [n.op for n in g.nodes].count("conv2d") == 3 and "dequantize_linear" in [n.op for n in g.nodes]
    f32, f4 = space.features("conv_out.0", LayerConfig()), space.features("conv_out.0", LayerConfig(4))
    assert f4[space.FEATURES.index("bits")] == 4 and f4[1] < f32[1]  # fewer weight bytes


def test_cache_reuses_measurements_and_keys_on_workload(digits, tmp_path):
    graph, _, space = digits
    path = tmp_path / "onnxruntime.json"
    pairs = [("res_conv1.0", LayerConfig()), ("res_conv1.0", LayerConfig(8)), ("fc", LayerConfig(4))]
    graphs = {p: space.layer_graph(*p) for p in pairs}
    first = LatencyCache("onnxruntime", path)
    t1 = first.measure(graphs)
    assert first.misses == 3 and first.hits == 0 and all(t > 0 for t in t1.values())
    second = LatencyCache("onnxruntime", path)  # a new process would start like this
    t2 = second.measure(graphs)
    assert second.misses == 0 and second.hits == 3 and t2 == t1
    doc = json.loads(path.read_text())
    assert doc["backend"] == "onnxruntime" and len(doc["entries"]) == 3

    # res_conv1.0 and res_conv2 have the same shapes and attributes: different names and weights,
    # one workload
    key = second.key
    assert key(space.layer_graph("res_conv2", LayerConfig())) == key(graphs[pairs[0]])
    g = graphs[pairs[0]].clone()
    w = g.nodes[0].inputs[1]
    g.constants[w] = np.ones_like(g.constants[w])
    assert key(g) == key(graphs[pairs[0]])
    # ... but bits and shapes are part of it
    assert key(space.layer_graph("res_conv1.0", LayerConfig(4))) != key(graphs[pairs[1]])
    assert key(space.layer_graph("branch3.0", LayerConfig())) == key(graphs[pairs[0]])
    assert key(space.layer_graph("conv_out.0", LayerConfig())) != key(graphs[pairs[0]])
    assert LatencyCache("onnxruntime", path, target="another cpu").key(g) != key(g)


def test_cache_file_survives_concurrent_writers(tmp_path):
    path = tmp_path / "latency" / "x.json"
    script = textwrap.dedent(f"""
        import sys
        from qcompile.search.latency_cache import LatencyCache
        c = LatencyCache("x", {str(path)!r}, target="t")
        for i in range(40):
            c.record({{f"{{sys.argv[1]}}-{{i}}": {{"seconds": i * 1e-6}}}})
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, tag]) for tag in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    doc = json.loads(path.read_text())  # valid JSON
    assert set(doc["entries"]) == {f"{t}-{i}" for t in "ab" for i in range(40)}
    assert not [p for p in path.parent.iterdir() if p.suffix == ".tmp"]


@pytest.fixture(scope="module")
def searched(digits, tmp_path_factory):
    graph, calib, space = digits
    cache = LatencyCache("onnxruntime", tmp_path_factory.mktemp("lat") / "onnxruntime.json")
    return search(graph, calib, space=space, cache=cache, budget=Budget(memory=0.6, max_error=0.5),
                  pop_size=8, generations=3, seed=0)


def test_front_is_non_dominated_and_within_budget(searched):
    r = searched
    assert r.feasible and r.front, r.message
    for p in r.front:
        assert p.measured and p.error <= 0.5 and p.memory_ratio <= 0.6
        assert 0 < p.memory_ratio <= 1
    for a in r.front:
        for b in r.front:
            assert a is b or not dominates(a.objectives(), b.objectives())
    assert non_dominated(r.front) == r.front
    json.dumps(r.to_json())  # serializable


def test_predictor_saves_measurements(digits, searched, tmp_path):
    graph, calib, space = digits
    assert searched.measurements == searched.cache["misses"] <= searched.pairs_measured < searched.space_size
    assert searched.measurements_saved == searched.space_size - searched.pairs_measured > 0
    everything = search(graph, calib, space=space, cache=LatencyCache("onnxruntime", tmp_path / "o.json"),
                        use_predictor=False, pop_size=4, generations=1)
    assert everything.pairs_measured == everything.space_size and everything.measurements_saved == 0
    assert everything.measurements > searched.measurements  # distinct workloads timed


def test_infeasible_latency_budget_is_named(digits, tmp_path):
    graph, calib, space = digits
    r = search(graph, calib, space=space, cache=LatencyCache("onnxruntime", tmp_path / "o.json"),
               budget=Budget(latency=0.01), pop_size=4, generations=1)
    assert not r.feasible and r.front == []
    assert "latency budget 0.01x" in r.message and "best reachable" in r.message
    assert r.best["latency_ratio"] > 0.01
