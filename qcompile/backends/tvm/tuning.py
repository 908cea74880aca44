"""MetaSchedule tuning with a persistent, workload-keyed database, and a measured choice per kernel.

``tune_and_choose(mod, target, trials)`` takes a Relax module that has been legalized and fused but
not yet scheduled. It:

1. extracts one task per distinct fused TIR function, keyed by MetaSchedule's structural workload
   hash, so identical layers in any model share one database entry;
2. tunes only the tasks the database does not know yet, ``trials`` measured candidates each, so a
   second compile of the same layers does no tuning;
3. times, for every task, the best tuned schedule against qcompile's default rule schedule on this
   CPU, records the faster one in ``choices.json``, and returns an in-memory database holding the
   tuned records that won. Tuning can only make a build faster, never slower.

The database lives in the cache folder (``<cache>/tuning/<target>-<hash>/``): MetaSchedule's JSON
workload and record files, plus ``choices.json``. Records are appended after each measured batch
and ``choices.json`` is replaced atomically, so an interrupted tuning run leaves a valid database.
A run killed in the middle of an append (a torn last line: MetaSchedule would refuse the whole
database) is repaired before the database is opened (:func:`repair_database`): unparseable workload
lines end the workload table, records that are unparseable or name a dropped workload are removed.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tvm
from tvm import tirx
from tvm.s_tir import meta_schedule as ms

from qcompile.backends.tvm.lowering import CpuTarget
from qcompile.backends.tvm.schedules import default_rules
from qcompile import progress
from qcompile.cache import atomic_write, cache_dir


def database_dir(target: CpuTarget) -> Path:
    key = hashlib.sha256(json.dumps(target.llvm, sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "tuning" / f"{target.name}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def repair_database(work: Path, log: Callable[[str], None] = print) -> None:
    """Make MetaSchedule's line-per-entry JSON files in ``work`` loadable after an interrupted append.

    The workload table is positional (a record names its workload by line index), so it is cut at its
    first unparseable line; records that do not parse or point past the kept workloads are dropped.
    Rewrites are atomic; intact files are not touched."""
    def lines(path: Path) -> list[str]:
        return path.read_text(errors="replace").splitlines() if path.exists() else []

    def parses(line: str) -> object:
        try:
            return json.loads(line)
        except ValueError:
            return None

    wpath, rpath = work / "database_workload.json", work / "database_tuning_record.json"
    workloads = lines(wpath)
    kept = 0
    while kept < len(workloads) and parses(workloads[kept]) is not None:
        kept += 1
    records = lines(rpath)
    good = [r for r in records if (v := parses(r)) is not None and isinstance(v, list) and v
            and isinstance(v[0], int) and 0 <= v[0] < kept]
    if kept < len(workloads):
        atomic_write(wpath, "".join(w + "\n" for w in workloads[:kept]))
    if len(good) < len(records):
        atomic_write(rpath, "".join(r + "\n" for r in good))
    if kept < len(workloads) or len(good) < len(records):
        log(f"tuning: repaired the database {work} after an interrupted write: dropped "
            f"{len(workloads) - kept} workload and {len(records) - len(good)} record line(s)")


def _read_choices(path: Path) -> dict:
    """``choices.json``, or {} when missing or unreadable (the choices are only re-measured)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _workload_key(mod: tvm.IRModule) -> str:
    from tvm_ffi import structural_hash

    return str(structural_hash(mod))


def _default_schedule(func: tirx.PrimFunc, tgt: tvm.target.Target) -> tirx.PrimFunc | None:
    for rule in default_rules():
        try:
            sch = rule.apply(func, tgt, False)
        except Exception:  # noqa: BLE001 - a rule that does not fit this function
            sch = None
        if sch is not None:
            return sch.mod["main"]
    return None


def _time_primfunc(func: tirx.PrimFunc, tgt: tvm.target.Target, repeat: int = 5) -> float:
    """Median seconds of one call on random inputs (local CPU)."""
    lib = tvm.compile(tvm.IRModule({"main": func}), tgt)
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    args = []
    for p in func.params:  # TVM 0.27: buffer parameters carry their shape and dtype
        shape = [int(d) for d in p.shape]
        args.append(tvm.runtime.tensor(rng.standard_normal(shape).astype(str(p.dtype)), dev))
    f = lib.mod.time_evaluator("main", dev, number=5, repeat=repeat) if hasattr(lib, "mod") else \
        lib.time_evaluator("main", dev, number=5, repeat=repeat)
    return float(np.median(f(*args).results))


def _cost_model() -> str:
    try:
        import xgboost  # noqa: F401
        return "xgb"
    except ImportError:
        return "random"


BUILD_TIMEOUT_S = 300.0
"""Per-candidate build timeout.  MetaSchedule's default (30 s) is shorter than a fresh build
worker's start-up on some machines: importing ``tvm.s_tir.tensor_intrin`` alone measured 49 s on a
2-core EPYC, and every candidate then failed as a build error."""
RUN_TIMEOUT_S = 120.0


def tune_and_choose(mod: tvm.IRModule, target: CpuTarget, trials: int,
                    log: Callable[[str], None] = print) -> ms.database.Database:
    """An in-memory database with the tuned schedule of every kernel where tuning beat the default."""
    if target.remote:
        raise NotImplementedError("tuning measures on this machine's CPU; tuning over RPC is not wired yet")
    tgt = target.tvm_target()
    work = database_dir(target)
    repair_database(work, log)
    db = ms.database.JSONDatabase(work_dir=str(work))
    choices_path = work / "choices.json"
    choices = _read_choices(choices_path)
    tasks = ms.relax_integration.extract_tasks(mod, tgt)
    todo = [t for t in tasks if not db.has_workload(t.dispatched[0])]
    log(f"tuning: {len(tasks)} distinct kernels, {len(tasks) - len(todo)} already in the database {work}")
    if todo:
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(todo, str(work))
        t0 = time.time()
        cost_model = _cost_model()
        ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work),
                           max_trials_global=trials * len(contexts), max_trials_per_task=trials,
                           num_trials_per_iter=min(64, trials), database=db, cost_model=cost_model,
                           builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S),
                           runner=ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S))
        log(f"tuning: {len(contexts)} kernels x {trials} trials took {time.time() - t0:.0f} s "
            f"({cost_model} cost model)")
    chosen = ms.database.MemoryDatabase()
    wins = 0
    with progress.steps("tuning: timing tuned vs default schedules", len(tasks)) as advance:
        for task in tasks:
            wins += _choose(task, db, tgt, choices, choices_path, chosen)
            advance()
    log(f"tuning: the tuned schedule is faster than the default for {wins} of {len(tasks)} kernels")
    return chosen


def _choose(task, db: ms.database.Database, tgt: tvm.target.Target, choices: dict, choices_path: Path,
            chosen: ms.database.Database) -> bool:
    """Time ``task``'s best tuned schedule against the default once (recorded in ``choices.json``,
    replaced atomically), and commit the tuned record to ``chosen`` where it won."""
    wmod = task.dispatched[0]
    sch = db.query_schedule(wmod, tgt, workload_name="main")
    if sch is None:
        return False
    key = _workload_key(wmod)
    if key not in choices:
        default = _default_schedule(wmod["main"], tgt)
        t_tuned = _time_primfunc(sch.mod["main"], tgt)
        t_default = _time_primfunc(default, tgt) if default is not None else float("inf")
        choices[key] = {"task": task.task_name, "tuned_s": t_tuned, "default_s": t_default,
                        "use": "tuned" if t_tuned < t_default else "default"}
        atomic_write(choices_path, json.dumps(choices, indent=1, sort_keys=True))
    if choices[key]["use"] != "tuned":
        return False
    record = db.get_top_k(db.commit_workload(wmod), 1)[0]
    chosen.commit_tuning_record(ms.database.TuningRecord(
        record.trace, chosen.commit_workload(wmod), record.run_secs, record.target, record.args_info))
    return True


def apply_choices(mod: tvm.IRModule, chosen: ms.database.Database, target: CpuTarget) -> tvm.IRModule:
    """Schedule every PrimFunc that has a chosen tuned record, using MetaSchedule's own pass."""
    from tvm import relax

    with target.tvm_target(), chosen:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
