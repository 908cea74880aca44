"""The qcompile Relax pipeline for CPU targets, as phase lists (TVM-style).

    to_relax(graph)                                  NCHW Relax, constants embedded
    layout:    ConvertLayout(conv2d -> NHWC/HWIO), FoldConstant (weights permuted once)
    legalize:  LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR
    schedule:  dlight ApplyDefaultSchedule(qcompile CPU rules)
    lower:     TVM's cpu_generic dataflow-lower + finalize passes

Targets are described by :class:`CpuTarget` (x86 host / aarch64 cross) in one
registry; nothing else branches on the target name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight as dl

from qcompile.backends.tvm.relax_builder import to_relax
from qcompile.backends.tvm.schedules import default_rules
from qcompile.errors import TargetError
from qcompile.ir.graph import Graph


@dataclass(frozen=True)
class CpuTarget:
    """A CPU code-generation target: LLVM target dict + how to link a shared library."""

    name: str
    llvm: dict
    cross_cc: str | None = None
    description: str = ""
    features: tuple[str, ...] = field(default=())

    def tvm_target(self) -> tvm.target.Target:
        return tvm.target.Target(self.llvm)

    @property
    def remote(self) -> bool:
        return self.cross_cc is not None


def host_x86_target() -> CpuTarget:
    """The machine we run on: LLVM's name for the host CPU and its features (AVX-512/VNNI if present)."""
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    have = set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu})))
    feats = tuple(f for f in ("avx2", "avx512f", "avx512bw", "avx512vnni", "avxvnni") if f in have)
    import os

    return CpuTarget("x86", {"kind": "llvm", "mcpu": cpu, "mtriple": "x86_64-linux-gnu",
                             "num-cores": len(os.sched_getaffinity(0))},
                     description=f"x86-64 host CPU ({cpu}: {', '.join(feats) or 'no AVX'})", features=feats)


def arm64_target(dotprod: bool = False) -> CpuTarget:
    mattr = ["+neon"] + (["+dotprod"] if dotprod else [])
    return CpuTarget("arm64" + ("-dotprod" if dotprod else ""),
                     {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr},
                     cross_cc="aarch64-linux-gnu-g++",
                     description=f"aarch64 Linux ({', '.join(mattr)}), cross-compiled, run over TVM RPC",
                     features=tuple(a.lstrip("+") for a in mattr))


def resolve(name: str) -> CpuTarget:
    if name == "x86":
        return host_x86_target()
    if name == "arm64":
        return arm64_target(False)
    if name == "arm64-dotprod":
        return arm64_target(True)
    raise TargetError(f"unknown TVM CPU target '{name}' (x86, arm64, arm64-dotprod)")


def layout_passes() -> list:
    return [relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
            relax.transform.FoldConstant()]


def legalize_passes() -> list:
    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


def schedule_passes() -> list:
    return [dl.ApplyDefaultSchedule(*default_rules())]


def lower_to_tir(graph: Graph, target: CpuTarget, tune_trials: int = 0, log=print) -> tvm.IRModule:
    """Relax module with every PrimFunc scheduled for ``target`` (before VM lowering).

    With ``tune_trials > 0`` the kernels are first tuned with MetaSchedule. The database lives in
    the cache folder and is reused across compiles, and a tuned schedule replaces the default rule
    only where it measured faster (see tuning.py).
    """
    mod = to_relax(graph)
    tgt = target.tvm_target()
    with tgt:
        mod = tvm.ir.transform.Sequential(layout_passes() + legalize_passes())(mod)
    if tune_trials > 0:
        from qcompile.backends.tvm.tuning import apply_choices, tune_and_choose

        mod = apply_choices(mod, tune_and_choose(mod, target, tune_trials, log=log), target)
    with tgt:
        mod = tvm.ir.transform.Sequential(schedule_passes())(mod)
    return mod


def build(graph: Graph, target: CpuTarget, tune_trials: int = 0, log=print) -> tvm.runtime.Executable:
    mod = lower_to_tir(graph, target, tune_trials, log)
    tgt = target.tvm_target()
    finish = tvm.ir.transform.Sequential(cpu_generic.dataflow_lower_passes(tgt) + cpu_generic.finalize_passes(tgt))
    return tvm.compile(mod, tgt, relax_pipeline=finish)
