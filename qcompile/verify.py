"""``qcompile verify OUT``: re-check an artifact directory written by compile / finetune / search.

Two checks, files first:

1. **files**: every file of the manifest's file table exists with the recorded size and sha256, and
   the directory holds no other file besides ``manifest.json``;
2. **numerics**: the source model (``manifest["source"]["spec"]``, specialised with the recorded
   input shapes) is loaded again with the same calibration feeds, the recorded pipeline is re-run
   (lossy pipelines only: their artifact is compared with the compressed IR), the artifact is loaded
   with its target's backend and run, and the outputs are judged by compile's own check
   (:func:`qcompile.compiler.check_numerics`) with the tolerances the manifest records.

A failed check raises :class:`ArtifactMismatch` (files) or ``NumericsError`` (numerics), both exit
code 1, naming the file or the check; a missing or unreadable manifest is an ``InputError`` (exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcompile.artifact import MANIFEST, read_manifest, sha256_file
from qcompile.errors import InputError, NumericsError, QCompileError


class ArtifactMismatch(QCompileError):
    """An artifact's files differ from its manifest's file table (changed, missing or unlisted)."""


@dataclass
class VerifyResult:
    out_dir: Path
    files: int
    lines: list[str] = field(default_factory=list)  # the report, one check per line


def check_files(out_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems with ``out_dir``'s files vs the manifest's file table, one message per file (empty: all
    files present with the recorded size and sha256, and nothing unlisted)."""
    table = manifest.get("files")
    if not isinstance(table, dict) or not table:
        return [f"manifest has no file table ('files'): nothing to check in '{out_dir}'"]
    problems = []
    for name, entry in sorted(table.items()):
        path, entry = out_dir / name, entry if isinstance(entry, dict) else {}
        if not path.is_file():
            problems.append(f"{name}: listed in the manifest but missing")
        elif path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            problems.append(f"{name}: sha256 differs from the manifest (file changed since it was written)")
    listed = set(table) | {MANIFEST}
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(out_dir).as_posix()
        if rel not in listed:
            problems.append(f"{rel}: not listed in the manifest's file table")
    return problems


def recorded_tolerances(v: dict[str, Any]) -> dict[str, Any]:
    """``check_numerics`` keyword arguments holding the tolerances the manifest's verification records."""
    from qcompile.compiler import FP32_ATOL_REL, FP32_RTOL

    kw: dict[str, Any] = {"max_rel": (v.get("tolerance") or {}).get("max_rel_error")}
    fp32 = v.get("tolerance") if v.get("exact_pipeline") else v.get("backend_vs_compressed_ir_tolerance")
    if fp32 and "rtol" in fp32:
        kw["fp32"] = (float(fp32["rtol"]), float(fp32["atol_rel"]))
    else:
        kw["fp32"] = (FP32_RTOL, FP32_ATOL_REL)
        if fp32 and "atol_rel" in fp32:
            kw["int8_atol_rel"] = float(fp32["atol_rel"])
        if fp32 and "rms_factor_vs_original" in fp32:
            kw["int8_rms_factor"] = float(fp32["rms_factor_vs_original"])
    return kw


def _calibration_file(source: str) -> str | None:
    return source[len("file "):] if source.startswith("file ") else None


def check_numerics_again(out_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Reload the source model, re-run the recorded pipeline where needed, run the artifact and judge it
    with compile's check; returns the recomputed verification entries (raises ``NumericsError``)."""
    from qcompile.compiler import check_numerics
    from qcompile.frontends import load_model
    from qcompile.passes import PassContext, PassManager, parse_pipeline
    from qcompile.passes.manager import run_feeds
    from qcompile.targets import get_target

    source, v = manifest.get("source") or {}, manifest.get("verification") or {}
    if not source.get("spec"):
        raise InputError(f"manifest of '{out_dir}' does not record its source model (source.spec)")
    shapes = {k: tuple(d) for k, d in (source.get("input_shapes") or {}).items()}
    loaded = load_model(source["spec"], shapes, _calibration_file(v.get("calibration", "")),
                        int(v.get("feeds", 16)))
    if v and (loaded.calibration_source != v.get("calibration") or len(loaded.calibration) != v.get("feeds")):
        raise NumericsError(
            f"numerics: cannot rebuild the calibration feeds compile used ({v.get('feeds')} from "
            f"{v.get('calibration')!r}); now {len(loaded.calibration)} from {loaded.calibration_source!r}")
    passes = parse_pipeline(manifest.get("pipeline") or "")
    exact = all(p.exact for p in passes)
    graph = None
    quantized = False
    if not exact:  # the compressed IR is the reference for the backend
        ctx = PassContext(calibration=loaded.calibration)
        graph = PassManager(passes).run(loaded.graph, ctx)
        quantized = any(n.op == "quantize_linear" for n in graph.nodes)
    runner = get_target(manifest["target"]["name"]).backend.load(out_dir, manifest)
    outputs = run_feeds(lambda feed: runner.run(feed), loaded.calibration)
    reference = run_feeds(loaded.reference, loaded.calibration)
    return check_numerics(outputs, reference, graph, loaded.calibration, exact=exact, quantized=quantized,
                          target=manifest["target"]["name"], backend=manifest.get("backend", ""),
                          **recorded_tolerances(v))


def verify_artifact(out_dir: str | Path, *, numerics: bool = True) -> VerifyResult:
    """Check ``out_dir`` (module docstring); returns the report lines, raises on the first failed check."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"'{out_dir}' is not a directory (expected an artifact written by `qcompile compile`)")
    manifest = read_manifest(out_dir)
    if not isinstance(manifest, dict) or "target" not in manifest:
        raise InputError(f"'{out_dir / MANIFEST}' is not a qcompile manifest (no target)")
    problems = check_files(out_dir, manifest)
    if problems:
        raise ArtifactMismatch(f"artifact '{out_dir}' does not match its manifest: " + "; ".join(problems))
    result = VerifyResult(out_dir, len(manifest["files"]))
    result.lines.append(f"files: {len(manifest['files'])} file(s) match their sha256, no unlisted files")
    if not numerics:
        return result
    rec = manifest.get("verification") or {}
    now = check_numerics_again(out_dir, manifest)
    result.lines.append(
        f"numerics: artifact vs original model on {rec.get('feeds')} feeds: max rel error {now['max_rel_error']:.3g} "
        f"(recorded {rec.get('max_rel_error', float('nan')):.3g}), "
        + ("within the fp32 tolerance" if now["exact_pipeline"] else
           f"vs compressed IR {now['backend_vs_compressed_ir_rel_error']:.3g} (recorded "
           f"{rec.get('backend_vs_compressed_ir_rel_error', float('nan')):.3g}), within "
           + ", ".join(f"{k}={x:.3g}" for k, x in sorted(now["backend_vs_compressed_ir_tolerance"].items()))))
    return result
