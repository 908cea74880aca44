"""The registered ``finetune`` pass (distils from the pipeline's input graph) and the search's recovery
of front points that miss the accuracy drop by fine-tuning them.

The bundled digits CNN (trained here on scikit-learn's digits), real digits for training, validation
and test; every latency cache under tmp_path.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from qcompile.finetune import accuracy, load_training_data
from qcompile.passes import PASSES, PassContext, PassManager, parse_pipeline

DIGITS = "qcompile.models.digits:digits_cnn"
PRUNED = "fold-bn,dead-code,prune-channels{macs=0.25,compensate=false}"
TUNE = "finetune{data=digits,epochs=2,patience=2}"


@pytest.fixture(scope="module")
def digits():
    from qcompile.frontends import load_model

    return load_model(DIGITS, num_calibration=8), load_training_data("digits")


def _run(m, text):
    pm = PassManager(parse_pipeline(text))
    return pm.run(m.graph, PassContext(calibration=m.calibration)), pm.records


def test_finetune_is_a_registered_pass_that_replays_from_its_text(digits):
    m, data = digits
    assert PASSES["finetune"].exact is False
    pruned, _ = _run(m, PRUNED)
    tuned, records = _run(m, f"{PRUNED},{TUNE}")
    stats = records[-1].stats
    assert records[-1].name == "finetune" and stats["teacher"]  # distilled from the pipeline's input graph
    before, after = accuracy(pruned, *data.val), accuracy(tuned, *data.val)
    assert stats["val_acc_before"] == pytest.approx(before) and stats["val_acc_after"] == pytest.approx(after)
    assert after > before  # a quarter of the MACs without compensation loses accuracy; training recovers some
    # the pipeline text alone rebuilds the same weights (fixed seed, same machine)
    again, _ = _run(m, PassManager(parse_pipeline(f"{PRUNED},{TUNE}")).text)
    for name, value in tuned.constants.items():
        np.testing.assert_array_equal(value, again.constants[name], err_msg=name)


def test_finetune_pass_refuses_unknown_data_naming_it(digits):
    m, _ = digits
    with pytest.raises(Exception, match="unknown training data 'nowhere'"):
        _run(m, "fold-bn,finetune{data=nowhere}")


def test_search_fine_tunes_points_that_miss_and_keeps_improvements(digits):
    from qcompile.passes.finetune import FinetuneOptions
    from qcompile.search import finalists as F

    m, data = digits
    x, y = data.val
    base = accuracy(m.graph, x, y)
    ctx = PassContext(calibration=m.calibration)
    texts = ["fold-bn,dead-code", PRUNED]  # a point within any drop, and one far below
    points = [SimpleNamespace(latency_s=1.0 - k, latency_ratio=1.0 - k / 2) for k in range(len(texts))]
    built = {}
    for p, text in zip(points, texts):
        g, _ = _run(m, text)
        built[id(p)] = (text, g, accuracy(g, x, y))
    untuned = {k: v[2] for k, v in built.items()}
    F.recover(built, points, m, ctx, x, y, base, 0.5, FinetuneOptions(data="digits", epochs=2), points=4)
    kept, pruned = built[id(points[0])], built[id(points[1])]
    assert kept[0] == "fold-bn,dead-code"  # within the drop: left alone
    assert pruned[0].startswith(PRUNED + ",finetune{") and pruned[2] > untuned[id(points[1])]
    # the recorded pipeline replays to the accuracy the search measured
    replayed, _ = _run(m, pruned[0])
    assert accuracy(replayed, x, y) == pytest.approx(pruned[2])
    # points=0 fine-tunes nothing
    built2 = {id(points[1]): (PRUNED, _run(m, PRUNED)[0], untuned[id(points[1])])}
    F.recover(built2, points[1:], m, ctx, x, y, base, 0.5, FinetuneOptions(data="digits", epochs=1), points=0)
    assert built2[id(points[1])][0] == PRUNED


def test_search_space_recovers_pruned_models_before_per_layer_choices(digits):
    """``prune_recovery``: each pruned model of the space is fine-tuned right after pruning (teacher: the
    loaded model), its pipeline text says so, and replaying that text from the loaded model rebuilds it."""
    from qcompile.passes.finetune import Finetune, FinetuneOptions
    from qcompile.search import LayerConfig, SearchSpace
    from qcompile.search.finalists import PREPARE, point_pipeline

    m, data = digits
    graph, _ = _run(m, PREPARE)
    opts = FinetuneOptions(data="digits", epochs=2, patience=2)
    plain = SearchSpace(graph, m.calibration, prune_ratios=(1.0, 0.25), bits=(8,), ranks_per_layer=0)
    recovered = SearchSpace(graph, m.calibration, prune_ratios=(1.0, 0.25), bits=(8,), ranks_per_layer=0,
                            prune_recovery=Finetune(opts).to_text(), teacher=m.graph)
    text = recovered.prune_pipeline(0.25)
    assert text.startswith(plain.prune_pipeline(0.25) + ",finetune{") and "epochs=2" in text
    assert recovered.prune_pipeline(1.0) == ""  # the unpruned model is not fine-tuned
    before, after = (accuracy(s.pruned_graph(0.25), *data.val) for s in (plain, recovered))
    assert after > before + 5, (before, after)  # a quarter of the MACs: the recovery is what makes it usable
    # a point on the recovered model replays from its pipeline text, from the loaded (unfolded) model
    point = SimpleNamespace(prune=0.25, configs={la.name: "int8" for la in recovered.layers})
    pipeline = point_pipeline(recovered, point)
    assert ",finetune{" in pipeline and pipeline.endswith('layer-config{configs="' + ";".join(
        f"{la.name}=int8" for la in recovered.layers) + '"}')
    built = recovered.build({la.name: LayerConfig(8) for la in recovered.layers}, 0.25)
    replayed, _ = _run(m, pipeline)
    assert accuracy(replayed, *data.val) == pytest.approx(accuracy(built, *data.val))
