"""The four CNNs trained here on real MNIST (qcompile.models.mnist_nets).

The first run trains the models (a few minutes on two cores) into the cache folder; the session
fixture does it once and every later run loads the cached ``.npz`` weights instantly.
"""

import time

import numpy as np
import pytest
import torch

from qcompile.data.mnist import load_mnist_split
from qcompile.errors import InputError, ShapeError
from qcompile.models import mnist_nets as mn
from qcompile.models.zoo import DenseBlock, Inception, Transition

SPECS = {"vgg_style": "qcompile.models.mnist_nets:vgg_style",
         "resnet_style": "qcompile.models.mnist_nets:resnet_style",
         "inception_style": "qcompile.models.mnist_nets:inception_style",
         "dense_style": "qcompile.models.mnist_nets:dense_style"}
CONV_MACS = {"vgg_style": 29_127_168, "resnet_style": 80_507_392,  # counted by hand, see module docstring
             "inception_style": 25_156_992, "dense_style": 26_802_216}
K3_MACS = {"vgg_style": 29_127_168, "resnet_style": 79_704_576,  # of which in 3x3 convs (the rest 1x1)
           "inception_style": 18_458_496, "dense_style": 17_950_464}
MIN_ACC = {"vgg_style": 97.0, "resnet_style": 97.0, "inception_style": 97.5, "dense_style": 97.5}
CONCAT_NETS = ["inception_style", "dense_style"]


@pytest.fixture(scope="session")
def models():
    """The four small trained models (trained into the cache on the very first run, loaded afterwards).

    ``resnet18`` (the ResNet-18 topology on MNIST) is left to the search benchmark: training it costs
    minutes a test run should not spend."""
    return {name: mn.FACTORIES[name]() for name in SPECS}


@pytest.fixture(scope="module")
def split():
    return load_mnist_split()


@pytest.fixture(scope="module")
def loaded(models):
    """``load_model(SPECS[name])`` per name, exported once (torch.export takes a while) on demand."""
    from qcompile.frontends import load_model

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(SPECS[name])
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(SPECS))
def test_trained_models_reach_97_percent_on_held_out_digits(models, split, name):
    model = models[name]
    assert not model.training
    acc = mn.evaluate(model, *split.test)
    assert acc >= MIN_ACC[name], (name, acc)


@pytest.mark.parametrize("name", list(SPECS))
def test_load_model_imports_the_trained_model_into_the_ir(models, loaded, split, name):
    from qcompile.backends.torch_backend import TorchRunner, to_torch
    from qcompile.ir.costs import graph_costs

    lm = loaded(name)
    g = lm.graph
    assert g.inputs == ["image"] and g.types["image"].shape == (1, 1, 28, 28)
    assert lm.calibration_source.endswith("(real samples)") and len(lm.calibration) == 16
    # the IR computes what the torch model computes, and classifies as well
    runner = TorchRunner(g)
    for feed in lm.calibration[:4]:
        (ref,) = lm.reference(feed)
        (out,) = runner.run(feed)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    x = split.test[0][:200]
    with torch.no_grad():
        ir_logits = to_torch(g, trainable=False)(torch.from_numpy(x)).numpy()  # batch 200 through a batch-1 graph
        ref_logits = models[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ir_logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert (ir_logits.argmax(-1) == ref_logits.argmax(-1)).all()
    # MACs: the IR's cost model, torch hooks and the hand count agree, and so does the 3x3 share
    costs = [c for c in graph_costs(g) if c.op == "conv2d"]
    assert sum(c.macs for c in costs) == mn.conv_macs(models[name]) == CONV_MACS[name]
    kernels = [g.types[n.inputs[1]].shape[2:] for n in g.nodes if n.op == "conv2d"]
    assert set(kernels) <= {(1, 1), (3, 3)}
    k3 = sum(c.macs for c, k in zip(costs, kernels) if k == (3, 3))
    assert k3 == K3_MACS[name] and k3 > 0.65 * CONV_MACS[name] and k3 > 15e6


@pytest.mark.parametrize("name", CONCAT_NETS)
def test_concat_graphs_go_through_fold_bn_dead_code_and_onnx(loaded, name):
    """The branch / dense-reuse concatenations survive fold-bn,dead-code and the ONNX export (run by
    onnxruntime) with fp32 numerics; DenseNet's pre-activation BatchNorms stay (nothing to fold into)."""
    from qcompile.backends.onnxruntime_backend import OrtRunner
    from qcompile.backends.torch_backend import TorchRunner
    from qcompile.frontends.onnx_export import to_onnx
    from qcompile.passes import PassContext, PassManager, parse_pipeline

    lm = loaded(name)
    g = lm.graph
    feeds = lm.calibration[:4]
    ctx = PassContext(calibration=feeds, verify_numerics=True)  # raises NumericsError beyond fp32 rounding
    folded = PassManager(parse_pipeline("fold-bn,dead-code")).run(g, ctx)

    def count(graph, op):
        return sum(n.op == op for n in graph.nodes)

    assert count(folded, "concat") == count(g, "concat") == {"inception_style": 4, "dense_style": 16}[name]
    assert count(folded, "conv2d") == count(g, "conv2d")
    assert count(g, "batch_norm") == count(g, "conv2d") + (name == "dense_style")  # + DenseNet's final BN
    # inception: every BN follows its conv; dense: only the stem's and each layer's second BN do
    assert count(folded, "batch_norm") == {"inception_style": 0, "dense_style": 16}[name]
    ort = OrtRunner(to_onnx(folded).SerializeToString(), threads=1)
    for runner in (TorchRunner(folded), ort):
        for feed in feeds:
            (ref,) = lm.reference(feed)
            (out,) = runner.run(feed)
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_architectures(models):
    vgg, res = models["vgg_style"], models["resnet_style"]
    convs = [m for m in vgg.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in vgg.modules()) == 3
    convs = [m for m in res.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 12 + 2
    assert sorted(c.out_channels for c in convs if c.kernel_size == (1, 1)) == [64, 128]
    assert [tuple(c.stride) for c in convs if c.kernel_size == (1, 1)] == [(2, 2), (2, 2)]
    inc, dense = models["inception_style"], models["dense_style"]
    mods = [m for m in inc.blocks if isinstance(m, Inception)]
    assert len(mods) == 4 and sum(isinstance(m, torch.nn.MaxPool2d) for m in inc.blocks) == 2
    assert [m.branch1.conv.in_channels for m in mods] == [24, 40, 128, 208] and inc.fc.in_features == 256
    blocks = [m for m in dense.features if isinstance(m, DenseBlock)]
    assert [len(b.layers) for b in blocks] == [3, 4, 6]
    assert sum(isinstance(m, Transition) for m in dense.features) == 2 and dense.fc.in_features == 111
    assert all(layer.conv2.out_channels == 12 and layer.conv1.out_channels == 48 for b in blocks for layer in b.layers)
    for m in (vgg, res, inc, dense):
        assert m.input_names == ["image"]
        assert tuple(m.example_inputs[0].shape) == (1, 1, 28, 28) and not m.example_inputs[0].any()
        cal = type(m).calibration_data()
        assert cal.shape == (64, 1, 28, 28) and cal.dtype == np.float32 and 0 <= cal.min() and cal.max() <= 1
        assert m(m.example_inputs[0]).shape == (1, 10)


@pytest.mark.parametrize("name", list(SPECS))
def test_weights_are_cached_as_plain_npz_and_reload_fast(models, name):
    path = mn.weights_path(name)
    assert mn.VERSION in path.name and path.suffix == ".npz" and path.is_file()
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == set(models[name].state_dict())
    t = time.perf_counter()
    again = mn.FACTORIES[name]()
    assert time.perf_counter() - t < 5.0  # loaded, not retrained
    for k, v in models[name].state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    note = mn.training_note(name)
    assert note is not None and note["version"] == mn.VERSION and note["test_acc"] >= 97.0


def test_training_is_deterministic_for_a_seed(split):
    x, y = split.train
    sub = (x[:96], y[:96])

    def run(seed):
        return mn.train(mn.build(mn.VGGStyle, seed), sub, epochs=1, seed=seed, batch=32).state_dict()

    before = torch.random.get_rng_state()
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(torch.random.get_rng_state(), before)  # global RNG untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_evaluate_accepts_modules_graphs_and_callables_and_checks_input(models, split):
    x, y = split.test[0][:200], split.test[1][:200]
    model = models["vgg_style"]
    acc = mn.evaluate(model, x, y)
    assert mn.evaluate(lambda t: model(t), x, y) == acc
    assert mn.evaluate(lambda t: torch.zeros(len(t), 10), x, y) == pytest.approx(100 * np.mean(y == 0))
    model.train()
    try:
        assert mn.evaluate(model, x, y) == acc  # run in eval mode (BN running statistics) ...
        assert model.training  # ... and the caller's mode is restored
    finally:
        model.eval()
    with pytest.raises(InputError, match="empty"):
        mn.evaluate(model, x[:0], y[:0])
    with pytest.raises(ShapeError, match="labels"):
        mn.evaluate(model, x, y[:10])


def test_command_line_prints_accuracy(models, capsys):
    assert mn.main(["vgg_style"]) == 0  # no argument: both models (same code path, twice the time)
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("vgg_style: test accuracy ")
    acc = float(line.split("test accuracy ")[1].split(" %")[0])
    assert acc >= 97.0 and f"{CONV_MACS['vgg_style']:,}" in line and mn.VERSION in line
