"""The compile report: ``OUT/report.md``, the same as a page ``OUT/report.html`` and the plot
``OUT/report/macs.png``, written into the artifact.

``build_report(manifest, original, compiled)`` returns ``{relative path: bytes}``; ``compile`` writes
these into the same atomic directory as the artifact and hashes them in the manifest's file table.
The HTML is the markdown rendered by markdown-it-py (CommonMark + tables) into one self-contained page
(inline CSS; the plots are the artifact's PNGs, linked by relative path).

The report holds

* the artifact (source model, target, pipeline, inputs/outputs);
* before/after totals (MACs, params, weight bytes, nodes) from the manifest's ``costs``;
* the verification result (errors vs the original model and vs the compressed IR, with tolerances);
* one row per conv / linear / matmul layer of the original model: op, how it was rewritten (from the
  provenance its nodes carry: folded batch norm, pruned channels, factorization method and rank,
  weight/activation bits), MACs and params before and after, and the numeric error a pass recorded
  for it (factorization weight or response error), and its share of the measured latency when the
  compile was profiled (``--profile``, :mod:`qcompile.profile`: the artifact's kernels timed on its
  backend at one thread); plus one row for every other op, so the rows add up to the totals; a bar
  chart of MACs per layer before/after;
* one row per pass (nodes before/after, whether it changed the graph, recorded error, scalar stats);
* when a search chose the pipeline: its result, the Pareto plot ``search/front.png`` and the chosen
  configuration per layer.

The report is a pure function of its inputs: no timestamps and no pass timings (they differ from
run to run, and the same inputs must give the same artifact bytes).  Latency shares are the one
exception, and only when asked for: ``--profile`` puts the measured times into the manifest
(``profile``), and the report shows them with the clock and machine they were measured on.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Mapping

from qcompile.ir.costs import node_cost
from qcompile.ir.graph import Graph, Node

REPORT = "report.md"
REPORT_HTML = "report.html"
MACS_PLOT = "report/macs.png"
LAYER_OPS = ("conv2d", "conv_transpose2d", "linear", "matmul")


@dataclass
class LayerRow:
    """One original layer (or one layer new in the compiled graph) and what became of it."""

    layer: str
    op: str
    macs_before: int = 0
    macs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    nodes_after: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def build_report(manifest: Mapping[str, Any], original: Graph, compiled: Graph) -> dict[str, bytes]:
    """``{"report.md": ..., "report/macs.png": ...}`` for an artifact whose manifest (without its file
    table) is ``manifest``, compiled from the IR ``original`` into the IR ``compiled``."""
    rows = layer_rows(original, compiled)
    text = render_markdown(manifest, rows)
    prof = manifest.get("profile") or {}
    shares = None
    if prof.get("measured") and prof.get("total_ms"):
        shares = {r.layer: (prof.get("layers") or {}).get(r.layer, 0.0) / prof["total_ms"] for r in rows}
    return {REPORT: text.encode(), REPORT_HTML: render_html(text).encode(), MACS_PLOT: plot_macs(rows, shares)}


# ---------------------------------------------------------------------------------------- layer table
def origin(node: Node) -> str:
    """The original layer a compiled node comes from: the ``source`` its latest factorization recorded,
    else its own name (passes that rewrite a layer in place keep its name)."""
    for entry in reversed(node.meta.get("provenance", [])):
        if "source" in entry:
            return str(entry["source"])
    return node.name


def _params(graph: Graph, node: Node) -> tuple[int, int]:
    """(elements, bytes) of ``node``'s constant inputs plus those of the weight-producing nodes feeding
    it (nodes computed from constants alone, e.g. ``dequantize_linear`` of int8 weights and scales)."""
    producers = graph.producers()
    costs = [node_cost(graph, node)]
    for v in node.inputs:
        p = producers.get(v) if v else None
        if p is not None and all(not i or i in graph.constants for i in p.inputs):
            costs.append(node_cost(graph, p))
    return sum(c.params for c in costs), sum(c.weight_bytes for c in costs)


def layer_rows(original: Graph, compiled: Graph) -> list[LayerRow]:
    """Per-layer MACs, params, rewrite methods and recorded errors, original layers in graph order,
    then compiled layers with no original counterpart."""
    rows: dict[str, LayerRow] = {}
    for n in original.nodes:
        if n.op in LAYER_OPS:
            params, nbytes = _params(original, n)
            rows[n.name] = LayerRow(n.name, n.op, macs_before=node_cost(original, n).macs, params_before=params,
                                    bytes_before=nbytes)
    for n in compiled.nodes:
        if n.op not in LAYER_OPS:
            continue
        row = rows.setdefault(origin(n), LayerRow(origin(n), n.op))
        row.macs_after += node_cost(compiled, n).macs
        params, nbytes = _params(compiled, n)
        row.params_after += params
        row.bytes_after += nbytes
        row.nodes_after.append(n.name)
        for entry in n.meta.get("provenance", []):
            text = describe(entry)
            if text and text not in row.methods:
                row.methods.append(text)
            for k, v in sorted(entry.items()):
                err = f"{k} {_num(v)}"
                if k.endswith("error") and isinstance(v, (int, float)) and err not in row.errors:
                    row.errors.append(err)
    return list(rows.values())


def describe(entry: Mapping[str, Any]) -> str:
    """One provenance entry as a few words: ``fold-bn (stem.1)``, ``tucker2 rank 8x8``, ``int8 w / int8 a``."""
    p = entry.get("pass", "")
    if p == "fold-bn":
        return f"fold-bn ({entry.get('folded')})"
    if "out_channels_kept" in entry:
        return f"pruned to {entry['out_channels_kept']}/{entry.get('out_channels')} out ch ({entry.get('criterion')})"
    if "method" in entry:
        rank = entry.get("rank")
        rank_text = "x".join(map(str, rank)) if isinstance(rank, (list, tuple)) else rank
        bits = f" int{entry['bits']}" if "bits" in entry else ""
        via = f" via {p}" if p and p != entry["method"] else ""
        return f"{entry['method']} rank {rank_text}{bits}{via}"
    if "weight_bits" in entry:
        act = f" / int{entry['act_bits']} a" if entry.get("act_bits") else " (weight-only)"
        return f"int{entry['weight_bits']} w{act}" + (" (kept)" if entry.get("weights") == "kept" else "")
    return str(p)


def _num(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else str(v)


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}" if before else "—"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------- markdown
def render_markdown(manifest: Mapping[str, Any], rows: list[LayerRow]) -> str:
    """The report text (sections listed in the module docstring)."""
    out: list[str] = []
    src, tgt = manifest.get("source", {}), manifest.get("target", {})
    out += [f"# qcompile report: `{src.get('spec', '?')}` for `{tgt.get('name', '?')}`", ""]
    out += [f"- pipeline: `{manifest.get('pipeline') or '(none)'}`",
            f"- target: `{tgt.get('name')}` — {tgt.get('description', '')}; backend `{manifest.get('backend')}`"]
    for kind in ("inputs", "outputs"):
        io_ = ", ".join(f"`{i['name']}` {'x'.join(map(str, i['shape']))} {i['dtype']}" for i in manifest.get(kind, []))
        out.append(f"- {kind}: {io_}")
    extra = {k: v for k, v in src.items() if k not in ("spec",)}
    if extra:
        out.append("- source: " + ", ".join(f"{k} `{v}`" for k, v in sorted(extra.items())))
    out += ["- file hashes (sha256) and tool versions: `manifest.json`", ""]
    out += _totals(manifest.get("costs", {}))
    out += _verification(manifest.get("verification", {}))
    out += _layers(manifest, rows)
    if manifest.get("search"):
        out += _search(manifest)
    out += _passes(manifest.get("passes", []))
    return "\n".join(out).rstrip("\n") + "\n"


def _totals(costs: Mapping[str, Any]) -> list[str]:
    before, after = costs.get("before", {}), costs.get("after", {})
    out = ["## Totals", "", "| | before | after | after / before |", "|---|---:|---:|---:|"]
    for key, label in (("macs", "MACs"), ("params", "params"), ("weight_bytes", "weight bytes"), ("nodes", "nodes")):
        if key in before:
            b, a = before[key], after.get(key, 0)
            out.append(f"| {label} | {b:,} | {a:,} | {_ratio(a, b)} |")
    return out + [""]


def _verification(v: Mapping[str, Any]) -> list[str]:
    if not v:
        return []
    out = ["## Verification", "",
           f"Passed: the artifact was loaded back with its backend and run on {v.get('feeds')} calibration feeds "
           f"({v.get('calibration')}).", ""]
    tol = v.get("tolerance", {})
    if v.get("exact_pipeline"):
        vs_orig = (f"must hold |y − y_ref| ≤ {tol.get('atol_rel')}·max|y_ref| + {tol.get('rtol')}·|y_ref| "
                   f"(exact pipeline): {'holds' if v.get('within_fp32_tolerance') else 'does not hold'}")
    else:
        bound = tol.get("max_rel_error")
        vs_orig = "lossy pipeline: recorded" + (f", bounded by --max-rel-error {bound}" if bound is not None else
                                               " (no bound given)")
    btol = v.get("backend_vs_compressed_ir_tolerance", {})
    btext = ", ".join(f"{k}={_num(x)}" for k, x in sorted(btol.items()))
    out += ["| check | max abs error | max rel error | tolerance |", "|---|---:|---:|---|",
            f"| artifact vs {_cell(v.get('against', 'original model'))} | {_num(v.get('max_abs_error'))} | "
            f"{_num(v.get('max_rel_error'))} | {_cell(vs_orig)} |"]
    if not v.get("exact_pipeline"):
        if "rms_factor_vs_original" in btol:  # quantized: two bounds per output (compiler.INT8_RMS_FACTOR)
            held = v.get("int8_bound_held") or []
            btext = (f"per output: max error ≤ {_num(btol.get('atol_rel'))}·max|y_ref| (four int8 steps), or RMS "
                     f"error vs the original ≤ {_num(btol['rms_factor_vs_original'])}× the quantized IR's"
                     + (f"; held: {', '.join(held)}" if held else ""))
            btext = _cell(btext)
        else:
            btext = _cell(f"{btext} (relative to max|y_ref|)")
        out.append(f"| artifact vs compressed IR (reference interpreter) | | "
                   f"{_num(v.get('backend_vs_compressed_ir_rel_error'))} | {btext} |")
    return out + ["", "Relative errors are max|y − y_ref| / max|y_ref| over all outputs and feeds.", ""]


def format_ms(ms: float) -> str:
    """Milliseconds for a reader: ``1.3 ms``, below 1 ms in µs (``496 µs``)."""
    return f"{ms:.3g} ms" if ms >= 1 else f"{1e3 * ms:.3g} µs"


def _pct(ms: float | None, total: float) -> str:
    return "—" if ms is None or not total else f"{100 * ms / total:.1f} %"


def _layers(manifest: Mapping[str, Any], rows: list[LayerRow]) -> list[str]:
    costs = manifest.get("costs", {})
    before, after = costs.get("before", {}), costs.get("after", {})
    prof = manifest.get("profile") or {}
    measured = bool(prof.get("measured"))
    times, total = (prof.get("layers") or {}), float(prof.get("total_ms") or 0.0)
    out = ["## Layers", "",
           "| layer | op | method / provenance | MACs before | MACs after | after / before | latency share | "
           "params before | params after | weight bytes before | weight bytes after | recorded error |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        method = "; ".join(r.methods) or ("removed" if not r.nodes_after else "unchanged")
        if r.nodes_after and r.nodes_after != [r.layer]:
            method += f" → {len(r.nodes_after)} node(s)"
        share = _pct(times.get(r.layer, 0.0) if r.nodes_after else None, total) if measured else "—"
        out.append(f"| `{_cell(r.layer)}` | {r.op} | {_cell(method)} | {r.macs_before:,} | {r.macs_after:,} | "
                   f"{_ratio(r.macs_after, r.macs_before)} | {share} | {r.params_before:,} | {r.params_after:,} | "
                   f"{r.bytes_before:,} | {r.bytes_after:,} | {_cell(', '.join(r.errors)) or '—'} |")
    if before:
        keys = (("macs", "macs_before", "macs_after"), ("params", "params_before", "params_after"),
                ("weight_bytes", "bytes_before", "bytes_after"))
        rest = {k: (before.get(k, 0) - sum(getattr(r, b) for r in rows),
                    after.get(k, 0) - sum(getattr(r, a) for r in rows)) for k, b, a in keys}
        (mb, ma), (pb, pa), (wb, wa) = rest.values()
        other = _pct(float(prof.get("other_ms") or 0.0), total) if measured else "—"
        out.append(f"| (other ops) | | pools, batch norms, activation quantization, ... | {mb:,} | {ma:,} | "
                   f"{_ratio(ma, mb)} | {other} | {pb:,} | {pa:,} | {wb:,} | {wa:,} | |")
        tb, ta = before.get("macs", 0), after.get("macs", 0)
        tshare = f"**100 %** ({format_ms(total)})" if measured else "—"
        out.append(f"| **total** | | | **{tb:,}** | **{ta:,}** | **{_ratio(ta, tb)}** | {tshare} | "
                   f"**{before.get('params', 0):,}** | **{after.get('params', 0):,}** | "
                   f"**{before.get('weight_bytes', 0):,}** | **{after.get('weight_bytes', 0):,}** | |")
    out += ["", "MACs count multiply-accumulates per inference. Params and weight bytes count a layer's constants "
            "as the IR stores them (quantized layers: integer weights, one byte each also for int4, plus "
            "per-channel scales and the bias).", "", _latency_note(prof), "",
            f"![MACs per layer, before and after]({MACS_PLOT})", ""]
    return out


def _latency_note(prof: Mapping[str, Any]) -> str:
    """What the latency-share column holds: how and where it was measured, or how to measure it."""
    if prof.get("measured"):
        return (f"Latency share: each layer's part of the summed kernel time of the compiled artifact, "
                f"{format_ms(float(prof.get('total_ms') or 0))} per inference on `{prof.get('backend')}`, measured with "
                f"`--profile` — {prof.get('clock')}; machine: {prof.get('machine')}. Kernels that compute "
                "pools, activation quantization, layout changes and the like count as (other ops). The times "
                "vary from run to run: a profiled artifact's bytes are not reproducible.")
    if prof:
        return f"Latency share: not measured on `{prof.get('backend')}` — {prof.get('reason')}."
    return ("Latency share: not measured (timings would make the artifact's bytes differ from compile to "
            "compile). `qcompile compile ... --profile` times every kernel of the compiled artifact on its "
            "backend at one thread and fills this column.")


def _search(manifest: Mapping[str, Any]) -> list[str]:
    s = manifest["search"]
    out = ["## Search", "",
           f"The pipeline is the point a compression search chose (`{s.get('file', 'search/search.json')}` holds "
           "the front, the finalists and the settings).", "",
           f"- chosen: `{s.get('chosen')}`"]
    if s.get("accuracy") is not None:
        out.append(f"- validation accuracy {s['accuracy']:.2f} % (drop {s.get('acc_drop', 0):.2f} points)")
    if s.get("latency_ratio") is not None:
        out.append(f"- measured latency {s['latency_ratio']:.3g}x the original on `{manifest['target']['name']}`; "
                   f"speed-up over onnxruntime fp32 on the original {s.get('speedup_vs_onnxruntime', 0):.2f}x")
    out += ["", "![Pareto front and finalists](search/front.png)", ""]
    chosen: dict[str, str] = {}
    for rec in manifest.get("passes", []):
        if rec.get("name") == "layer-config":
            chosen.update((rec.get("stats") or {}).get("layers", {}))
        if rec.get("name") == "prune-channels" and rec.get("modified"):
            chosen["(all prunable channels)"] = f"keep ratio {_num((rec.get('stats') or {}).get('keep_ratio'))}"
    if chosen:
        out += ["Chosen configuration per layer (layers not listed stay fp32):", "",
                "| layer | configuration |", "|---|---|"]
        out += [f"| `{_cell(k)}` | {_cell(v)} |" for k, v in chosen.items()]
        out.append("")
    return out


def _passes(records: list[Mapping[str, Any]]) -> list[str]:
    out = ["## Passes", "", "| # | pass | changed | nodes before → after | rel error | stats |",
           "|---:|---|---|---|---:|---|"]
    for k, r in enumerate(records, 1):
        stats = r.get("stats") or {}
        scalars = ", ".join(f"{key}={_num(v)}" for key, v in sorted(stats.items()) if isinstance(v, (int, float, str)))
        err = "—" if r.get("rel_error") is None else _num(r["rel_error"])
        out.append(f"| {k} | `{_cell(r.get('text', r.get('name')))}` | {'yes' if r.get('modified') else 'no'} | "
                   f"{r.get('nodes_before')} → {r.get('nodes_after')} | {err} | {_cell(scalars) or '—'} |")
    return out + ["", "Pass timings are not part of the artifact: they vary from run to run and the same inputs must "
                  "give the same artifact bytes (`qcompile compile --timing` prints them)."]


# ---------------------------------------------------------------------------------------- plot
def plot_macs(rows: list[LayerRow], shares: Mapping[str, float] | None = None) -> bytes:
    """PNG: MACs per layer before and after (grouped bars), one group per table row; with ``shares``
    (layer -> measured latency share, ``--profile``) a second panel shows them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [r.layer for r in rows]
    x = np.arange(len(rows))
    width = max(6.0, 0.6 * len(rows) + 2)
    if shares is None:
        fig, ax = plt.subplots(figsize=(width, 4.2))
    else:
        fig, (ax, lat) = plt.subplots(2, 1, figsize=(width, 6.6), sharex=True, height_ratios=(3, 2))
    ax.bar(x - 0.2, [r.macs_before for r in rows], 0.4, label="before", color="#8c8c8c")
    ax.bar(x + 0.2, [r.macs_after for r in rows], 0.4, label="after", color="#1f77b4")
    ax.set_ylabel("MACs per inference")
    ax.set_title("MACs per layer: before and after the pipeline")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    if shares is not None:
        lat.bar(x, [100 * shares.get(n, 0.0) for n in names], 0.6, color="#d62728")
        lat.set_ylabel("latency share (%)")
        lat.set_title("measured latency share of the compiled artifact (--profile)", fontsize=10)
        lat.grid(axis="y", alpha=0.3)
        ax = lat
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------- HTML
_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1f2328;
       margin: 0 auto; padding: 24px 32px 48px; max-width: 1500px; }
h1 { font-size: 22px; border-bottom: 1px solid #d0d7de; padding-bottom: 6px; }
h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #eaeef2; padding-bottom: 4px; }
code { font: 12.5px/1.3 ui-monospace, "DejaVu Sans Mono", monospace; background: #f3f5f7; padding: 1px 4px;
       border-radius: 4px; overflow-wrap: anywhere; }
.table { overflow-x: auto; margin: 10px 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d0d7de; padding: 4px 7px; vertical-align: top; }
th { vertical-align: bottom; }
th { background: #f6f8fa; position: sticky; top: 0; }
td { font-variant-numeric: tabular-nums; }
td[style*="right"] { white-space: nowrap; }
td:first-child code { white-space: nowrap; overflow-wrap: normal; }
tr:nth-child(even) td { background: #fafbfc; }
img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
li { margin: 2px 0; }
"""


def render_html(markdown_text: str) -> str:
    """``markdown_text`` (the report) as one self-contained HTML page: CommonMark + tables rendered by
    markdown-it-py, inline CSS, images linked by their relative paths inside the artifact."""
    import html

    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown_text)
    body = body.replace("<table>", '<div class="table"><table>').replace("</table>", "</table></div>")
    first = markdown_text.splitlines()[0] if markdown_text else "qcompile report"
    title = html.escape(first.lstrip("# ").replace("`", ""))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")
