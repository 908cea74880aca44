"""Pass instrumentation plug-ins: per-pass timing, numbered IR dumps, print-after-change.

An instrument implements any of ``run_before_pipeline``, ``run_before_pass``,
``run_after_pass`` and ``run_after_pipeline``; the :class:`PassManager` calls them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING

from qcompile.ir.printer import format_graph

if TYPE_CHECKING:
    from qcompile.ir.graph import Graph
    from qcompile.passes.base import Pass
    from qcompile.passes.manager import PassManager, PassRecord


class Instrument:
    def run_before_pipeline(self, graph: "Graph", pm: "PassManager") -> None: ...
    def run_before_pass(self, graph: "Graph", p: "Pass", index: int) -> None: ...
    def run_after_pass(self, graph: "Graph", p: "Pass", index: int, record: "PassRecord") -> None: ...
    def run_after_pipeline(self, graph: "Graph", pm: "PassManager") -> None: ...


class DumpIR(Instrument):
    """Write ``000_input.txt``, ``001_<pass>.txt``, ... into ``directory``."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def run_before_pipeline(self, graph, pm):
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "000_input.txt").write_text(format_graph(graph) + "\n")

    def run_after_pass(self, graph, p, index, record):
        (self.directory / f"{index + 1:03d}_{p.name}.txt").write_text(format_graph(graph) + "\n")


class PrintAfterChange(Instrument):
    """Print the IR after every pass that reports ``modified=True``."""

    def __init__(self, stream: IO[str] | None = None):
        self.stream = stream

    def run_after_pass(self, graph, p, index, record):
        if record.modified:
            out = self.stream or sys.stderr
            print(f"// ----- IR after {p.to_text()} -----", file=out)
            print(format_graph(graph), file=out)


class Timing(Instrument):
    """Collect per-pass wall time; :meth:`table` renders it."""

    def __init__(self):
        self.records: list = []

    def run_after_pass(self, graph, p, index, record):
        self.records.append(record)

    def table(self) -> str:
        total = sum(r.seconds for r in self.records) or 1e-12
        lines = [f"{'pass':<32} {'ms':>9} {'%':>6} {'nodes':>11} {'changed':>8} {'rel.err':>9}"]
        for r in self.records:
            err = "-" if r.rel_error is None else f"{r.rel_error:.2e}"
            lines.append(f"{r.text[:32]:<32} {r.seconds * 1e3:9.2f} {100 * r.seconds / total:6.1f} "
                         f"{r.nodes_before:>5}->{r.nodes_after:<5} {str(r.modified):>8} {err:>9}")
        lines.append(f"{'total':<32} {total * 1e3:9.2f}")
        return "\n".join(lines)
