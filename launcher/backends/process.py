"""Child processes that never outlive fitquant.

Each server runs in its own process group (a terminal's Ctrl-C reaches fitquant, which stops the group in
order) and, on Linux, with PR_SET_PDEATHSIG: the kernel kills the child when fitquant dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child between fork and exec."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv with stdout and stderr appended to log_path, in a new process group, tied to our life."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    parent = os.getpid()
    preexec = (lambda: _die_with_parent(parent)) if sys.platform.startswith("linux") else None
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=preexec,
        )


def stop_process(proc: subprocess.Popen[bytes], *, timeout_s: float = 10.0) -> int | None:
    """SIGTERM the child's process group, then SIGKILL after timeout_s; returns the exit status."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)
    # anything the server itself started in its group
    _signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode


def stop_pid(pid: int, *, timeout_s: float = 10.0) -> bool:
    """Stop a process fitquant started in an earlier run (not our child): SIGTERM, wait, SIGKILL.
    Returns False when it was already gone."""
    if not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    return True


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def pid_alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as gone)."""
    try:
        import psutil

        return bool(psutil.pid_exists(pid)) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:  # psutil.NoSuchProcess between the two calls, or AccessDenied
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """True when binding host:port fails (someone listens there, or it is reserved)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def tail(path: Path | None, lines: int = 12) -> list[str]:
    """The last lines of a log file (empty when there is none)."""
    if path is None or not path.exists():
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 64 * 1024))
        text = f.read().decode("utf-8", "replace")
    return [line for line in text.splitlines() if line.strip()][-lines:]


def poll_until(probe: Callable[[], str | None], *, timeout_s: float, wait: Any = None) -> str | None:
    """Call `probe` until it returns None (ready), for at most `timeout_s`; a string it returns says why not
    yet, and the last one is returned when the time is up. What `probe` raises ends the wait at once (a child
    that died). `wait` is a tenacity wait (default: every 50 ms, as a local GET is cheap)."""
    import tenacity

    class _NotYet(Exception):
        pass

    def attempt_once() -> None:
        why = probe()
        if why is not None:
            raise _NotYet(why)

    try:
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(_NotYet),
            wait=wait if wait is not None else tenacity.wait_fixed(0.05),
            stop=tenacity.stop_after_delay(timeout_s),
            reraise=True,
        ):
            with attempt:
                attempt_once()
    except _NotYet as exc:
        return str(exc)
    return None
