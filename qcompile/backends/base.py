"""The backend contract shared by torch, onnxruntime and (next) TVM.

A backend turns a verified IR graph into artifact files inside a directory
(:meth:`Backend.build`), and turns such a directory back into something that runs
(:meth:`Backend.load`).  :meth:`Backend.runner` runs a graph in memory, which the
pass manager uses for numerical verification without touching the disk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from qcompile.ir.graph import Graph


class Runner(ABC):
    """Runs a compiled model: named numpy inputs in, outputs (graph order) out."""

    input_names: Sequence[str]
    output_names: Sequence[str]

    @abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        ...


class Backend(ABC):
    name: ClassVar[str]
    description: ClassVar[str] = ""

    @abstractmethod
    def build(self, graph: Graph, out_dir: Path, options: Mapping[str, Any] | None = None) -> list[str]:
        """Write the artifact files for ``graph`` into ``out_dir``; return their relative paths."""

    @abstractmethod
    def load(self, out_dir: Path, manifest: Mapping[str, Any]) -> Runner:
        """Load an artifact directory written by :meth:`build`."""

    @abstractmethod
    def runner(self, graph: Graph) -> Runner:
        """Run ``graph`` in memory (no artifact on disk)."""

    def versions(self) -> dict[str, str]:
        """Versions of the libraries this backend depends on (recorded in manifests)."""
        return {}
