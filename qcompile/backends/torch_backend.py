"""The reference interpreter (IR -> ``torch.nn.Module``) and the ``torch`` backend.

:class:`GraphModule` executes IR nodes in order with ``torch.nn.functional``;
its semantics are the IR's reference semantics (ONNX-compatible: asymmetric
pads, ``ceil_mode`` pooling, ``count_include_pad``).  Floating constants become
``nn.Parameter`` so a compressed graph is directly trainable (fine-tuning);
:func:`write_back` copies trained values back into a graph.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qcompile.backends.base import Backend, Runner
from qcompile.errors import IRVerificationError, QCompileError
from qcompile.ir.graph import Graph, Node

Impl = Callable[[list, dict], Any]


def _pad_nchw(x: torch.Tensor, pads: Sequence[int], value: float = 0.0) -> torch.Tensor:
    t, l, b, r = pads
    if t == l == b == r == 0:
        return x
    return F.pad(x, (l, r, t, b), value=value)


def _conv2d(v, a):
    x, w = v[0], v[1]
    b = v[2] if len(v) > 2 else None
    t, l, bo, r = a["pads"]
    if t == bo and l == r:
        return F.conv2d(x, w, b, a["strides"], (t, l), a["dilations"], a["group"])
    return F.conv2d(_pad_nchw(x, a["pads"]), w, b, a["strides"], 0, a["dilations"], a["group"])


def _ceil_extra(size: int, k: int, s: int, pb: int, pe: int, d: int) -> int:
    """Extra end padding that turns ONNX ceil_mode output size into floor-mode arithmetic."""
    from qcompile.ir.ops import conv_out_size

    out = conv_out_size(size, k, s, pb, pe, d, True)
    needed = (out - 1) * s + d * (k - 1) + 1 - (size + pb + pe)
    return max(0, needed)


def _pool_pads(x, a) -> tuple[int, int, int, int, int, int]:
    t, l, b, r = a["pads"]
    k, s = a["kernel"], a["strides"]
    d = a.get("dilations", (1, 1))
    eb = er = 0
    if a["ceil_mode"]:
        eb = _ceil_extra(x.shape[2], k[0], s[0], t, b, d[0])
        er = _ceil_extra(x.shape[3], k[1], s[1], l, r, d[1])
    return t, l, b, r, eb, er


def _max_pool2d(v, a):
    x = v[0]
    t, l, b, r, eb, er = _pool_pads(x, a)
    xp = _pad_nchw(x, (t, l, b + eb, r + er), value=-math.inf)
    return F.max_pool2d(xp, a["kernel"], a["strides"], 0, a["dilations"])


def _avg_pool2d(v, a):
    """ONNX average pool: the divisor counts real elements (count_include_pad=0) or real + pad
    elements (=1); positions added only by ceil_mode never count."""
    x = v[0]
    t, l, b, r, eb, er = _pool_pads(x, a)
    k, s = a["kernel"], a["strides"]
    summed = F.avg_pool2d(_pad_nchw(x, (t, l, b + eb, r + er)), k, s, 0) * (k[0] * k[1])
    ones = torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device)
    if a["count_include_pad"]:
        ones = _pad_nchw(ones, (t, l, b, r), value=1.0)
        ones = _pad_nchw(ones, (0, 0, eb, er))
    else:
        ones = _pad_nchw(ones, (t, l, b + eb, r + er))
    count = F.avg_pool2d(ones, k, s, 0) * (k[0] * k[1])
    return summed / count


def _batch_norm(v, a):
    x, scale, bias, mean, var = v
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = scale / torch.sqrt(var + a["epsilon"])
    return (x - mean.reshape(shape)) * inv.reshape(shape) + bias.reshape(shape)


def _flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX Flatten: (prod(shape[:axis]), prod(shape[axis:]))."""
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _clip(v, a):
    return torch.clamp(v[0], a["min"], a["max"])


IMPLS: dict[str, Impl] = {
    "conv2d": _conv2d,
    "linear": lambda v, a: F.linear(v[0], v[1], v[2] if len(v) > 2 else None),
    "matmul": lambda v, a: torch.matmul(v[0], v[1]),
    "batch_norm": _batch_norm,
    "relu": lambda v, a: F.relu(v[0]),
    "sigmoid": lambda v, a: torch.sigmoid(v[0]),
    "tanh": lambda v, a: torch.tanh(v[0]),
    "exp": lambda v, a: torch.exp(v[0]),
    "sqrt": lambda v, a: torch.sqrt(v[0]),
    "erf": lambda v, a: torch.erf(v[0]),
    "neg": lambda v, a: -v[0],
    "abs": lambda v, a: torch.abs(v[0]),
    "reciprocal": lambda v, a: torch.reciprocal(v[0]),
    "identity": lambda v, a: v[0],
    "hardswish": lambda v, a: F.hardswish(v[0]),
    "silu": lambda v, a: F.silu(v[0]),
    "hardsigmoid": lambda v, a: torch.clamp(a["alpha"] * v[0] + a["beta"], 0.0, 1.0),
    "clip": _clip,
    "leaky_relu": lambda v, a: F.leaky_relu(v[0], a["alpha"]),
    "gelu": lambda v, a: F.gelu(v[0], approximate=a["approximate"]),
    "add": lambda v, a: v[0] + v[1],
    "sub": lambda v, a: v[0] - v[1],
    "mul": lambda v, a: v[0] * v[1],
    "div": lambda v, a: v[0] / v[1],
    "pow": lambda v, a: torch.pow(v[0], v[1]),
    "max": lambda v, a: torch.maximum(v[0], v[1]),
    "min": lambda v, a: torch.minimum(v[0], v[1]),
    "max_pool2d": _max_pool2d,
    "avg_pool2d": _avg_pool2d,
    "global_avg_pool": lambda v, a: v[0].mean(dim=(2, 3), keepdim=True),
    "reduce_mean": lambda v, a: v[0].mean(dim=tuple(a["axes"]), keepdim=bool(a["keepdims"])),
    "concat": lambda v, a: torch.cat(v, dim=a["axis"]),
    "reshape": lambda v, a: v[0].reshape(tuple(a["shape"])),
    "flatten": lambda v, a: _flatten(v[0], a["axis"]),
    "transpose": lambda v, a: v[0].permute(*a["perm"]),
    "softmax": lambda v, a: torch.softmax(v[0], dim=a["axis"]),
}

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8, "uint8": torch.uint8,
                 "int32": torch.int32, "int64": torch.int64, "bool": torch.bool}


def _param_name(const: str, taken: set[str]) -> str:
    """A module attribute name for an IR constant: always prefixed, so user tensor names such as
    'half', 'to' or 'train' cannot collide with ``nn.Module`` attributes."""
    base = "c_" + (re.sub(r"[^A-Za-z0-9_]", "_", const) or "const")
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


class GraphModule(nn.Module):
    """Executes an IR graph. ``param_names`` maps IR constant name -> attribute name."""

    def __init__(self, graph: Graph, trainable: bool = True):
        super().__init__()
        for n in graph.nodes:
            if n.op not in IMPLS:
                raise IRVerificationError(f"torch backend has no implementation of op '{n.op}' (node '{n.name}')")
        self.graph = graph
        self.param_names: dict[str, str] = {}
        taken: set[str] = set()
        for cname, arr in graph.constants.items():
            attr = _param_name(cname, taken)
            self.param_names[cname] = attr
            tensor = torch.from_numpy(np.array(arr))
            if arr.dtype.kind == "f":
                self.register_parameter(attr, nn.Parameter(tensor, requires_grad=trainable))
            else:
                self.register_buffer(attr, tensor)
        self._plan = [(IMPLS[n.op], n) for n in graph.nodes]

    def constant(self, name: str) -> torch.Tensor:
        return getattr(self, self.param_names[name])

    def forward(self, *inputs: torch.Tensor):
        g = self.graph
        if len(inputs) != len(g.inputs):
            raise QCompileError(f"graph '{g.name}' takes {len(g.inputs)} inputs, got {len(inputs)}")
        env: dict[str, torch.Tensor] = dict(zip(g.inputs, inputs))
        for cname in g.constants:
            env[cname] = self.constant(cname)
        for fn, node in self._plan:
            out = fn([env[i] for i in node.inputs if i], node.attrs)
            if len(node.outputs) == 1:
                env[node.outputs[0]] = out
            else:
                env.update(zip(node.outputs, out))
        outs = tuple(env[o] for o in g.outputs)
        return outs[0] if len(outs) == 1 else outs


def to_torch(graph: Graph, trainable: bool = True) -> GraphModule:
    return GraphModule(graph, trainable)


def write_back(graph: Graph, module: GraphModule) -> Graph:
    """A clone of ``graph`` whose constants hold ``module``'s current parameter values."""
    g = graph.clone()
    for cname, attr in module.param_names.items():
        if cname not in g.constants:
            continue
        value = getattr(module, attr).detach().cpu().numpy()
        if value.shape != g.constants[cname].shape:
            raise IRVerificationError(f"parameter '{cname}' changed shape {g.constants[cname].shape} -> {value.shape}")
        arr = value.astype(g.constants[cname].dtype, copy=True)
        arr.flags.writeable = False
        g.constants[cname] = arr
    return g


class TorchRunner(Runner):
    def __init__(self, graph: Graph, num_threads: int | None = None):
        self.module = GraphModule(graph, trainable=False).eval()
        self.input_names = list(graph.inputs)
        self.output_names = list(graph.outputs)
        self.num_threads = num_threads

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.input_names]
            out = self.module(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return [o.numpy() for o in outs]


class TorchBackend(Backend):
    name = "torch"
    description = "PyTorch eager execution of the IR (reference semantics); artifact model.onnx"

    def build(self, graph: Graph, out_dir: Path, options: Mapping[str, Any] | None = None) -> list[str]:
        from qcompile.frontends.onnx_export import save_onnx

        save_onnx(graph, Path(out_dir) / "model.onnx")
        return ["model.onnx"]

    def load(self, out_dir: Path, manifest: Mapping[str, Any]) -> Runner:
        from qcompile.frontends.onnx_frontend import load_onnx

        return TorchRunner(load_onnx(Path(out_dir) / "model.onnx"))

    def runner(self, graph: Graph) -> Runner:
        return TorchRunner(graph)

    def versions(self) -> dict[str, str]:
        return {"torch": torch.__version__}
