"""torch.export frontend + reference interpreter: numerics vs the torch model, naming, op counts,
unsupported ops named, user model untouched, trainability (write_back).

fp32 tolerance: |y - y_ref| <= 1e-5 * max|y_ref| + 1e-4 * |y_ref|.
Weights are random (seeded): these tests check the translation, not accuracy.
"""

import numpy as np
import pytest
import torch
from torch import nn

from qcompile.errors import ShapeError, UnsupportedOpError
from qcompile.frontends.torch_frontend import load_torch
from qcompile.backends.torch_backend import to_torch, write_back
from qcompile.ir import verify
from qcompile.passes.manager import within_fp32_tolerance

RTOL, ATOL_REL = 1e-4, 1e-5


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1, ceil_mode=True))
        self.layer1 = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layer1(self.stem(x))), 1))


class Inceptionish(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(4, 6, 1)
        self.b2 = nn.Sequential(nn.Conv2d(4, 3, 1), nn.ReLU(), nn.Conv2d(3, 5, 3, padding=1))
        self.b3 = nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=False), nn.Conv2d(4, 2, 1))
        self.head = nn.Linear(13, 3)

    def forward(self, x):
        y = torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)
        return torch.softmax(self.head(y.mean(dim=(2, 3))), dim=-1)


class MobileBlock(nn.Module):
    """MobileNetV2/V3 style: expand, depthwise, squeeze-excite with hardsigmoid, hardswish, relu6."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, 2, 1, groups=24, bias=False), nn.BatchNorm2d(24),
                                nn.Hardswish())
        self.se_fc1 = nn.Conv2d(24, 6, 1)
        self.se_fc2 = nn.Conv2d(6, 24, 1)
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.gelu = nn.GELU()
        self.act = nn.SiLU()

    def forward(self, x):
        y = self.dw(self.expand(x))
        s = nn.functional.hardsigmoid(self.se_fc2(torch.relu(self.se_fc1(nn.functional.adaptive_avg_pool2d(y, 1)))))
        y = self.project(y * s)
        return self.act(self.gelu(y)) * 0.5 + 1.0


class Pools(nn.Module):
    def forward(self, x):
        a = nn.functional.max_pool2d(x, 3, 2, 1, ceil_mode=True)
        b = nn.functional.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=True)
        c = nn.functional.avg_pool2d(x, 2, 2, 0, ceil_mode=True, count_include_pad=False)
        return torch.cat([a, b], 1), c.permute(0, 2, 3, 1).reshape(1, -1) - 0.25, torch.clamp(x, -0.5, 0.5)


def _randomize_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


CASES = [
    (ResNetish, (1, 3, 15, 15), {"conv2d": 6, "batch_norm": 6, "linear": 1, "max_pool2d": 1}),
    (Inceptionish, (2, 4, 7, 7), {"conv2d": 4, "concat": 1, "softmax": 1, "avg_pool2d": 1}),
    (MobileBlock, (1, 8, 9, 9), {"conv2d": 5, "batch_norm": 3, "hardswish": 1, "hardsigmoid": 1, "gelu": 1}),
    (Pools, (1, 3, 9, 10), {"max_pool2d": 1, "avg_pool2d": 2, "clip": 1}),
]


@pytest.mark.parametrize("cls,shape,counts", CASES, ids=[c[0].__name__ for c in CASES])
def test_import_matches_torch(cls, shape, counts):
    torch.manual_seed(0)
    model = _randomize_bn(cls()).eval()
    x = torch.randn(shape)
    g = load_torch(model, (x,))
    verify(g)
    ops = g.op_counts()
    for op, n in counts.items():
        assert ops.get(op, 0) == n, (op, ops)
    with torch.no_grad():
        ref = model(x)
        ours = to_torch(g)(x)
    ref = ref if isinstance(ref, tuple) else (ref,)
    ours = ours if isinstance(ours, tuple) else (ours,)
    assert within_fp32_tolerance([o.detach().numpy() for o in ours], [r.numpy() for r in ref], RTOL, ATOL_REL)


def test_names_come_from_modules_and_state_dict():
    model = ResNetish().eval()
    g = load_torch(model, (torch.randn(1, 3, 15, 15),), input_names=["image"])
    assert g.inputs == ["image"]
    assert set(model.state_dict()) - {k for k in model.state_dict() if k.endswith("num_batches_tracked")} \
        <= set(g.constants)
    names = {n.name for n in g.nodes}
    assert {"layer1.0.conv1", "layer1.1.down.0", "fc", "stem.0"} <= names
    assert g.node("layer1.0.conv1").inputs[1] == "layer1.0.conv1.weight"
    assert g.node("fc").meta["module"] == "fc"


def test_user_model_is_not_modified():
    model = ResNetish()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_torch(model, (torch.randn(1, 3, 15, 15),))
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class WithTopK(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return torch.topk(self.fc(x), 3).values


def test_unsupported_op_is_named():
    with pytest.raises(UnsupportedOpError) as e:
        load_torch(WithTopK().eval(), (torch.randn(2, 8),))
    msg = str(e.value)
    assert "topk" in msg and "torch frontend" in msg and e.value.node_name.startswith("topk")


def test_example_inputs_required():
    with pytest.raises(ShapeError):
        load_torch(ResNetish(), ())


def test_graph_module_trains_and_writes_back():
    torch.manual_seed(0)
    model = ResNetish().eval()
    x = torch.randn(4, 3, 15, 15)
    g = load_torch(model, (x[:1],))
    gm = to_torch(g)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    loss0 = None
    for _ in range(3):
        loss = gm(x[:1]).pow(2).mean()
        loss0 = loss0 if loss0 is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(gm(x[:1]).pow(2).mean()) < loss0
    g2 = write_back(g, gm)
    verify(g2)
    with torch.no_grad():
        assert within_fp32_tolerance([to_torch(g2)(x[:1]).numpy()], [gm(x[:1]).numpy()], RTOL, ATOL_REL)
    assert not np.array_equal(g2.constants["fc.weight"], g.constants["fc.weight"])


def test_constant_names_cannot_collide_with_module_attributes():
    """User tensors named like nn.Module attributes ('half', 'to', 'train') must not break the interpreter."""
    import numpy as np

    from qcompile.ir import Graph, TensorType

    g = Graph("names")
    x = g.add_input("x", TensorType((2, 3)))
    y = x
    for name in ("half", "to", "train", "forward"):
        c = g.add_constant(name, np.full((3,), 2.0, np.float32), exact_name=True)
        y = g.append(g.make_node("mul", [y, c], name=f"mul_{name}")).outputs[0]
    g.outputs = [y]
    out = to_torch(g)(torch.ones(2, 3))
    assert torch.allclose(out, torch.full((2, 3), 16.0))
