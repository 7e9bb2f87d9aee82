"""fitquant run, ps, stop end to end with the real Gemma 3 270M on both llama.cpp servers (CPU here), and
its bad inputs. Every test checks by pid that no server is left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
import psutil
import pytest
from processes import built_llama_server, gone

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "FITQUANT_LLAMA_SERVER")}
    env["FITQUANT_HOME"] = os.environ["FITQUANT_HOME"]
    env.update(extra)
    return env


def _fitquant(
    args: list[str], env: dict[str, str], *, stdin: str = "", timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launcher", *args], input=stdin, capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)  # fmt: skip


def _python_server_env(tmp_path: Path) -> dict[str, str]:
    """No llama-server anywhere: the llama.cpp backend falls back to llama-cpp-python's server."""
    empty = tmp_path / "no-builds"
    empty.mkdir()
    bindir = Path(sys.executable).parent
    return _env(tmp_path, PATH=f"{bindir}:/usr/bin:/bin", FITQUANT_LLAMA_CPP_BUILDS=str(empty))


@pytest.mark.parametrize("server", ["llama-cpp-python", "llama-server"])
def test_run_answers_a_piped_prompt_verifies_cpu_only_and_leaves_nothing(
    server: str, tmp_path: Path, gemma3_270m_path: Path
) -> None:
    if server == "llama-server":
        env = _env(tmp_path, FITQUANT_LLAMA_SERVER=str(built_llama_server()))
    else:
        env = _python_server_env(tmp_path)
    done = _fitquant(["run", str(gemma3_270m_path), "--ctx", "2048", "--no-engine", "--json", "--ram", "8GiB",
                      "--max-tokens", "32"], env,
                     stdin="Say hello in one word.")  # fmt: skip
    assert done.returncode == 0, done.stderr
    first, _, answer = done.stdout.partition("\n")
    result = json.loads(first)
    jsonschema.validate(result, json.loads((ROOT / "docs" / "run.schema.json").read_text()))
    assert result["schema_version"] == 1
    assert result["backend"]["server"] == server
    assert result["chosen"]["quant"] == "Q4_K_M" and result["chosen"]["n_ctx"] == 2048
    assert result["chosen"]["cache_type_k"] == "q8_0"
    placement = result["placement"]
    assert placement["verdict"] == "cpu-only", placement
    assert placement["type_k"] == "q8_0" and placement["n_ctx"] == 2048
    assert [a["outcome"] for a in result["attempts"]] == ["verified"]
    assert result["endpoint"].startswith("http://127.0.0.1:")
    assert answer.strip(), "the piped prompt got no answer"
    assert "CPU only" in done.stderr
    assert gone(result["pid"]), "the server outlived fitquant run"


def test_serve_ps_stop_and_signals_leave_no_child(tmp_path: Path, gemma3_270m_path: Path) -> None:
    env = _env(tmp_path, FITQUANT_LLAMA_SERVER=str(built_llama_server()))
    for how in ("stop", signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        # started with SIGINT ignored, as a script's background job is (`fitquant run --serve &`): SIGINT still stops it
        proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", str(gemma3_270m_path), "--ctx", "1024",
                                 "--no-engine", "--serve", "--json", "--warmup", "none"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # fmt: skip
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            result = json.loads(line)
            server_pid = result["pid"]
            assert psutil.pid_exists(server_pid)
            listed = json.loads(_fitquant(["ps", "--json"], env).stdout)["instances"]
            assert [i["pid"] for i in listed] == [server_pid]
            if how == "stop":
                stopped = _fitquant(["stop", listed[0]["name"]], env)
                assert stopped.returncode == 0, stopped.stderr
            else:
                proc.send_signal(how)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:  # say which way of stopping hung, and what fitquant said last
                proc.kill()
                _, err = proc.communicate()
                pytest.fail(f"{how}: fitquant did not exit within 30 s; its stderr ends: {err[-2000:]}")
            assert gone(server_pid), f"{how}: the server outlived fitquant"
            assert json.loads(_fitquant(["ps", "--json"], env).stdout)["instances"] == []
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_next_plan_starts_from_what_was_measured(tmp_path: Path, gemma3_270m_path: Path) -> None:
    env = _python_server_env(tmp_path)
    args = ["run", str(gemma3_270m_path), "--ctx", "1024", "--no-engine", "--warmup", "none", "--ram", "8GiB",
            "--max-tokens", "16"]  # fmt: skip
    assert _fitquant(args, env, stdin="hi").returncode == 0
    records = list((Path(env["FITQUANT_HOME"]) / "state" / "machines").glob("*.jsonl"))
    assert len(records) == 1
    entry = json.loads(records[0].read_text().splitlines()[0])
    assert entry["quant"] == "Q4_K_M" and entry["verdict"] == "cpu-only" and entry["needs_bytes"]["CPU"] > 0
    again = _fitquant(["plan", str(gemma3_270m_path), "--ctx", "1024", "--no-engine", "--ram", "8GiB"], env)
    assert "starts from what was measured on this machine" in again.stdout + again.stderr


def test_bad_inputs_are_one_line_and_leave_nothing(tmp_path: Path, gemma3_270m_path: Path) -> None:
    env = _python_server_env(tmp_path)
    model = str(gemma3_270m_path)
    cases = []
    # a --llama-server that is not llama-server
    cases.append((["run", model, "--llama-server", "/bin/true", "--no-engine"], "is not llama-server"))
    # a port in use
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases.append((["run", model, "--no-engine", "--port", str(port), "--ram", "8GiB"], f"port {port}"))
        # an unknown model
        cases.append((["run", str(tmp_path / "nope.gguf"), "--no-engine"], "nope.gguf"))
        # an unreachable Ollama (and no ollama binary on PATH)
        cases.append((["run", model, "--backend", "ollama", "--no-engine"], "Ollama"))
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            closed_port = closed.getsockname()[1]
        # fits nowhere under --strict
        cases.append((["run", model, "--ram", "64MiB", "--strict", "--no-engine"], "--strict"))
        for args, expected in cases:
            before = {p.pid for p in psutil.Process().children(recursive=True)}
            done = _fitquant(args, {**env, "OLLAMA_HOST": f"127.0.0.1:{closed_port}"}, stdin="hi")
            assert done.returncode != 0, args
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            assert expected in lines[-1], (args, done.stderr)
            assert "Traceback" not in done.stderr
            after = {p.pid for p in psutil.Process().children(recursive=True)}
            assert after <= before, f"{args}: left {after - before}"
