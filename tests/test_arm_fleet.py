"""arm64 measurement over TVM RPC: a fleet of emulated boards behind a tracker.

A TVM RPC server serves one session at a time, so runners share a session per thread, each library is
uploaded under its own name, and a fleet measures one chunk of layers per board in parallel.  Two
emulated Cortex-A72 boards register with an in-process tracker (correctness only: emulated timings mean
nothing).
"""

import threading

import numpy as np
import pytest

from graphs import resnet_block_graph

KEY = "qc-fleet"


def _within(seconds, fn):
    """Run ``fn`` in a thread; fail (instead of hanging CI) if it has not finished in ``seconds``."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"did not finish within {seconds} s (a board waiting for a session that never closes?)"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture(scope="module")
def fleet():
    import time

    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    from qcompile import board
    from qcompile.errors import TargetError

    tracker = Tracker(host="127.0.0.1", port=9300, port_end=9500, silent=True)
    address = f"127.0.0.1:{tracker.port}"
    boards = []
    try:
        for _ in range(2):
            try:
                boards.append(board.serve("arm64", tracker=address, key=KEY))
            except TargetError as e:
                if "download" in str(e) or "apt-get update" in str(e) or "pip" in str(e):
                    pytest.skip(f"package registries unreachable, cannot build the emulated board: {e}")
                raise
        deadline = time.time() + 60
        while time.time() < deadline:
            info = rpc.connect_tracker("127.0.0.1", tracker.port).summary()
            if sum(s["key"] == f"server:{KEY}" for s in info["server_info"]) == 2:
                break
            time.sleep(0.5)
        yield address, boards
    finally:
        for b in boards:
            b.stop()
        tracker.terminate()


@pytest.fixture
def on_fleet(fleet, monkeypatch):
    address, boards = fleet
    monkeypatch.delenv("QCOMPILE_RPC", raising=False)
    monkeypatch.setenv("QCOMPILE_RPC_TRACKER", address)
    monkeypatch.setenv("QCOMPILE_RPC_KEY", KEY)
    return boards


def _sessions(b) -> int:
    from qcompile.board import board_dir

    return (board_dir() / f"server-{b.port}.log").read_text().count("board: session from")


def test_fleet_size_counts_the_boards_at_the_tracker(on_fleet):
    from qcompile.backends.tvm.remote import fleet_size

    assert fleet_size() == 2


def test_two_models_loaded_at_once_on_one_board_each_compute_their_own(on_fleet):
    """Two runners alive in one thread: the second needs no second session (the board would wait for
    the first to close), and its library must not be mistaken for the first one's (same file name)."""
    from qcompile.backends.tvm.backend import TvmBackend
    from qcompile.passes.manager import run_reference

    graphs = [resnet_block_graph(seed=s) for s in (1, 2)]
    feed = {graphs[0].inputs[0]: np.random.default_rng(0).standard_normal(
        graphs[0].types[graphs[0].inputs[0]].shape).astype(np.float32)}

    def run_both():
        runners = [TvmBackend("arm64").runner(g) for g in graphs]
        assert runners[0].session is runners[1].session
        return [r.run(feed)[0] for r in runners]
    outs = _within(300, run_both)
    for g, out in zip(graphs, outs):
        ref = run_reference(g, [feed])[0][0]
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())  # fp32
    assert not np.allclose(outs[0], outs[1])  # different weights, different results


def test_measurements_are_spread_over_every_board(on_fleet):
    from qcompile.factorize.latency import measure

    before = [_sessions(b) for b in on_fleet]
    graphs = {k: resnet_block_graph(seed=k) for k in range(4)}
    got = _within(600, lambda: measure(graphs, "tvm-arm64", rounds=2, number=2))
    assert set(got) == set(graphs) and all(np.isfinite(v) and v > 0 for v in got.values())
    after = [_sessions(b) for b in on_fleet]
    assert all(a > b for a, b in zip(after, before)), (before, after)  # both boards served a chunk


def test_search_on_the_fleet_writes_a_verified_arm64_artifact(on_fleet, tmp_path, monkeypatch):
    """The whole `qcompile search` against tvm-arm64: per-layer and whole-model (anchor) timing over the
    fleet, finalists timed on one board next to the original, the chosen point compiled and verified
    over RPC.  Only the plumbing is checked: emulated latencies are meaningless."""
    import json

    from qcompile.cli import main

    monkeypatch.setenv("QCOMPILE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rc = _within(900, lambda: main(["search", "qcompile.models.digits:digits_cnn", "-t", "tvm-arm64", "-o", str(out),
                                    "--bits", "8", "--ranks-per-layer", "1", "--pop", "4", "--generations", "1",
                                    "--finalists", "1", "--check-points", "3", "--rounds", "1", "--max-acc-drop",
                                    "2", "-q"]))
    assert rc == 0
    doc = json.loads((out / "search" / "search.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["name"] == "tvm-arm64" and manifest["files"]["model.so"]
    assert manifest["pipeline"].startswith(doc["chosen"]["pipeline"])
    assert doc["measurements"] > 0 and doc["chosen"]["latency_s"] > 0
    cache = json.loads((tmp_path / "cache" / "latency" / "tvm-arm64.json").read_text())
    assert cache["backend"] == "tvm-arm64" and len(cache["entries"]) >= doc["measurements"]
