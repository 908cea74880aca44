"""Pass manager: verification between passes, numerics checks, instruments, no mutation of input."""

import io

import numpy as np
import pytest

from graphs import feeds, resnet_block_graph
from qcompile.errors import NumericsError, PostconditionError
from qcompile.ir.printer import format_graph
from qcompile.passes import PassContext, PassManager, Sequential, parse_pipeline
from qcompile.passes.base import Pass, PassResult
from qcompile.passes.dead_code import DeadCode
from qcompile.passes.fold_bn import FoldBatchNorm
from qcompile.passes.instruments import DumpIR, PrintAfterChange, Timing


class _ScaleWeights(Pass):
    """Claims to be exact but doubles a weight: the manager must catch it."""

    name = "scale-weights"

    def call(self, graph, ctx):
        n = next(n for n in graph.nodes if n.op == "conv2d")
        n.inputs[1] = graph.add_constant("doubled", graph.constants[n.inputs[1]] * 2)
        return PassResult(graph, True)


class _Lossy(_ScaleWeights):
    name = "lossy-scale"
    exact = False


class _BreakIR(Pass):
    name = "break-ir"

    def call(self, graph, ctx):
        graph.nodes.reverse()
        return PassResult(graph, True)


def test_pipeline_does_not_mutate_input_and_records_stats():
    g = resnet_block_graph()
    text = format_graph(g)
    pm = PassManager(parse_pipeline("fold-bn,dead-code,annotate-costs"))
    out = pm.run(g, PassContext(calibration=feeds(g), verify_numerics=True))
    assert format_graph(g) == text
    assert [r.name for r in pm.records] == ["fold-bn", "dead-code", "annotate-costs"]
    assert pm.records[0].modified and pm.records[0].nodes_after == pm.records[0].nodes_before - 4
    assert all(r.rel_error is not None and r.rel_error < 1e-5 for r in pm.records)
    assert out.op_counts()["batch_norm"] == 1
    assert pm.text == "fold-bn,dead-code,annotate-costs"


def test_exact_pass_that_changes_numerics_is_caught():
    g = resnet_block_graph()
    pm = PassManager([FoldBatchNorm(), _ScaleWeights()])
    with pytest.raises(NumericsError, match="scale-weights"):
        pm.run(g, PassContext(calibration=feeds(g), verify_numerics=True))


def test_lossy_pass_error_is_recorded_not_raised():
    g = resnet_block_graph()
    pm = PassManager([_Lossy()])
    pm.run(g, PassContext(calibration=feeds(g), verify_numerics=True))
    assert pm.records[0].rel_error > 1e-3


def test_structural_verification_names_the_pass():
    g = resnet_block_graph()
    with pytest.raises(PostconditionError, match="break-ir"):
        PassManager([_BreakIR()]).run(g)


def test_instruments_dump_print_and_time(tmp_path):
    g = resnet_block_graph()
    stream = io.StringIO()
    timing = Timing()
    ctx = PassContext(instruments=[DumpIR(tmp_path / "ir"), PrintAfterChange(stream), timing])
    PassManager(parse_pipeline("annotate-costs,fold-bn,fold-bn")).run(g, ctx)
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == ["000_input.txt", "001_annotate-costs.txt", "002_fold-bn.txt", "003_fold-bn.txt"]
    assert "batch_norm" in (tmp_path / "ir" / "000_input.txt").read_text()
    printed = stream.getvalue()
    # annotate-costs and the first fold-bn change the IR, the second fold-bn does not.
    assert printed.count("// ----- IR after") == 2
    table = timing.table()
    assert table.count("fold-bn") == 2 and "total" in table


def test_sequential_is_a_pass():
    g = resnet_block_graph()
    seq = Sequential([FoldBatchNorm(), DeadCode()])
    assert seq.to_text() == "fold-bn,dead-code" and seq.exact
    pm = PassManager([seq])
    out = pm.run(g, PassContext(calibration=feeds(g), verify_numerics=True))
    assert out.op_counts()["batch_norm"] == 1
    assert np.isfinite(pm.records[0].rel_error)
