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
    """Lanes of ``dtype_bits`` in the widest SIMD register the target's CPU has (asked of LLVM)."""
    from tvm.target import codegen

    try:
        features = set(codegen.llvm_get_cpu_features(target))
    except Exception:  # noqa: BLE001 - a target LLVM cannot query: assume 128-bit SIMD
        features = set()
    for feature, bits in (("avx512f", 512), ("avx2", 256)):
        if feature in features:
            return bits // dtype_bits
    return 128 // dtype_bits


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


def _accumulate_tile(sch: s_tir.Schedule, block, anchor):
    """Accumulate ``block`` (a reduction) in a ``local`` tile written back under loop ``anchor``.

    The fused elementwise epilogue after ``block`` (bias, residual add, activation) is inlined
    into its last stage, and that stage into the write-back, so it is applied while the tile is
    stored.  Returns the write-back block.
    """
    epilogue = _spatial_consumers_chain(sch, block)
    for blk in epilogue[:-1]:
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001 - a stage that cannot be inlined stays separate
            pass
    local = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(local, anchor, preserve_unit_loops=True)
    if epilogue:
        try:
            sch.reverse_compute_inline(sch.get_consumers(local)[0])
        except Exception:  # noqa: BLE001 - the write-back then stays a plain copy
            pass
    return local


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


def register_tile(channel_vectors: int, width: int) -> tuple[int, int]:
    """(vectors of output channels, output pixels) accumulated in registers by the conv micro-kernel.

    32 vector registers (AVX-512) hold up to ~28 accumulators beside the broadcast and weight
    registers.  Measured on the seed models (profile_kernels): wide rows (W > 14) run best with
    8 pixels x 2 vectors; narrow late layers (W <= 14: 7x7, 14x14 with many channels) with
    7 pixels x 4 vectors (fewer passes over the input per weight block); a channel count that is an
    odd number of vectors gets more pixels instead.
    """
    if width <= 14:
        nvec = _largest_divisor(channel_vectors, [4, 3, 2, 1])
        pixels = (7, 6, 5, 4, 3, 2) if nvec >= 3 else (14, 8, 7, 6, 5, 4, 3, 2)
    else:
        nvec = _largest_divisor(channel_vectors, [2, 3, 1])
        pixels = (8, 7, 6, 5, 4, 3, 2) if nvec >= 2 else (14, 12, 8, 7, 6, 5, 4, 3, 2)
    return nvec, _largest_divisor(width, list(pixels))


WEIGHT_BLOCK_BYTES = 256 * 1024
"""Weights touched by one (output-channel tile, input-channel block) stay below this (L2-resident)."""
ACC_BLOCK_BYTES = 32 * 1024
"""Partial sums of one row block stay below this (L1-resident) when input channels are blocked."""


class Conv2dNHWC(dl.ScheduleRule):
    """Register-blocked direct convolution for ``conv2d_nhwc`` blocks (see module docstring).

    ``T`` = tile_w pixels, ``V`` = vector lanes, ``C`` = nvec*V output channels per register tile
    (both from :func:`register_tile`).  The weight is repacked at compile time to
    ``[CO/C][CI/B][kh][kw][B][C]`` (:func:`_pack_weights`) so each tile streams it contiguously.
    One of three loop orders, by weight size ``kh*kw*CI*C*4`` bytes against WEIGHT_BLOCK_BYTES:

    * weights of a channel tile too big for L2 -> input channels blocked by ``B``::

        parallel co_tile, n, row_block:
          ci_block:                            # L2-resident weight block
            rows, w_o, kh, kw, ci_i:
              unroll T, unroll nvec, vector V: acc[...] += x[...] * w[...]
          write-back + fused epilogue (bias, residual add, activation), vectorized

    * all weights of the layer fit in L2 (1x1 expansions, depthwise, thin layers): channel tiles
      innermost, so every output pixel is finished and written once, contiguously::

        parallel n, h, w_o:
          co_tile: kh, kw, ci: unroll T, unroll nvec, vector V: acc += x * w ; write-back

    * otherwise ``parallel co_tile, n, h: w_o: kh, kw, ci: (register tile); write-back``.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not _has_root(func_sch := s_tir.Schedule(func)):
            return None
        sch = func_sch
        convs = [b for b in sch.get_child_blocks(sch.get_sblock("root"))
                 if _block_name(sch, b).startswith(("conv2d_nhwc", "group_conv2d_nhwc"))]
        if len(convs) != 1 or len(sch.get_loops(convs[0])) != 7:
            return None
        conv = convs[0]
        lanes = vector_lanes(target)
        n, h, w, co, kh, kw, ci = sch.get_loops(conv)
        H, W, CO, CI = (_int(sch.get(lp).extent) for lp in (h, w, co, ci))
        KK = _int(sch.get(kh).extent) * _int(sch.get(kw).extent)
        vec = _largest_divisor(CO, [lanes, lanes // 2, lanes // 4])
        co_o, co_i = sch.split(co, [None, vec])
        nvec, tile_w = register_tile(CO // vec, W)
        co_oo, co_m = sch.split(co_o, [None, nvec])
        tile_c = vec * nvec
        w_o, w_i = sch.split(w, [None, tile_w])
        ci_block = CI
        if KK * CI * tile_c * 4 > WEIGHT_BLOCK_BYTES:
            # the largest divisor of CI (<= 256) whose weight block fits: pruned layers have channel
            # counts like 360 or 88 that no power of two divides (a block of 1 ran 2.4x slower)
            ci_block = max([c for c in range(min(CI, 256), 0, -1)
                            if CI % c == 0 and KK * c * tile_c * 4 <= WEIGHT_BLOCK_BYTES] or [1])
        if ci_block < CI:
            rows = _largest_divisor(H, [r for r in range(H, 0, -1) if r * W * tile_c * 4 <= ACC_BLOCK_BYTES] or [1])
            h_o, h_i = sch.split(h, [None, rows])
            ci_o, ci_i = sch.split(ci, [None, ci_block])
            sch.reorder(co_oo, n, h_o, ci_o, h_i, w_o, kh, kw, ci_i, w_i, co_m, co_i)
            anchor, outer, first_reduction = h_o, (co_oo, n, h_o), ci_o
        elif KK * CI * CO * 4 <= WEIGHT_BLOCK_BYTES and CO > tile_c:
            # all weights fit in L2 (thin layers, 1x1 expansions): every pixel tile is finished for all
            # output channels before moving on, so each output row is written once, contiguously,
            # and the input tile is reused from L1 across channel tiles
            sch.reorder(n, h, w_o, co_oo, kh, kw, ci, w_i, co_m, co_i)
            anchor, outer, first_reduction = co_oo, (n, h, w_o), kh
        else:
            sch.reorder(co_oo, n, h, w_o, kh, kw, ci, w_i, co_m, co_i)
            anchor, outer, first_reduction = w_o, (co_oo, n, h), kh
        # w[kh, kw, ci, co] -> w'[co // C, ci // B, kh, kw, ci % B, co % C]: one contiguous run per
        # (channel tile, input-channel block), read in loop order
        _pack_weights(sch, conv, lambda kh_, kw_, ci_, co_: (
            co_ // tile_c, ci_ // ci_block, kh_, kw_, ci_ % ci_block, co_ % tile_c))
        local = _accumulate_tile(sch, conv, anchor)
        sch.parallel(sch.fuse(*outer))
        sch.vectorize(co_i)
        sch.unroll(co_m)
        sch.unroll(w_i)
        _vectorize_last(sch, local, vec)
        init = sch.decompose_reduction(conv, first_reduction)
        _vectorize_last(sch, init, vec)
        depthwise = CI == 1
        for prod in sch.get_producers(conv):
            if _block_name(sch, prod).startswith("pad"):
                if depthwise or KK == 1:
                    # depthwise (one input channel per output channel) or 1x1: a full padded copy of the
                    # input costs as much memory traffic as the convolution itself; read through the
                    # bounds check (none at all for an unpadded 1x1)
                    sch.compute_inline(prod)
                else:
                    _vectorize_inner(sch, prod, lanes)
        return sch




def _pack_weights(sch: s_tir.Schedule, block, index_map) -> bool:
    """Repack the constant weight ``block`` reads second, by ``index_map``, at compile time.

    Used so a micro-kernel streams its weights contiguously, in loop order (see the conv and dense
    rules for the layouts).  The repack block is marked as a layout-rewrite pre-process, so Relax's
    SplitLayoutRewritePreproc moves it out of the kernel and FoldConstant applies it to the weights
    at compile time: the artifact holds only the packed constant.  Only weights Relax marked
    layout-free (constants) are repacked; returns whether it happened.
    """
    func = sch.mod["main"]
    free = {int(i) for i in (func.attrs.get("layout_free_buffers", []) if func.attrs else [])}
    reads = sch.get(block).reads
    if len(reads) < 2:
        return False
    wbuf = reads[1].source
    if not any(i < len(func.params) and func.params[i].same_as(wbuf) for i in free):
        return False
    cached = sch.cache_read(block, 1, "global")
    sch.transform_layout(block, ("read", 1), index_map)
    sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
    return True


def _vectorize_last(sch: s_tir.Schedule, block, vec: int) -> None:
    loops = sch.get_loops(block)
    if loops and _int(sch.get(loops[-1]).extent) % vec == 0 and vec > 1:
        _, inner = sch.split(loops[-1], [None, vec])
        sch.vectorize(inner)


def _has_root(sch: s_tir.Schedule) -> bool:
    """True when the function has a root block (i.e. it is a TIR function dlight can schedule)."""
    try:
        sch.get_sblock("root")
        return True
    except Exception:  # noqa: BLE001
        return False


class Elementwise(dl.ScheduleRule):
    """Fallback for injective functions and window reductions (pooling, means).

    Producers are inlined into their consumers; every remaining spatial block gets
    parallel outer loops and a vectorized innermost loop.  A reduction block whose
    innermost *spatial* loop is the last output axis (NHWC channels) is reordered so
    that axis is innermost — inside the window loops — and vectorized there.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return None
        lanes = vector_lanes(target)
        blocks = sch.get_child_blocks(sch.get_sblock("root"))
        for b in blocks[:-1]:
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001 - a block that cannot be inlined keeps its own loops
                pass
        for b in sch.get_child_blocks(sch.get_sblock("root")):
            kinds = [iv.iter_type for iv in sch.get(b).iter_vars]
            if all(k == tirx.IterVar.DataPar for k in kinds):
                _vectorize_inner(sch, b, lanes)
            else:
                _schedule_window_reduction(sch, b, kinds, lanes)
        return sch


def _schedule_window_reduction(sch: s_tir.Schedule, block, kinds: list, lanes: int) -> None:
    loops = sch.get_loops(block)
    if len(loops) != len(kinds):
        return
    spatial = [lp for lp, k in zip(loops, kinds) if k == tirx.IterVar.DataPar]
    reduce = [lp for lp, k in zip(loops, kinds) if k != tirx.IterVar.DataPar]
    if not spatial:
        return
    inner = spatial[-1]
    vec = _largest_divisor(_int(sch.get(inner).extent), [lanes, lanes // 2, lanes // 4])
    if vec > 1 and loops[:len(spatial)] == spatial:
        c_o, c_i = sch.split(inner, [None, vec])
        sch.reorder(*spatial[:-1], c_o, *reduce, c_i)
        outer = spatial[:-1]
        if outer:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        sch.vectorize(c_i)
        if reduce:
            try:
                init = sch.decompose_reduction(block, reduce[0])
                _vectorize_last(sch, init, vec)
            except Exception:  # noqa: BLE001 - a reduction without init block
                pass
    elif len(spatial) > 1 and loops[:len(spatial)] == spatial:
        sch.parallel(sch.fuse(*spatial[:-1]))


class DenseRowMajor(dl.ScheduleRule):
    """``y[..., i, j] = sum_k x[..., i, k] * w[k, j]``: dense layers and matmuls (any leading batch
    dims, fused with ``i`` into one row loop of ``M`` rows).

    Constant ``w`` (``linear`` weights folded to (in, out), a ``matmul`` by a constant) is repacked at
    compile time to ``[N/T][K][T]`` so each tile of ``T = nvec * vec`` columns, accumulated in
    registers, streams its weights once and contiguously.  ``M <= 8`` (batch-1 dense layers,
    bandwidth-bound): one row per tile, up to 8 vectors of columns.  Larger ``M`` (a sequence model's
    projections, 40 x 120 @ 120 x 6625 in a text recognizer): ``rows`` (4, 3 or 2) rows x up to 3
    vectors per tile (12 accumulators, within AVX2's 16 registers), so each loaded weight vector
    feeds ``rows`` FMAs.  When no vector width divides ``N`` the columns are split with a bound check
    (the last tile is partial).  Row-blocks x column tiles go to threads; the bias epilogue is fused
    into the write-back.
    """

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        sch = s_tir.Schedule(func)
        if not _has_root(sch):
            return None
        mms = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if _block_name(sch, b).startswith("matmul")]
        if len(mms) != 1:
            return None
        mm = mms[0]
        loops = sch.get_loops(mm)
        kinds = [iv.iter_type for iv in sch.get(mm).iter_vars]
        if len(loops) < 3 or len(kinds) != len(loops) or kinds[-1] != tirx.IterVar.CommReduce \
                or any(k_ != tirx.IterVar.DataPar for k_ in kinds[:-1]):
            return None
        *lead, j, k = loops
        i = sch.fuse(*lead) if len(lead) > 1 else lead[0]
        M, N = _int(sch.get(i).extent), _int(sch.get(j).extent)
        lanes = vector_lanes(target)
        vec = _largest_divisor(N, [lanes, lanes // 2, lanes // 4])
        exact = vec > 1
        if not exact:
            vec = lanes  # partial last tile (bound check)
        rows = 1 if M <= 8 else _largest_divisor(M, [4, 3, 2])
        cols = -(-N // vec)
        nvec = _largest_divisor(cols, [8, 5, 4, 3, 2, 1] if rows == 1 else [3, 2, 1])
        j_o, j_m, j_v = sch.split(j, [None, nvec, vec])
        if rows > 1:
            i_o, i_r = sch.split(i, [None, rows])
            sch.reorder(i_o, j_o, k, i_r, j_m, j_v)
        else:
            i_o, i_r = i, None
            sch.reorder(i_o, j_o, k, j_m, j_v)
        # w[k, j] -> w'[j // T, k, j % T]: each thread streams one contiguous run per tile
        tile = nvec * vec
        if exact:
            _pack_weights(sch, mm, lambda k_, j_: (j_ // tile, k_, j_ % tile))
        local = _accumulate_tile(sch, mm, j_o)
        sch.parallel(sch.fuse(i_o, j_o))
        if i_r is not None:
            sch.unroll(i_r)
        sch.unroll(j_m)
        if exact:
            sch.vectorize(j_v)
            _vectorize_last(sch, local, vec)
        init = sch.decompose_reduction(mm, k)
        if exact:
            _vectorize_last(sch, init, vec)
        return sch


def default_rules() -> list[dl.ScheduleRule]:
    return [Conv2dNHWC(), DenseRowMajor(), dl.cpu.GEMV(), dl.cpu.Reduction(), Elementwise()]
