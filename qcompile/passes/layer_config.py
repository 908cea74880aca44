"""``layer-config``: apply one explicit configuration per layer (what a compression search chose).

``configs`` lists ``layer=choice`` pairs separated by ``;``; a choice is a
:class:`LayerConfig` label::

    stem.0=int8;conv_out.0=tucker2[16x8]+int8;fc=int4

* ``tucker2[Ro x Ri]`` replaces the k x k conv by the Tucker-2 chain
  ``1x1 (I -> R_i) -> k x k core (R_i -> R_o) -> 1x1 (R_o -> O)`` at exactly that rank pair (the
  ``tucker2`` pass's factorization, HOSVD + HOOI);
* ``int8`` / ``int4`` quantizes the layer's weights per output channel on the 8/4-bit grid and, with
  ``act_bits=8``, its input activations per tensor (the ``quantize`` pass; after ``tucker2[...]`` every
  factor conv is quantized);
* ``fp32`` leaves the layer alone.

``reduce_range=true`` puts int8 weights on the 7-bit grid (+-63), as ``quantize{reduce_range=true}``
does: onnxruntime's int8 kernels on x86 CPUs without VNNI add byte products in int16 and saturate
with full-range int8 weights.  ``qcompile search -t onnxruntime`` sets it on such a CPU and records
it in the chosen pipeline text.

Layers not listed stay as they are.  A name that is not a conv2d/linear layer with constant weights,
a malformed choice, or a rank pair larger than the layer's channels is refused naming the layer.
The search (:mod:`qcompile.search`) builds every candidate model with :func:`apply_layer_configs`
and records the chosen point as this pass's text, so ``qcompile compile -p "...,layer-config{...}"``
replays it exactly.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, field
from typing import Callable, Mapping

from qcompile.errors import PipelineError
from qcompile.factorize import layers as L
from qcompile.ir.graph import Graph, Node
from qcompile.passes.base import Pass, PassContext, PassResult

FactorSteps = Callable[[Graph, Node, tuple[int, int]], list[L.Step]]


@dataclass(frozen=True)
class LayerConfigOptions:
    configs: str = field(default="", metadata={
        "doc": "';'-separated layer=choice pairs, choice one of fp32, int8, int4, tucker2[RoxRi], "
               "tucker2[RoxRi]+int8 / +int4"})
    act_bits: int = field(default=8, metadata={"doc": "activation bits of quantized layers (8, or 0 = weight-only)"})
    bias_correction: bool = field(default=True, metadata={
        "doc": "correct the mean output shift of rounded weights (needs calibration data)"})
    reduce_range: bool = field(default=False, metadata={
        "doc": "int8 weights on a 7-bit grid (+-63), for int8 kernels that add byte products in int16 "
               "(onnxruntime's u8s8 kernels on CPUs without VNNI saturate otherwise)"})


@dataclass(frozen=True)
class LayerConfig:
    """One layer's choice: weight ``bits`` (32 = float) and an optional Tucker-2 ``rank`` (R_o, R_i)."""

    bits: int = 32
    rank: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        parts = []
        if self.rank:
            parts.append(f"tucker2[{self.rank[0]}x{self.rank[1]}]")
        if self.bits != 32 or not parts:
            parts.append("fp32" if self.bits == 32 else f"int{self.bits}")
        return "+".join(parts)

    @staticmethod
    def parse(label: str) -> "LayerConfig":
        bits, rank = 32, None
        for part in label.split("+"):
            if part.startswith("tucker2["):
                ro, ri = part[len("tucker2["):-1].split("x")
                rank = (int(ro), int(ri))
            elif part.startswith("int"):
                bits = int(part[3:])
        return LayerConfig(bits, rank)


def option_text(act_bits: int = 8, reduce_range: bool = False) -> str:
    """The non-default quantization options of a ``layer-config{configs=...<here>}`` text (search
    records its chosen point with them), e.g. ``",act_bits=0,reduce_range=true"``."""
    return ("" if act_bits == 8 else f",act_bits={act_bits}") + (",reduce_range=true" if reduce_range else "")


def parse_configs(text: str):
    """``"a=int8;b=tucker2[16x8]"`` -> ``{"a": LayerConfig(8), "b": LayerConfig(32, (16, 8))}``."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        name, sep, label = item.partition("=")
        if not sep or not name.strip():
            raise PipelineError(f"pass 'layer-config': '{item}' is not layer=choice")
        try:
            cfg = LayerConfig.parse(label.strip())
        except (ValueError, IndexError) as e:
            raise PipelineError(f"pass 'layer-config': layer '{name.strip()}': cannot parse choice "
                                f"'{label.strip()}' ({e})") from e
        if cfg.bits not in (32, 8, 4):
            raise PipelineError(f"pass 'layer-config': layer '{name.strip()}': {cfg.bits}-bit weights are not "
                                "supported (fp32, int8, int4)")
        if cfg.label != label.strip():
            raise PipelineError(f"pass 'layer-config': layer '{name.strip()}': choice '{label.strip()}' is not "
                                f"canonical (expected '{cfg.label}')")
        out[name.strip()] = cfg
    return out


def format_configs(configs: Mapping) -> str:
    """The ``configs`` option text of ``{layer: LayerConfig}`` (fp32 layers left out)."""
    return ";".join(f"{n}={c.label}" for n, c in configs.items() if c.label != "fp32")


def tucker2_steps(graph: Graph, node: Node, rank: tuple[int, int]) -> list[L.Step]:
    from qcompile.passes.tucker2 import Tucker2

    return Tucker2(rank=max(rank)).factorize(graph, node, rank, PassContext())[0]


def apply_layer_configs(graph: Graph, configs: Mapping, ctx: PassContext, *, act_bits: int = 8,
                        bias_correction: bool = True, reduce_range: bool = False,
                        factor_steps: FactorSteps = tucker2_steps) -> Graph:
    """Rewrite ``graph`` (mutated; the quantized graph returned) with ``{layer: LayerConfig}``
    (``reduce_range``: int8 weights on the 7-bit grid, as the ``quantize`` pass's option).

    ``factor_steps(graph, node, rank)`` gives a layer's Tucker-2 factors (the search passes a memoised
    one)."""
    from qcompile.passes.quantize import Quantize

    layers = {n.name: n for n in L.targets(graph, ("conv2d", "linear"), "*", "")}
    quant, int4 = [], []
    for name, cfg in configs.items():
        node = layers.get(name)
        if node is None:
            raise PipelineError(f"pass 'layer-config': '{name}' is not a conv2d/linear layer with constant weights "
                                "in this graph")
        if cfg.rank:
            o, i = graph.types[node.inputs[1]].shape[:2]
            if node.op != "conv2d" or node.attrs["group"] != 1:
                raise PipelineError(f"pass 'layer-config': layer '{name}' ({node.op}) cannot take Tucker-2 "
                                    "(ungrouped conv2d only)")
            if not (0 < cfg.rank[0] <= o and 0 < cfg.rank[1] <= i):
                raise PipelineError(f"pass 'layer-config': layer '{name}': rank {cfg.rank[0]}x{cfg.rank[1]} "
                                    f"outside 1..{o} x 1..{i}")
            L.splice(graph, node, factor_steps(graph, node, cfg.rank),
                     {"pass": "layer-config", "method": "tucker2", "rank": list(cfg.rank), "choice": cfg.label})
        if cfg.bits != 32:
            pat = glob.escape(name) + (".tucker_*" if cfg.rank else "")
            quant.append(pat)
            if cfg.bits == 4:
                int4.append(pat)
    graph.remove_unused_constants()
    if quant:
        q = Quantize(layers="|".join(quant), int4="|".join(int4), act_bits=act_bits,
                     bias_correction=bias_correction and bool(ctx.calibration), reduce_range=reduce_range)
        graph = q(graph, PassContext(calibration=ctx.calibration)).graph
    return graph


class LayerConfigPass(Pass):
    name = "layer-config"
    summary = "apply an explicit per-layer choice (Tucker-2 rank, int8/int4), e.g. a search's chosen point"
    Options = LayerConfigOptions
    exact = False

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if o.act_bits not in (0, 8):
            raise PipelineError(f"pass 'layer-config': act_bits must be 8 or 0, not {o.act_bits}")
        configs = {n: c for n, c in parse_configs(o.configs).items() if c.label != "fp32"}
        if not configs:
            return PassResult(graph, False, {"layers": {}})
        out = apply_layer_configs(graph, configs, ctx, act_bits=o.act_bits, bias_correction=o.bias_correction,
                                  reduce_range=o.reduce_range)
        return PassResult(out, True, {"layers": {n: c.label for n, c in configs.items()}})
