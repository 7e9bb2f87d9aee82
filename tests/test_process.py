"""Child processes: the minimal environment a server gets, prctl resolved before fork, a child that dies with its
parent, and pids signalled only while they are still the recorded process (`fitquant stop` / `ps` on stale
records). Real subprocesses throughout: `sleep`, and a Python parent that spawns through launcher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from launcher import instances
from launcher.backends import process
from launcher.backends.process import ProcessIdentity, process_identity, server_env, spawn, stop_pid
from launcher.cli import main

REPO = Path(__file__).resolve().parent.parent
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG: Linux")


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not process.pid_alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def sleeper():
    """An unrelated process (not fitquant's child's child): `sleep 60`, killed at the end whatever happens."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------------------------------- the environment


def test_process_server_env_keeps_what_a_server_needs_and_drops_secrets():
    base = {
        "PATH": "/usr/bin", "HOME": "/home/ann", "LANG": "C.UTF-8", "LC_ALL": "C", "TMPDIR": "/tmp",
        "XDG_CACHE_HOME": "/c", "LD_LIBRARY_PATH": "/opt/cuda/lib64", "CUDA_VISIBLE_DEVICES": "0",
        "HIP_VISIBLE_DEVICES": "1", "ROCR_VISIBLE_DEVICES": "1", "GGML_CUDA_NO_PINNED": "1", "OLLAMA_MODELS": "/m",
        "HF_TOKEN": "hf_x", "HUGGING_FACE_HUB_TOKEN": "hf_y", "OPENAI_API_KEY": "sk", "FITQUANT_API_KEY": "k",
        "OLLAMA_API_KEY": "o", "LLAMA_API_KEY": "inherited", "API_KEY": "a", "AWS_ACCESS_KEY_ID": "AKIA",
        "AWS_SECRET_ACCESS_KEY": "s", "GITHUB_TOKEN": "g", "DB_PASSWORD": "p", "MY_SECRET": "m",
        "NOTIFY_SOCKET": "/run/systemd/notify", "FITQUANT_HOME": "/f", "SSH_AUTH_SOCK": "/tmp/ssh",
    }  # fmt: skip
    env = server_env(base, {"LLAMA_API_KEY": "the-servers-own"})
    assert env == {
        "PATH": "/usr/bin", "HOME": "/home/ann", "LANG": "C.UTF-8", "LC_ALL": "C", "TMPDIR": "/tmp",
        "XDG_CACHE_HOME": "/c", "LD_LIBRARY_PATH": "/opt/cuda/lib64", "CUDA_VISIBLE_DEVICES": "0",
        "HIP_VISIBLE_DEVICES": "1", "ROCR_VISIBLE_DEVICES": "1", "GGML_CUDA_NO_PINNED": "1", "OLLAMA_MODELS": "/m",
        "LLAMA_API_KEY": "the-servers-own",  # from `extra`, the only way a key reaches a server
    }  # fmt: skip


@linux_only
def test_process_spawned_server_gets_no_secret_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret")
    monkeypatch.setenv("FITQUANT_API_KEY", "fitquant-key")
    monkeypatch.setenv("GGML_CUDA_NO_PINNED", "1")
    for env in (None, dict(os.environ)):  # inherited, or passed whole as a backend does
        proc = spawn(["sleep", "30"], log_path=tmp_path / "log", env=env, extra_env={"LLAMA_API_KEY": "own"})
        try:
            seen = _environ_of(proc.pid)
        finally:
            process.stop_process(proc, timeout_s=5)
        assert "HF_TOKEN" not in seen and "AWS_SECRET_ACCESS_KEY" not in seen and "FITQUANT_API_KEY" not in seen
        assert not any("secret" in value or "fitquant-key" in value for value in seen.values())
        assert seen["GGML_CUDA_NO_PINNED"] == "1"
        assert seen["PATH"] == os.environ["PATH"]
        assert seen["LLAMA_API_KEY"] == "own"


# ---------------------------------------------------------------------------------------------- tied to our life


@linux_only
def test_process_prctl_is_resolved_in_the_parent_not_after_fork(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """dlopen after fork may deadlock on a lock another thread held: the child may only call the resolved prctl.
    With ctypes.CDLL unusable once resolved, a spawn that still loaded libc in the child would fail."""
    import ctypes

    assert process._prctl() is not None  # resolved (and cached) here, in the parent

    def no_dlopen(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("ctypes.CDLL called in the child")

    monkeypatch.setattr(ctypes, "CDLL", no_dlopen)
    proc = spawn(["sleep", "30"], log_path=tmp_path / "log")
    try:
        assert process.pid_alive(proc.pid)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert proc.poll() is None, status
    finally:
        process.stop_process(proc, timeout_s=5)


PARENT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from launcher.backends.process import spawn
child = spawn(["sleep", "60"], log_path=Path({log!r}))
print(child.pid, flush=True)
time.sleep(60)
"""


@linux_only
def test_process_child_dies_when_its_parent_is_sigkilled(tmp_path: Path):
    script = PARENT.format(repo=str(REPO), log=str(tmp_path / "child.log"))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert process.pid_alive(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _gone(child_pid, within_s=5), "the child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()
        if child_pid is not None and process.pid_alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- identity


def test_process_identity_is_start_time_and_program(sleeper: subprocess.Popen[bytes]):
    identity = process_identity(sleeper.pid)
    assert identity is not None
    assert identity.command == "sleep"
    assert identity.started == pytest.approx(psutil.Process(sleeper.pid).create_time())
    assert identity.matches(process_identity(sleeper.pid))
    assert not identity.matches(ProcessIdentity(identity.started - 5, "sleep"))  # the pid, reused later
    assert not identity.matches(ProcessIdentity(identity.started, "llama-server"))
    assert not identity.matches(None)


def test_process_stop_pid_signals_only_the_recorded_process(sleeper: subprocess.Popen[bytes]):
    identity = process_identity(sleeper.pid)
    assert identity is not None
    # a record made by an earlier process that had this pid: another start time
    assert stop_pid(sleeper.pid, expected=ProcessIdentity(identity.started - 3600, "sleep"), timeout_s=1) is False
    assert stop_pid(sleeper.pid, expected=ProcessIdentity(identity.started, "llama-server"), timeout_s=1) is False
    assert sleeper.poll() is None, "stop_pid signalled a process that is not the recorded one"
    assert stop_pid(sleeper.pid, expected=identity, timeout_s=5) is True
    assert sleeper.wait(timeout=5) == -signal.SIGTERM


def _record(tmp_name: str, *, pid: int, owner_pid: int, **identity: object) -> Path:
    """A record as an earlier `fitquant run` left it (written as JSON, as on disk)."""
    directory = instances.instances_dir()
    directory.mkdir(parents=True, exist_ok=True)
    data = {
        "name": tmp_name, "model": "qwen3-8b.gguf", "quant": "Q4_K_M", "n_ctx": 8192, "backend": "llamacpp",
        "server": "llama-server", "pid": pid, "owner_pid": owner_pid, "endpoint": "http://127.0.0.1:8080/v1",
        "verdict": "fits", "started": time.time() - 3600, "log_path": None, **identity,
    }  # fmt: skip
    path = directory / f"{tmp_name}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("kind", ["reused-pid", "older-record"])
def test_process_stop_all_never_signals_a_stale_records_pid(sleeper: subprocess.Popen[bytes], kind: str):
    """A reboot or SIGKILL left a record; its pids now belong to an unrelated `sleep`."""
    live = process_identity(sleeper.pid)
    assert live is not None
    if kind == "reused-pid":  # the record's processes started an hour before this one
        identity = {"server_started": live.started - 3600, "server_command": "llama-server",
                    "owner_started": live.started - 3600, "owner_command": "python3"}  # fmt: skip
    else:  # a record without identity (an older fitquant's): nothing proves the pid is ours
        identity = {}
    path = _record("qwen3-8b-q4-k-m-8080", pid=sleeper.pid, owner_pid=sleeper.pid, **identity)
    result = CliRunner().invoke(main, ["stop", "--all"])
    assert result.exit_code == 0, result.output
    time.sleep(0.2)
    assert sleeper.poll() is None, "fitquant stop --all killed an unrelated process"
    assert not path.exists()  # the stale record is gone
    assert result.output.startswith("removed the stale record qwen3-8b-q4-k-m-8080 (")
    assert result.output.rstrip().endswith("; signalled nothing")
    assert len(result.output.strip().splitlines()) == 1
    listed = CliRunner().invoke(main, ["ps", "--json"])
    assert json.loads(listed.output)["instances"] == []


def test_process_ps_and_stop_act_on_a_record_whose_processes_match(sleeper: subprocess.Popen[bytes]):
    """The record a live `fitquant run` writes: identity filled from the live processes, so ps lists it and stop
    signals it (here the server is `sleep`, the owner this test process, which stop never signals)."""
    instances.save(
        instances.RunningInstance(
            name="sleepy-q4-k-m-8080", model="sleepy.gguf", quant="Q4_K_M", n_ctx=4096, backend="llamacpp",
            server="llama-server", pid=sleeper.pid, owner_pid=os.getpid(), endpoint="http://127.0.0.1:8080/v1",
            verdict="fits", started=time.time(),
        )
    )  # fmt: skip
    listed = json.loads(CliRunner().invoke(main, ["ps", "--json"]).output)["instances"]
    assert [i["name"] for i in listed] == ["sleepy-q4-k-m-8080"]
    assert listed[0]["server_command"] == "sleep"
    assert listed[0]["owner_started"] == pytest.approx(psutil.Process().create_time())
    result = CliRunner().invoke(main, ["stop", "sleepy-q4-k-m-8080"])
    assert result.exit_code == 0, result.output
    assert result.output == "stopped sleepy-q4-k-m-8080\n"
    assert sleeper.wait(timeout=5) == -signal.SIGTERM
    assert json.loads(CliRunner().invoke(main, ["ps", "--json"]).output)["instances"] == []


# ---------------------------------------------------------------------------------------------- ps at 80 columns


def test_process_ps_at_80_columns_keeps_names_and_endpoints_whole():
    names = ("hf-co-unsloth-qwen3-30b-a3b-instruct-2507-gguf-q4-k-m-8080", "gemma-3-27b-it-qat-q4-0-8081")
    endpoints = ("http://127.0.0.1:8080/v1", "http://192.168.100.200:8081/v1")
    for name, endpoint in zip(names, endpoints, strict=True):
        instances.save(
            instances.RunningInstance(
                name=name, model=f"hf.co/unsloth/{name}-GGUF-with-a-long-model-reference", quant="Q4_K_M",
                n_ctx=32768, backend="llamacpp", server="llama-server", pid=os.getpid(), owner_pid=os.getpid(),
                endpoint=endpoint, verdict="fits", started=time.time() - 7200,
            )
        )  # fmt: skip
    for columns in ("80", "140", "300"):
        result = CliRunner().invoke(main, ["ps"], env={"COLUMNS": columns})
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert lines[0].split()[0] == "NAME"
        for name, endpoint in zip(names, endpoints, strict=True):
            row = next(line for line in lines if name in line)  # the whole name, on one line ...
            assert endpoint in row.split()  # ... with the whole endpoint beside it
        if columns == "80":  # no more than the name and the endpoint need, however narrow the terminal
            assert max(len(line.rstrip()) for line in lines) == len(names[0]) + 2 + max(map(len, endpoints))
            assert lines[0].split() == ["NAME", "ENDPOINT"]
        if columns == "140":  # the model shortened with …, the least useful columns hidden
            assert max(len(line.rstrip()) for line in lines) <= 140
            assert "…" in result.output and "PID" not in lines[0] and "BACKEND" not in lines[0]
        if columns == "300":
            assert lines[0].split() == ["NAME", "MODEL", "QUANT", "CONTEXT", "BACKEND", "PID", "ENDPOINT", "VERDICT",
                                        "T/S", "UPTIME"]  # fmt: skip
            assert "…" not in result.output


def test_process_ps_shows_measured_decode_speed_beside_the_prediction_and_a_slow_finding():
    """`fitquant ps` says how fast each model decodes (the warm-up's measure) against what the plan predicted, and
    marks a load whose speed was a finding."""
    rows = (
        ("fast-q4-k-m-8080", 94.4, 80.2, None),
        ("slow-q4-k-m-8081", 12.0, 80.0, "slow: decode 12.0 tokens/s, predicted 80.0: probable CPU fallback"),
        ("new-q4-k-m-8082", None, None, None),
    )
    for name, measured, predicted, finding in rows:
        instances.save(
            instances.RunningInstance(
                name=name, model="m.gguf", quant="Q4_K_M", n_ctx=4096, backend="llamacpp", server="llama-server",
                pid=os.getpid(), owner_pid=os.getpid(), endpoint="http://127.0.0.1:8080/v1", verdict="gpu",
                started=time.time(), measured_tg_per_s=measured, predicted_tg_per_s=predicted, speed_finding=finding,
            )
        )  # fmt: skip
    result = CliRunner().invoke(main, ["ps"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    line = {row[0]: next(x for x in result.output.splitlines() if x.startswith(row[0])) for row in rows}
    assert "94 (pred 80)" in line["fast-q4-k-m-8080"] and "gpu, slow" not in line["fast-q4-k-m-8080"]
    assert "12 (pred 80)" in line["slow-q4-k-m-8081"] and "gpu, slow" in line["slow-q4-k-m-8081"]
    assert " - " in line["new-q4-k-m-8082"]
    listed = {i["name"]: i for i in json.loads(CliRunner().invoke(main, ["ps", "--json"]).output)["instances"]}
    assert listed["slow-q4-k-m-8081"]["measured_tg_per_s"] == 12.0
    assert listed["slow-q4-k-m-8081"]["speed_finding"].startswith("slow: decode")
