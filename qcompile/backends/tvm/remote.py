"""Remote boards over TVM RPC: sessions, uploads, and a fleet behind a tracker.

A board is reached through ``QCOMPILE_RPC=host:port`` (one RPC server) or
``QCOMPILE_RPC_TRACKER=host:port`` + ``QCOMPILE_RPC_KEY`` (a tracker that hands out a free
board of that key per session).  A TVM RPC server serves **one session at a time**: a second
session to the same board waits until the first one closes.  So

* every runner created in one thread shares that thread's session (:func:`shared_session`; the
  session closes when its last runner is gone, freeing the board for others), which lets a
  benchmark keep several models loaded on one board and time them interleaved;
* each library is uploaded under a unique name: a board's ``dlopen`` of a path it already loaded
  returns the old library, so two models uploaded as ``model.so`` would silently run the first;
* measuring on a fleet (:func:`fleet_size` boards registered under the key) splits the work into
  one chunk per board, each timed in its own thread with its own session (see
  :func:`qcompile.factorize.latency.measure`).  Boards of one key are assumed identical.
"""

from __future__ import annotations

import os
import threading
import uuid
import weakref
from pathlib import Path
from typing import Mapping

import numpy as np

from qcompile.backends.base import Runner
from qcompile.errors import TargetError

_local = threading.local()


def rpc_session():
    """A new session to the device named by QCOMPILE_RPC / QCOMPILE_RPC_TRACKER (+ QCOMPILE_RPC_KEY)."""
    from tvm import rpc

    direct = os.environ.get("QCOMPILE_RPC")
    tracker = os.environ.get("QCOMPILE_RPC_TRACKER")
    for var, value in (("QCOMPILE_RPC", direct), ("QCOMPILE_RPC_TRACKER", tracker)):
        host, sep, port = (value or "").rpartition(":")
        if value and not (sep and host and port.isdigit()):
            raise TargetError(f"{var}={value!r} is not host:port (e.g. 127.0.0.1:9190)")
    try:
        if direct:
            host, port = direct.rsplit(":", 1)
            return rpc.connect(host, int(port), session_timeout=600)
        if tracker:
            host, port = tracker.rsplit(":", 1)
            key = os.environ.get("QCOMPILE_RPC_KEY", "arm64")
            return rpc.connect_tracker(host, int(port)).request(key, session_timeout=600)
    except Exception as e:  # noqa: BLE001 - TVM raises plain errors for refused/unreachable
        raise TargetError(f"cannot reach the arm64 device over TVM RPC ({direct or tracker}): {e}") from e
    raise TargetError("target tvm-arm64 runs on a remote board: set QCOMPILE_RPC=host:port (an RPC server, e.g. "
                      "the emulated board from `python -m qcompile.board serve`) or QCOMPILE_RPC_TRACKER=host:port "
                      "with QCOMPILE_RPC_KEY")


def _device_address() -> tuple:
    """Which device the environment names now (a session is only shared for the same one)."""
    return (os.environ.get("QCOMPILE_RPC"), os.environ.get("QCOMPILE_RPC_TRACKER"),
            os.environ.get("QCOMPILE_RPC_KEY"))


def shared_session():
    """This thread's open session to the device the environment names (shared by the runners that
    hold it), or a new one.  Keyed by the address: pointing QCOMPILE_RPC at another board (say a
    Cortex-A76 after a Cortex-A72) must not reuse the first board's session."""
    sessions = getattr(_local, "sessions", None)
    if sessions is None:
        sessions = _local.sessions = {}
    where = _device_address()
    ref = sessions.get(where)
    session = ref() if ref is not None else None
    if session is None:
        session = rpc_session()
        sessions[where] = weakref.ref(session)
    return session


def fleet_size() -> int:
    """Boards available for parallel measurement: the servers registered under QCOMPILE_RPC_KEY at
    the tracker (busy or free), or 1 for a single server."""
    tracker = os.environ.get("QCOMPILE_RPC_TRACKER")
    if os.environ.get("QCOMPILE_RPC") or not tracker:
        return 1
    from tvm import rpc

    host, port = tracker.rsplit(":", 1)
    key = "server:" + os.environ.get("QCOMPILE_RPC_KEY", "arm64")
    try:
        info = rpc.connect_tracker(host, int(port)).summary()
    except Exception as e:  # noqa: BLE001
        raise TargetError(f"cannot reach the RPC tracker {tracker}: {e}") from e
    return max(1, sum(1 for s in info.get("server_info", []) if s.get("key") == key))


class RemoteTvmRunner(Runner):
    """Runs a ``model.so`` on a remote device: upload (unique name), load, set_input / invoke_stateful /
    get_outputs, in this thread's shared session."""

    def __init__(self, lib_path: Path, graph_inputs: list[str], graph_outputs: list[str]):
        from tvm import relax

        self.session = shared_session()
        name = f"qc-{uuid.uuid4().hex[:16]}.so"
        self.session.upload(str(lib_path), target=name)
        lib = self.session.load_module(name)
        self.device = self.session.cpu()
        self.vm = relax.VirtualMachine(lib, self.device)
        self.input_names = graph_inputs
        self.output_names = graph_outputs

    def run(self, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import tvm

        args = [tvm.runtime.tensor(np.ascontiguousarray(inputs[n]), self.device) for n in self.input_names]
        self.vm.set_input("main", *args)
        self.vm.invoke_stateful("main")
        out = self.vm.get_outputs("main")
        if hasattr(out, "numpy"):
            return [out.numpy()]
        return [out[i].numpy() for i in range(len(self.output_names))]
