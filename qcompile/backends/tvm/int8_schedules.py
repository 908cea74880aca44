"""Integer dot-product schedules (dlight-style rules) for int8 convolutions and dense layers.

The integer-lowering pass hands the scheduler, per quantized layer, one fused PrimFunc whose
anchor is an exact integer reduction followed by the layer's elementwise epilogue::

    conv2d_nhwc[n, h, w, co] += int32(A[n, h*s + kh*d, w*s + kw*d, ci]) * int32(W[kh, kw, ci, co])
    matmul[i, j]             += int32(X[i, k]) * int32(W[k, j])

A is ``uint8`` on x86 with VNNI (activations shifted by +128, the pass subtracts ``128 * sum(W)``
afterwards), ``uint8`` holding 0..127 or ``int8`` on x86 without VNNI (non-negative activations
are passed as uint8) and ``int8`` on aarch64; W is an ``int8`` constant (layout-free, so it is repacked at
compile time); the accumulator is ``int32``.  The epilogue (compensation, scale, bias, activation,
requantization) is applied while the accumulator tile is written back.

Instructions (``L`` int32 lanes, each summing ``D`` byte products; the activation bytes
``a[0:D]`` are broadcast to every lane, ``b`` is an ``L x D`` block of weights)::

    c[l] += sum_{d < D} int32(a[d]) * int32(b[l][d])      for l < L

* ``vpdpbusd`` (x86 AVX512-VNNI: L=16 zmm, or L=8 ymm for channel counts that are only a
  multiple of 8; AVX-VNNI: L=8), D=4, unsigned a x signed b: 64 MACs per instruction.
* ``sdot`` (aarch64 ``+dotprod``), L=4, D=4, signed x signed: 16 MACs.
* plain NEON (aarch64 without dotprod), L=4, D=4: ``smull`` (int8 x int8 -> int16, exact) on two
  lanes' weights at a time, ``saddlp`` + ``addp`` sum each lane's four products into int32.
* ``vpmaddwd`` (x86 without VNNI: L=8 AVX2, L=16 AVX-512BW), D=2: bytes widened to int16, pairs of
  products summed into int32 exactly.  (``vpmaddubsw`` is not used: its int16 sums saturate.)

They are registered as qcompile's own tensor intrinsics (``qcompile_*``), with the same
description as TVM's ``tensor_intrin`` ones: TVM 0.27's ``VNNI_DOT_16x4_INTRIN`` passes int32
vectors where LLVM 22's ``vpdpbusd`` takes byte vectors (module verification fails), and importing
``tvm.s_tir.tensor_intrin`` builds every target's intrinsics (~1 minute).
The kernel is chosen from LLVM's feature list for the target (``llvm_get_cpu_features``): the
widest one whose L divides the output channels and whose D divides the input channels.

Loop nest of :class:`Int8Conv2dNHWC` (register tile ``P`` pixels x ``V`` vectors of L channels,
``C = V*L``; weights repacked to ``W'[CO/C][CI/B][kh][kw][B/D][V][L][D]``, so the ``L x D`` bytes an
instruction needs are contiguous and a tile streams its weights in loop order)::

    parallel co_tile, n, h (, row block):          # or `parallel n, h, w_o` when W fits in L2
      [ci_block:]                                  # when the tile's weights exceed L2
        w_o, kh, kw, ci_o:
          unroll P, unroll V: dot(acc[p, v, 0:L], A[.., ci_o*D : +D], W'[.., v, 0:L, 0:D])
      write-back of acc + fused epilogue, vectorized

:class:`Int8Dense` (batch ``M`` <= 8): ``W'[N/C][K/D][V][L][D]``; each thread takes output tiles,
and for every group of D inputs all M rows are updated, so the weights (the layer is memory
bound) are read exactly once::

    parallel j_tile: k_o: unroll M, unroll V: dot(acc[i, v, 0:L], X[i, k_o*D : +D], W'[j_tile, k_o, v])

Shapes the instructions cannot cover (input channels / K not a multiple of D, output channels /
N not a multiple of L: e.g. the 3-channel first layer or a 10-class head) use the plain
register-tiled schedules of :mod:`schedules` on the int32 arithmetic (vectorized over output
channels), which are exact too.  Anything that is not an int8 x int8 -> int32 reduction (fp32,
grouped / depthwise convolutions) is left to the other rules (``apply`` returns None).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.target import Target

from qcompile.backends.tvm.schedules import (
    ACC_BLOCK_BYTES,
    WEIGHT_BLOCK_BYTES,
    Conv2dNHWC,
    DenseRowMajor,
    _accumulate_tile,
    _block_name,
    _has_root,
    _int,
    _largest_divisor,
    _pack_weights,
    _vectorize_inner,
    _vectorize_last,
)


log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------
# Dot-product kernels
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DotKernel:
    """One tensor intrinsic: ``c[0:lanes] += a[0:depth] . b[0:lanes, 0:depth]`` (bytes -> int32)."""

    intrin: str
    lanes: int
    depth: int
    a_dtype: str
    registers: int
    """Vector registers of the ISA (bounds the accumulator tile)."""
    isa: str


def _dot_desc(lanes: int, depth: int, a_dtype: str):
    """The computation every kernel implements, in the form the legalized conv / matmul blocks have."""

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (depth,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, depth), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:depth], B[0:lanes, 0:depth])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, depth):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

    return desc


def _pmaddwd_impl(lanes: int, a_dtype: str):
    """x86 without VNNI: widen bytes to int16, ``vpmaddwd`` (exact pairwise products summed to int32)."""
    bits = lanes * 32
    name = "llvm.x86.avx2.pmadd.wd" if bits == 256 else "llvm.x86.avx512.pmaddw.d.512"
    w16 = f"int16x{2 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (2,), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (lanes, 2), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:2], B[0:lanes, 0:2])
            T.writes(C[0:lanes])
            pair = T.reinterpret(T.Cast("int16x2", A.vload([0], f"{a_dtype}x2")), dtype="int32")
            a16 = T.reinterpret(T.broadcast(pair, lanes), dtype=w16)
            b16 = T.Cast(w16, B.vload([0, 0], dtype=f"int8x{2 * lanes}"))
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=f"int32x{lanes}") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(name), a16, b16, dtype=f"int32x{lanes}")

    return impl


def _pmaddubsw_impl(lanes: int):
    """x86 without VNNI, activations in [0, 127]: ``vpmaddubsw`` multiplies unsigned by signed bytes
    and adds adjacent pairs into int16 (saturating, but |a0 b0 + a1 b1| <= 2 * 127 * 128 = 32512
    cannot saturate when a <= 127), then ``vpmaddwd`` with ones adds the pairs into int32: four byte
    products per int32 lane, the VNNI layout, in two instructions instead of one."""
    bits = lanes * 32
    ubs, wd = (("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd") if bits == 256 else
               ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"))

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            pairs = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(ubs), T.reinterpret(T.broadcast(a32, lanes), dtype=f"int8x{4 * lanes}"),
                B.vload([0, 0], dtype=f"int8x{4 * lanes}"), dtype=f"int16x{2 * lanes}")
            C[T.ramp(T.int32(0), 1, lanes)] = C.vload([0], dtype=f"int32x{lanes}") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(wd), pairs, T.broadcast(T.int16(1), 2 * lanes), dtype=f"int32x{lanes}")

    return impl


def _vpdpbusd_impl(lanes: int):
    """``vpdpbusd`` on ``lanes`` int32 (16: AVX512-VNNI zmm, 8: AVX-VNNI / AVX512VL ymm).

    The 4 activation bytes are broadcast to every lane as one int32; LLVM >= 22 types the byte
    operands of ``llvm.x86.avx512.vpdpbusd.*`` as byte vectors (older LLVM: int32 vectors), which
    is why TVM's own ``VNNI_DOT_16x4_INTRIN`` (int32 operands) fails LLVM verification in 0.27.
    """
    from tvm.target.codegen import llvm_version_major

    name = f"llvm.x86.avx512.vpdpbusd.{lanes * 32}"
    byte_operands = llvm_version_major() >= 22
    a_type = f"uint8x{4 * lanes}" if byte_operands else f"int32x{lanes}"
    b_type = f"int8x{4 * lanes}" if byte_operands else f"int32x{lanes}"

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(name),
                C.vload([0], dtype=f"int32x{lanes}"),
                T.reinterpret(T.broadcast(a32, lanes), dtype=a_type),
                T.reinterpret(B.vload([0, 0], dtype=f"int8x{4 * lanes}"), dtype=b_type),
                dtype=f"int32x{lanes}")

    return impl


def _sdot_impl():
    """aarch64 ``+dotprod``: ``sdot`` on 4 int32 lanes; the 4 activation bytes broadcast per lane."""

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a32 = T.reinterpret(A.vload([0], "int8x4"), dtype="int32")
            C[T.ramp(T.int32(0), 1, 4)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.sdot.v4i32.v16i8"),
                C.vload([0], dtype="int32x4"),
                T.reinterpret(T.broadcast(a32, 4), dtype="int8x16"),
                B.vload([0, 0], dtype="int8x16"),
                dtype="int32x4")

    return impl


def _neon_impl():
    """Plain NEON: ``smull`` of the 4 broadcast activation bytes with 2 lanes' weights at a time
    (int16 products, exact), ``saddlp`` + ``addp`` reduce each lane's 4 products to int32."""

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (4,), "int8", offset_factor=1)
        B = T.match_buffer(b, (4, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (4,), "int32", offset_factor=1)
        with T.sblock("root"):
            T.reads(C[0:4], A[0:4], B[0:4, 0:4])
            T.writes(C[0:4])
            a8 = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int8x4"), dtype="int32"), 2), dtype="int8x8")
            b = B.vload([0, 0], dtype="int8x16")
            lanes01 = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
                T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                                        a8, T.vectorlow(b, dtype="int8x8"), dtype="int16x8"),
                dtype="int32x4")
            lanes23 = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.saddlp.v4i32.v8i16"),
                T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.smull.v8i16"),
                                        a8, T.vectorhigh(b, dtype="int8x8"), dtype="int16x8"),
                dtype="int32x4")
            C[T.ramp(T.int32(0), 1, 4)] = C.vload([0], dtype="int32x4") + T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.aarch64.neon.addp.v4i32"), lanes01, lanes23, dtype="int32x4")

    return impl


def _register(name: str, desc, impl) -> str:
    TensorIntrin.register(name, desc, impl, override=True)
    return name


_KERNELS: dict[str, DotKernel] = {}


def _kernels() -> dict[str, DotKernel]:
    """All kernels by ``isa/activation dtype``, registering qcompile's own intrinsics on first use."""
    if _KERNELS:
        return _KERNELS
    # (TVM's own tensor_intrin package is not imported: importing it builds every target's
    # intrinsics, ~1 minute; its VNNI one also fails LLVM 22's verifier, see _vpdpbusd_impl)
    vnni16 = _register("qcompile_vnni_16x4_u8i8i32", _dot_desc(16, 4, "uint8"), _vpdpbusd_impl(16))
    vnni8 = _register("qcompile_vnni_8x4_u8i8i32", _dot_desc(8, 4, "uint8"), _vpdpbusd_impl(8))
    ks = [DotKernel(vnni16, 16, 4, "uint8", 32, "avx512vnni"),
          DotKernel(vnni8, 8, 4, "uint8", 32, "avx512vnni-ymm"),
          DotKernel(vnni8, 8, 4, "uint8", 16, "avxvnni"),
          DotKernel(_register("qcompile_sdot_4x4_i8i8i32", _dot_desc(4, 4, "int8"), _sdot_impl()),
                    4, 4, "int8", 32, "sdot"),
          DotKernel(_register("qcompile_neon_4x4_i8i8i32", _dot_desc(4, 4, "int8"), _neon_impl()),
                    4, 4, "int8", 32, "neon")]
    for lanes, regs, isa in ((16, 32, "avx512bw"), (8, 16, "avx2")):
        ks.append(DotKernel(_register(f"qcompile_pmaddubsw_{lanes}x4_u7i8i32", _dot_desc(lanes, 4, "uint8"),
                                      _pmaddubsw_impl(lanes)), lanes, 4, "uint8", regs, f"{isa}-ubsw"))
        for a_dtype in ("uint8", "int8"):
            name = f"qcompile_pmaddwd_{lanes}x2_{a_dtype[0]}8i8i32"
            ks.append(DotKernel(_register(name, _dot_desc(lanes, 2, a_dtype), _pmaddwd_impl(lanes, a_dtype)),
                                lanes, 2, a_dtype, regs, isa))
    _KERNELS.update({f"{k.isa}/{k.a_dtype}": k for k in ks})
    return _KERNELS


def target_features(target: Target) -> set[str]:
    from tvm.target import codegen

    try:
        return set(codegen.llvm_get_cpu_features(target))
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe: no special instructions
        return set()


def candidate_kernels(target: Target, a_dtype: str) -> list[DotKernel]:
    """The dot-product kernels ``target`` can run for activations of ``a_dtype``, best first.

    x86: vpdpbusd (AVX512-VNNI zmm, then ymm; AVX-VNNI; unsigned activations only), then vpmaddwd
    (AVX-512BW, AVX2).  aarch64: sdot with ``+dotprod``, then the NEON widening multiply (signed
    activations only).  Narrower kernels come after wider ones, for channel counts that are not a
    multiple of the wide vector.
    """
    feats = target_features(target)
    if "neon" in feats:
        order = (["sdot"] if "dotprod" in feats else []) + ["neon"]
    else:
        order = []
        if {"avx512vnni", "avx512bw"} <= feats:
            order.append("avx512vnni")
            if "avx512vl" in feats:
                order.append("avx512vnni-ymm")
        if "avxvnni" in feats:
            order.append("avxvnni")
        if not order:  # no VNNI: uint8 activations are in [0, 127] (integer_lowering), vpmaddubsw is exact
            order += [isa for f, isa in (("avx512bw", "avx512bw-ubsw"), ("avx2", "avx2-ubsw")) if f in feats]
        if "avx512bw" in feats:
            order.append("avx512bw")
        if "avx2" in feats:
            order.append("avx2")
    ks = _kernels()
    return [ks[f"{isa}/{a_dtype}"] for isa in order if f"{isa}/{a_dtype}" in ks]


def select_kernel(target: Target, a_dtype: str, lanes_of: int, depth_of: int) -> DotKernel | None:
    """The best kernel whose lanes divide ``lanes_of`` (output channels / N) and whose depth divides
    ``depth_of`` (input channels / K); None when no instruction fits (plain schedule then)."""
    for k in candidate_kernels(target, a_dtype):
        if lanes_of % k.lanes == 0 and depth_of % k.depth == 0:
            return k
    return None


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------


def _int8_reduction(sch: s_tir.Schedule, prefixes: tuple[str, ...], nloops: int):
    """The single anchor block named ``prefixes`` computing int32 += (u)int8 * int8, or None."""
    if not _has_root(sch):
        return None, None
    blocks = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if _block_name(sch, b).startswith(prefixes)]
    if len(blocks) != 1 or len(sch.get_loops(blocks[0])) != nloops:
        return None, None
    blk = sch.get(blocks[0])
    if len(blk.reads) != 2 or len(blk.writes) != 1 or blk.writes[0].source.dtype != "int32":
        return None, None
    a, w = (r.source.dtype for r in blk.reads)
    if a not in ("uint8", "int8") or w != "int8":
        return None, None
    return blocks[0], str(a)


def _is_plain_copy(sch: s_tir.Schedule, block) -> bool:
    from tvm import ir

    body = sch.get(block).body
    return isinstance(body, tirx.BufferStore) and isinstance(body.value, ir.TensorLoad)


def _register_tile(vectors: int, pixels: int, registers: int, max_pixels: int = 14) -> tuple[int, int]:
    """(vectors V, pixels P) of the accumulator tile: V | vectors, P | pixels, V*P + V + 2 registers.

    Each reduction step loads P broadcasts and V weight vectors for V*P dot instructions; the tile
    maximizing V*P / (V + P) (then V*P) within the register budget is chosen.
    """
    best = (0.0, 0, 1, 1)
    for v in (1, 2, 3, 4, 6, 8):
        if vectors % v:
            continue
        for p in range(1, min(pixels, max_pixels) + 1):
            if pixels % p or v * p + v + 2 > registers:
                continue
            cand = (v * p / (v + p), v * p, v, p)
            if cand > best:
                best = cand
    return best[2], best[3]


def _tensorize(sch: s_tir.Schedule, update, init, kernel: DotKernel) -> None:
    """Replace the (lanes x depth) inner loops of ``update`` by ``kernel``.

    The intrinsics describe their accumulator as a ``global`` buffer; the register tile is ``local``
    (a stack array LLVM keeps in registers), so the scope is switched around the matching.
    """
    sch.set_scope(update, 0, "global")
    sch.tensorize(sch.get_loops(update)[-2], kernel.intrin)
    sch.set_scope(init, 0, "local")


# ----------------------------------------------------------------------------------------------
# Rules
# ----------------------------------------------------------------------------------------------


class Int8Conv2dNHWC(dl.ScheduleRule):
    """``conv2d_nhwc`` (uint8|int8) x int8 -> int32 with a dot-product micro-kernel (module docstring).

    Falls back to :class:`schedules.Conv2dNHWC` (exact int32 arithmetic, vectorized over output
    channels) when the input channels are not a multiple of the instruction's depth or the output
    channels not a multiple of its lanes, or the target has no suitable instruction.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        sch = s_tir.Schedule(func)
        conv, a_dtype = _int8_reduction(sch, ("conv2d_nhwc",), 7)
        if conv is None:
            return None
        iters = sch.get(conv).iter_vars
        if [iv.iter_type for iv in iters] != [tirx.IterVar.DataPar] * 4 + [tirx.IterVar.CommReduce] * 3:
            return None
        # an unpadded conv reads its input through an identity copy: read the input directly
        for prod in sch.get_producers(conv):
            if _block_name(sch, prod).startswith("pad") and _is_plain_copy(sch, prod):
                sch.compute_inline(prod)
        n, h, w, co, kh, kw, ci = sch.get_loops(conv)
        kernel = select_kernel(target, a_dtype, _int(sch.get(co).extent), _int(sch.get(ci).extent))
        if kernel is None:
            return Conv2dNHWC().apply(sch.mod["main"], target, tunable)
        try:
            return self._tensorized(sch, conv, kernel)
        except Exception as e:  # noqa: BLE001 - an unexpected form: the exact plain schedule instead
            log.warning("int8 conv not tensorized with %s (%s); plain int32 schedule used", kernel.intrin, e)
            return Conv2dNHWC().apply(func, target, tunable)

    @staticmethod
    def _tensorized(sch: s_tir.Schedule, conv, kernel: DotKernel) -> s_tir.Schedule:
        L, D = kernel.lanes, kernel.depth
        n, h, w, co, kh, kw, ci = sch.get_loops(conv)
        H, W, CO, CI = (_int(sch.get(lp).extent) for lp in (h, w, co, ci))
        KK = _int(sch.get(kh).extent) * _int(sch.get(kw).extent)
        nvec, tile_w = _register_tile(CO // L, W, kernel.registers)
        C = nvec * L
        co_t, co_m, co_v = sch.split(co, [None, nvec, L])
        w_o, w_i = sch.split(w, [None, tile_w])
        ci_block = CI
        if KK * CI * C > WEIGHT_BLOCK_BYTES:
            ci_block = _largest_divisor(CI, [c for c in (1024, 512, 256, 128, 64, 32, 16, 8, 4)
                                             if c % D == 0 and KK * c * C <= WEIGHT_BLOCK_BYTES] or [D])
        if ci_block < CI:
            rows = _largest_divisor(H, [r for r in range(H, 0, -1) if r * W * C * 4 <= ACC_BLOCK_BYTES] or [1])
            h_o, h_i = sch.split(h, [None, rows])
            ci_b, ci_o, ci_d = sch.split(ci, [None, ci_block // D, D])
            sch.reorder(co_t, n, h_o, ci_b, h_i, w_o, kh, kw, ci_o, w_i, co_m, co_v, ci_d)
            anchor, outer, first_reduction = h_o, (co_t, n, h_o), ci_b
        else:
            ci_o, ci_d = sch.split(ci, [None, D])
            if KK * CI * CO <= WEIGHT_BLOCK_BYTES and CO > C:
                # the whole weight fits in L2: finish every pixel tile for all channels (input tile
                # reused from L1, output rows written once)
                sch.reorder(n, h, w_o, co_t, kh, kw, ci_o, w_i, co_m, co_v, ci_d)
                anchor, outer, first_reduction = co_t, (n, h, w_o), kh
            else:
                sch.reorder(co_t, n, h, w_o, kh, kw, ci_o, w_i, co_m, co_v, ci_d)
                anchor, outer, first_reduction = w_o, (co_t, n, h), kh
        # w[kh, kw, ci, co] -> w'[co // C, ci // B, kh, kw, ci % B // D, co % C // L, co % L, ci % D]
        # (written with // before % so unit factors simplify away)
        if not _pack_weights(sch, conv, lambda kh_, kw_, ci_, co_: (
                co_ // C, ci_ // ci_block, kh_, kw_, ci_ // D % (ci_block // D), co_ // L % nvec, co_ % L, ci_ % D)):
            raise ValueError("the weight is not a layout-free constant: cannot form dot-product tiles")
        local = _accumulate_tile(sch, conv, anchor)
        sch.parallel(sch.fuse(*outer))
        sch.unroll(w_i)
        sch.unroll(co_m)
        _vectorize_last(sch, local, L)
        init = sch.decompose_reduction(conv, first_reduction)
        _vectorize_last(sch, init, L)
        for prod in sch.get_producers(conv):
            if _block_name(sch, prod).startswith("pad"):  # a zero-padded input (aarch64 form)
                _vectorize_inner(sch, prod, 16)
        _tensorize(sch, conv, init, kernel)
        return sch


class Int8Dense(dl.ScheduleRule):
    """``matmul`` (uint8|int8)[M, K] x int8[K, N] -> int32 for M <= 8, with a dot-product kernel.

    Falls back to :class:`schedules.DenseRowMajor` when K is not a multiple of the instruction's
    depth or N not a multiple of its lanes (e.g. a 10-class head).
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        sch = s_tir.Schedule(func)
        mm, a_dtype = _int8_reduction(sch, ("matmul",), 3)
        if mm is None:
            return None
        if [iv.iter_type for iv in sch.get(mm).iter_vars] != [tirx.IterVar.DataPar] * 2 + [tirx.IterVar.CommReduce]:
            return None
        i, j, k = sch.get_loops(mm)
        M, N, K = (_int(sch.get(lp).extent) for lp in (i, j, k))
        if M > 8:
            return None
        kernel = select_kernel(target, a_dtype, N, K)
        if kernel is None:
            return DenseRowMajor().apply(func, target, tunable)
        try:
            return self._tensorized(sch, mm, kernel, M, N)
        except Exception as e:  # noqa: BLE001 - an unexpected form: the exact plain schedule instead
            log.warning("int8 dense not tensorized with %s (%s); plain int32 schedule used", kernel.intrin, e)
            return DenseRowMajor().apply(func, target, tunable)

    @staticmethod
    def _tensorized(sch: s_tir.Schedule, mm, kernel: DotKernel, M: int, N: int) -> s_tir.Schedule:
        L, D = kernel.lanes, kernel.depth
        i, j, k = sch.get_loops(mm)
        vectors = N // L
        # M rows x V vectors of accumulators; keep >= 2 tiles per thread so both cores stay busy
        nvec = 1
        for v in (8, 6, 4, 3, 2):
            if vectors % v == 0 and M * v + v + 2 <= kernel.registers and vectors // v >= 4:
                nvec = v
                break
        C = nvec * L
        j_t, j_m, j_v = sch.split(j, [None, nvec, L])
        k_o, k_d = sch.split(k, [None, D])
        sch.reorder(j_t, k_o, i, j_m, j_v, k_d)
        # w[k, j] -> w'[j // C, k // D, j % C // L, j % L, k % D]: one contiguous run per tile
        if not _pack_weights(sch, mm, lambda k_, j_: (j_ // C, k_ // D, j_ // L % nvec, j_ % L, k_ % D)):
            raise ValueError("the weight is not a layout-free constant")
        local = _accumulate_tile(sch, mm, j_t)
        sch.parallel(j_t)
        sch.unroll(i)
        sch.unroll(j_m)
        _vectorize_last(sch, local, L)
        init = sch.decompose_reduction(mm, k_o)
        _vectorize_last(sch, init, L)
        _tensorize(sch, mm, init, kernel)
        return sch


def int8_rules() -> list[dl.ScheduleRule]:
    """Rules for the integer layers; put them before ``schedules.default_rules()``."""
    return [Int8Conv2dNHWC(), Int8Dense()]
