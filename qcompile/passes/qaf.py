"""``qaf``: quantization-aware factorization — factor chains whose weights are fitted on the grid.

Cherniuk et al. 2023.  Where ``tucker2`` / ``cp`` followed by ``quantize`` factorize in float and
round each factor afterwards, ``qaf`` fits the factors *subject to* lying on the symmetric
``bits``-bit grid with one scale per output channel of each factor conv, jointly, by ADMM
(:mod:`qcompile.factorize.admm`), starting from the float decomposition of the chosen method:

* ``method=tucker2``: 1x1 (I -> R_i), k x k core (R_i -> R_o), 1x1 (R_o -> O); three groups=1 convs,
  so the TVM integer lowering runs all three as int8 convolutions;
* ``method=cp``: 1x1, depthwise k x 1, depthwise 1 x k, 1x1 (the depthwise ones stay float in TVM).

Ranks are chosen exactly as the ``tucker2`` / ``cp`` passes choose them (same options, same chain
shapes and MACs).  Each factor conv reads its weight as
``dequantize_linear(q int8, s float32 per output channel, axis=0, bits)`` — the weight form the
``quantize`` pass emits, which then only adds activation quantization to these layers.  6-bit
factors are int8 values with ``|q| <= 31`` read with ``bits=8`` (the IR stores 4 or 8).  The bias
stays float.  Provenance per factor: method, rank, weight_bits, ADMM iterations (and the best
one; 0 = the factorize-then-quantize start was kept), the grid chain's relative weight error,
the factorize-then-quantize error at the same rank and bits, and the float chain's error.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from qcompile.errors import PipelineError
from qcompile.factorize import admm
from qcompile.factorize.layers import Step, weight_and_bias
from qcompile.ir.graph import Graph, Node
from qcompile.passes.base import PassContext, PassResult
from qcompile.passes.cp_decomp import CPDecomposition
from qcompile.passes.factorize_base import FactorizeOptions, FactorizePass
from qcompile.passes.quantize import dequantized_weight
from qcompile.passes.tucker2 import Tucker2

METHODS = {"tucker2": Tucker2, "cp": CPDecomposition}
ORDER = {"tucker2": ((2, 0, False), (1, 0, True), (0, 1, False)),
         "cp": ((3, 0, False), (0, 1, False), (1, 1, False), (2, 1, False))}
"""Per method, the ADMM factors in :mod:`~qcompile.factorize.admm` order as (chain step index,
grid axis of the factor, kept 4-D): Tucker-2 ``[U_o, G, U_i]``, CP ``[A, B, C, D]``."""


@dataclass(frozen=True)
class QAFOptions(FactorizeOptions):
    method: str = field(default="tucker2", metadata={"doc": "factor chain: tucker2 (1x1, kxk core, 1x1) or cp "
                                                            "(1x1, depthwise kx1, depthwise 1xk, 1x1)"})
    bits: int = field(default=8, metadata={"doc": "weight bits of every factor: 8, 6 (int8 storage, |q| <= 31) "
                                                  "or 4"})
    iterations: int = field(default=40, metadata={"doc": "ADMM outer iterations (ALS sweeps)"})


def _from_step(weight: np.ndarray, axis: int, four_d: bool) -> np.ndarray:
    """A chain step's conv weight as the ADMM factor: 4-D kept (the Tucker core), else the
    (out, rest) matrix, transposed when the factor's grid axis is its columns."""
    if four_d:
        return weight
    m = weight.reshape(weight.shape[0], -1)
    return m if axis == 0 else m.T


def _to_step(factor: np.ndarray, axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_from_step`: the conv weight (output channels on axis 0)."""
    return (factor if axis == 0 else factor.T).reshape(shape)


class QAF(FactorizePass):
    name = "qaf"
    Options = QAFOptions
    summary = "quantization-aware factorization: tucker2 / cp factor chains fitted on an int8/6/4 grid by ADMM"

    def __init__(self, options=None, **kwargs):
        super().__init__(options, **kwargs)
        o = self.options
        if o.method not in METHODS:
            raise PipelineError(f"pass 'qaf': option 'method' must be one of {', '.join(METHODS)}, got '{o.method}'")
        if o.bits not in admm.BITS:
            raise PipelineError(f"pass 'qaf': option 'bits' must be one of {', '.join(map(str, admm.BITS))}, "
                                f"got {o.bits}")
        if o.iterations < 1:
            raise PipelineError(f"pass 'qaf': option 'iterations' must be >= 1, got {o.iterations}")
        shared = {f.name: getattr(o, f.name) for f in dataclasses.fields(FactorizeOptions)}
        self.base = METHODS[o.method](FactorizeOptions(**shared))
        self.method = o.method
        self._grids: dict[tuple[str, str], admm.GridFactor] = {}

    # -- rank selection and chain shapes: those of the float method ---------------
    def why_not(self, graph, node):
        return self.base.why_not(graph, node)

    def full_rank(self, graph, node):
        return self.base.full_rank(graph, node)

    def fixed_rank(self, graph, node, rank):
        return self.base.fixed_rank(graph, node, rank)

    def macs_of(self, graph, node, rank):
        return self.base.macs_of(graph, node, rank)

    def candidates(self, graph, node, ctx):
        return self.base.candidates(graph, node, ctx)

    def timing_steps(self, graph, node, rank, ctx):
        return self.base.timing_steps(graph, node, rank, ctx)

    # -- the grid fit ------------------------------------------------------------
    def factorize(self, graph: Graph, node: Node, rank, ctx: PassContext) -> tuple[list[Step], dict]:
        o = self.options
        steps, info = self.base.factorize(graph, node, rank, ctx)
        w, _ = weight_and_bias(graph, node)
        start = [_from_step(steps[i].weight, axis, four_d) for i, axis, four_d in ORDER[o.method]]
        if o.method == "tucker2":
            res = admm.tucker2(w, *start, bits=o.bits, iterations=o.iterations)
        else:
            res = admm.cp(w, start, bits=o.bits, iterations=o.iterations)
        for (i, axis, _), gf in zip(ORDER[o.method], res.factors):
            st = steps[i]
            shape = st.weight.shape
            conv = admm.GridFactor(_to_step(gf.q, axis, shape), gf.scale, 0, gf.bits)
            self._grids[(node.name, st.role)] = conv
            steps[i] = Step(st.op, conv.value, st.bias, st.attrs, st.role)
        return steps, {"weight_bits": o.bits, "admm_iterations": res.iterations,
                       "admm_best_iteration": res.best_iteration, "weight_rel_error": round(res.rel_error, 6),
                       "ftq_weight_rel_error": round(res.ftq_rel_error, 6),
                       "float_weight_rel_error": info["weight_rel_error"]}

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        """The factorization driver, then every factor's float weight replaced by its grid form."""
        self._grids = {}
        result = super().call(graph, ctx)
        for n in list(graph.nodes):
            prov = n.meta.get("provenance", [{}])[-1]
            grid = self._grids.get((prov.get("source"), prov.get("role"))) if prov.get("pass") == self.name else None
            if grid is not None:
                _read_through_dequantize(graph, n, grid)
        graph.remove_unused_constants()
        return result


def _read_through_dequantize(graph: Graph, node: Node, grid: admm.GridFactor) -> None:
    """``node``'s weight input becomes ``dequantize_linear(q, s, axis=0)`` (bits 4, else 8)."""
    node.inputs[1] = dequantized_weight(graph, node, grid.q, grid.scale, 4 if grid.bits == 4 else 8)
