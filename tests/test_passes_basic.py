"""fold-bn, dead-code, annotate-costs: structure (op counts, provenance) and numerics.

Numerical tolerance for these exact passes (fp32):
|y - y_ref| <= 1e-5 * max|y_ref| + 1e-4 * |y_ref|.
"""

import numpy as np
import pytest

from graphs import feeds, resnet_block_graph
from qcompile.ir import verify
from qcompile.ir.costs import graph_costs
from qcompile.passes import AnnotateCosts, DeadCode, FoldBatchNorm, PassContext
from qcompile.passes.manager import run_reference, within_fp32_tolerance

RTOL, ATOL_REL = 1e-4, 1e-5


def assert_same_function(before, after, n=3):
    f = feeds(before, n)
    ref, out = run_reference(before, f), run_reference(after, f)
    assert within_fp32_tolerance(out, ref, RTOL, ATOL_REL), \
        f"max abs diff {max(float(np.abs(a - b).max()) for a, b in zip(out, ref))}"


def test_fold_bn_structure_and_numerics():
    g = resnet_block_graph()
    before = g.clone()
    assert g.op_counts()["batch_norm"] == 5
    r = FoldBatchNorm()(g, PassContext())
    verify(r.graph)
    assert r.modified
    # stem, b1, b2 fold into convs, fc_bn into the linear; post_bn follows an add and must stay.
    assert r.graph.op_counts().get("batch_norm", 0) == 1
    assert r.stats["folded"] == 4
    assert "post_bn" in r.stats["skipped"] and "not produced by conv2d/linear" in r.stats["skipped"]["post_bn"]
    prov = r.graph.node("b2").meta["provenance"]
    assert prov == [{"pass": "fold-bn", "folded": "b2_bn"}]
    assert len(r.graph.node("stem").inputs) == 3  # a bias was created
    assert not any(k.startswith("stem_bn.") for k in r.graph.constants)  # BN constants removed
    assert_same_function(before, r.graph)


def test_fold_bn_skips_conv_with_other_users():
    g = resnet_block_graph()
    stem = g.node("stem")
    extra = g.make_node("relu", stem.outputs, name="side")
    g.insert_before(g.node("stem_bn"), [extra])
    g.outputs = g.outputs + extra.outputs
    before = g.clone()
    r = FoldBatchNorm()(g, PassContext())
    assert "stem_bn" in r.stats["skipped"] and "other users" in r.stats["skipped"]["stem_bn"]
    assert_same_function(before, r.graph)


def test_fold_bn_is_idempotent():
    g = FoldBatchNorm()(resnet_block_graph(), PassContext()).graph
    r = FoldBatchNorm()(g, PassContext())
    assert not r.modified and r.stats["folded"] == 0


def test_dead_code_removes_unreachable_and_identities():
    g = resnet_block_graph()
    before = g.clone()
    stem = g.node("stem_relu")
    dead1 = g.make_node("sigmoid", stem.outputs, name="dead_sig")
    dead2 = g.make_node("relu", dead1.outputs, name="dead_relu")
    g.insert_before(g.node("b1"), [dead1, dead2])
    unused = g.add_constant("unused.weight", np.ones((3, 3), np.float32))
    gap = g.node("gap")
    ident = g.make_node("identity", gap.outputs, name="ident")
    g.insert_before(g.node("flatten"), [ident])
    g.node("flatten").inputs = list(ident.outputs)
    verify(g)
    r = DeadCode()(g, PassContext())
    verify(r.graph)
    names = {n.name for n in r.graph.nodes}
    assert not names & {"dead_sig", "dead_relu", "ident"}
    assert unused not in r.graph.constants
    assert r.stats == {"nodes_removed": 2, "identities_bypassed": 1, "constants_removed": 1}
    assert_same_function(before, r.graph)
    assert not DeadCode()(r.graph, PassContext()).modified


def test_dead_code_keeps_identity_that_is_an_output():
    g = resnet_block_graph()
    ident = g.append(g.make_node("identity", g.outputs, name="out_ident"))
    g.outputs = list(ident.outputs)
    r = DeadCode()(g, PassContext())
    assert "out_ident" in {n.name for n in r.graph.nodes}


def test_annotate_costs_writes_meta_and_totals():
    g = resnet_block_graph()
    r = AnnotateCosts()(g, PassContext())
    costs = {c.node: c for c in graph_costs(g)}
    stem = r.graph.node("stem")
    assert stem.meta["macs"] == costs["stem"].macs == 1 * 8 * 10 * 10 * 3 * 9
    assert stem.meta["params"] == 8 * 3 * 9
    assert stem.meta["out_shape"] == [1, 8, 10, 10]
    assert r.graph.meta["costs"]["macs"] == sum(c.macs for c in costs.values())
    assert r.stats["params"] == r.graph.meta["costs"]["params"]
    assert not AnnotateCosts()(r.graph, PassContext()).modified


@pytest.mark.parametrize("seed", range(4))
def test_fold_bn_then_dead_code_preserves_function(seed):
    g = resnet_block_graph(seed)
    out = DeadCode()(FoldBatchNorm()(g.clone(), PassContext()).graph, PassContext()).graph
    assert_same_function(g, out)
