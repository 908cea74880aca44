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


# ---------------------------------------------------------------------- model-level prune ratios
@pytest.fixture(scope="module")
def pruned_space(digits):
    graph, calib, _ = digits
    return SearchSpace(graph, calib, prune_ratios=(0.5, 1.0, 0.75))


def test_prune_ratios_give_pruned_layers_and_scaled_choices(digits, pruned_space):
    _, _, plain = digits
    space = pruned_space
    assert space.prune_ratios == (1.0, 0.75, 0.5)  # sorted, largest first
    assert space.prune_pipeline(1.0) == "" and \
        space.prune_pipeline(0.5) == "prune-channels{macs=0.5,criterion=magnitude}"
    assert space.prune_stats[0.5]["mac_ratio"] <= 0.5
    # the genome: prune-ratio index, then one choice per layer (ratio 1: the unpruned space's choices)
    assert list(space.upper) == [2] + [len(la.choices) - 1 for la in plain.layers]
    assert [la.choices for la in space.layers] == [la.choices for la in plain.layers]
    assert space.decode(space.genome(1.0, [0] * len(space.layers))) == (1.0, {la.name: LayerConfig() for la in
                                                                                space.layers})
    full, half = space.layer("conv_out.0"), space.layer("conv_out.0", 0.5)
    assert half.weight_shape[0] < full.weight_shape[0] and half.weight_shape[1] < full.weight_shape[1]
    assert half.macs < full.macs and space.layer("fc", 0.5).weight_shape[1] < space.layer("fc").weight_shape[1]
    pruned_layers = [n.name for n in space.pruned_graph(0.5).nodes if n.op in ("conv2d", "linear")]
    assert pruned_layers == [la.name for la in space.layers]  # names survive pruning
    assert space.weight_bytes("conv_out.0", LayerConfig(), 0.5) == half.weight_numel * 4
    assert space.other_bytes(0.5) < space.other_bytes()  # pruned biases
    f = space.features("conv_out.0", LayerConfig(), 0.5)
    assert f[space.FEATURES.index("log_macs")] == pytest.approx(np.log1p(half.macs))
    g = space.layer_graph("conv_out.0", LayerConfig(), 0.5)
    assert g.types[g.nodes[0].inputs[1]].shape == half.weight_shape  # a new workload for the latency cache
    # Tucker-2 ranks follow the pruned shapes, or the layer is not factorized where they would not save MACs
    for r in space.prune_ratios:
        for la in space.layers:
            pl = space.layer(la.name, r)
            for c in pl.choices:
                assert LayerConfig.parse(c.label) == c
                if c.rank:
                    assert c.rank[0] <= pl.weight_shape[0] and c.rank[1] <= pl.weight_shape[1]
                    assert space.macs(la.name, c, r) < pl.macs
    tucker8 = LayerConfig(8, (8, 8))
    small = [la.name for la in space.layers
             if tucker8 in la.choices and space.layer(la.name, 0.5).weight_shape[:2] == (8, 8)]
    assert small, "some layer with a Tucker-2 8x8 choice is pruned to 8x8 channels at 0.5"
    choice = space.layer(small[0]).choices.index(tucker8)
    genome = space.genome(0.5, [choice if la.name == small[0] else 0 for la in space.layers])
    assert space.decode(genome).configs[small[0]] == LayerConfig(8)  # 8x8 of an 8x8 layer saves nothing


def test_pruned_point_replays_from_its_pipeline_text(digits, pruned_space):
    from qcompile.passes import PassContext, PassManager, parse_pipeline
    from qcompile.passes.manager import run_reference, within_fp32_tolerance

    graph, calib, _ = digits
    space = pruned_space
    wanted = {"stem.0": "int8", "res_conv1.0": "int4", "conv_out.0": "tucker2[32x24]+int8", "fc": "int8"}
    choices = [[c.label for c in la.choices].index(wanted.get(la.name, "fp32")) for la in space.layers]
    ratio, configs = space.decode(space.genome(0.5, choices))
    assert ratio == 0.5 and configs["conv_out.0"].rank != (32, 24)  # scaled to the pruned layer
    built = space.build(configs, ratio)
    # replay: the prune pass from its text (same calibration), then the same per-layer labels
    replayed = PassManager(parse_pipeline(space.prune_pipeline(ratio))).run(graph, PassContext(calibration=calib))
    labels = {n: c.label for n, c in configs.items()}
    rebuilt = SearchSpace(replayed, calib).build({n: LayerConfig.parse(s) for n, s in labels.items()})
    assert within_fp32_tolerance(run_reference(rebuilt, calib), run_reference(built, calib), 1e-4, 1e-5)


def test_search_with_prune_ratios_honours_a_tight_budget(digits, pruned_space, tmp_path):
    graph, calib, _ = digits
    budget = Budget(latency=0.6)
    r = search(graph, calib, space=pruned_space, cache=LatencyCache("onnxruntime", tmp_path / "o.json"),
               budget=budget, pop_size=8, generations=3, seed=0)
    if not r.feasible:
        assert r.front == [] and r.message.startswith("infeasible: latency budget 0.6x"), r.message
        return
    assert r.front and non_dominated(r.front) == r.front
    for p in r.front:
        assert p.measured and p.latency_ratio <= 0.6 and p.prune in pruned_space.prune_ratios
        assert set(p.configs) == {la.name for la in pruned_space.layers}
    json.dumps(r.to_json())


def test_search_over_a_space_smaller_than_its_population_stops_cleanly(digits, tmp_path):
    """Prune ratios only (no bits, no ranks): 3 genomes.  Once every genome the operators can reach is
    evaluated, NSGA-II has nothing new to ask for; the search stops there with every genome in the archive
    instead of failing."""
    graph, calib, _ = digits
    space = SearchSpace(graph, calib, bits=(), ranks_per_layer=0, prune_ratios=(1.0, 0.75, 0.5))
    assert all(len(la.choices) == 1 for la in space.layers)
    r = search(graph, calib, space=space, cache=LatencyCache("onnxruntime", tmp_path / "o.json"),
               pop_size=8, generations=5, seed=0)
    assert r.feasible and r.evaluations == 3 and r.generations < 5
    assert {p.prune for p in r.front} <= {1.0, 0.75, 0.5} and non_dominated(r.front) == r.front
