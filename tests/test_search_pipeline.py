"""One search over the models of a pipeline (qcompile.search.pipeline).

The pipeline: two MNIST classifiers trained here (VGG-style and ResNet-style) whose class
probabilities are averaged — one latency budget (both run per image), one end-to-end metric
(ensemble accuracy on 200 images of the real MNIST validation split).  Small on purpose: part of each model's
layers searched, tiny populations, onnxruntime, latency cache under tmp_path.
"""

import json

import numpy as np
import pytest

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


def test_pipeline_space_refuses_pruning_and_bad_names(pipeline):
    space, models, _ = pipeline
    with pytest.raises(ValueError, match="must not contain"):
        P.PipelineSpace({"a/b": space.spaces["vgg"]}, lambda fns: [])
    pruned = SearchSpace(models.graphs["vgg"], models.calibration["vgg"], ranks_per_layer=0, bits=(8,),
                         prune_ratios=(1.0, 0.5))
    with pytest.raises(ValueError, match="pruning inside a pipeline search is not supported"):
        P.PipelineSpace({"vgg": pruned}, lambda fns: [])
