"""Shared fixtures. Third-party models are fetched once into the cache folder.

The suite runs on ``pytest-xdist`` workers (``-n auto`` in pyproject's addopts, one worker per core,
whole files per worker).  Each worker then computes with one thread: workers already fill the cores,
and oversubscribed OpenMP / TVM thread pools spin against each other (measured: torch 50x slower on a
busy core).
"""

import os

import pytest


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for var in ("OMP_NUM_THREADS", "TVM_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def rapidocr_models():
    from qcompile.models.thirdparty import RegistryUnavailable, fetch_rapidocr_models

    try:
        return fetch_rapidocr_models()
    except RegistryUnavailable as e:
        pytest.skip(f"PyPI registry unreachable, third-party model not available: {e}")


@pytest.fixture(scope="session")
def arm_board():
    """The emulated aarch64 board (qemu-user + TVM RPC server), built into the cache on first use."""
    import os

    from qcompile import board
    from qcompile.errors import TargetError

    try:
        b = board.serve("arm64")
    except TargetError as e:
        if "download" in str(e) or "apt-get update" in str(e) or "pip" in str(e):
            pytest.skip(f"package registries unreachable, cannot build the emulated board: {e}")
        raise
    old = os.environ.get("QCOMPILE_RPC")
    os.environ["QCOMPILE_RPC"] = b.address
    yield b
    b.stop()
    if old is None:
        os.environ.pop("QCOMPILE_RPC", None)
    else:
        os.environ["QCOMPILE_RPC"] = old


# ---------------------------------------------------------------------------- fuzz counts
_FUZZ_COUNTS: list[tuple[str, dict]] = []


def pytest_runtest_logreport(report):
    """Collect the ``fuzz`` user properties of tests/test_fuzz_end_to_end.py (xdist ships them to the
    controller with each report), so the terminal summary can say how many random graphs really ran."""
    if report.when == "call":
        _FUZZ_COUNTS.extend((report.nodeid, dict(v)) for k, v in report.user_properties if k == "fuzz")


def pytest_terminal_summary(terminalreporter):
    if not _FUZZ_COUNTS:
        return
    keys = ("examples", "graphs", "compared", "refused", "unsupported")
    per_target: dict[str, dict[str, int]] = {}
    for _, c in _FUZZ_COUNTS:
        t = per_target.setdefault(c.get("target", "?"), dict.fromkeys(keys, 0))
        for key in keys:
            t[key] += c.get(key, 0)
    terminalreporter.section("fuzz: random CNNs compiled and compared")
    for target, t in sorted(per_target.items()):
        terminalreporter.write_line(
            f"{target}: {t['graphs']} random graphs imported, {t['compared']} compiles checked against the "
            f"reference ({t['examples']} examples; {t['unsupported']} graphs refused by a frontend with a named "
            f"unsupported op, {t['refused']} budgets refused as impossible)")
