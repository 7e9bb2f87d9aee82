"""fitquant serve for real: a profile's models on the built llama-server with the real Gemma 3 270M, and the RPC
stand-in device. Start; a killed server is restarted and verified again; SIGHUP after an edit restarts only the
edited model; SIGTERM stops everything (checked by pid); a smaller device than the last verified start is
noticed, planned again and the new choice verified."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import needs_llama_cpp
from processes import gone
from rpc_device import built_binaries, rpc_server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


class Serve:
    """`fitquant serve` as a child, its stderr events read as they come."""

    def __init__(self, profile: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "launcher", "serve", "--profile", str(profile)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)  # fmt: skip
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None and self._queue.empty():
                    break
                continue
            self.lines.append(line)
            match = regex.search(line)
            if match:
                return match
        raise AssertionError(f"no line matching {pattern!r}; serve said:\n" + "\n".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def _env(server: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OLLAMA_HOST"}
    env["FITQUANT_LLAMA_SERVER"] = str(server)
    return env


def _ready_pids(serve: Serve, names: list[str]) -> dict[str, int]:
    pids = {}
    for _ in names:
        m = serve.wait_for(r"ready model=(\S+) .*pid=(\d+) verdict=cpu-only")
        pids[m.group(1)] = int(m.group(2))
    assert sorted(pids) == sorted(names)
    return pids


def test_serve_restarts_a_killed_server_reloads_one_model_and_stops_everything(
    tmp_path: Path, gemma3_270m_path: Path
) -> None:
    server, _ = built_binaries()
    profile = tmp_path / "home.yaml"
    text = f"""machine: test-box
backend: llamacpp
defaults: {{warmup: short}}
models:
  - {{model: {gemma3_270m_path}, context: 1024, alias: small}}
  - {{model: {gemma3_270m_path}, context: 2048, alias: other}}
"""
    profile.write_text(text)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    serve = Serve(profile, {**_env(server), "NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        pids = _ready_pids(serve, ["small", "other"])
        # systemd hears READY=1 once every model is verified (Type=notify)
        message = notify.recv(4096).decode()
        assert "READY=1" in message and "2 of 2 models verified" in message, message
        # a server that dies is started again and verified again
        os.kill(pids["small"], signal.SIGKILL)
        serve.wait_for(r"crashed model=small ")
        m = serve.wait_for(r"ready model=small .*pid=(\d+) verdict=cpu-only")
        assert int(m.group(1)) != pids["small"]
        pids["small"] = int(m.group(1))
        # SIGHUP after an edit: only the edited model restarts
        profile.write_text(text.replace("context: 2048", "context: 3072"))
        since = len(serve.lines)
        serve.proc.send_signal(signal.SIGHUP)
        serve.wait_for(r"stopping model=other reason=\"its profile entry changed\"")
        m = serve.wait_for(r"ready model=other quant=\S+ ctx=3072 .*pid=(\d+)")
        assert gone(pids["other"])
        assert psutil.pid_exists(pids["small"]), "the unchanged model kept running"
        assert not any("model=small" in line for line in serve.lines[since:])
        pids["other"] = int(m.group(1))
        # a profile that no longer reads is reported and the models keep running
        profile.write_text(text + "bogus: 1\n")
        serve.proc.send_signal(signal.SIGHUP)
        serve.wait_for(r"reload-refused .*bogus")
        assert all(psutil.pid_exists(pid) for pid in pids.values())
    finally:
        rc = serve.stop()
    assert rc == 128 + signal.SIGTERM
    serve.wait_for(r"stopped", timeout=10)
    assert all(gone(pid) for pid in pids.values()), "SIGTERM left a server behind"
    said = []
    while not said or "STOPPING=1" not in said[-1]:
        said.append(notify.recv(4096).decode())
    # each SIGHUP: RELOADING=1, then READY=1 again (also when the profile was refused; the SIGTERM may come first)
    heads = [m.split("\n")[0] for m in said]
    assert heads[:3] == ["RELOADING=1", "READY=1", "RELOADING=1"] and heads[-1] == "STOPPING=1", said
    notify.close()


def test_serve_refuses_models_that_do_not_fit_together_naming_the_model(tmp_path: Path, gemma3_270m_path: Path) -> None:
    server, _ = built_binaries()
    profile = tmp_path / "tight.yaml"
    profile.write_text(f"""machine: tight
backend: llamacpp
ram: 400MiB
reserve: 0
models:
  - {{model: {gemma3_270m_path}, context: 1024, alias: first}}
  - {{model: {gemma3_270m_path}, context: 1024, alias: second}}
""")
    done = subprocess.run([sys.executable, "-m", "launcher", "serve", "--profile", str(profile)], capture_output=True,
                          text=True, env=_env(server), cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "'second' does not fit entirely beside first" in last, done.stderr


def test_a_smaller_device_than_the_last_verified_start_is_planned_again_and_verified(
    tmp_path: Path, two_quants: Path
) -> None:
    server, _ = built_binaries()
    profile = tmp_path / "rpc-profile.yaml"

    def write(memory: str, address: str) -> None:
        profile.write_text(f"""machine: rpc-box
backend: llamacpp
rpc: [{address}]
devices: [{{name: RPC0, kind: rpc, memory: {memory}}}]
ram: 8GiB
reserve: 0
models:
  - {{model: {two_quants}, context: 1024, alias: step}}
""")

    with rpc_server(None) as rpc:  # no limit: the best quant loads
        write("2GiB", rpc.address)
        serve = Serve(profile, _env(server))
        try:
            serve.wait_for(r"planned model=step quant=Q8_0")
            first = serve.wait_for(r"ready model=step quant=Q8_0 .*verdict=gpu")
        finally:
            serve.stop()
    assert first
    # the device shrinks (an address-space limit that holds Q4_K_M only) and the profile says so
    with rpc_server(85_000 * 1024) as rpc:
        write("64MiB", rpc.address)
        serve = Serve(profile, _env(server))
        try:
            serve.wait_for(r"hardware-changed .*RPC0 2\.0 GiB.*RPC0 64\.0 MiB")
            serve.wait_for(r"planned model=step quant=Q4_K_M")
            serve.wait_for(r"ready model=step quant=Q4_K_M .*verdict=gpu")
        finally:
            serve.stop()


@pytest.fixture(scope="module")
def two_quants(corpus_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import stepdown_model

    needs_llama_cpp()
    return stepdown_model.build(corpus_root)
