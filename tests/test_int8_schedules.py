"""Integer dot-product schedules (qcompile.backends.tvm.int8_schedules).

The Relax forms are built by hand exactly as the integer-lowering pass emits them (NHWC / HWIO,
x86 with VNNI: activations shifted to uint8 and padded with 128, compensation subtracted; x86
without VNNI: non-negative activations (0..127) as uint8, zero padding inside the conv; aarch64:
int8 activations, zero padding inside the conv), legalized and scheduled with the int8 rules first,
compiled and run on this machine; integer results must be bit-exact against numpy int64.
Cross-compiled x86 (AVX512-VNNI) and aarch64 (+dotprod / plain NEON) kernels are checked in the
assembly only.
"""

import numpy as np
import pytest
import tvm
from tvm import relax, s_tir
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight as dl
from tvm.script import relax as R

from qcompile.backends.tvm.int8_schedules import Int8Conv2dNHWC, Int8Dense, candidate_kernels, int8_rules
from qcompile.backends.tvm.lowering import host_x86_target, legalize_passes
from qcompile.backends.tvm.schedules import default_rules

HOST = host_x86_target().tvm_target()
VNNI_HOST = "avx512vnni" in host_x86_target().features
"""The x86 form depends on the host: shifted uint8 with VNNI, non-negative int8 as uint8 without."""
CASCADELAKE = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "mtriple": "x86_64-linux-gnu"})
ARM_DOTPROD = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]})
ARM_NEON = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})

# LLVM intrinsic each kernel's code calls (found in the scheduled TIR when the layer was tensorized)
LLVM_CALL = {"avx512vnni": "vpdpbusd", "avx512vnni-ymm": "vpdpbusd", "avxvnni": "vpdpbusd",
             "avx512bw": "pmaddw", "avx2": "pmadd.wd", "avx512bw-ubsw": "pmaddubs", "avx2-ubsw": "pmadd.ub.sw",
             "sdot": "sdot", "neon": "smull"}


def x86_activations(rng, shape):
    """int8 activations the x86 form accepts on this host: any with VNNI, non-negative without."""
    return rng.integers(-128 if VNNI_HOST else 0, 128, shape).astype("int8")


# ---------------------------------------------------------------------------------------------
# Relax forms of the integer-lowering pass
# ---------------------------------------------------------------------------------------------


def _epilogue(bb, acc, co, rng):
    """Float epilogue: per-channel scale, bias, relu, requantize to int8; returns (expr, params)."""
    scale = (rng.random(co) * 1e-3 + 1e-4).astype("float32")
    bias = rng.standard_normal(co).astype("float32")
    inv_out = np.float32(1 / 0.05)
    y = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale.reshape(1, 1, 1, co))))
    y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(bias.reshape(1, 1, 1, co)))))
    q = relax.op.clip(relax.op.round(relax.op.multiply(y, relax.const(inv_out))), -128, 127)
    return bb.emit(relax.op.astype(q, "int8")), (scale, bias, inv_out)


def conv_module(shape, co, k, pad, stride, x86, epilogue=False, seed=0):
    n, h, w, ci = shape
    rng = np.random.default_rng(seed)
    wt = rng.integers(-128, 128, (k, k, ci, co)).astype("int8")
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor(shape, "int8"))
    params = None
    with bb.function("main", [x]):
        with bb.dataflow():
            conv = dict(strides=stride, data_layout="NHWC", kernel_layout="HWIO", out_dtype="int32")
            if x86 and not VNNI_HOST:
                acc = bb.emit(relax.op.nn.conv2d(bb.emit(relax.op.astype(x, "uint8")), relax.const(wt),
                                                 padding=pad, **conv))
            elif x86:
                comp = (128 * wt.astype(np.int64).sum((0, 1, 2))).astype("int32").reshape(1, 1, 1, co)
                xu = bb.emit(relax.op.astype(relax.op.add(relax.op.astype(x, "int32"), relax.const(128, "int32")),
                                             "uint8"))
                if pad:
                    xu = bb.emit(relax.op.nn.pad(xu, [0, 0, pad, pad, pad, pad, 0, 0], pad_value=128))
                acc = bb.emit(relax.op.nn.conv2d(xu, relax.const(wt), padding=0, **conv))
                acc = bb.emit(relax.op.subtract(acc, relax.const(comp)))
            else:
                acc = bb.emit(relax.op.nn.conv2d(x, relax.const(wt), padding=pad, **conv))
            if epilogue:
                acc, params = _epilogue(bb, acc, co, rng)
            out = bb.emit_output(acc)
        bb.emit_func_output(out)
    return bb.get(), wt, params


def dense_module(m, k, n, x86, seed=0):
    rng = np.random.default_rng(seed)
    wt = rng.integers(-128, 128, (k, n)).astype("int8")
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((m, k), "uint8" if x86 else "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            acc = bb.emit(relax.op.matmul(x, relax.const(wt), out_dtype="int32"))
            if x86 and VNNI_HOST:
                comp = (128 * wt.astype(np.int64).sum(0)).astype("int32")
                acc = bb.emit(relax.op.subtract(acc, relax.const(comp)))
            out = bb.emit_output(acc)
        bb.emit_func_output(out)
    return bb.get(), wt


def conv_reference(x, wt, pad, stride):
    x = np.pad(x.astype(np.int64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    k = wt.shape[0]
    ho, wo = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, wt.shape[3]), np.int64)
    for kh in range(k):
        for kw in range(k):
            out += x[:, kh:kh + stride * ho:stride, kw:kw + stride * wo:stride, :] @ wt[kh, kw].astype(np.int64)
    return out


# ---------------------------------------------------------------------------------------------
# Pipeline
# ---------------------------------------------------------------------------------------------


def schedule(mod, target):
    with target:
        mod = tvm.ir.transform.Sequential(legalize_passes())(mod)
        return tvm.ir.transform.Sequential([
            relax.transform.AttachAttrLayoutFreeBuffers(),
            dl.ApplyDefaultSchedule(*int8_rules(), *default_rules()),
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination()])(mod)


def compile_module(mod, target):
    """(scheduled IRModule, executable, assembly of its kernels)."""
    scheduled = schedule(mod, target)
    finish = tvm.ir.transform.Sequential(cpu_generic.dataflow_lower_passes(target)
                                         + cpu_generic.finalize_passes(target))
    ex = tvm.compile(scheduled, target, relax_pipeline=finish)
    asm = "\n".join(m.inspect_source("asm") for m in ex.mod.imports)
    return scheduled, ex, asm


def kernel_tir(scheduled, word):
    return "\n".join(scheduled[gv].script() for gv in scheduled.functions
                     if word in gv.name_hint and isinstance(scheduled[gv], tvm.tirx.PrimFunc))


def run(ex, x):
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def host_kernel(a_dtype, lanes_of, depth_of):
    for k in candidate_kernels(HOST, a_dtype):
        if lanes_of % k.lanes == 0 and depth_of % k.depth == 0:
            return k
    return None


# ---------------------------------------------------------------------------------------------
# Bit-exact on this machine
# ---------------------------------------------------------------------------------------------

CONVS = {  # name: (input NHWC, CO, k, pad, stride)
    "3x3-pad1": ((1, 10, 12, 32), 64, 3, 1, 1),
    "3x3-stride2": ((1, 15, 15, 16), 32, 3, 1, 2),
    "1x1": ((1, 7, 7, 64), 128, 1, 0, 1),
    "first-layer-ci3": ((1, 16, 16, 3), 16, 3, 1, 1),
    "grayscale-ci1": ((1, 12, 12, 1), 8, 5, 2, 1),
    "co-not-multiple-of-lanes": ((1, 6, 6, 8), 12, 3, 1, 1),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv_x86_form_bit_exact(name):
    shape, co, k, pad, stride = CONVS[name]
    mod, wt, _ = conv_module(shape, co, k, pad, stride, x86=True)
    scheduled, ex, _ = compile_module(mod, HOST)
    x = x86_activations(np.random.default_rng(1), shape)
    np.testing.assert_array_equal(run(ex, x), conv_reference(x, wt, pad, stride).astype(np.int32))
    kernel = host_kernel("uint8", co, shape[3])
    tir = kernel_tir(scheduled, "conv2d")
    if kernel is not None:  # tensorized whenever an instruction fits the channel counts
        assert LLVM_CALL[kernel.isa] in tir, f"{name}: not tensorized with {kernel.intrin}"
    else:
        assert "call_llvm_pure_intrin" not in tir


def test_conv_requantize_epilogue_fused():
    shape, co, k, pad, stride = (1, 8, 8, 16), 32, 3, 1, 1
    mod, wt, (scale, bias, inv_out) = conv_module(shape, co, k, pad, stride, x86=True, epilogue=True)
    scheduled, ex, _ = compile_module(mod, HOST)
    conv_funcs = [gv.name_hint for gv in scheduled.functions if "conv2d" in gv.name_hint]
    assert len(conv_funcs) == 1 and "round" in conv_funcs[0], conv_funcs  # epilogue fused in the conv
    x = x86_activations(np.random.default_rng(2), shape)
    acc = conv_reference(x, wt, pad, stride).astype(np.float32)
    ref = np.clip(np.round(np.maximum(acc * scale + bias, 0) * inv_out), -128, 127)
    out = run(ex, x)
    assert out.dtype == np.int8
    assert np.abs(out.astype(np.int32) - ref.astype(np.int32)).max() <= 1


DENSES = {"1x512->10": (1, 512, 10), "1x4096->1000": (1, 4096, 1000), "4x256->64": (4, 256, 64),
          "8x300->48": (8, 300, 48), "1x30->16": (1, 30, 16)}


@pytest.mark.parametrize("name", sorted(DENSES))
def test_dense_x86_form_bit_exact(name):
    m, k, n = DENSES[name]
    mod, wt = dense_module(m, k, n, x86=True)
    scheduled, ex, _ = compile_module(mod, HOST)
    x = np.random.default_rng(3).integers(0, 256 if VNNI_HOST else 128, (m, k)).astype("uint8")
    ref = x.astype(np.int64) @ wt.astype(np.int64) - (128 * wt.astype(np.int64).sum(0) if VNNI_HOST else 0)
    np.testing.assert_array_equal(run(ex, x), ref.astype(np.int32))
    kernel = host_kernel("uint8", n, k)
    if kernel is not None:
        assert LLVM_CALL[kernel.isa] in kernel_tir(scheduled, "matmul"), f"{name}: not tensorized"


def test_arm_forms_bit_exact_on_host():
    """The aarch64 forms (int8 activations, zero padding inside the conv) scheduled for this machine."""
    shape = (1, 9, 9, 16)
    mod, wt, _ = conv_module(shape, 32, 3, 1, 1, x86=False)
    _, ex, _ = compile_module(mod, HOST)
    x = np.random.default_rng(4).integers(-128, 128, shape).astype("int8")
    np.testing.assert_array_equal(run(ex, x), conv_reference(x, wt, 1, 1).astype(np.int32))
    mod, wt = dense_module(2, 128, 32, x86=False)
    _, ex, _ = compile_module(mod, HOST)
    x = np.random.default_rng(5).integers(-128, 128, (2, 128)).astype("int8")
    np.testing.assert_array_equal(run(ex, x), (x.astype(np.int64) @ wt.astype(np.int64)).astype(np.int32))


# ---------------------------------------------------------------------------------------------
# Instructions in cross-compiled code (assembly only)
# ---------------------------------------------------------------------------------------------


def test_x86_vnni_uses_vpdpbusd():
    mod, _, _ = conv_module((1, 8, 8, 32), 64, 3, 1, 1, x86=True)
    _, _, asm = compile_module(mod, CASCADELAKE)
    assert "vpdpbusd" in asm and "%zmm" in asm
    mod, _ = dense_module(1, 512, 64, x86=True)
    _, _, asm = compile_module(mod, CASCADELAKE)
    assert "vpdpbusd" in asm


def test_x86_vnni_narrow_channels_use_ymm_vpdpbusd():
    mod, _ = dense_module(1, 256, 1000, x86=True)  # 1000 = 8 x 125: 256-bit vpdpbusd
    _, _, asm = compile_module(mod, CASCADELAKE)
    assert "vpdpbusd" in asm


def test_arm_dotprod_uses_sdot():
    mod, _, _ = conv_module((1, 8, 8, 16), 32, 3, 1, 1, x86=False)
    _, _, asm = compile_module(mod, ARM_DOTPROD)
    assert "sdot" in asm
    mod, _ = dense_module(1, 256, 32, x86=False)
    _, _, asm = compile_module(mod, ARM_DOTPROD)
    assert "sdot" in asm


def test_arm_without_dotprod_uses_neon_widening_multiply():
    mod, _, _ = conv_module((1, 8, 8, 16), 32, 3, 1, 1, x86=False)
    _, _, asm = compile_module(mod, ARM_NEON)
    assert "sdot" not in asm and "smull" in asm and "saddlp" in asm


# ---------------------------------------------------------------------------------------------
# What the rules leave alone
# ---------------------------------------------------------------------------------------------


def _legalized_prim_funcs(mod):
    with HOST:
        mod = tvm.ir.transform.Sequential(legalize_passes() + [relax.transform.AttachAttrLayoutFreeBuffers()])(mod)
    return {gv.name_hint: mod[gv] for gv in mod.functions if isinstance(mod[gv], tvm.tirx.PrimFunc)}


def test_rules_decline_float_and_grouped():
    rng = np.random.default_rng(0)
    bb = relax.BlockBuilder()
    x = relax.Var("x", R.Tensor((1, 8, 8, 16), "float32"))
    xi = relax.Var("xi", R.Tensor((1, 8, 8, 16), "int8"))
    with bb.function("main", [x, xi]):
        with bb.dataflow():
            a = bb.emit(relax.op.nn.conv2d(x, relax.const(rng.standard_normal((3, 3, 16, 16)).astype("float32")),
                                           padding=1, data_layout="NHWC", kernel_layout="HWIO"))
            b = bb.emit(relax.op.matmul(relax.op.reshape(a, (1, 1024)),
                                        relax.const(rng.standard_normal((1024, 16)).astype("float32"))))
            g = bb.emit(relax.op.nn.conv2d(xi, relax.const(rng.integers(-8, 8, (3, 3, 4, 16)).astype("int8")),
                                           padding=1, groups=4, data_layout="NHWC", kernel_layout="HWIO",
                                           out_dtype="int32"))
            out = bb.emit_output(relax.Tuple([b, g]))
        bb.emit_func_output(out)
    funcs = _legalized_prim_funcs(bb.get())
    assert len(funcs) >= 3
    for name, func in funcs.items():
        assert Int8Conv2dNHWC().apply(func, HOST, False) is None, name
        assert Int8Dense().apply(func, HOST, False) is None, name


def test_rules_schedule_int8_prim_funcs():
    mod, _, _ = conv_module((1, 8, 8, 16), 32, 3, 1, 1, x86=True)
    funcs = _legalized_prim_funcs(mod)
    conv = next(f for n, f in funcs.items() if "conv2d" in n)
    assert isinstance(Int8Conv2dNHWC().apply(conv, CASCADELAKE, False), s_tir.Schedule)
    assert Int8Dense().apply(conv, CASCADELAKE, False) is None
