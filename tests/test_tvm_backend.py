"""TVM backend: x86 numerics against the reference interpreter on layer variants and real models,
the schedules actually vectorize (AVX-512 zmm FMAs), arm64 artifacts run on the emulated board.

Tolerance (fp32): |y - y_ref| <= 1e-5 * max|y_ref| + 1e-4 * |y_ref|, except where noted:
TVM's reduction order differs from torch's, so accumulated error grows with depth; real
models are held to a relative error max|y - y_ref| / max|y_ref| <= 1e-4.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

from graphs import feeds, resnet_block_graph
from qcompile.backends.tvm.backend import TvmBackend
from qcompile.cli import main
from qcompile.frontends.torch_frontend import load_torch
from qcompile.passes.manager import run_reference, within_fp32_tolerance

RTOL, ATOL_REL = 1e-4, 1e-5


class Layers(nn.Module):
    """Conv variants the schedules must handle: strided, dilated, grouped, depthwise, 1x1, 7x7, odd widths."""

    def __init__(self):
        super().__init__()
        self.c7 = nn.Conv2d(3, 16, 7, 2, 3)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.grp = nn.Conv2d(16, 32, 3, 1, 2, dilation=2, groups=4)
        self.pw = nn.Conv2d(32, 24, 1)
        self.odd = nn.Conv2d(24, 10, 3, 2, 0)
        self.fc = nn.Linear(10, 7)

    def forward(self, x):
        y = torch.relu(self.c7(x))
        y = nn.functional.relu6(self.dw(y)) + y
        y = nn.functional.hardswish(self.grp(y))
        y = nn.functional.max_pool2d(self.pw(y), 3, 2, 1, ceil_mode=True)
        y = nn.functional.avg_pool2d(torch.sigmoid(self.odd(y)), 2, 1, 0, ceil_mode=False)
        return torch.softmax(self.fc(y.mean(dim=(2, 3))), -1), y


@pytest.fixture(scope="module")
def x86():
    return TvmBackend("x86")


def test_layer_variants_match_reference(x86):
    torch.manual_seed(0)
    m = Layers().eval()
    g = load_torch(m, (torch.randn(1, 3, 29, 27),))
    f = feeds(g, 2)
    runner = x86.runner(g)
    outs = [runner.run(feed) for feed in f]
    ref = run_reference(g, f)
    got = [np.stack([o[k] for o in outs]) for k in range(len(ref))]
    assert within_fp32_tolerance(got, ref, RTOL, ATOL_REL)


def test_ir_graph_with_batchnorm_residual(x86):
    g = resnet_block_graph()
    f = feeds(g, 2)
    runner = x86.runner(g)
    got = [np.stack([runner.run(feed)[0] for feed in f])]
    assert within_fp32_tolerance(got, run_reference(g, f), RTOL, ATOL_REL)


class Projection(nn.Module):
    """A sequence model's head: (1, T, C) @ (C, N) with more than 8 rows and an odd class count, and a
    linear whose output count 8 does not divide (both padded to full vectors, sliced back)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(24, 101) * 0.2)
        self.fc = nn.Linear(101, 67)

    def forward(self, x):
        return self.fc(torch.relu(x @ self.proj))


def test_sequence_projection_is_scheduled_and_matches_reference(x86):
    from qcompile.backends.tvm.lowering import lower_to_tir, x86_target

    torch.manual_seed(0)
    g = load_torch(Projection().eval(), (torch.randn(1, 40, 24),))
    assert [n.op for n in g.nodes if n.op in ("matmul", "linear")] == ["matmul", "linear"]
    f = feeds(g, 2)
    runner = x86.runner(g)
    got = [np.stack([runner.run(feed)[0] for feed in f])]
    assert within_fp32_tolerance(got, run_reference(g, f), RTOL, ATOL_REL)
    mod = lower_to_tir(g, x86_target("znver3"))
    dense = [str(fn) for gv, fn in mod.functions.items() if "matmul" in gv.name_hint]
    assert dense and all("T.parallel" in t and "T.vectorized" in t for t in dense)  # register-tiled, not naive


def test_x86_kernels_use_avx512():
    """The conv schedule must turn into 512-bit FMAs on an AVX-512 CPU (the point of the schedule).
    Compiled for one (not run), so the check does not depend on this machine's CPU."""
    from qcompile.backends.tvm.lowering import assembly, build, x86_target

    m = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.ReLU()).eval()
    g = load_torch(m, (torch.randn(1, 16, 14, 14),))
    asm = assembly(build(g, x86_target("skylake-avx512")))
    fma_zmm = sum(1 for line in asm.splitlines() if "vfmadd" in line and "zmm" in line)
    assert fma_zmm >= 16, fma_zmm


def test_cli_compile_and_run_tvm_x86(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["compile", "qcompile.models.digits:digits_cnn", "-p", "fold-bn,dead-code", "-t", "tvm-x86",
                 "-o", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(m["files"]) == ["model.so", "report.html", "report.md", "report/macs.png"] and m["verification"]["within_fp32_tolerance"]
    assert "tvm" in m["versions"]
    from qcompile.data.digits import load_digits_split

    x, y = load_digits_split().test
    np.save(tmp_path / "x.npy", x[:1])
    capsys.readouterr()
    assert main(["run", str(out), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npz")]) == 0
    saved = np.load(tmp_path / "y.npz")
    assert int(np.argmax(saved[saved.files[0]])) == int(y[0])


def test_arm64_runs_on_emulated_board(arm_board):
    torch.manual_seed(0)
    m = Layers().eval()
    g = load_torch(m, (torch.randn(1, 3, 29, 27),))
    f = feeds(g, 1)
    got = TvmBackend("arm64").runner(g).run(f[0])
    ref = run_reference(g, f)
    assert within_fp32_tolerance([o[None] for o in got], ref, RTOL, ATOL_REL)


def test_cli_arm64_artifact_verified_over_rpc(arm_board, tmp_path):
    out = tmp_path / "digits-arm"
    assert main(["compile", "qcompile.models.digits:digits_cnn", "-p", "fold-bn,dead-code", "-t", "tvm-arm64",
                 "-o", str(out), "--num-calib", "4"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["within_fp32_tolerance"] and m["verification"]["feeds"] == 4
    header = (out / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


def test_tuning_database_is_reused_by_a_second_compile(tmp_path, monkeypatch, capsys):
    """MetaSchedule tuning (1 trial per kernel, to stay cheap) fills the database in the cache folder;
    a second compile of the same layers finds every kernel there and does not tune again."""
    from tvm.s_tir import meta_schedule as ms

    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()).eval()
    g = load_torch(model, (torch.zeros(1, 8, 8, 8),))
    backend = TvmBackend("x86")
    backend.build(g, tmp_path, {"tune_trials": 1})
    first = capsys.readouterr().err
    assert "0 already in the database" in first and "kernels x 1 trials" in first
    db_dir = next((tmp_path / "cache" / "tuning").iterdir())
    choices = json.loads((db_dir / "choices.json").read_text())
    assert choices and all(c["use"] in ("tuned", "default") and c["default_s"] > 0 for c in choices.values())

    def no_tuning(**kwargs):
        raise AssertionError("the second compile must not tune")

    monkeypatch.setattr(ms.tune, "tune_tasks", no_tuning)
    out2 = tmp_path / "second"
    out2.mkdir()
    backend.build(g, out2, {"tune_trials": 1})
    second = capsys.readouterr().err
    n = len(choices)
    assert f"{n} distinct kernels, {n} already in the database" in second
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 8)).astype(np.float32)
    runner = backend.load(out2, {"inputs": g.inputs, "outputs": g.outputs})
    ref = run_reference(g, [{g.inputs[0]: x}])
    assert within_fp32_tolerance([runner.run({g.inputs[0]: x})[0][None]], ref, RTOL, ATOL_REL)


def test_explicit_mcpu(tmp_path, capsys, monkeypatch):
    """--mcpu: a subset ISA compiles and is recorded; an unknown CPU or one this machine cannot run is refused."""
    spec = "qcompile.models.digits:digits_cnn"
    out = tmp_path / "v2"
    assert main(["compile", spec, "-t", "tvm-x86", "--mcpu", "x86-64-v2", "-o", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["options"] == {"mcpu": "x86-64-v2"} and "x86-64-v2" in m["versions"]["tvm_target"]
    assert main(["compile", spec, "-t", "tvm-x86", "--mcpu", "pentium9000", "-o", str(tmp_path / "bad")]) == 2
    assert "does not know the x86 CPU 'pentium9000'" in capsys.readouterr().err
    from qcompile.backends.tvm import lowering

    real = lowering._x86_features
    host = __import__("tvm").target.codegen.llvm_get_system_cpu()
    monkeypatch.setattr(lowering, "_x86_features",
                        lambda cpu: {"sse4.2", "avx", "avx2"} if cpu == host else real(cpu) | {"avx512f"})
    assert main(["compile", spec, "-t", "tvm-x86", "--mcpu", "skylake-avx512", "-o", str(tmp_path / "no")]) == 2
    assert "cannot run code for 'skylake-avx512'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "no").exists()
