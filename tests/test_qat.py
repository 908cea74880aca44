"""Quantization-aware training (qcompile.finetune with QDQ graphs, the torch backend's STE) and the
``qcompile finetune`` command, on the bundled digits model with real scikit-learn digits.

Training runs single-threaded (a fixture): on a shared 2-core machine the tiny batches are several
times faster with one torch thread than with two competing ones.
"""

import json

import numpy as np
import pytest
import torch

from graphs import damaged
from qcompile.artifact import sha256_file
from qcompile.backends.torch_backend import fake_quantize, to_torch, torch_threads, write_back
from qcompile.cli import main
from qcompile.data.digits import load_digits_split
from qcompile.errors import InputError
from qcompile.finetune import accuracy, finetune, weight_grids
from qcompile.frontends import load_model
from qcompile.ir import Graph, TensorType
from qcompile.passes import PassContext, PassManager, parse_pipeline

DIGITS = "qcompile.models.digits:digits_cnn"


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def loaded():
    return load_model(DIGITS)


@pytest.fixture(scope="module")
def split():
    return load_digits_split()


def _quantize(loaded, graph, pipeline):
    return PassManager(parse_pipeline(pipeline)).run(graph, PassContext(calibration=loaded.calibration))


@pytest.fixture(scope="module")
def folded(loaded):
    return PassManager(parse_pipeline("fold-bn")).run(loaded.graph)


@pytest.fixture(scope="module")
def int4(loaded, folded):
    return _quantize(loaded, folded, "quantize{weight_bits=4}")


def _qdq_graph(scale: float) -> Graph:
    g = Graph("qdq")
    g.add_input("x", TensorType((2, 6), "float32"))
    s = g.add_constant("s", np.array(scale, np.float32), exact_name=True)
    q = g.append(g.make_node("quantize_linear", ["x", s], {"dtype": "int8", "bits": 8}))
    dq = g.append(g.make_node("dequantize_linear", [q.outputs[0], s], {"bits": 8}))
    g.outputs = [dq.outputs[0]]
    return g


def test_ste_gradients_inside_and_outside_the_clip_range():
    s = 0.1
    g = _qdq_graph(s)
    # x/s: inside [-128, 127] for the first four, saturated beyond for the last two of each row
    x = torch.tensor([[0.01, -0.26, 3.0, 12.7, 12.9, 50.0], [-12.8, 0.04, -1.0, 7.0, -12.9, -40.0]],
                     requires_grad=True)
    m = to_torch(g, trainable=True).train()
    y = m(x)
    y.sum().backward()
    inside = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(x.grad, inside)  # straight through inside the range, zero where saturated
    # LSQ: d/ds sum(x_hat) = sum(q - x/s inside, saturation level outside) * 1/sqrt(N * Qp), N = 6 per sample
    xs = x.detach().double() / s
    q = torch.clamp(torch.round(xs), -128, 127)
    want = (torch.where(inside.bool(), q - xs, q).sum() / np.sqrt(6 * 127)).item()
    got = m.constant("s").grad.item()
    assert got != 0 and got == pytest.approx(want, rel=1e-4, abs=1e-6)
    # same values in training and eval; eval keeps int8 integers and no graph to differentiate
    with torch.no_grad():
        ev = to_torch(g, trainable=False)(x.detach())
        assert torch.equal(y.detach(), ev)
        qi = to_torch(g, trainable=True).eval()._plan[0][0]([x.detach(), torch.tensor(s)], g.nodes[0].attrs)
        assert qi.dtype == torch.int8


def test_fake_quantize_matches_quantize_linear_bit_for_bit():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((64, 16, 5, 5)).astype(np.float32) * 3)
    s = torch.from_numpy(rng.uniform(0.01, 0.05, 16).astype(np.float32))
    x[0, 0, 0, :3] = torch.tensor([0.5, 1.5, -2.5]) * s[0]  # exact half steps round to even
    from qcompile.backends.torch_backend import _quantize_linear

    ref = _quantize_linear([x, s], {"axis": 1, "dtype": "int8", "bits": 4})
    got = fake_quantize(x, s, -8, 7, 4, axis=1)
    assert got.dtype == torch.float32 and torch.equal(got, ref.to(torch.float32))
    assert ref[0, 0, 0, :3].tolist() == [0, 2, -2]


def test_interpreter_output_is_unchanged_by_training_mode(int4, split):
    x = torch.from_numpy(split.test[0][:64])
    with torch.no_grad():
        ref = to_torch(int4, trainable=False).eval()(x)
        train_mode = to_torch(int4, trainable=True).train()(x)
        shadows = to_torch(int4, trainable=True, fake_quant=weight_grids(int4))
        assert torch.equal(train_mode, ref)
        assert torch.equal(shadows.train()(x), ref) and torch.equal(shadows.eval()(x), ref)
        # untrained shadows write back the very same integers
        back = write_back(int4, shadows)
    for name, arr in int4.constants.items():
        assert back.constants[name].dtype == arr.dtype and np.array_equal(back.constants[name], arr), name


def test_weight_grids_follow_bits_and_reduce_range(loaded, folded, int4):
    grids = weight_grids(int4)
    assert len(grids) == 7 and set(grids.values()) == {(-7, 7)}
    rr = _quantize(loaded, folded, "quantize{reduce_range=true}")
    assert set(weight_grids(rr).values()) == {(-63, 63)}
    assert weight_grids(folded) == {}
    with pytest.raises(InputError, match="no quantized weights"):
        finetune(folded, *load_digits_split().train, qat=True, epochs=1, progress=False)
    with pytest.raises(InputError, match=r"outside its grid \[-3, 3\]"):
        to_torch(int4, fake_quant={next(iter(grids)): (-3, 3)})


def _damaged_int4(loaded, folded):
    return _quantize(loaded, damaged(folded), "quantize{weight_bits=4}")


def _structure(g):
    return ([(n.op, n.name, list(n.inputs), list(n.outputs), dict(n.attrs)) for n in g.nodes],
            {k: (v.dtype, v.shape) for k, v in g.constants.items()})


def test_qat_recovers_a_damaged_int4_model(loaded, folded, int4, split):
    bad = _damaged_int4(loaded, folded)
    (xtr, ytr), (xva, yva), (xte, yte) = split.train, split.val, split.test
    acc_int4, acc_bad = accuracy(int4, xte, yte), accuracy(bad, xte, yte)
    assert acc_bad < acc_int4 - 30, (acc_int4, acc_bad)  # measured 98.3 vs 32.5: the damage is real
    epochs = []
    res = finetune(bad, xtr, ytr, val_images=xva, val_labels=yva, teacher=folded, epochs=5, patience=5, lr=3e-3,
                   progress=epochs.append)
    acc_ft = accuracy(res.graph, xte, yte)
    assert acc_ft >= acc_int4 - 3, (acc_int4, acc_bad, acc_ft)  # measured 97.8
    assert [e["epoch"] for e in epochs] == list(range(6)) and epochs[-1]["best_epoch"] == res.best_epoch
    losses = [h["train_loss"] for h in res.history[1:]]
    assert losses[-1] < losses[0] / 3, losses
    # again a QDQ graph of the same structure, int8 weights exactly on the int4 grid
    assert _structure(res.graph) == _structure(bad)
    changed_q = changed_s = 0
    for node in res.graph.nodes:
        if node.name in weight_grids(bad):
            q = res.graph.constants[node.inputs[0]]
            assert q.dtype == np.int8 and np.abs(q).max() <= 7
            changed_q += not np.array_equal(q, bad.constants[node.inputs[0]])
        if node.op in ("quantize_linear", "dequantize_linear"):
            s = res.graph.constants[node.inputs[1]]
            assert s.dtype == np.float32 and (s > 0).all()
            changed_s += not np.array_equal(s, bad.constants[node.inputs[1]])
    assert changed_q == 7 and changed_s > 7  # weights and the learned scales (weights' and activations') moved
    # what validation measured is what the written graph computes
    assert accuracy(res.graph, xva, yva) == res.best_val_acc


def test_fixed_scales_and_reduce_range_grid(loaded, folded, split):
    rr = _quantize(loaded, folded, "quantize{reduce_range=true,act_bits=0,bias_correction=false}")
    x, y = split.train[0][:256], split.train[1][:256]
    res = finetune(rr, x, y, epochs=1, lr=3e-2, learn_scales=False, progress=False)
    moved = 0
    for node in rr.nodes:
        if node.op == "dequantize_linear":
            q, s = res.graph.constants[node.inputs[0]], res.graph.constants[node.inputs[1]]
            assert q.dtype == np.int8 and np.abs(q).max() <= 63  # the 7-bit grid survives a large step
            assert s.tobytes() == rr.constants[node.inputs[1]].tobytes()  # fixed scales stay bit for bit
            moved += int(np.sum(q != rr.constants[node.inputs[0]]))
    assert moved > 100


def test_progress_lines_without_a_terminal(int4, split, capsys):
    finetune(int4, split.train[0][:64], split.train[1][:64], epochs=1, progress=True)
    err = capsys.readouterr().err
    assert "fine-tuning 'digits_cnn': epoch 1/1 loss" in err and "\x1b[" not in err
    finetune(int4, split.train[0][:64], split.train[1][:64], epochs=1, progress=False)
    assert capsys.readouterr().err == ""


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def test_cli_finetune_end_to_end(tmp_path, capsys):
    out = tmp_path / "ft"
    assert run_cli("finetune", DIGITS, "-p", "fold-bn,quantize{weight_bits=4}", "-t", "torch", "-o", out,
                   "--epochs", "1", "--lr", "3e-3", "-q") == 0
    text = capsys.readouterr().out
    assert "quantization-aware fine-tune on digits: 1 epoch(s)" in text and "test accuracy" in text
    m = json.loads((out / "manifest.json").read_text())
    assert m["pipeline"] == "fold-bn,quantize{weight_bits=4},finetune{epochs=1,lr=0.003}"
    st = m["passes"][-1]["stats"]
    assert st["qat"] and st["epochs_run"] == 1 and st["test_acc_after"] >= 95.0
    v = m["verification"]
    assert not v["exact_pipeline"] and v["backend_vs_compressed_ir_rel_error"] <= 4 / 127
    for name, f in m["files"].items():
        assert sha256_file(out / name) == f["sha256"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    # an artifact as input: its source model, pipeline and target are reused, the old finetune replaced
    out2 = tmp_path / "ft2"
    assert run_cli("finetune", out, "-o", out2, "--epochs", "1", "--fixed-scales", "-q") == 0
    m2 = json.loads((out2 / "manifest.json").read_text())
    assert m2["pipeline"] == "fold-bn,quantize{weight_bits=4},finetune{epochs=1,learn_scales=false}"
    assert m2["target"]["name"] == "torch"


@pytest.mark.parametrize("args,message", [
    (["--epochs", "0"], "epochs=0"),
    (["--kd-weight", "1.5"], "kd_weight=1.5"),
    (["--data", "imagenet"], "unknown training data 'imagenet'"),
    (["-t", "gpu"], "unknown target 'gpu'"),
    (["-p", "fold-bn,nosuchpass"], "nosuchpass"),
])
def test_cli_finetune_bad_arguments(tmp_path, capsys, args, message):
    out = tmp_path / "o"
    assert run_cli("finetune", DIGITS, "-o", out, "-q", *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_finetune_bad_inputs(tmp_path, capsys):
    (tmp_path / "art").mkdir()
    assert run_cli("finetune", tmp_path / "art", "-o", tmp_path / "o") == 2
    assert "without manifest.json" in capsys.readouterr().err
    np.savez(tmp_path / "wrong.npz", x_train=np.zeros((8, 1, 9, 9), np.float32), y_train=np.zeros(8, np.int64))
    assert run_cli("finetune", DIGITS, "-o", tmp_path / "o", "--data", tmp_path / "wrong.npz", "-q") == 2
    assert "(1, 9, 9)" in capsys.readouterr().err and not (tmp_path / "o").exists()
