"""Default CPU schedules (dlight-style rules) for the fused TIR functions Relax produces.

TVM 0.27's CPU pipeline leaves TIR unscheduled (scalar loops, one thread), which
is why a default build runs 7-190x slower than onnxruntime.  These rules give
every fused function a schedule without tuning:

* :class:`Conv2dNHWC` — direct convolution in NHWC / HWIO with a register-blocked
  micro-kernel: an output tile of ``tile_w`` pixels x ``tile_c`` channels
  (``tile_c`` = 2 vectors) is accumulated in registers over (kh, kw, ci); channels
  are the vector lanes; the epilogue (bias, activation, residual add) is applied
  while the tile is written back; rows are split across threads.
  Grouped and depthwise convolutions are handled too (lanes along channels).
* :class:`Elementwise` — fallback for injective / pooling functions: parallel outer
  loops, vectorized innermost loop.
* dlight's own CPU ``GEMV`` and ``Reduction`` rules for dense layers and reductions.

Vector width comes from the target (AVX-512: 16 fp32 lanes, NEON: 4).
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """fp32 lanes of the widest SIMD register the target has."""
    attrs = {}
    try:
        attrs = dict(target.attrs)
    except Exception:  # noqa: BLE001
        pass
    mcpu = str(attrs.get("mcpu", ""))
    mattr = " ".join(str(a) for a in attrs.get("mattr", []) or [])
    triple = str(attrs.get("mtriple", ""))
    if "aarch64" in triple or "arm" in triple or "neon" in mattr:
        bits = 128
    elif "avx512" in mattr or mcpu in ("znver4", "znver5", "skylake-avx512", "cascadelake", "icelake-server",
                                       "sapphirerapids", "x86-64-v4"):
        bits = 512
    else:
        bits = 256
    return bits // dtype_bits


def _largest_divisor(n: int, candidates: list[int]) -> int:
    for c in candidates:
        if c <= n and n % c == 0:
            return c
    return 1


def _int(e) -> int:
    return int(e.value) if hasattr(e, "value") else int(e)


def _block_name(sch: s_tir.Schedule, block) -> str:
    return sch.get(block).name_hint


def _spatial_consumers_chain(sch: s_tir.Schedule, block) -> list:
    """The single-consumer chain of blocks after ``block`` (the fused epilogue)."""
    chain = []
    cur = block
    while True:
        cons = sch.get_consumers(cur)
        if len(cons) != 1:
            return chain
        chain.append(cons[0])
        cur = cons[0]


def _vectorize_inner(sch: s_tir.Schedule, block, lanes: int, parallel: bool = True) -> None:
    """Fuse a spatial block's loops, split off ``lanes`` and vectorize them; parallelize the rest."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [_int(sch.get(lp).extent) for lp in loops]
    inner = extents[-1]
    vec = _largest_divisor(inner, [lanes, lanes // 2, lanes // 4]) if inner > 1 else 1
    if vec > 1:
        outer, vloop = sch.split(loops[-1], [None, vec])
        sch.vectorize(vloop)
        loops = loops[:-1] + [outer]
    if parallel and len(loops) > 1:
        fused = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        sch.parallel(fused)
    elif parallel and loops:
        sch.parallel(loops[0])


class Conv2dNHWC(dl.ScheduleRule):
    """Register-blocked direct convolution for ``conv2d_nhwc`` blocks (see module docstring)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        sch = s_tir.Schedule(func)
        conv = None
        for b in sch.get_child_blocks(sch.get_sblock("root")) if _has_root(sch) else []:
            if _block_name(sch, b).startswith("conv2d_nhwc") or _block_name(sch, b).startswith("group_conv2d_nhwc") \
                    or _block_name(sch, b).startswith("depth_conv2d_nhwc"):
                conv = b
        if conv is None:
            return None
        loops = sch.get_loops(conv)
        if len(loops) != 7:
            return None
        lanes = vector_lanes(target)
        n, h, w, co, kh, kw, ci = loops
        W, CO = _int(sch.get(w).extent), _int(sch.get(co).extent)
        vec = _largest_divisor(CO, [lanes, lanes // 2, lanes // 4])
        co_o, co_i = sch.split(co, [None, vec])
        import os
        nvec = _largest_divisor(CO // vec, [int(os.environ.get("QC_NVEC", 2)), 2, 1])
        co_oo, co_m = sch.split(co_o, [None, nvec])
        tile_w = _largest_divisor(W, [int(os.environ.get("QC_TW", 8)), 8, 7, 6, 5, 4, 3, 2])
        w_o, w_i = sch.split(w, [None, tile_w])
        sch.reorder(n, h, w_o, co_oo, kh, kw, ci, w_i, co_m, co_i)
        # epilogue: inline every elementwise stage into the last, then into the write-back of the tile
        epilogue = _spatial_consumers_chain(sch, conv)
        for blk in epilogue[:-1]:
            try:
                sch.compute_inline(blk)
            except Exception:  # noqa: BLE001 - a non-inlinable stage stays separate
                pass
        local = sch.cache_write(conv, 0, "local")
        sch.reverse_compute_at(local, co_oo, preserve_unit_loops=True)
        if epilogue:
            try:
                sch.reverse_compute_inline(sch.get_consumers(local)[0])
            except Exception:  # noqa: BLE001
                pass
        par = sch.fuse(n, h)
        sch.parallel(par)
        sch.vectorize(co_i)
        sch.unroll(co_m)
        sch.unroll(w_i)
        wb_loops = sch.get_loops(local)
        if _int(sch.get(wb_loops[-1]).extent) % vec == 0:
            _, i = sch.split(wb_loops[-1], [None, vec])
            sch.vectorize(i)
        init = sch.decompose_reduction(conv, kh)
        init_loops = sch.get_loops(init)
        if _int(sch.get(init_loops[-1]).extent) % vec == 0:
            _, i = sch.split(init_loops[-1], [None, vec])
            sch.vectorize(i)
        # the padding stage (if any) runs before: parallel + vectorized copy
        for prod in sch.get_producers(conv):
            if _block_name(sch, prod).startswith("pad"):
                _vectorize_inner(sch, prod, lanes)
        return sch


def _has_root(sch: s_tir.Schedule) -> bool:
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


class Elementwise(dl.ScheduleRule):
    """Fallback for functions whose blocks are all spatial (injective ops, pooling windows)."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return None
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        lanes = vector_lanes(target)
        # inline everything that can be inlined, then schedule what remains
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001
                pass
        for b in sch.get_child_blocks(sch.get_sblock("root")):
            iters = sch.get(b).iter_vars
            if any(iv.iter_type != tirx.IterVar.DataPar for iv in iters):
                # a reduction (pooling window): parallelize its spatial loops only
                loops = sch.get_loops(b)
                spatial = [lp for lp, iv in zip(loops, iters) if iv.iter_type == tirx.IterVar.DataPar]
                if len(spatial) == len(loops) - sum(1 for iv in iters if iv.iter_type != tirx.IterVar.DataPar) \
                        and spatial and loops[:len(spatial)] == spatial:
                    sch.parallel(sch.fuse(*spatial[:-1]) if len(spatial) > 1 else spatial[0])
                continue
            _vectorize_inner(sch, b, lanes)
        return sch


def default_rules() -> list[dl.ScheduleRule]:
    return [Conv2dNHWC(), dl.cpu.GEMV(), dl.cpu.Reduction(), Elementwise()]
