"""Compilation targets: the one place that maps a target name to its backend.

A :class:`Target` names a backend, a description and the passes that target
needs before building (its *phase list*, appended to the user's pipeline).
Adding a target is adding one entry to :data:`TARGETS`; no code elsewhere
branches on target names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from qcompile.backends.base import Backend
from qcompile.errors import TargetError


def _torch() -> Backend:
    from qcompile.backends.torch_backend import TorchBackend

    return TorchBackend()


def _onnxruntime() -> Backend:
    from qcompile.backends.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend()


def _tvm(name: str) -> Callable[[], Backend]:
    def make() -> Backend:
        from qcompile.backends.tvm.backend import TvmBackend

        return TvmBackend(name)
    return make


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    make_backend: Callable[[], Backend]
    phases: tuple[str, ...] = field(default=())

    @property
    def backend(self) -> Backend:
        return self.make_backend()

    def as_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "phases": list(self.phases)}


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("torch", "PyTorch eager (reference interpreter); artifact: model.onnx", _torch),
    Target("onnxruntime", "onnxruntime CPU execution provider; artifact: model.onnx", _onnxruntime),
    Target("tvm-x86", "Apache TVM, x86-64 host CPU (AVX-512 where present); artifact: model.so", _tvm("x86")),
    Target("tvm-arm64", "Apache TVM, aarch64 +neon, cross-compiled; runs over TVM RPC (QCOMPILE_RPC)",
           _tvm("arm64")),
    Target("tvm-arm64-dotprod", "Apache TVM, aarch64 +neon +dotprod (Cortex-A76+); runs over TVM RPC",
           _tvm("arm64-dotprod")),
)}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise TargetError(f"unknown target '{name}'; available targets: {', '.join(TARGETS)}") from None
