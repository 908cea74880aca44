"""torch.export frontend: numerics vs the torch model (through the reference interpreter),
op counts, constant and node naming, unsupported ops named, the user's model untouched,
trainability (write_back).

fp32 tolerance: |y - y_ref| <= RTOL * |y_ref| + ATOL_REL * max|y_ref|.
Weights are random (seeded, BN statistics randomised): these tests check the
translation, not accuracy (that is tests/test_digits_model.py).
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qcompile.backends.torch_backend import to_torch, write_back
from qcompile.errors import ShapeError, UnsupportedOpError
from qcompile.frontends.onnx_export import to_onnx
from qcompile.frontends.torch_frontend import decomposition_table, load_torch
from qcompile.ir import verify

RTOL = 1e-5
ATOL_REL = 1e-5


def assert_close(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert y.shape == ref.shape
    atol = ATOL_REL * float(np.max(np.abs(ref)))
    err = np.abs(y - ref)
    assert np.all(err <= atol + RTOL * np.abs(ref)), f"max abs error {err.max():.3g} (atol {atol:.3g})"


# ---------------------------------------------------------------------------- models
class ConvBNReLU(nn.Module):
    """Conv-BN-ReLU stack: stride, dilation, groups, bias/no bias, rectangular kernels."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 6, (1, 3), padding=(0, 1)), nn.BatchNorm2d(6), nn.ReLU())

    def forward(self, x):
        return self.features(x)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1, ceil_mode=True))
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer1(self.stem(x))), 1))


class Inceptionish(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(4, 6, 1)
        self.b3 = nn.Sequential(nn.Conv2d(4, 3, 1), nn.ReLU(), nn.Conv2d(3, 5, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(4, 2, 1), nn.ReLU(), nn.Conv2d(2, 3, 5, padding=2))
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(4, 2, 1))
        self.mpool = nn.MaxPool2d(3, 1, 1)

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.pool(x), self.mpool(x)], dim=1)


class MobileBlock(nn.Module):
    """MobileNetV2/V3 inverted residual: expand, depthwise, squeeze-excite (hardsigmoid * x), project, skip."""

    def __init__(self, c=8, e=24):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, 1, 1, groups=e, bias=False), nn.BatchNorm2d(e), nn.Hardswish())
        self.se_pool = nn.AdaptiveAvgPool2d(1)
        self.se_fc1 = nn.Conv2d(e, 6, 1)
        self.se_fc2 = nn.Conv2d(6, e, 1)
        self.se_gate = nn.Hardsigmoid()
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.dw(self.expand(x))
        s = self.se_gate(self.se_fc2(F.relu(self.se_fc1(self.se_pool(y)))))
        return x + self.project(y * s)


class MobileNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.blocks = nn.Sequential(MobileBlock(), MobileBlock())
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(8 * 5 * 5, 4))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class Pools(nn.Module):
    """Pools with ceil_mode and padding, an exact adaptive tiling, a non-square kernel."""

    def forward(self, x):
        a = F.max_pool2d(x, 3, 2, 1, ceil_mode=True)
        b = F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=True)
        c = F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False)
        d = F.adaptive_avg_pool2d(x, (3, 2))
        e = F.max_pool2d(x, (2, 3), (2, 1))
        return torch.cat([a, b, c], 1), d, e


class MLPHead(nn.Module):
    """Flatten + linear head with several activations and a softmax."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(2 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = F.gelu(self.fc1(torch.flatten(x, 1)))
        h = F.silu(self.fc2(self.drop(h))) + F.leaky_relu(h, 0.1)
        return torch.softmax(self.fc3(torch.tanh(h)), dim=-1)


class CatMean(nn.Module):
    """torch.cat, means (keepdim and not), scalar arithmetic, permute/reshape, two outputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), torch.sigmoid(self.b(x))], dim=1)
        pooled = y.mean(dim=(2, 3))
        centred = y - y.mean(dim=1, keepdim=True)
        t = (1.0 - centred * 0.5) / 2 + 3
        return pooled, torch.clamp(t.permute(0, 2, 3, 1).reshape(1, -1, 8), -1.0, 4.0)


def randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def count_modules(model, cls):
    return sum(isinstance(m, cls) for m in model.modules())


CASES = [
    (ConvBNReLU, (2, 3, 11, 10), {"relu": 3}),
    (ResNetish, (1, 3, 15, 15), {"max_pool2d": 1, "global_avg_pool": 1, "add": 2, "relu": 5}),
    (Inceptionish, (2, 4, 7, 7), {"concat": 1, "avg_pool2d": 1, "max_pool2d": 1}),
    (MobileNetish, (1, 3, 10, 10), {"clip": 2, "hardswish": 3, "hardsigmoid": 2, "global_avg_pool": 2,
                                    "mul": 2, "add": 2}),
    (Pools, (1, 3, 9, 10), {"max_pool2d": 2, "avg_pool2d": 3, "concat": 1}),
    (MLPHead, (3, 2, 4, 4), {"gelu": 1, "silu": 1, "leaky_relu": 1, "softmax": 1, "reshape": 1}),
    (CatMean, (1, 3, 6, 5), {"concat": 1, "reduce_mean": 2, "transpose": 1, "clip": 1}),
]


@pytest.fixture(scope="module")
def imported():
    """cls -> (model, x, graph), each model imported once."""
    out = {}
    for i, (cls, shape, _) in enumerate(CASES):
        torch.manual_seed(i)
        model = randomize_bn(cls()).eval()
        x = torch.randn(shape)
        out[cls] = (model, x, load_torch(model, (x,)))
    return out


@pytest.mark.parametrize("cls,shape,counts", CASES, ids=[c[0].__name__ for c in CASES])
def test_import_matches_torch(imported, cls, shape, counts):
    model, x, g = imported[cls]
    verify(g)
    ops = g.op_counts()
    expected = {"conv2d": count_modules(model, nn.Conv2d), "batch_norm": count_modules(model, nn.BatchNorm2d),
                "linear": count_modules(model, nn.Linear), **counts}
    assert {op: ops.get(op, 0) for op in expected} == expected, ops
    with torch.no_grad():
        ref = model(x)
        ours = to_torch(g)(x)
    ref = ref if isinstance(ref, tuple) else (ref,)
    ours = ours if isinstance(ours, tuple) else (ours,)
    assert len(ours) == len(ref)
    for y, r in zip(ours, ref):
        assert_close(y.numpy(), r.numpy())


@pytest.mark.parametrize("cls", [ResNetish, MobileNetish, Inceptionish])
def test_constants_are_state_dict_keys_and_nodes_are_module_paths(imported, cls):
    model, _, g = imported[cls]
    keys = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert keys <= set(g.constants)
    modules = dict(model.named_modules())
    for n in g.nodes:
        assert n.meta["torch_node"]
        if n.op in ("conv2d", "batch_norm", "linear"):
            path = n.meta["module"]
            assert n.name == path and path in modules
            assert n.inputs[1] == f"{path}.weight"
            assert g.constants[n.inputs[1]].shape == tuple(modules[path].weight.shape)
    assert g.meta["source"] == {"format": "torch", "class": cls.__qualname__}


def test_resnet_names_and_io(imported):
    _, _, g = imported[ResNetish]
    names = {n.name for n in g.nodes}
    assert {"stem.0", "stem.1", "stem.3", "layer1.0.conv1", "layer1.1.downsample.0", "layer1.1.downsample.1",
            "avgpool", "fc"} <= names
    assert g.node("layer1.1.conv1").attrs["strides"] == (2, 2)
    assert g.node("stem.3").attrs == {"kernel": (3, 3), "strides": (2, 2), "pads": (1, 1, 1, 1), "ceil_mode": 1,
                                      "dilations": (1, 1)}
    assert g.node("layer1.1.bn2").inputs[1:] == [f"layer1.1.bn2.{k}" for k in
                                                 ("weight", "bias", "running_mean", "running_var")]
    assert g.inputs == ["x"] and g.outputs == ["output"]


def test_activation_attributes(imported):
    _, _, g = imported[MobileNetish]
    sig = [n for n in g.nodes if n.op == "hardsigmoid"][0]
    assert sig.attrs == {"alpha": pytest.approx(1 / 6), "beta": 0.5} and sig.name == "blocks.0.se_gate"
    relu6 = g.node("blocks.0.expand.2")
    assert relu6.op == "clip" and relu6.attrs == {"min": 0.0, "max": 6.0}
    dw = g.node("blocks.1.dw.0")
    assert dw.attrs["group"] == 24 and dw.attrs["pads"] == (1, 1, 1, 1)


def test_input_and_output_names():
    model = Pools()
    g = load_torch(model, (torch.randn(1, 2, 6, 6),), input_names=["image"], name="pools")
    assert g.name == "pools" and g.inputs == ["image"]
    assert g.outputs == ["output_0", "output_1", "output_2"]

    class TwoInputs(nn.Module):
        def forward(self, left, right):
            return left + right, left  # an input returned as-is gets an identity node

    g = load_torch(TwoInputs(), (torch.randn(2, 3), torch.randn(2, 3)))
    verify(g)
    assert g.inputs == ["left", "right"] and g.outputs == ["output_0", "output_1"]
    assert g.op_counts() == {"add": 1, "identity": 1}


def test_linear_written_as_matmul_becomes_linear():
    class Manual(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 8))
            self.b = nn.Parameter(torch.randn(5))

        def forward(self, x):
            return torch.addmm(self.b, x, self.w.t()), x @ self.w.t(), torch.sub(x @ self.w.T, self.b, alpha=2)

    model = Manual()
    x = torch.randn(3, 8)
    g = load_torch(model, (x,))
    verify(g)
    assert g.op_counts() == {"linear": 3, "mul": 1, "sub": 1} and "transpose" not in g.op_counts()
    with torch.no_grad():
        for y, r in zip(to_torch(g)(x), model(x)):
            assert_close(y.numpy(), r.numpy())


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_same_padding_and_scalars():
    class Same(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 4, padding="same", dilation=1)

        def forward(self, x):
            return 2 - self.conv(x) ** 2, F.hardtanh(x, -0.5, 0.5)

    model = Same()
    x = torch.randn(1, 2, 7, 6)
    g = load_torch(model, (x,))
    assert g.node("conv").attrs["pads"] == (1, 1, 2, 2)  # torch puts the odd element at the end
    with torch.no_grad():
        for y, r in zip(to_torch(g)(x), model(x)):
            assert_close(y.numpy(), r.numpy())


def test_adaptive_pool_to_input_size_is_elided():
    class VGGHead(nn.Module):  # VGG's AdaptiveAvgPool2d(7) on a 7x7 map is the identity
        def __init__(self):
            super().__init__()
            self.avgpool = nn.AdaptiveAvgPool2d(7)
            self.maxpool = nn.AdaptiveMaxPool2d((7, 7))

        def forward(self, x):
            return self.avgpool(x) + self.maxpool(x)

    x = torch.randn(1, 2, 7, 7)
    g = load_torch(VGGHead(), (x,))
    assert g.op_counts() == {"add": 1}
    assert_close(to_torch(g)(x).numpy(), (2 * x).numpy())


class PadConv(nn.Module):
    """ZeroPad2d / F.pad before convs: "same" padding of a strided conv, a pad added to a conv's own
    padding, a pad shared by two convs, and a pad before a count_include_pad avg pool."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 4, (1, 3), groups=4)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)  # count_include_pad=True

    def forward(self, x):
        h = torch.relu(self.conv(self.pad(x)))
        p = F.pad(h, (1, 0, 0, 1))                 # shared by conv2, conv3 and the pool
        return self.conv2(p), self.conv3(p), self.pool(p)


def test_zero_pad_is_folded_into_convs_and_avg_pool():
    model = PadConv().eval()
    for shape in ((1, 3, 8, 8), (2, 3, 9, 7)):
        x = torch.randn(shape)
        g = load_torch(model, (x,))
        verify(g)
        assert "pad" not in " ".join(g.op_counts()) and g.op_counts()["conv2d"] == 3
        assert g.node("conv").attrs["pads"] == (0, 0, 1, 1)       # ZeroPad2d((l, r, t, b)) -> (t, l, b, r)
        assert g.node("conv2").attrs["pads"] == (1, 2, 2, 1)      # own padding 1 + F.pad (0, 1, 1, 0)
        assert g.node("conv3").attrs["pads"] == (0, 1, 1, 0)
        pool = g.node("pool")
        assert pool.attrs["pads"] == (1, 2, 2, 1) and pool.attrs["count_include_pad"] == 1
        assert g.node("conv").meta["folded_pad"] == "constant_pad_nd"
        with torch.no_grad():
            ref = [r.numpy() for r in model(x)]
            for y, r in zip(to_torch(g)(x), ref):
                assert_close(y.numpy(), r)
        # the folded asymmetric conv / pool padding is what onnxruntime computes too
        sess = ort.InferenceSession(to_onnx(g).SerializeToString(), providers=["CPUExecutionProvider"])
        for y, r in zip(sess.run(None, {g.inputs[0]: x.numpy()}), ref):
            assert_close(y, r)


def test_zero_pad_before_avg_pool_without_count_include_pad():
    """The pool's own count_include_pad=False does not apply to explicit zeros: folded as counted."""
    model = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 1)), nn.AvgPool2d(2, count_include_pad=False)).eval()
    x = torch.randn(1, 2, 6, 5)
    g = load_torch(model, (x,))
    assert g.op_counts() == {"avg_pool2d": 1} and g.nodes[0].attrs["count_include_pad"] == 1
    assert_close(to_torch(g)(x).detach().numpy(), model(x).numpy())


def test_chained_zero_pads_through_dropout_fold_into_one_conv():
    model = nn.Sequential(nn.ZeroPad2d((1, 0, 0, 0)), nn.ZeroPad2d((0, 0, 2, 0)), nn.Dropout(0.2),
                          nn.Conv2d(2, 3, 3, stride=2, padding=1)).eval()
    x = torch.randn(1, 2, 7, 6)
    g = load_torch(model, (x,))
    assert g.op_counts() == {"conv2d": 1} and g.nodes[0].attrs["pads"] == (3, 2, 1, 1)
    assert_close(to_torch(g)(x).detach().numpy(), model(x).detach().numpy())


class PadThenRelu(nn.Module):
    def forward(self, x):
        return torch.relu(F.pad(x, (1, 1, 1, 1)))


class PadValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.pad = nn.ConstantPad2d(1, 0.5)
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return self.conv(self.pad(x))


class PadChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 0, 0, 0, 1, 1)))


class PadNegative(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3)

    def forward(self, x):
        return self.conv(F.pad(x, (-1, 0, 0, 0)))


class PadCeilPool(nn.Module):
    def __init__(self, ceil_mode=True, pad=1):
        super().__init__()
        self.pad = nn.ZeroPad2d(pad)
        self.pool = nn.AvgPool2d(2, ceil_mode=ceil_mode)

    def forward(self, x):
        return self.pool(self.pad(x))


class PadWidePool(PadCeilPool):
    def __init__(self):
        super().__init__(ceil_mode=False, pad=(0, 2, 0, 0))


@pytest.mark.parametrize("cls,shape,why", [
    (PadThenRelu, (1, 2, 4, 4), "also used otherwise"),
    (PadValue, (1, 2, 4, 4), "pad value here is 0.5"),
    (PadChannels, (1, 2, 4, 4), "pads other axes than H and W"),
    (PadNegative, (1, 2, 4, 4), "is negative"),
    (PadCeilPool, (1, 2, 4, 4), "ceil_mode"),
    (PadWidePool, (1, 2, 4, 4), "reach the kernel size"),
], ids=["relu-consumer", "value", "channels", "negative", "ceil-pool", "pool-pad-over-kernel"])
def test_unfoldable_pads_are_refused_naming_the_pad(cls, shape, why):
    with pytest.raises(UnsupportedOpError) as e:
        load_torch(cls().eval(), (torch.randn(shape),))
    assert e.value.op_type == "aten.constant_pad_nd.default" and e.value.node_name.startswith("constant_pad_nd")
    assert "zero padding of H and W" in str(e.value) and why in str(e.value)


# ---------------------------------------------------------------------------- errors
class WithTopK(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.topk(self.fc(x), 3).values


class WithSort(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=-1).values


class WithConv1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 1)

    def forward(self, x):
        return self.conv(x)


class WithIndices(nn.Module):
    def forward(self, x):
        y, idx = F.max_pool2d(x, 2, return_indices=True)
        return y + idx.float()


class AdaptiveOdd(nn.Module):
    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 4)


class DivisorOverride(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AvgPool2d(2, divisor_override=3)

    def forward(self, x):
        return self.pool(x)


@pytest.mark.parametrize("cls,shape,op,node", [
    (WithTopK, (2, 8), "aten.topk", "topk"),
    (WithSort, (2, 8), "aten.sort", "sort"),
    (WithConv1d, (1, 4, 5), "aten.convolution", "convolution in module 'conv' (Conv1d)"),
    (WithIndices, (1, 2, 4, 4), "getitem", "getitem"),
    (AdaptiveOdd, (1, 2, 6, 6), "aten.adaptive_avg_pool2d", "adaptive_avg_pool2d"),
    (DivisorOverride, (1, 2, 6, 6), "aten.avg_pool2d", "avg_pool2d in module 'pool' (AvgPool2d)"),
], ids=["topk", "sort", "conv1d", "pool-indices", "adaptive-odd", "divisor-override"])
def test_unsupported_ops_are_named(cls, shape, op, node):
    with pytest.raises(UnsupportedOpError) as e:
        load_torch(cls().eval(), (torch.randn(shape),))
    msg = str(e.value)
    assert op in e.value.op_type and e.value.node_name.startswith(node) and "torch frontend" in msg
    assert op in msg and node in msg and e.value.alternative


@pytest.mark.filterwarnings("ignore:The tensor attributes self.rnn")
def test_lstm_is_reported_as_lstm():
    class JustLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 6, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(UnsupportedOpError, match=r"aten\.lstm.*in module 'rnn' \(LSTM\)"):
        load_torch(JustLSTM(), (torch.randn(1, 3, 4),))


def test_example_inputs_must_fit():
    with pytest.raises(ShapeError, match="example inputs"):
        load_torch(ResNetish(), ())
    with pytest.raises(ShapeError, match="example input 0 is ndarray"):
        load_torch(ResNetish(), (np.zeros((1, 3, 8, 8)),))
    with pytest.raises(ShapeError, match="2 example inputs"):
        load_torch(ResNetish(), (torch.randn(1, 3, 8, 8), torch.randn(1)))
    with pytest.raises(ShapeError, match=r"\(3, 8, 8\)"):  # wrong rank: BatchNorm2d needs 4-D
        load_torch(ResNetish(), (torch.randn(3, 8, 8),))
    with pytest.raises(ShapeError, match="4-D"):  # a 3-D input torch accepts (unbatched conv), the IR not
        load_torch(nn.Conv2d(3, 4, 3), (torch.randn(3, 8, 8),))


def test_decomposition_table_keeps_mapped_ops():
    kept = {op._overloadpacket.__name__ for op in decomposition_table()}
    assert not kept & {"conv2d", "linear", "hardswish", "hardsigmoid", "silu", "relu6", "adaptive_avg_pool2d",
                       "matmul", "softmax", "lstm"}


# ---------------------------------------------------------------------------- user model untouched
def test_user_model_is_not_modified():
    torch.manual_seed(0)
    model = ResNetish()
    model.train()
    model.layer1[0].bn1.eval()  # mixed flags must come back exactly
    flags = {name: m.training for name, m in model.named_modules()}
    params = {name: (p, p.requires_grad) for name, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_torch(model, (torch.randn(2, 3, 15, 15),))
    assert flags == {name: m.training for name, m in model.named_modules()}
    assert all(p is params[n][0] and p.requires_grad == params[n][1] for n, p in model.named_parameters())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------- trainability
def test_graph_module_trains_and_writes_back(imported):
    torch.manual_seed(0)
    _, _, g = imported[ResNetish]
    gm = to_torch(g)
    x = torch.randn(1, 3, 15, 15)
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    losses = []
    for _ in range(3):
        loss = gm(x).square().mean()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    g2 = write_back(g, gm)
    verify(g2)
    assert not np.array_equal(g2.constants["fc.weight"], g.constants["fc.weight"])
    with torch.no_grad():
        assert_close(to_torch(g2)(x).numpy(), gm(x).numpy())
