"""What the tests that start real servers share: the built llama-server, and waiting for a process to be gone."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest


def built_llama_server() -> Path:
    """scripts/build-llama-cpp's llama-server; skips without one (under CI its absence is an error)."""
    from launcher.backends.builds import find_built

    path = find_built("llama-server")
    if path is None:
        if os.environ.get("CI"):
            raise pytest.UsageError("CI: llama-server is not built; scripts/setup test runs scripts/build-llama-cpp")
        pytest.skip("llama-server is not built: scripts/build-llama-cpp builds it")
    return path


def gone(pid: int | None, timeout_s: float = 10.0) -> bool:
    """True once `pid` has exited (a zombie counts as gone), waiting up to `timeout_s`."""
    if pid is None:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False
