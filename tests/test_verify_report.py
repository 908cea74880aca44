"""``qcompile verify`` (file table and numerics re-checked) and the compile report (``report.md`` + plot)."""

import json
import shutil

import pytest

from qcompile.artifact import sha256_file
from qcompile.cli import main

DIGITS = "qcompile.models.digits:digits_cnn"
EXACT, LOSSY = "fold-bn,dead-code", "fold-bn,quantize"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Two fresh artifacts of the digits CNN on onnxruntime: an exact pipeline and a quantized one."""
    root = tmp_path_factory.mktemp("artifacts")
    out = {}
    for name, pipeline in (("exact", EXACT), ("lossy", LOSSY)):
        assert main(["compile", DIGITS, "-p", pipeline, "-t", "onnxruntime", "-o", str(root / name)]) == 0
        out[name] = root / name
    return out


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("which", ["exact", "lossy"])
def test_verify_passes_on_a_fresh_artifact(artifacts, which, capsys):
    capsys.readouterr()
    assert main(["verify", str(artifacts[which])]) == 0
    out = capsys.readouterr().out
    manifest = json.loads((artifacts[which] / "manifest.json").read_text())
    assert f"files: {len(manifest['files'])} file(s) match their sha256" in out
    assert "numerics: artifact vs original model on 16 feeds" in out
    if which == "lossy":  # the quantized artifact is also held to the compressed IR
        assert "vs compressed IR" in out and "atol_rel=0.0315" in out


def test_a_flipped_byte_in_model_onnx_is_named(artifacts, tmp_path, capsys):
    art = _copy(artifacts["exact"], tmp_path)
    data = bytearray((art / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (art / "model.onnx").write_bytes(bytes(data))
    assert main(["verify", str(art)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "model.onnx: sha256 differs" in err
    assert "report.md" not in err  # only the changed file is named


def test_a_missing_listed_file_and_an_unlisted_one_are_named(artifacts, tmp_path, capsys):
    art = _copy(artifacts["exact"], tmp_path)
    (art / "report" / "macs.png").unlink()
    (art / "notes.txt").write_text("added later\n")
    assert main(["verify", str(art), "--files-only"]) == 1
    err = capsys.readouterr().err
    assert "report/macs.png: listed in the manifest but missing" in err
    assert "notes.txt: not listed in the manifest's file table" in err


def test_a_manifest_that_is_not_json_is_an_input_error(artifacts, tmp_path, capsys):
    art = _copy(artifacts["exact"], tmp_path)
    (art / "manifest.json").write_text('{"files": {"model.onnx": ')
    assert main(["verify", str(art)]) == 2
    err = capsys.readouterr().err
    assert "corrupt manifest" in err and "manifest.json" in err
    assert main(["verify", str(tmp_path / "nowhere")]) == 2


def test_changed_weights_with_a_rehashed_manifest_fail_the_numeric_check(artifacts, tmp_path, capsys):
    """Hashes only say the files are the ones written; the numeric check must catch a model that
    computes something else even when the manifest was updated to match it."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    art = _copy(artifacts["exact"], tmp_path)
    model = onnx.load(str(art / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init).copy()
    w.flat[: w.size // 4] *= 1.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(art / "model.onnx"))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = {"sha256": sha256_file(art / "model.onnx"),
                                       "bytes": (art / "model.onnx").stat().st_size}
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(art), "--files-only"]) == 0
    capsys.readouterr()
    assert main(["verify", str(art)]) == 1
    err = capsys.readouterr().err
    assert "FAILED" in err and "differs from the original model beyond fp32 tolerance" in err


def test_report_lists_every_layer_and_the_totals(artifacts):
    from qcompile.frontends import load_model

    layers = [n.name for n in load_model(DIGITS).graph.nodes if n.op in ("conv2d", "linear")]
    assert len(layers) == 7
    for which in ("exact", "lossy"):
        art = artifacts[which]
        manifest = json.loads((art / "manifest.json").read_text())
        assert {"report.md", "report/macs.png"} <= set(manifest["files"])  # hashed with the artifact
        assert (art / "report" / "macs.png").read_bytes()[:4] == b"\x89PNG"
        text = (art / "report.md").read_text()
        rows = {line.split("|")[1].strip(" `"): line for line in text.splitlines() if line.startswith("| `")}
        assert set(layers) <= set(rows)
        before, after = manifest["costs"]["before"], manifest["costs"]["after"]
        assert f"| **total** | | | **{before['macs']:,}** | **{after['macs']:,}** |" in text
        assert f"| weight bytes | {before['weight_bytes']:,} | {after['weight_bytes']:,} |" in text
        assert "](report/macs.png)" in text and "## Verification" in text
        _assert_tables_are_well_formed(text)
        if which == "lossy":
            assert "int8 w / int8 a" in rows["fc"] and "fold-bn (conv_out.1)" in rows["conv_out.0"]
            assert "| artifact vs compressed IR (reference interpreter) |" in text
        else:
            assert "fold-bn (stem.1)" in rows["stem.0"] and "| fc | linear | unchanged |" in rows["fc"].replace("`", "")


def _assert_tables_are_well_formed(text):
    """Every markdown table row has as many cell separators as its header (a stray '|' in a cell breaks it)."""
    import re

    header = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        bars = len(re.findall(r"(?<!\\)\|", line))
        header = header or bars
        assert bars == header, line


def test_same_inputs_give_the_same_artifact_bytes(artifacts, tmp_path):
    out = tmp_path / "again"
    assert main(["compile", DIGITS, "-p", EXACT, "-t", "onnxruntime", "-o", str(out)]) == 0
    first = artifacts["exact"]
    assert (out / "report.md").read_bytes() == (first / "report.md").read_bytes()
    for name in json.loads((first / "manifest.json").read_text())["files"]:
        assert (out / name).read_bytes() == (first / name).read_bytes(), name
    assert (out / "manifest.json").read_bytes() == (first / "manifest.json").read_bytes()


def test_factorized_layer_rows_carry_method_rank_error_and_the_chain_macs():
    from qcompile.frontends import load_model
    from qcompile.ir.costs import graph_costs
    from qcompile.passes import PassManager, parse_pipeline
    from qcompile.report import layer_rows

    g = load_model(DIGITS).graph
    g2 = PassManager(parse_pipeline("fold-bn,tucker2{rank=8}")).run(g)
    rows = {r.layer: r for r in layer_rows(g, g2)}
    r = rows["conv_out.0"]
    assert r.nodes_after == ["conv_out.0.tucker_in", "conv_out.0.tucker_core", "conv_out.0.tucker_out"]
    assert "tucker2 rank 8x8" in r.methods and any(e.startswith("weight_rel_error ") for e in r.errors)
    costs = {c.node: c.macs for c in graph_costs(g2)}
    assert r.macs_after == sum(costs[n] for n in r.nodes_after) < r.macs_before
    assert rows["fc"].macs_after == rows["fc"].macs_before == 480


def test_search_section_links_the_front_and_lists_the_chosen_configuration():
    from qcompile.report import render_markdown

    manifest = {
        "source": {"spec": DIGITS}, "target": {"name": "onnxruntime"}, "pipeline": "p",
        "search": {"file": "search/search.json", "chosen": "fold-bn,layer-config{...}", "accuracy": 97.5,
                   "acc_drop": 0.4, "latency_ratio": 0.61, "speedup_vs_onnxruntime": 1.7},
        "passes": [{"name": "layer-config", "text": "layer-config{...}", "modified": True, "nodes_before": 18,
                    "nodes_after": 40, "rel_error": None,
                    "stats": {"layers": {"conv_out.0": "tucker2[16x8]+int8", "fc": "int4"}}}],
    }
    text = render_markdown(manifest, [])
    assert "## Search" in text and "![Pareto front and finalists](search/front.png)" in text
    assert "| `conv_out.0` | tucker2[16x8]+int8 |" in text and "| `fc` | int4 |" in text
    assert "97.50 % (drop 0.40 points)" in text and "0.61x the original" in text
    assert "## Search" not in render_markdown({**manifest, "search": None}, [])


def _layer_table(text):
    """The report's layer table: {first cell: [cells]}."""
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, {cells[0].strip(" `*"): cells for cells in
                    ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def _shares(text):
    header, rows = _layer_table(text)
    col = header.index("latency share")
    return {name: cells[col] for name, cells in rows.items()}


def test_report_html_renders_the_markdown_and_is_hashed(artifacts):
    for which in ("exact", "lossy"):
        art = artifacts[which]
        manifest = json.loads((art / "manifest.json").read_text())
        assert "report.html" in manifest["files"]
        page = (art / "report.html").read_text()
        assert page.startswith("<!DOCTYPE html>") and "<style>" in page and "<script" not in page
        assert '<img src="report/macs.png"' in page and page.count("<table>") >= 4
        assert "<th>layer</th>" in page and "<code>conv_out.0</code>" in page and '<th style="text-align:right">' in page


def test_without_profile_the_latency_column_says_how_to_measure_it(artifacts):
    text = (artifacts["exact"] / "report.md").read_text()
    assert set(_shares(text).values()) == {"—"}
    assert "Latency share: not measured" in text and "`qcompile compile ... --profile`" in text
    assert "profile" not in json.loads((artifacts["exact"] / "manifest.json").read_text())


@pytest.mark.parametrize("target", ["onnxruntime", "tvm-x86"])
def test_profile_measures_each_layers_latency_share(target, tmp_path):
    """--profile times the artifact's kernels at one thread: every conv/linear row gets a share, the rows
    plus (other ops) make 100 %, and on the digits CNN the convolutions take most of the time."""
    from qcompile.frontends import load_model

    out = tmp_path / "prof"
    assert main(["compile", DIGITS, "-p", "fold-bn", "-t", target, "-o", str(out), "--profile"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    prof = manifest["profile"]
    assert prof["measured"] and prof["threads"] == 1 and prof["runs"] >= 5 and prof["total_ms"] > 0
    assert prof["clock"] and prof["machine"]
    layers = {n.name: n.op for n in load_model(DIGITS).graph.nodes if n.op in ("conv2d", "linear")}
    assert set(prof["layers"]) == set(layers)
    shares = {k: v / prof["total_ms"] for k, v in prof["layers"].items()}
    other = prof["other_ms"] / prof["total_ms"]
    assert all(0 <= s <= 1 for s in shares.values()) and 0 <= other <= 1
    assert abs(sum(shares.values()) + other - 1) < 0.01
    conv = sum(s for k, s in shares.items() if layers[k] == "conv2d")
    assert conv > other and conv > shares["fc"]
    # the report shows them: a percentage in every layer row, 100 % in the total row
    text = (out / "report.md").read_text()
    cells = _shares(text)
    for name, s in shares.items():
        assert cells[name] == f"{100 * s:.1f} %"
    assert cells["total"].startswith("**100 %**")
    assert f"on `{target}`, measured with `--profile`" in text and prof["machine"] in text
    _assert_tables_are_well_formed(text)
    assert main(["verify", str(out), "--files-only"]) == 0  # the profiled report is hashed like the rest


def test_backends_without_a_profiler_say_why(tmp_path):
    from qcompile.backends.torch_backend import TorchBackend
    from qcompile.frontends import load_model
    from qcompile.profile import profile_artifact
    from qcompile.report import render_markdown

    loaded = load_model(DIGITS)
    prof = profile_artifact(TorchBackend(), tmp_path, {}, loaded.graph, loaded.calibration[0])
    assert prof["measured"] is False and "reference interpreter" in prof["reason"]
    text = render_markdown({"source": {"spec": DIGITS}, "target": {"name": "torch"}, "profile": prof}, [])
    assert "Latency share: not measured on `torch` — the torch target runs" in text


def test_kernels_map_to_layers_in_call_order():
    """TVM kernels are named after their ops, not layers: the k-th conv/matmul kernel is the k-th layer
    node, preferring one whose output has the kernel's output size; a count mismatch is refused."""
    from qcompile.frontends import load_model
    from qcompile.passes import PassManager, parse_pipeline
    from qcompile.profile import NotMeasured, _ort_node, _tvm_assign

    g = PassManager(parse_pipeline("fold-bn")).run(load_model(DIGITS).graph)
    layers = [n.name for n in g.nodes if n.op in ("conv2d", "linear")]
    kernels = [("transpose1", 64)] + [(f"fused_conv2d{k}_add_relu1_prepacked", 1024) for k in range(5)] + \
        [("concatenate1", 2048), ("fused_conv2d3_add2_relu11_prepacked", 768), ("mean1", 48),
         ("fused_matmul_add31_prepacked", 10)]
    assert _tvm_assign(g, kernels) == [None] + layers[:5] + [None, layers[5], None, layers[6]]
    with pytest.raises(NotMeasured, match="matched no kernel"):
        _tvm_assign(g, kernels[:-1])
    # onnxruntime names: the IR node, a node the exporter added for it, or (after NCHWc / fusion) the name
    # of a value it produces; a fused conv named after its ReLU's output is the conv
    relu_out = next(n for n in g.nodes if n.name == "stem.2").outputs[0]
    assert _ort_node(g, "conv_out.0", "Conv") == "conv_out.0"
    assert _ort_node(g, "fc/dequantize_w", "DequantizeLinear") == "fc"
    assert _ort_node(g, f"{relu_out}_nchwc", "Conv") == "stem.0"
    assert _ort_node(g, f"{relu_out}_nchwc", "Relu") == "stem.2"
    assert _ort_node(g, "ReorderOutput", "ReorderOutput") is None
