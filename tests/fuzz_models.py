"""Random CNN graphs as ordinary ``torch.nn.Module`` code, for the torch.export frontend.

:class:`IdiomaticCNN` rebuilds an IR graph made by :mod:`cnn_strategies` from the layers a user
writes -- ``nn.Conv2d`` (every other conv's padding
written out as ``nn.ZeroPad2d`` before it, asymmetric pads as ``nn.ZeroPad2d`` of the excess), ``nn.BatchNorm2d`` in eval
mode with its running statistics, ``nn.ReLU``, ``nn.MaxPool2d`` / ``nn.AvgPool2d``,
``nn.AdaptiveAvgPool2d``, ``torch.flatten``, ``nn.Linear``, ``+``, ``*`` and ``torch.cat`` -- so
the frontend sees what torch.export makes of a real model (aten convolution, batch norm, ...),
not the reference interpreter's functional calls.

:func:`current` is a ``module:factory`` for :func:`qcompile.frontends.load_model`
(``"fuzz_models:current"``): it returns the module last set with :func:`set_current`, so a test
loads it through the same entry point the CLI uses.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from qcompile.ir import Graph


class IdiomaticCNN(nn.Module):
    def __init__(self, graph: Graph):
        super().__init__()
        self.graph = graph
        self.layers = nn.ModuleDict()
        self.consts: dict[str, str] = {}
        self.example_inputs = tuple(torch.zeros(graph.types[i].shape) for i in graph.inputs)
        self.input_names = list(graph.inputs)
        for k, n in enumerate(graph.nodes):
            key = f"n{k}_{n.op}"
            c = [graph.constants.get(i) for i in n.inputs]
            if n.op == "conv2d":
                w = c[1]
                t, l, b, r = n.attrs["pads"]
                # odd convs: all padding written out by nn.ZeroPad2d before an unpadded conv; even ones: the
                # symmetric part as the conv's own padding, only an asymmetric excess by nn.ZeroPad2d
                odd = sum(m.op == "conv2d" for m in graph.nodes[:k]) % 2
                ph, pw = (0, 0) if odd else (min(t, b), min(l, r))
                conv = nn.Conv2d(w.shape[1] * n.attrs["group"], w.shape[0], tuple(w.shape[2:]),
                                 stride=tuple(n.attrs["strides"]), dilation=tuple(n.attrs["dilations"]),
                                 groups=n.attrs["group"], bias=len(c) > 2, padding=(ph, pw))
                conv.weight.data = torch.from_numpy(np.array(w))
                if len(c) > 2:
                    conv.bias.data = torch.from_numpy(np.array(c[2]))
                extra = (l - pw, r - pw, t - ph, b - ph)  # the rest by nn.ZeroPad2d((left, right, top, bottom))
                self.layers[key] = conv if not any(extra) else nn.Sequential(nn.ZeroPad2d(extra), conv)
            elif n.op == "batch_norm":
                bn = nn.BatchNorm2d(c[1].shape[0], eps=n.attrs["epsilon"])
                for p, v in zip(("weight", "bias", "running_mean", "running_var"), c[1:5]):
                    getattr(bn, p).data = torch.from_numpy(np.array(v))
                self.layers[key] = bn
            elif n.op == "linear":
                w = c[1]
                fc = nn.Linear(w.shape[1], w.shape[0], bias=len(c) > 2)
                fc.weight.data = torch.from_numpy(np.array(w))
                if len(c) > 2:
                    fc.bias.data = torch.from_numpy(np.array(c[2]))
                self.layers[key] = fc
            elif n.op in ("max_pool2d", "avg_pool2d"):
                t, l, b, r = n.attrs["pads"]
                assert (t, l) == (b, r), "the generator only makes symmetric pool pads"
                kw = dict(kernel_size=tuple(n.attrs["kernel"]), stride=tuple(n.attrs["strides"]), padding=(t, l),
                          ceil_mode=bool(n.attrs["ceil_mode"]))
                self.layers[key] = nn.MaxPool2d(**kw) if n.op == "max_pool2d" else \
                    nn.AvgPool2d(**kw, count_include_pad=bool(n.attrs["count_include_pad"]))
            elif n.op == "global_avg_pool":
                self.layers[key] = nn.AdaptiveAvgPool2d(1)
            elif n.op == "relu":
                self.layers[key] = nn.ReLU()
            elif n.op == "mul":
                self.register_buffer(key, torch.from_numpy(np.array(c[1])))
            elif n.op in ("add", "concat", "flatten"):
                pass
            else:
                raise NotImplementedError(f"IdiomaticCNN: no torch layer for IR op '{n.op}' (node '{n.name}')")
            if n.op in ("add", "concat"):
                assert not any(v is not None for v in c), "operands are activations"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env = {self.graph.inputs[0]: x}
        for k, n in enumerate(self.graph.nodes):
            key = f"n{k}_{n.op}"
            v = [env[i] for i in n.inputs if i in env]
            if n.op == "add":
                y = v[0] + v[1]
            elif n.op == "concat":
                y = torch.cat(v, dim=n.attrs["axis"])
            elif n.op == "flatten":
                y = torch.flatten(v[0], n.attrs["axis"])
            elif n.op == "mul":
                y = v[0] * getattr(self, key)
            else:
                y = self.layers[key](v[0])
            env[n.outputs[0]] = y
        return env[self.graph.outputs[0]]


_CURRENT: list[nn.Module] = []


def set_current(module: nn.Module) -> None:
    _CURRENT[:] = [module]


def current() -> nn.Module:
    return _CURRENT[0]
