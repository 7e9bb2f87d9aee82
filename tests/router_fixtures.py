"""What the router's real tests share: `fitquant serve` as a child process (ServeProcess) and the two-model profile
whose described RAM holds one of its models at a time (two_model_profile).

ServeProcess runs `python -m launcher serve --profile P` in its own session with its own FITQUANT_HOME and the built
llama-server, reads its stderr event lines (`fitquant: event key=value ...`) as they come, and on stop/teardown
kills what is left: the serve process group and every model server it started (their pids come from the `ready`
events and from serve's children), so no test leaves a llama-server behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import psutil
from processes import built_llama_server

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def two_model_profile(
    directory: Path,
    *,
    smol: Path,
    gemma: Path,
    port: int | None = None,
    ram: str = "360MiB",
    router: str = "{min_residency: 0s}",
    extra: str = "",
    name: str = "router.yaml",
) -> Path:
    """A profile serving the embedded SmolLM2 (alias smol, embeddings on) and Gemma 3 270M (alias gemma), both at
    context 2048, on 127.0.0.1:`port` (a free one by default). Its described RAM (360 MiB by default) holds one of
    them at a time: smol (about 217 MiB measured) + gemma (about 281 MiB) > 360 MiB, so alternating swaps. `router`
    is the profile's router section (flow YAML); `extra` is YAML appended at the top level (`api_key_env: KEY`)."""
    port = free_port() if port is None else port
    path = directory / name
    path.write_text(
        f"""machine: smoke
ram: {ram}
reserve: 0
listen: {HOST}:{port}
router: {router}
models:
  - {{model: {smol}, alias: smol, context: 2048, embeddings: true}}
  - {{model: {gemma}, alias: gemma, context: 2048}}
{extra}"""
    )
    return path


def parse_event(line: str) -> Event | None:
    """`fitquant: event key=value ...` as an Event; None for any other line."""
    if not line.startswith("fitquant: "):
        return None
    try:
        parts = shlex.split(line[len("fitquant: ") :])
    except ValueError:
        return None
    if not parts:
        return None
    fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return Event(parts[0], fields, line)


@dataclass
class Event:
    name: str
    fields: dict[str, str]
    line: str


class ServeProcess:
    """`fitquant serve --profile PROFILE` as a child in its own session, its stderr lines kept as they arrive."""

    def __init__(self, profile: Path, *, home: Path, env: dict[str, str] | None = None) -> None:
        self.profile = profile
        self.home = home
        self.extra_env = dict(env or {})
        self.lines: list[str] = []
        self.times: list[float] = []  # time.monotonic() when each line arrived
        self._lock = threading.Lock()
        self._servers: dict[int, psutil.Process] = {}  # pid -> the process as first seen (guards against pid reuse)
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        text = profile.read_text()
        match = re.search(r"^listen:\s*(\S+)", text, re.M)
        self.address = match.group(1) if match else f"{HOST}:8080"

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> ServeProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "CUDA_VISIBLE_DEVICES")}
        env["FITQUANT_HOME"] = str(self.home)
        env["FITQUANT_LLAMA_SERVER"] = str(built_llama_server())
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("NOTIFY_SOCKET", None)
        env.update(self.extra_env)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "launcher", "serve", "--profile", str(self.profile)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __enter__(self) -> ServeProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *_exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        self.kill()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            event = parse_event(line)
            if event is not None and event.fields.get("pid", "").isdigit():
                self._remember(int(event.fields["pid"]))
            with self._lock:
                self.lines.append(line)
                self.times.append(time.monotonic())

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def wait_healthy(self, timeout: float = 240, headers: dict[str, str] | None = None) -> None:
        """Until GET /health answers 200 (every pinned/preloaded model verified); fails early if serve exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2, headers=headers).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"serve was not healthy within {timeout} s:\n{self.log()}")

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 90) -> int:
        """SIGTERM and wait: serve's exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def _remember(self, pid: int) -> None:
        if pid not in self._servers:
            with contextlib.suppress(psutil.Error):
                self._servers[pid] = psutil.Process(pid)

    def server_pids(self) -> set[int]:
        """Every model-server pid this serve was seen to run: from its events and from its live children."""
        if self.proc is not None:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    self._servers.setdefault(child.pid, child)
        return set(self._servers)

    def leftovers(self) -> list[int]:
        """The model servers this serve started that still run (a zombie counts as gone)."""
        alive = []
        for pid, process in list(self._servers.items()):
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
        return alive

    def kill(self) -> list[int]:
        """Teardown: stop serve (SIGTERM, then SIGKILL of its group) and kill any model server left; returns the
        pids of the servers that were still running and had to be killed (empty when serve cleaned up)."""
        if self.proc is None:
            return []
        self.server_pids()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        deadline = time.monotonic() + 5  # a server that serve was stopping may take a moment to exit
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = self.leftovers()
        for pid in killed:
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # a model server leads its own session: its group goes too
                self._servers[pid].kill()
        return killed

    # --- the log -----------------------------------------------------------------------------------------------
    def log(self) -> str:
        """Every line so far, each prefixed with the seconds since serve started."""
        with self._lock:
            t0 = self.times[0] if self.times else 0.0
            return "\n".join(f"{t - t0:7.2f} {line}" for t, line in zip(self.times, self.lines, strict=True))

    def mark(self) -> int:
        """The number of lines so far: pass it as `after` to wait only for what comes next."""
        with self._lock:
            return len(self.lines)

    def events(self, name: str | None = None, *, after: int = 0) -> list[Event]:
        with self._lock:
            lines = self.lines[after:]
        found = [e for e in map(parse_event, lines) if e is not None]
        return [e for e in found if name is None or e.name == name]

    def wait_for(self, pattern: str, *, after: int = 0, timeout: float = 180) -> re.Match[str]:
        """The first line at or past `after` that matches `pattern` (re.search), waiting up to `timeout`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        index = after
        while True:
            with self._lock:
                fresh = self.lines[index:]
            for line in fresh:
                match = regex.search(line)
                if match:
                    return match
            index += len(fresh)
            ended = self._reader is not None and not self._reader.is_alive()  # serve exited, its stderr read to EOF
            if time.monotonic() > deadline or (ended and not fresh):
                raise AssertionError(f"no line matching {pattern!r} within {timeout} s; serve said:\n{self.log()}")
            time.sleep(0.05)

    # --- convenience -------------------------------------------------------------------------------------------
    def running(self, headers: dict[str, str] | None = None) -> dict[str, Any]:
        r = httpx.get(self.url + "/running", timeout=10, headers=headers)
        r.raise_for_status()
        value: dict[str, Any] = r.json()
        return value

    def model_row(self, alias: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
        return next(m for m in self.running(headers)["models"] if m["model"] == alias)
