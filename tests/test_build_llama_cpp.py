"""scripts/build-llama-cpp, launcher.backends.builds, and the real binaries it caches.

Fast: the script's argument errors and cache check, and how builds.py finds a build (fake build folders).
Slow (`-m slow`): the cached llama-server and ggml-rpc-server themselves, with an RPC device standing in for
a GPU (tests/rpc_device.py; backends.md §10): Gemma 3 270M fully offloaded to RPC0, and refused under a
~195 MiB address-space limit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from rpc_device import built_binaries, free_port, pid_alive, rpc_server, stop_group

from launcher.backends import builds

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build-llama-cpp"


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def fake_build(root: Path, version: str, variant: str, *, date: str = "2026-10-01T00:00:00+00:00",
               tools: bool = True) -> Path:  # fmt: skip
    folder = root / f"{version}-{variant}"
    (folder / "bin").mkdir(parents=True)
    for name in builds.BINARIES + (builds.TOOLS if tools else ()):
        exe = folder / "bin" / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    manifest = {"version": version, "variant": variant, "commit": "abc1234", "date": date}
    (folder / "build.json").write_text(json.dumps(manifest))
    return folder


# --- the script's arguments (fast) ---


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-such-flag"], "build-llama-cpp: error: unrecognized arguments: --no-such-flag (see --help)"),
        (
            ["--cuda", "--vulkan"],
            "build-llama-cpp: error: argument --vulkan: not allowed with argument --cuda (see --help)",
        ),
        (["--jobs", "0"], "build-llama-cpp: error: argument --jobs/-j: must be at least 1, not 0 (see --help)"),
        (["--jobs", "x"], "build-llama-cpp: error: argument --jobs/-j: not a number: 'x' (see --help)"),
    ],
)
def test_build_script_argument_error_is_one_line(args: list[str], message: str) -> None:
    done = run_script(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [message]


def test_build_script_skips_a_cached_build(tmp_path: Path) -> None:
    folder = fake_build(tmp_path, "0.3.36", "vulkan")
    done = run_script("--vulkan", "--llama-cpp-python", "0.3.36", env={builds.ENV_ROOT: str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"build-llama-cpp: llama.cpp abc1234 (0.3.36-vulkan) is already built: {folder / 'bin'} (--force rebuilds)"
    ]


def test_a_cached_build_without_llama_bench_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build cached before llama-bench joined the targets serves llama-server still, but the script builds again
    (here: stopped at once by a PATH without cmake, after deciding to)."""
    fake_build(tmp_path, "0.3.36", "cpu", tools=False)
    monkeypatch.setenv(builds.ENV_ROOT, str(tmp_path))
    monkeypatch.setattr(builds, "installed_version", lambda: "0.3.36")
    assert builds.find_built() == tmp_path / "0.3.36-cpu" / "bin" / "llama-server"
    assert builds.find_built("llama-bench") is None
    (tmp_path / "empty").mkdir()
    done = run_script(
        "--llama-cpp-python", "0.3.36", env={"PATH": str(tmp_path / "empty"), builds.ENV_ROOT: str(tmp_path)}
    )
    assert done.returncode == 1 and "cmake not found" in done.stderr  # not "already built"


def test_build_script_bad_source_fails_in_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "builds"
    done = run_script(
        "--source", str(tmp_path / "nowhere"), "--llama-cpp-python", "0.3.36", env={builds.ENV_ROOT: str(root)}
    )
    assert done.returncode == 1
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("build-llama-cpp: error:")]
    assert len(errors) == 1, done.stderr
    assert "nowhere" in errors[0] or "cmake not found" in errors[0] or "C++ compiler" in errors[0]
    assert not root.exists()  # checked before anything is made


def test_build_script_without_cmake_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()  # a PATH with no cmake and no compiler
    root = tmp_path / "builds"
    done = run_script("--llama-cpp-python", "0.3.36", env={"PATH": str(tmp_path / "bin"), builds.ENV_ROOT: str(root)})
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "build-llama-cpp: error: cmake not found: install cmake (3.14 or newer), e.g. apt-get install cmake"
    ]
    assert not root.exists()


# --- launcher.backends.builds (fast) ---


def test_builds_root_follows_its_env_var_not_fitquant_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(builds.ENV_ROOT, str(tmp_path / "b"))
    assert builds.builds_root() == tmp_path / "b"
    monkeypatch.delenv(builds.ENV_ROOT)
    import platformdirs

    assert builds.builds_root() == Path(platformdirs.user_cache_dir("fitquant")) / "llama.cpp"
    assert not str(builds.builds_root()).startswith(os.environ["FITQUANT_HOME"])


def test_find_built_none_without_builds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(builds.ENV_ROOT, str(tmp_path / "missing"))
    assert builds.find_built() is None
    assert builds.find_built("ggml-rpc-server", variant="cpu") is None


def test_find_built_prefers_the_installed_version_and_skips_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(builds.ENV_ROOT, str(tmp_path))
    monkeypatch.setattr(builds, "installed_version", lambda: "0.3.36")
    fake_build(tmp_path, "0.3.36", "cpu")
    fake_build(tmp_path, "0.3.40", "cpu")  # newer, but not the installed engine
    (fake_build(tmp_path, "0.3.36", "cuda") / "bin" / "ggml-rpc-server").unlink()  # incomplete
    fake_build(tmp_path, "0.3.36", "vulkan").rename(tmp_path / ".partial-0.3.36-vulkan-1")  # in progress: hidden
    assert builds.find_built() == tmp_path / "0.3.36-cpu" / "bin" / "llama-server"
    assert builds.find_built("ggml-rpc-server", variant="cpu") == tmp_path / "0.3.36-cpu" / "bin" / "ggml-rpc-server"
    assert builds.find_built(variant="cuda") is None

    monkeypatch.setattr(builds, "installed_version", lambda: None)
    assert builds.find_built() == tmp_path / "0.3.40-cpu" / "bin" / "llama-server"  # newest
    fake_build(tmp_path, "0.3.40", "vulkan")
    assert builds.find_built() == tmp_path / "0.3.40-vulkan" / "bin" / "llama-server"  # a GPU build over cpu
    with pytest.raises(ValueError, match="unknown binary"):
        builds.find_built("rpc-server")


# --- the cached binaries, for real (slow) ---


def start_server(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_healthy(port: int, proc: subprocess.Popen[bytes], log_path: Path, *, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"llama-server exited {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"llama-server not ready in {timeout_s}s:\n{log_path.read_text(errors='replace')[-3000:]}")


def server_argv(llama_server: Path, rpc_address: str, model: Path, port: int) -> list[str]:
    return [
        str(llama_server), "--rpc", rpc_address, "-m", str(model), "-ngl", "all", "-c", "4096",
        "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on", "--fit", "off", "--port", str(port), "-lv", "4",
    ]  # fmt: skip


@pytest.mark.slow
def test_llama_server_runs_from_the_cache() -> None:
    llama_server, rpc_bin = built_binaries()
    build = builds.read_build(llama_server.parent.parent)
    assert build is not None
    assert llama_server.parent.parent.parent == builds.builds_root()
    assert rpc_bin.parent == llama_server.parent
    done = subprocess.run([str(llama_server), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    line = next(ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("version:"))
    assert build.commit is not None
    assert re.fullmatch(rf"version: \S+ \(build \d+, commit {build.commit}\)", line)
    if sys.platform.startswith("linux") and shutil.which("readelf"):
        # the lib*.so beside them and nowhere else (an empty entry, as in "$ORIGIN:", means the working dir)
        for exe in (llama_server, rpc_bin):
            dyn = subprocess.run(["readelf", "-d", str(exe)], capture_output=True, text=True, check=True).stdout
            assert re.findall(r"Library (?:runpath|rpath): \[(.*)\]", dyn) == ["$ORIGIN"], dyn


@pytest.mark.slow
def test_rpc_server_is_listed_as_device_rpc0() -> None:
    llama_server, _ = built_binaries()
    with rpc_server() as rpc:
        done = subprocess.run(
            [str(llama_server), "--rpc", rpc.address, "--list-devices"], capture_output=True, text=True, timeout=60
        )
        assert rpc.proc.poll() is None
    assert done.returncode == 0, done.stderr
    assert re.search(rf"^\s*RPC0: {re.escape(rpc.address)} \(\d+ MiB, \d+ MiB free\)$", done.stdout, re.M), done.stdout
    assert not pid_alive(rpc.pid)


@pytest.mark.slow
def test_gemma_fully_offloaded_to_the_rpc_device(gemma3_270m_path: Path, tmp_path: Path) -> None:
    llama_server, _ = built_binaries()
    port = free_port()
    log_path = tmp_path / "llama-server.log"
    with rpc_server(None) as rpc:
        proc = start_server(server_argv(llama_server, rpc.address, gemma3_270m_path, port), log_path)
        try:
            wait_healthy(port, proc, log_path)
        finally:
            stop_group(proc)
        rpc_pid = rpc.pid
    log = log_path.read_text(errors="replace")
    dev = re.escape(f"RPC0[{rpc.address}]")
    assert "load_tensors: offloaded 19/19 layers to GPU" in log
    assert re.search(rf"load_tensors: +{dev} model buffer size = +\d+\.\d+ MiB", log), log[-3000:]
    assert re.search(rf"llama_kv_cache: +{dev} KV buffer size = +\d+\.\d+ MiB", log), log[-3000:]
    assert re.search(rf"{dev} compute buffer size = +\d+\.\d+ MiB", log), log[-3000:]
    assert not pid_alive(proc.pid)
    assert not pid_alive(rpc_pid)


@pytest.mark.slow
def test_gemma_refused_by_a_limited_rpc_device(gemma3_270m_path: Path, tmp_path: Path) -> None:
    llama_server, _ = built_binaries()
    port = free_port()
    log_path = tmp_path / "llama-server.log"
    with rpc_server(200_000 * 1024) as rpc:  # `ulimit -v 200000`: ~195 MiB, less than the 235 MiB of weights
        proc = start_server(server_argv(llama_server, rpc.address, gemma3_270m_path, port), log_path)
        try:
            rc = proc.wait(timeout=120)
        finally:
            stop_group(proc)
        rpc_log = rpc.stderr_text()
        assert rpc.proc.poll() is None  # the refusal is the server's answer, not its crash
    log = log_path.read_text(errors="replace")
    assert rc != 0
    assert f"failed to allocate RPC0[{rpc.address}] buffer of size" in log, log[-3000:]
    assert "exiting due to model loading error" in log
    assert "ggml_aligned_malloc: insufficient memory" in rpc_log
    assert not pid_alive(proc.pid)
    assert not pid_alive(rpc.pid)
