"""The qcompile Relax pipeline for CPU targets, as phase lists (TVM-style).

    to_relax(graph)                                  NCHW Relax, constants embedded
    integer:   qdq_to_integer (dequantize -> conv/matmul as int8 x int8 -> int32)
    layout:    ConvertLayout(conv2d -> NHWC/HWIO; conv2d_transpose kept NCHW/IOHW), FoldConstant
               (weights permuted once)
    unsigned:  (x86) uint8 activations: shifted by 128 for vpdpbusd (VNNI), else the non-negative
               ones as they are for vpmaddubsw
    legalize:  LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR
    schedule:  dlight ApplyDefaultSchedule(int8 dot-product rules, then the qcompile CPU rules)
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

from qcompile.backends.tvm.integer_lowering import qdq_to_integer, unsigned_activations
from qcompile.backends.tvm.relax_builder import to_relax
from qcompile.backends.tvm.int8_schedules import int8_rules
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


def _x86_features(cpu: str) -> set[str]:
    from tvm.target import codegen

    return set(codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu})))


def host_x86_target(mcpu: str | None = None) -> CpuTarget:
    """x86-64 code for this machine's CPU (LLVM's name for it), or for ``mcpu`` when given.

    An explicit ``mcpu`` must be a CPU LLVM knows, and its ISA must run here (the artifact is
    verified on this machine): asking for AVX-512 code on a host without it is refused up front
    instead of dying with SIGILL.
    """
    from tvm.target import codegen

    host = codegen.llvm_get_system_cpu()
    cpu = mcpu or host
    if mcpu:
        if not codegen.llvm_is_valid_cpu(mcpu, "x86_64-linux-gnu"):
            raise TargetError(f"LLVM does not know the x86 CPU '{mcpu}' (e.g. znver4, skylake-avx512, "
                              f"x86-64-v3; this machine is '{host}')")
        missing = sorted(f for f in _x86_features(mcpu) - _x86_features(host)
                         if f.startswith(("avx", "fma", "sse", "amx", "bmi")))
        if missing:
            raise TargetError(f"this machine ('{host}') cannot run code for '{mcpu}': it lacks "
                              f"{', '.join(missing[:6])}; compile on (or for) a CPU that has them")
    return x86_target(cpu, host=host)


def x86_target(cpu: str, host: str | None = None) -> CpuTarget:
    """x86-64 code for LLVM CPU ``cpu`` without checking that it runs here (cross-compiling for
    another x86 machine, or inspecting the code): :func:`host_x86_target` is the checked form."""
    import os

    have = _x86_features(cpu)
    feats = tuple(f for f in ("avx2", "avx512f", "avx512bw", "avx512vnni", "avxvnni") if f in have)
    return CpuTarget("x86", {"kind": "llvm", "mcpu": cpu, "mtriple": "x86_64-linux-gnu",
                             "num-cores": len(os.sched_getaffinity(0))},
                     description=f"x86-64 {'host ' if cpu == host else ''}CPU ({cpu}: "
                                 f"{', '.join(feats) or 'no AVX'})", features=feats)


def assembly(executable) -> str:
    """The assembly of a built executable's kernels (to check which instructions were used)."""
    return "\n".join(m.inspect_source("asm") for m in executable.mod.imports)


def arm64_target(dotprod: bool = False) -> CpuTarget:
    mattr = ["+neon"] + (["+dotprod"] if dotprod else [])
    return CpuTarget("arm64" + ("-dotprod" if dotprod else ""),
                     {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr},
                     cross_cc="aarch64-linux-gnu-g++",
                     description=f"aarch64 Linux ({', '.join(mattr)}), cross-compiled, run over TVM RPC",
                     features=tuple(a.lstrip("+") for a in mattr))


def resolve(name: str, mcpu: str | None = None) -> CpuTarget:
    if name == "x86":
        return host_x86_target(mcpu)
    if mcpu:
        raise TargetError(f"--mcpu applies to the x86 target, not '{name}'")
    if name == "arm64":
        return arm64_target(False)
    if name == "arm64-dotprod":
        return arm64_target(True)
    raise TargetError(f"unknown TVM CPU target '{name}' (x86, arm64, arm64-dotprod)")


def layout_passes() -> list:
    """conv2d -> NHWC/HWIO; conv2d_transpose stays NCHW/IOHW, the only layout TOPI lowers (without it
    ConvertLayout would carry NHWC into it from its neighbours and legalization would leave it)."""
    return [relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"],
                                           "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}),
            relax.transform.FoldConstant()]


def legalize_passes() -> list:
    return [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]


def schedule_passes() -> list:
    """Default schedules, then weight repacking folded into the constants.

    Constant weights are marked layout-free, so a rule may repack them (see
    ``schedules._pack_weights``); the repack is split out of the kernel and evaluated at
    compile time by FoldConstant, leaving only the packed constant in the artifact.
    """
    return [relax.transform.AttachAttrLayoutFreeBuffers(),
            dl.ApplyDefaultSchedule(*int8_rules(), *default_rules()),
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination()]


def lower_to_tir(graph: Graph, target: CpuTarget, tune_trials: int = 0, log=print) -> tvm.IRModule:
    """Relax module with every PrimFunc scheduled for ``target`` (before VM lowering).

    With ``tune_trials > 0`` the kernels are first tuned with MetaSchedule. The database lives in
    the cache folder and is reused across compiles, and a tuned schedule replaces the default rule
    only where it measured faster (see tuning.py).
    """
    mod, _ = qdq_to_integer(to_relax(graph))
    tgt = target.tvm_target()
    with tgt:
        mod = tvm.ir.transform.Sequential(layout_passes())(mod)
        if target.name == "x86" and {"avx2", "avx512bw"} & set(target.features):
            mod, _ = unsigned_activations(mod, vnni="avx512vnni" in target.features)
        mod = tvm.ir.transform.Sequential(legalize_passes())(mod)
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
