"""An emulated aarch64 board: a TVM RPC server in an aarch64 CPython under qemu-user.

No ARM board is attached to the development and CI machines, yet arm64 artifacts
must be executed.  This module builds (once, into the cache folder) and starts a
"board" that the host reaches exactly like a physical one — over TVM RPC — so the
same client code (``QCOMPILE_RPC=host:port`` or a tracker) drives either.

Set-up, all from Debian packages and PyPI (``python -m qcompile.board setup``):

1. host tools: ``g++-aarch64-linux-gnu`` (cross linker) and ``qemu-user``;
2. an aarch64 CPython 3.11 sysroot: the ``:arm64`` Debian packages downloaded with
   ``apt-get download`` and unpacked with ``dpkg -x`` (nothing arm64 is installed
   system-wide; the arm64 architecture is removed from dpkg again afterwards);
3. the board's Python packages: the aarch64 ``apache-tvm`` wheel and friends,
   installed with ``pip --target --platform manylinux_2_28_aarch64``.

``serve()`` starts the server on a loopback port with ``QEMU_CPU`` pinned to a real
core (Cortex-A72 = Raspberry Pi 4; Cortex-A76 with dotprod = Pi 5), so an
over-specified ``mattr`` fails with SIGILL as on real hardware.  Emulation is for
correctness only: it runs ~15x slower than native, never use it for timing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from qcompile.cache import cache_dir
from qcompile.errors import TargetError

TVM_VERSION = "0.27.0.post1"
BOARD_PYTHON_PACKAGES = [f"apache-tvm=={TVM_VERSION}", "apache-tvm-ffi", "numpy", "ml_dtypes", "typing_extensions",
                         "psutil", "cloudpickle"]
ARM64_DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "libexpat1", "zlib1g",
              "libssl3", "libbz2-1.0", "libcrypt1", "libffi8", "liblzma5", "libuuid1", "libsqlite3-0", "libstdc++6",
              "libgcc-s1", "libncursesw6", "libtinfo6", "libreadline8", "libtirpc3", "libnsl2", "libgssapi-krb5-2",
              "libkrb5-3", "libk5crypto3", "libkrb5support0", "libcom-err2", "libkeyutils1", "libdb5.3"]
HOST_TOOLS = {"aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu", "qemu-aarch64": "qemu-user"}
CPUS = {"arm64": "cortex-a72", "arm64-dotprod": "cortex-a76"}

_SERVER = r'''
import os, sys, logging
import tvm.rpc.server as server
_orig = server._serving

def _safe_serving(sock, addr, opts, load_library):
    # a crashing session (e.g. SIGILL) must not take the server down or leave it in a deleted cwd
    cwd = os.getcwd()
    print("board: session from", addr[0], flush=True)
    try:
        _orig(sock, addr, opts, load_library)
    except Exception as e:  # noqa: BLE001
        print("board: session failed:", e, flush=True)
    finally:
        os.chdir(cwd)

server._serving = _safe_serving
tracker = None
if len(sys.argv) > 3:  # register with a tracker under a key: one board of a fleet
    host, tport = sys.argv[2].rsplit(":", 1)
    tracker = (host, int(tport))
state = server.PopenRPCServerState("127.0.0.1", int(sys.argv[1]), int(sys.argv[1]) + 1, tracker_addr=tracker,
                                   key=sys.argv[3] if tracker else "", silent=True)
print("board: serving on port", state.port, flush=True)
state.thread.join()
'''


def board_dir() -> Path:
    return cache_dir() / "arm-board"


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise TargetError(f"board set-up step failed: {' '.join(cmd)}\n{(proc.stderr or proc.stdout)[-2000:]}")
    return proc


def _ensure_host_tools() -> None:
    missing = [pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise TargetError(f"the emulated board needs Debian packages {missing}; install them as root "
                          f"(apt-get install {' '.join(missing)})")
    _run(["apt-get", "update", "-qq"], timeout=900)
    _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], timeout=1800,
         env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


def _ensure_sysroot(root: Path) -> Path:
    python = root / "sysroot" / "usr" / "bin" / "python3.11"
    if python.exists():
        return python
    if os.geteuid() != 0:
        raise TargetError("building the emulated board's sysroot needs root (dpkg --add-architecture arm64)")
    staging = Path(tempfile.mkdtemp(prefix=".sysroot-", dir=root))
    debs = Path(tempfile.mkdtemp(prefix="debs-"))
    had_arch = "arm64" in _run(["dpkg", "--print-foreign-architectures"]).stdout.split()
    try:
        if not had_arch:
            _run(["dpkg", "--add-architecture", "arm64"])
        _run(["apt-get", "update", "-qq"], timeout=900)
        _run(["apt-get", "download", *[f"{p}:arm64" for p in ARM64_DEBS]], cwd=debs, timeout=1800)
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(staging)])
        os.replace(staging, root / "sysroot")
    finally:
        if not had_arch:
            subprocess.run(["dpkg", "--remove-architecture", "arm64"], capture_output=True)
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=900)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(debs, ignore_errors=True)
    return python


def _ensure_site(root: Path) -> Path:
    site = root / "site"
    if (site / "tvm").is_dir():
        return site
    staging = Path(tempfile.mkdtemp(prefix=".site-", dir=root))
    try:
        _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(staging),
              "--platform", "manylinux_2_28_aarch64", "--platform", "manylinux2014_aarch64",
              "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
              *BOARD_PYTHON_PACKAGES], timeout=1800)
        compiler = staging / "tvm" / "lib" / "libtvm_compiler.so"
        if compiler.exists():
            compiler.unlink()  # 240 MB the board never uses (it only runs compiled modules)
        try:
            os.replace(staging, site)
        except OSError:
            if not (site / "tvm").is_dir():  # not a concurrent set-up that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return site


def setup() -> Path:
    """Install everything the emulated board needs (idempotent); returns its folder."""
    root = board_dir()
    root.mkdir(parents=True, exist_ok=True)
    _ensure_host_tools()
    _ensure_sysroot(root)
    _ensure_site(root)
    server = root / "server.py"
    if not server.exists() or server.read_text() != _SERVER:  # atomic: concurrent test workers start boards
        tmp = root / f".server-{os.getpid()}.py"
        tmp.write_text(_SERVER)
        os.replace(tmp, server)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Board:
    process: subprocess.Popen
    port: int
    cpu: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self) -> "Board":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(target: str = "arm64", port: int | None = None, timeout: float = 120.0, tracker: str | None = None,
          key: str = "arm64") -> Board:
    """Start the emulated board (after :func:`setup`) and wait until it accepts RPC sessions; with
    ``tracker="host:port"`` it registers there under ``key`` (one board of a fleet: clients then set
    QCOMPILE_RPC_TRACKER and QCOMPILE_RPC_KEY instead of QCOMPILE_RPC)."""
    root = setup()
    port = port or _free_port()
    cpu = CPUS.get(target, "cortex-a72")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(root / "site"), "QEMU_CPU": cpu,
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(root)}
    log = open(root / f"server-{port}.log", "w")
    proc = subprocess.Popen(["qemu-aarch64", "-L", str(root / "sysroot"), str(root / "sysroot/usr/bin/python3.11"),
                             str(root / "server.py"), str(port), *([tracker, key] if tracker else [])], env=env, stdout=log, stderr=subprocess.STDOUT,
                            cwd=root)
    board = Board(proc, port, cpu)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise TargetError(f"emulated board exited ({proc.returncode}); see {root / f'server-{port}.log'}")
        if "serving on port" in (root / f"server-{port}.log").read_text():
            return board
        time.sleep(0.5)
    board.stop()
    raise TargetError(f"emulated board did not start within {timeout:.0f} s; see {root / f'server-{port}.log'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qcompile.board", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("setup", help="install the emulated board into the cache folder")
    s = sub.add_parser("serve", help="run the emulated board until interrupted")
    s.add_argument("--port", type=int, default=9090)
    s.add_argument("--target", default="arm64", choices=sorted(CPUS))
    s.add_argument("--tracker", help="host:port of a TVM RPC tracker to register with (a fleet of boards)")
    s.add_argument("--key", default="arm64", help="device key at the tracker (default arm64)")
    args = ap.parse_args(argv)
    if args.cmd == "setup":
        print(f"emulated board ready in {setup()}")
        return 0
    board = serve(args.target, args.port, tracker=args.tracker, key=args.key)
    if args.tracker:
        print(f"emulated {board.cpu} board on {board.address}, registered at {args.tracker} as '{args.key}': "
              f"export QCOMPILE_RPC_TRACKER={args.tracker} QCOMPILE_RPC_KEY={args.key}")
    else:
        print(f"emulated {board.cpu} board on {board.address}: export QCOMPILE_RPC={board.address}")
    try:
        board.process.wait()
    except KeyboardInterrupt:
        board.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
