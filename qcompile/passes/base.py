"""The pass contract.

A pass is a class with

* ``name``: kebab-case, unique (``fold-bn``);
* ``Options``: a frozen dataclass whose fields carry defaults and a ``doc``
  (``field(default=..., metadata={"doc": "..."})``);
* ``exact``: True when the rewrite preserves the function up to fp32 rounding
  (numerics are then checked against a tight tolerance), False for lossy
  compression passes (their error is measured and reported);
* ``call(graph, ctx) -> PassResult(graph, modified)``.

Passes may mutate the graph they are given: the :class:`~qcompile.passes.manager.PassManager`
hands each pipeline a private clone, so a user's graph is never changed.
``requires``/``ensures`` raise :class:`PreconditionError`/:class:`PostconditionError`
naming what was expected.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from qcompile.errors import PipelineError
from qcompile.ir.graph import Graph


@dataclass
class PassResult:
    graph: Graph
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    """This pass has no options."""


@dataclass
class PassContext:
    """What a pipeline run shares with its passes.

    ``calibration``: a list of feeds (``{input name: array}`` shaped exactly like the
    graph inputs; real data where the user gave it) used by data-driven passes and
    by numerical verification.  ``original``: the graph the pipeline started from (set by
    :meth:`~qcompile.passes.manager.PassManager.run` when not given), e.g. the teacher of ``finetune``.
    """

    calibration: Sequence[Mapping[str, np.ndarray]] | None = None
    original: Graph | None = None
    instruments: list = field(default_factory=list)
    verify_structure: bool = True
    verify_numerics: bool = False
    rtol: float = 1e-4
    atol_rel: float = 1e-5


class Pass:
    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    exact: ClassVar[bool] = True
    summary: ClassVar[str] = ""

    def __init__(self, options: Any = None, **kwargs: Any):
        if options is None:
            options = self.Options(**kwargs)
        elif kwargs:
            options = dataclasses.replace(options, **kwargs)
        if not isinstance(options, self.Options):
            raise PipelineError(f"pass '{self.name}' expects {self.Options.__name__} options")
        self.options = options

    # -- the contract ---------------------------------------------------------
    def requires(self, graph: Graph) -> None:
        """Raise PreconditionError if ``graph`` is not something this pass can handle."""

    def call(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, before: Graph, result: PassResult) -> None:
        """Raise PostconditionError if the pass broke a promise."""

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> PassResult:
        ctx = ctx or PassContext()
        self.requires(graph)
        result = self.call(graph, ctx)
        self.ensures(graph, result)
        return result

    # -- text form ------------------------------------------------------------
    def option_items(self) -> list[tuple[str, Any]]:
        """Options that differ from their defaults, in declaration order."""
        items = []
        for f in dataclasses.fields(self.options):
            v = getattr(self.options, f.name)
            if f.default is not dataclasses.MISSING and v == f.default:
                continue
            items.append((f.name, v))
        return items

    def to_text(self) -> str:
        from qcompile.passes.pipeline import format_value

        items = self.option_items()
        if not items:
            return self.name
        return self.name + "{" + ",".join(f"{k}={format_value(v)}" for k, v in items) + "}"

    def __repr__(self) -> str:
        return f"<Pass {self.to_text()}>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.options == other.options  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.options))


def option_docs(options_cls: type) -> list[dict[str, Any]]:
    """[{name, type, default, doc}] for a pass's Options dataclass."""
    out = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append({"name": f.name, "type": f.type if isinstance(f.type, str) else f.type.__name__,
                    "default": default, "doc": f.metadata.get("doc", "")})
    return out
