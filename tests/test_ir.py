"""IR core: type inference, MAC counts, verifier invariants, printing, editing helpers."""

import numpy as np
import pytest

from qcompile.errors import IRVerificationError, ShapeError
from qcompile.ir import Graph, TensorType, ops, verify
from qcompile.ir.costs import format_cost_table, graph_costs, totals
from qcompile.ir.verifier import collect_problems


def small_graph() -> Graph:
    g = Graph("small")
    x = g.add_input("x", TensorType((2, 3, 9, 9)))
    w = g.add_constant("conv.weight", np.ones((8, 3, 3, 3), np.float32))
    b = g.add_constant("conv.bias", np.zeros(8, np.float32))
    c = g.append(g.make_node("conv2d", [x, w, b], {"strides": (2, 2), "pads": (1, 1, 1, 1)}, name="conv"))
    r = g.append(g.make_node("relu", c.outputs, name="relu"))
    p = g.append(g.make_node("global_avg_pool", r.outputs, name="gap"))
    f = g.append(g.make_node("flatten", p.outputs, name="flat"))
    fw = g.add_constant("fc.weight", np.ones((4, 8), np.float32))
    fc = g.append(g.make_node("linear", [f.outputs[0], fw], name="fc"))
    g.outputs = fc.outputs
    return g


def test_shape_inference_and_macs():
    g = small_graph()
    verify(g)
    assert g.types["conv"] == TensorType((2, 8, 5, 5))
    assert g.types["fc"] == TensorType((2, 4))
    costs = {c.node: c for c in graph_costs(g)}
    assert costs["conv"].macs == 2 * 8 * 5 * 5 * 3 * 3 * 3
    assert costs["conv"].params == 8 * 27 + 8
    assert costs["fc"].macs == 2 * 4 * 8
    assert totals(graph_costs(g))["params"] == g.param_count()


@pytest.mark.parametrize("size,k,s,pb,pe,d,ceil,expected", [
    (9, 3, 2, 1, 1, 1, False, 5), (8, 3, 2, 0, 0, 1, False, 3), (8, 3, 2, 0, 0, 1, True, 4),
    (8, 3, 1, 2, 2, 2, False, 8), (7, 2, 2, 0, 0, 1, True, 4), (6, 3, 3, 0, 1, 1, True, 2),
])
def test_conv_out_size_matches_torch(size, k, s, pb, pe, d, ceil, expected):
    import torch

    assert ops.conv_out_size(size, k, s, pb, pe, d, ceil) == expected
    if pb == pe and not ceil:
        y = torch.nn.functional.conv2d(torch.zeros(1, 1, size, size), torch.zeros(1, 1, k, k), None, s, pb, d)
        assert y.shape[-1] == expected
    elif pb == pe:
        y = torch.nn.functional.max_pool2d(torch.zeros(1, 1, size, size), k, s, pb, d, ceil_mode=True)
        assert y.shape[-1] == expected


def test_bad_shapes_name_the_node():
    g = Graph("bad")
    x = g.add_input("x", TensorType((1, 4, 8, 8)))
    w = g.add_constant("w", np.ones((8, 3, 3, 3), np.float32))
    with pytest.raises(ShapeError, match="conv_a"):
        g.make_node("conv2d", [x, w], name="conv_a")
    y = g.add_input("y", TensorType((1, 5, 8, 8)))
    with pytest.raises(ShapeError, match="cannot broadcast"):
        g.make_node("add", [x, y], name="add_a")
    with pytest.raises(IRVerificationError, match="unknown attributes"):
        g.make_node("relu", [x], {"alpha": 1.0})
    with pytest.raises(IRVerificationError, match="unknown IR op"):
        g.make_node("frobnicate", [x])


def test_verifier_catches_broken_invariants():
    g = small_graph()
    g.nodes.reverse()  # use before definition
    assert any("before it is defined" in p for p in collect_problems(g))
    with pytest.raises(IRVerificationError):
        verify(g)

    g = small_graph()
    g.types["relu"] = TensorType((2, 8, 5, 6))  # recorded type disagrees with inference
    assert any("recorded" in p for p in collect_problems(g))

    g = small_graph()
    g.outputs = ["nope"]
    assert any("not defined" in p for p in collect_problems(g))

    g = small_graph()
    g.nodes[1].outputs = list(g.nodes[0].outputs)  # SSA violation
    assert any("defined twice" in p for p in collect_problems(g))


def test_constants_are_read_only_and_clone_is_independent():
    g = small_graph()
    with pytest.raises(ValueError):
        g.constants["conv.weight"][0, 0, 0, 0] = 5.0
    h = g.clone()
    h.nodes[1].attrs["dummy"] = 1
    h.nodes.pop()
    h.outputs = h.nodes[-1].outputs
    assert len(g.nodes) == 5 and "dummy" not in g.nodes[1].attrs
    verify(g)


def test_replace_node_rewires_uses_and_checks_types():
    g = small_graph()
    relu = g.node("relu")
    new = g.make_node("clip", [relu.inputs[0]], {"min": 0.0, "max": None}, name="relu_as_clip")
    g.replace_node(relu, [new], new.outputs)
    verify(g)
    assert g.node("gap").inputs == new.outputs
    bad = g.make_node("global_avg_pool", [g.inputs[0]])
    with pytest.raises(IRVerificationError, match="changes type"):
        g.replace_node(g.node("gap"), [bad], bad.outputs)


def test_fresh_names_are_unique():
    g = small_graph()
    names = {g.fresh_name("conv") for _ in range(5)}
    assert len(names) == 5 and "conv" not in names


def test_printer_shows_ops_types_and_provenance():
    g = small_graph()
    g.node("conv").add_provenance(**{"pass": "unit", "rank": 3})
    text = str(g)
    assert "graph small(%x: f32[2,3,9,9]) -> (%fc)" in text
    assert "conv2d(%x, @conv.weight, @conv.bias) {strides=(2, 2), pads=(1, 1, 1, 1)} : f32[2,8,5,5]" in text
    assert "[pass=unit rank=3]" in text
    table = format_cost_table(g)
    assert "conv" in table and "total" in table


def test_tensor_type_validation():
    with pytest.raises(ValueError):
        TensorType((1, -1))
    with pytest.raises(ValueError):
        TensorType((1,), "complex64")
    assert TensorType((2, 3), "int8").nbytes == 6
