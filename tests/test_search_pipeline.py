"""One search over the models of a pipeline (qcompile.search.pipeline).

The pipeline: two MNIST classifiers trained here (VGG-style and ResNet-style) whose class
probabilities are averaged — one latency budget (both run per image), one end-to-end metric
(ensemble accuracy on 200 images of the real MNIST validation split).  Small on purpose: part of each model's
layers searched, tiny populations, onnxruntime, latency cache under tmp_path.
"""

import json

import numpy as np
import pytest

from qcompile.factorize.layers import compute_macs
from qcompile.passes import PassContext, PassManager, parse_pipeline
from qcompile.search import LatencyCache, SearchSpace, non_dominated, search
from qcompile.search import pipeline as P
from qcompile.search.nsga import Budget

MODELS = {"vgg": ("qcompile.models.mnist_nets:vgg_style", "features.1?|fc"),
          "res": ("qcompile.models.mnist_nets:resnet_style", "blocks.5*|fc")}


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="module")
def pipeline():
    from qcompile.data.mnist import load_mnist_split
    from qcompile.frontends import load_model

    graphs, calib, spaces = {}, {}, {}
    for name, (spec, layers) in MODELS.items():
        m = load_model(spec, num_calibration=16)
        g = PassManager(parse_pipeline("fold-bn,dead-code")).run(m.graph)
        graphs[name], calib[name] = g, m.calibration
        spaces[name] = SearchSpace(g, m.calibration, ranks_per_layer=1, layers=layers)
    images = np.concatenate([f["image"] for f in calib["vgg"]])  # the pipeline's own calibration inputs
    x_val, y_val = (a[:200] for a in load_mnist_split().val)

    def run(fns, x=images):
        return [(_softmax(fns["vgg"]({"image": x})[0]) + _softmax(fns["res"]({"image": x})[0])) / 2]

    def metric(fns):
        return float((run(fns, x_val)[0].argmax(-1) == y_val).mean() * 100)

    return P.PipelineSpace(spaces, run), P.PipelineModels(graphs, calib), metric


def test_pipeline_space_joins_the_models_layers(pipeline):
    space, models, _ = pipeline
    vgg, res = space.spaces["vgg"], space.spaces["res"]
    assert len(space.layers) == len(vgg.layers) + len(res.layers) == 4 + 3
    assert space.layers[0].name == "vgg/features.10" and space.layers[-1].name == "res/fc"
    genome = tuple(int(u) for u in space.upper)
    d = space.decode(genome)
    per = space.per_model(d.configs)
    assert set(per) == {"vgg", "res"} and per["res"]["fc"] == res.layer("fc").choices[-1]
    assert space.size == vgg.size + res.size
    ref = space.outputs(None)[0]
    assert ref.shape == (16, 10) and np.allclose(ref.sum(-1), 1, atol=1e-5)


def test_pipeline_search_allocates_across_models_and_checks_the_end_to_end_metric(pipeline, tmp_path):
    space, models, metric = pipeline
    result = search(None, None, space=space, backend="onnxruntime", budget=Budget(memory=0.6), pop_size=8,
                    generations=2, cache=LatencyCache("onnxruntime", tmp_path / "lat.json"))
    assert result.feasible, result.message
    assert all(p.memory_ratio <= 0.6 and p.measured for p in result.front)
    assert non_dominated(result.front) == result.front
    finalists, base, timing, front_metric = P.evaluate(space, models, result, "onnxruntime", metric,
                                                       max_metric_drop=1.0, count=2, max_points=4,
                                                       rounds=2, number=3)
    assert base > 97 and len(front_metric) == len(result.front)
    assert 1 <= sum(v is not None for v in front_metric) <= 4
    assert finalists and all(f.acc_drop <= 1.0 and f.latency_s > 0 for f in finalists)
    assert timing["original_target_s"] > 0
    # every finalist's per-model pipeline texts rebuild exactly the models the search evaluated
    f = finalists[0]
    texts = json.loads(f.pipeline)
    rebuilt = {m: PassManager(parse_pipeline(t)).run(
        PassManager(parse_pipeline("fold-bn,dead-code")).run(models.graphs[m]),
        PassContext(calibration=models.calibration[m])) for m, t in texts.items()}
    assert metric({m: P.reference_fn(g) for m, g in rebuilt.items()}) == pytest.approx(f.accuracy, abs=1e-9)
    alloc = P.allocation(space, next(p for p in result.front if json.dumps(space.pipelines(p), sort_keys=True)
                                     == f.pipeline))
    assert set(alloc) == {"vgg", "res"} and sum(r["fp32"] + r["int8"] + r["int4"] for r in alloc.values()) == 7


def test_pipeline_metric_drop_that_no_point_meets_is_an_error(pipeline, tmp_path):
    from qcompile.errors import SearchError

    space, models, metric = pipeline
    result = search(None, None, space=space, budget=Budget(memory=0.7), pop_size=4, generations=1,
                    cache=LatencyCache("onnxruntime", tmp_path / "lat.json"))
    with pytest.raises(SearchError, match="no point of the pipeline's front keeps the end-to-end metric"):
        P.evaluate(space, models, result, "onnxruntime", metric, max_metric_drop=-1.0, max_points=2)


def test_pipeline_space_refuses_bad_names(pipeline):
    space, _, _ = pipeline
    with pytest.raises(ValueError, match="must not contain"):
        P.PipelineSpace({"a/b": space.spaces["vgg"]}, lambda fns: [])


@pytest.fixture(scope="module")
def pruned_pipeline(pipeline):
    """vgg prunable to 0.5 or 0.3 of its MACs, res to 0.5: each model has a prune-ratio gene of its own."""
    space, models, metric = pipeline
    spaces = {m: SearchSpace(models.graphs[m], models.calibration[m], ranks_per_layer=0, bits=(8,),
                             layers=MODELS[m][1], prune_ratios=r)
              for m, r in (("vgg", (1.0, 0.5, 0.3)), ("res", (1.0, 0.5)))}
    return P.PipelineSpace(spaces, space.run), models, metric


def test_pipeline_space_has_a_prune_gene_per_model(pruned_pipeline):
    space, models, _ = pruned_pipeline
    vgg, res = space.spaces["vgg"], space.spaces["res"]
    n_layers = len(vgg.layers) + len(res.layers)
    assert list(space.upper[:2]) == [2, 1] and len(space.upper) == 2 + n_layers
    assert len(space.prune_ratios) == 3 * 2 and (0.3, 1.0) in space.prune_ratios
    assert space.size == vgg.size + res.size
    # vgg at 0.3, res unpruned, every layer at its last choice
    genome = space.genome((0.3, 1.0), [len(la.choices) - 1 for la in space.layers])
    assert genome[:2] == (2, 0)
    d = space.decode(genome)
    assert d.prune == (0.3, 1.0)
    ratio = {name.partition("/")[0]: r for name, _, r in d.pairs()}
    assert ratio == {"vgg": 0.3, "res": 1.0}  # each pair carries its own model's ratio (the cache's key)
    assert all(p in set(space.pairs()) for p in d.pairs())
    # the pruned model's layer has the pruned shape; bytes follow
    name = space.layers[0].name
    assert space.layer(name, (0.3, 1.0)).weight_shape[0] < space.layer(name).weight_shape[0]
    assert space.other_bytes((0.3, 0.5)) < space.other_bytes(1.0)
    graphs = space.build_models(d.configs, d.prune)
    macs = {m: compute_macs(g) / compute_macs(models.graphs[m]) for m, g in graphs.items()}
    assert macs["vgg"] <= 0.3 + 1e-9 and macs["res"] == pytest.approx(1.0)


def test_pipeline_search_prunes_models_differently_and_points_replay(pruned_pipeline, tmp_path):
    """A memory budget only pruning meets: every front point prunes some model (ratios chosen per model),
    and a point's per-model pipeline texts (prune-channels included) rebuild the evaluated models."""
    space, models, metric = pruned_pipeline

    def smallest(ratio):  # the fewest weight bytes at these per-model ratios
        return space.other_bytes(ratio) + sum(min(space.weight_bytes(la.name, c, ratio)
                                                  for c in space.layer(la.name, ratio).choices) for la in space.layers)
    base = space.other_bytes(1.0) + sum(space.weight_bytes(la.name, P.FP32) for la in space.layers)
    unpruned, floor = smallest((1.0, 1.0)) / base, min(smallest(r) for r in space.prune_ratios) / base
    budget = (unpruned + floor) / 2  # below anything the unpruned models reach
    assert floor < budget < unpruned
    result = search(None, None, space=space, backend="onnxruntime", budget=Budget(memory=budget), pop_size=10,
                    generations=3, cache=LatencyCache("onnxruntime", tmp_path / "lat.json"))
    assert result.feasible, result.message
    assert all(p.memory_ratio <= budget for p in result.front)
    assert all(isinstance(p.prune, tuple) and min(p.prune) < 1 for p in result.front)
    p = result.front[0]
    texts = space.pipelines(p)
    assert all(("prune-channels" in texts[m]) == (r < 1) for m, r in zip(space.models, p.prune))
    rebuilt = {m: PassManager(parse_pipeline(t)).run(models.graphs[m], PassContext(calibration=models.calibration[m]))
               for m, t in texts.items()}
    built = space.build_models({n: P.LayerConfig.parse(c) for n, c in p.configs.items()}, p.prune)
    x = models.calibration["vgg"][0]
    for m in space.models:
        np.testing.assert_allclose(P.reference_fn(rebuilt[m])(x)[0], P.reference_fn(built[m])(x)[0],
                                   rtol=1e-5, atol=1e-5)  # fp32 reference interpreter, same weights
    alloc = P.allocation(space, p)
    assert {m: alloc[m]["prune"] for m in space.models} == dict(zip(space.models, p.prune))


def test_search_space_uses_given_pruned_models(pipeline):
    """``pruned=``: a model already pruned (and recovered) by ``prune_pipeline(ratio)`` is used as given."""
    _, models, _ = pipeline
    g, calib = models.graphs["vgg"], models.calibration["vgg"]
    text = SearchSpace(g, calib, ranks_per_layer=0, bits=(), prune_ratios=(1.0, 0.5)).prune_pipeline(0.5)
    given = PassManager(parse_pipeline(text)).run(g, PassContext(calibration=calib))
    space = SearchSpace(g, calib, ranks_per_layer=0, bits=(8,), prune_ratios=(1.0, 0.5), pruned={0.5: given})
    assert space.pruned_graph(0.5) is given and space.prune_stats[0.5]["given"]
    assert space.prune_stats[0.5]["mac_ratio"] <= 0.5
    with pytest.raises(ValueError, match="not among prune_ratios"):
        SearchSpace(g, calib, prune_ratios=(1.0, 0.5), pruned={0.3: given})
