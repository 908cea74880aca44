"""The qcompile IR: graph, operator schemas, printer, verifier."""

from qcompile.ir import ops
from qcompile.ir.graph import DTYPES, Graph, Node, TensorType
from qcompile.ir.printer import format_graph
from qcompile.ir.verifier import verify

__all__ = ["DTYPES", "Graph", "Node", "TensorType", "format_graph", "ops", "verify"]
