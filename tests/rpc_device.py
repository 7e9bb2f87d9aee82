"""A real ggml-rpc-server on 127.0.0.1: a GPU-type device (`RPC0`) on a machine without a GPU.

llama.cpp registers every RPC device as a GPU, so llama-server `--rpc 127.0.0.1:PORT` offloads layers to it
and prints its buffers as `RPC0[127.0.0.1:PORT]`; an allocation the server cannot satisfy fails as a CUDA one
does. The rpc-server reports the host's memory as its own, so its real budget is an address-space limit
(RLIMIT_AS, like `ulimit -v`) set in the child before exec (backends.md §10).

    llama_server, rpc_bin = built_binaries()          # skips (or, under CI, fails) without scripts/build-llama-cpp
    with rpc_server(200_000 * 1024) as rpc:           # ~195 MiB of address space
        run([llama_server, "--rpc", rpc.address, ...])
        rpc.stderr_text()                              # its output so far (stdout and stderr together)
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
_PR_SET_PDEATHSIG = 1


@dataclass
class RpcServer:
    """A running ggml-rpc-server: `address` is what llama-server's --rpc takes."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr_text(self) -> str:
        """What the server printed so far (stderr, with stdout merged into it)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


def built_binaries() -> tuple[Path, Path]:
    """(llama-server, ggml-rpc-server) of the cached cpu build; skips with the reason when there is none,
    except under CI (scripts/test builds them through scripts/setup test), where that is a usage error."""
    from launcher.backends.builds import builds_root, find_built

    # the cpu variant: a GPU build's rpc-server would expose the real GPU rather than a limited CPU device
    server = find_built("llama-server", variant="cpu")
    rpc = find_built("ggml-rpc-server", variant="cpu")
    if server is not None and rpc is not None:
        return server, rpc
    reason = (
        f"no cpu build of llama-server and ggml-rpc-server in {builds_root()}: "
        "scripts/build-llama-cpp builds them (scripts/setup test runs it)"
    )
    if os.environ.get("CI"):
        raise pytest.UsageError(f"CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _preexec(limit_bytes: int | None, parent: int) -> Callable[[], None]:
    def run_in_child() -> None:
        if sys.platform.startswith("linux"):  # never outlive the test run, even if pytest is killed
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)
        # last: the forked copy of the test process is already larger than the limit, so nothing may allocate
        # after it until exec replaces the image
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return run_in_child


def stop_group(proc: subprocess.Popen[bytes], *, timeout_s: float = 10.0) -> int | None:
    """SIGTERM the child's process group, SIGKILL after timeout_s; wait for it (no zombie, no orphan)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the rest of its group, if any
    proc.wait(timeout=timeout_s)
    return proc.returncode


def wait_for_port(port: int, proc: subprocess.Popen[bytes], *, timeout_s: float) -> bool:
    """Poll until something accepts TCP connections on 127.0.0.1:port; False if proc exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@contextlib.contextmanager
def rpc_server(
    limit_bytes: int | None = None,
    *,
    binary: Path | None = None,
    threads: int = 1,
    timeout_s: float = 30.0,
) -> Iterator[RpcServer]:
    """Start ggml-rpc-server on 127.0.0.1 and a free port, in its own session, with RLIMIT_AS = limit_bytes
    (None: no limit); yield once it accepts connections; stop its process group on exit."""
    if binary is None:
        binary = built_binaries()[1]
    with tempfile.TemporaryDirectory(prefix="rpc-server-") as tmp:
        log_path = Path(tmp) / "rpc-server.log"
        last_error = ""
        for _attempt in range(3):  # another process may take the free port before the server binds it
            port = free_port()
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [str(binary), "-H", HOST, "-p", str(port), "-t", str(threads)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_preexec(limit_bytes, os.getpid()),
                )
            server = RpcServer(proc, port, log_path)
            try:
                if wait_for_port(port, proc, timeout_s=timeout_s):
                    yield server
                    return
                last_error = server.stderr_text().strip()[-500:]
            finally:
                stop_group(proc)
        raise RuntimeError(f"ggml-rpc-server did not start on {HOST}: {last_error or 'no output'}")
