"""Child processes that never outlive fitquant.

Each server runs in its own process group (a terminal's Ctrl-C reaches fitquant, which stops the group in
order) and, on Linux, with PR_SET_PDEATHSIG: the kernel kills the child when fitquant dies, even by SIGKILL.
A server gets a minimal environment (`server_env`): what it needs to find its libraries and devices, never
the tokens and keys of the shell that started fitquant.

A pid alone names no process for long: a record outlives a reboot or a SIGKILL, and the number is reused.
`process_identity(pid)` is what a record keeps beside it (start time and command), and `stop_pid` signals only
a process that still has that identity.
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
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1

# What a server may inherit: by exact name, and by prefix (runtimes, GPU visibility, locale, folders).
_KEEP_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR", "TMP", "TEMP",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "DYLD_LIBRARY_PATH", "DYLD_FALLBACK_LIBRARY_PATH", "VIRTUAL_ENV",
    "GPU_DEVICE_ORDINAL", "ONEAPI_DEVICE_SELECTOR", "DRI_PRIME", "__NV_PRIME_RENDER_OFFLOAD",
    "SSL_CERT_FILE", "SSL_CERT_DIR",  # Ollama pulls models over TLS
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "ALL_PROXY", "all_proxy",
})  # fmt: skip
_KEEP_PREFIXES = (
    "LC_", "XDG_", "PYTHON",  # locale, folders, the interpreter of a Python server (llama-cpp-python)
    "CUDA_", "NVIDIA_", "HIP_", "ROCR_", "ROCM_", "HSA_", "GGML_", "LLAMA_", "OLLAMA_",  # runtimes, visibility
    "VK_", "ZE_", "SYCL_", "MTL_", "METAL_", "OMP_", "KMP_", "OPENBLAS_", "MKL_", "GOMP_",  # Vulkan, oneAPI, threads
)  # fmt: skip
# ... unless the name says it holds a secret: checked first, so OLLAMA_API_KEY and LLAMA_API_KEY are dropped too.
_SECRET_PARTS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "API_KEY", "APIKEY", "PRIVATE_KEY")
_SECRET_NAMES = frozenset({"API_KEY", "KEY"})


def _is_secret(name: str) -> bool:
    upper = name.upper()
    return upper in _SECRET_NAMES or upper.startswith("AWS_") or any(part in upper for part in _SECRET_PARTS)


def server_env(base: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a server starts with: from `base` only what a server needs (PATH, HOME, locale, TMPDIR,
    XDG_*, the GPU runtimes' and their visibility variables, LD_LIBRARY_PATH, proxies), never a secret (HF_TOKEN,
    *_API_KEY, *_TOKEN, *_SECRET, AWS_*, FITQUANT_*); then `extra` as given (the server's own key goes there)."""
    env = {
        name: value
        for name, value in base.items()
        if not _is_secret(name) and (name in _KEEP_NAMES or name.startswith(_KEEP_PREFIXES))
    }
    env.update(extra or {})
    return env


@cache
def _prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved in the parent: after fork only async-signal-safe work may run in the child, and
    dlopen/dlsym (ctypes.CDLL) take locks another thread of the parent may have held at fork."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def _die_with_parent(prctl: Callable[..., int], parent_pid: int) -> None:
    """Runs in the child between fork and exec: only calls what the parent resolved."""
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv with stdout and stderr appended to log_path, in a new process group, tied to our life.
    The child's environment is `server_env(env or os.environ, extra_env)`: secrets in `env` are dropped,
    what the server must get (its API key) goes in `extra_env`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    parent = os.getpid()
    prctl = _prctl()
    preexec = (lambda: _die_with_parent(prctl, parent)) if prctl is not None else None
    child_env = server_env(os.environ if env is None else env, extra_env)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_env,
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


@dataclass(frozen=True)
class ProcessIdentity:
    """What tells one process from a later one with the same pid: its start time and its program."""

    started: float  # seconds since the epoch (psutil's create_time: from the kernel, stable for the process)
    command: str  # the base name of argv[0] (the process name when argv is unreadable)

    def matches(self, other: ProcessIdentity | None) -> bool:
        # create_time is computed from boot time and clock ticks: equal for one process, up to float rounding
        return other is not None and abs(self.started - other.started) < 0.01 and self.command == other.command


def process_identity(pid: int) -> ProcessIdentity | None:
    """The identity of the process `pid` now; None when there is none (or a zombie), or it cannot be read."""
    import psutil

    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            argv = proc.cmdline()
            command = os.path.basename(argv[0]) if argv and argv[0] else proc.name()
            return ProcessIdentity(started=float(proc.create_time()), command=command)
    except (psutil.Error, OSError, ValueError):
        return None


def is_process(pid: int, expected: ProcessIdentity | None) -> bool:
    """True when `pid` runs and is still the process `expected` describes (None describes no process)."""
    return expected is not None and expected.matches(process_identity(pid))


def stop_pid(pid: int, *, expected: ProcessIdentity | None = None, timeout_s: float = 10.0) -> bool:
    """Stop a process fitquant started in an earlier run (not our child): SIGTERM, wait, SIGKILL. With
    `expected`, each signal goes only to a process that still has that identity (a recorded pid may have been
    reused). Returns False when it was already gone, or is another process now (nothing was signalled)."""

    def ours() -> bool:
        return pid_alive(pid) if expected is None else is_process(pid, expected)

    if not ours():
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not ours():
            return True
        time.sleep(0.05)
    if ours():
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
