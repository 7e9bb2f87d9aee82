"""The server must reach the plan's GPUs: a CPU-only llama.cpp server (the real cpu build of llama-server, which
lists no device) on a machine whose NVML (the fake in tests/fakes_hardware.py) reports a GPU is refused in one line
that says how to get one, and `auto` prefers Ollama (a real HTTP server shaped like its API) when it answers."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from fakes_hardware import RTX_3090, FakeGpu, FakeNvml, write_meminfo
from rpc_device import built_binaries

from launcher.backends.llamacpp import LlamaCppBackend, probe_server, server_gpu_devices
from launcher.errors import BackendError
from launcher.hardware import describe_machine, detect_hardware
from launcher.hardware.types import HardwareSnapshot
from launcher.run import choose_backend
from launcher.units import GiB


@pytest.fixture
def gpu_machine(tmp_path: Path) -> HardwareSnapshot:
    proc = write_meminfo(tmp_path / "proc", total_bytes=64 * GiB, available_bytes=48 * GiB)
    (tmp_path / "sys").mkdir()
    nvml = FakeNvml([FakeGpu(**RTX_3090, used_bytes=GiB)])
    machine = detect_hardware(nvml=nvml, sysfs_root=tmp_path / "sys", proc_root=proc, env={}, platform="linux")
    assert [d.kind for d in machine.devices] == ["cuda"]
    return machine


@pytest.fixture
def cpu_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    server, _ = built_binaries()
    monkeypatch.setenv("FITQUANT_LLAMA_SERVER", str(server))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))  # no `ollama` binary to fall back on
    return server


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_the_cpu_build_of_llama_server_lists_no_gpu(cpu_server: Path) -> None:
    assert server_gpu_devices(probe_server(str(cpu_server), found_by="test")) == ()


def test_a_cpu_only_llama_server_is_refused_on_a_machine_with_a_gpu(cpu_server: Path, gpu_machine) -> None:
    with pytest.raises(BackendError) as refused:
        choose_backend("llamacpp", machine=gpu_machine)
    line = str(refused.value)
    assert "\n" not in line and "CPU-only" in line and "GPU0 NVIDIA GeForce RTX 3090" in line
    assert "scripts/build-llama-cpp --cuda|--rocm|--metal|--vulkan" in line and "--llama-server PATH" in line
    assert "Ollama" in line
    # auto with no Ollama to prefer: the same line
    with pytest.raises(BackendError, match="CPU-only"):
        choose_backend("auto", machine=gpu_machine, ollama_host=_closed_port())


def test_auto_prefers_ollama_when_the_only_llama_cpp_is_cpu_only(cpu_server: Path, gpu_machine) -> None:
    from ollama_api_server import OllamaApiServer

    ollama = OllamaApiServer().start()
    try:
        backend = choose_backend("auto", machine=gpu_machine, ollama_host=ollama.url)
    finally:
        ollama.close()
    assert backend.name == "ollama"


def test_a_cpu_only_server_is_fine_where_the_plan_uses_no_gpu(cpu_server: Path) -> None:
    no_gpu = describe_machine(ram=8 * GiB)
    assert isinstance(choose_backend("auto", machine=no_gpu, ollama_host=_closed_port()), LlamaCppBackend)
    assert isinstance(choose_backend("llamacpp", machine=no_gpu), LlamaCppBackend)


def test_hw_doctor_shows_the_same_finding(cpu_server: Path, gpu_machine: HardwareSnapshot) -> None:
    from launcher.run import gpu_reach

    finding = gpu_reach(gpu_machine)
    assert finding["server"] == "llama-server" and finding["gpu_devices"] == []
    assert "CPU-only" in finding["finding"] and "GPU0 NVIDIA GeForce RTX 3090" in finding["finding"]
    assert gpu_reach(describe_machine(ram=8 * GiB))["finding"] is None  # no GPU to reach


def test_hw_doctor_prints_the_finding(cpu_server: Path) -> None:
    import json

    from click.testing import CliRunner

    from launcher.cli import main

    done = CliRunner().invoke(main, ["hw", "--doctor"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["llama_cpp_server"]["server"] == "llama-server"
    assert report["llama_cpp_server"]["finding"] is None  # this machine has no GPU for it to miss
