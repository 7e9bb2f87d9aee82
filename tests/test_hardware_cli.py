"""`fitquant hw`: exit codes, exact error lines, and the real machine this runs on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.cli import main
from launcher.errors import HardwareError
from launcher.units import GiB


def invoke(*args: str):
    return CliRunner().invoke(main, ["hw", *args])


def last_line(output: str) -> str:
    return output.rstrip("\n").splitlines()[-1]


def test_hw_bad_vram_is_a_usage_error_naming_the_item():
    result = invoke("--vram", "12XB")
    assert result.exit_code == 2
    assert last_line(result.output) == (
        "Error: Invalid value for '--vram': '12XB' is not a size; write it like 24GiB, 12GB or 512MiB"
    )


def test_hw_bad_second_vram_item_and_bad_ram():
    result = invoke("--vram", "24GiB,24GB,x")
    assert result.exit_code == 2
    assert last_line(result.output) == (
        "Error: Invalid value for '--vram': 'x' is not a size; write it like 24GiB, 12GB or 512MiB"
    )
    result = invoke("--ram", "0")
    assert result.exit_code == 2
    assert (
        last_line(result.output) == "Error: Invalid value for '--ram': '0' is not a usable size; it must be more than 0"
    )


def test_hw_contradictory_description_is_a_usage_error():
    result = invoke("--vram", "12GiB", "--unified", "32GiB")
    assert result.exit_code == 2
    assert last_line(result.output) == ("Error: give either discrete GPU memory (vram) or unified memory, not both")
    result = invoke("--doctor", "--vram", "12GiB")
    assert result.exit_code == 2
    assert last_line(result.output) == (
        "Error: --doctor reads this machine; it cannot be combined with --vram, --ram, --unified or --gpu-name"
    )


def test_hw_names_described_gpus_from_the_chip_table_and_shows_their_speed_figures():
    result = invoke("--vram", "24GiB,16GiB", "--gpu-name", "RTX 4090,rx 7900 xtx", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [(d["name"], d["kind"]) for d in data["devices"]] == [
        ("NVIDIA GeForce RTX 4090", "cuda"),
        ("AMD Radeon RX 7900 XTX", "rocm"),
    ]
    assert data["speed"]["GPU0"]["bandwidth_bytes_per_s"] == 1008e9 and data["speed"]["GPU0"]["source"] == "table"
    assert data["speed"]["GPU1"]["backend"] == "rocm"
    assert "CPU" not in data["speed"]  # a described host has no figures unless a profile gives them
    result = invoke("--unified", "36GiB", "--gpu-name", "M3 Max (30-core GPU)")
    assert result.exit_code == 0, result.output
    assert "GPU0: 300.0 GB/s memory" in result.output and "(the chip table)" in result.output
    result = invoke("--vram", "24GiB")  # no name: the plan cannot know its speed, and says how to give it
    assert "GPU0: GPU 0 (described): unknown (not in the chip table" in " ".join(result.output.split())


def test_hw_gpu_name_errors_name_the_choices():
    result = invoke("--vram", "24GiB", "--gpu-name", "M3 Max")
    assert result.exit_code == 2
    assert "matches 2 chips (Apple M3 Max (30-core GPU); Apple M3 Max (40-core GPU)); name one of them" in result.output
    result = invoke("--vram", "24GiB", "--gpu-name", "RTX 9999")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    # the names most like it, not the whole table
    assert ("GPU name 'RTX 9999' is not in the chip table (nearest: NVIDIA GeForce RTX 5090; NVIDIA GeForce RTX 4090; "
            "NVIDIA GeForce RTX 3090; `fitquant hw --chips` lists all ") in text  # fmt: skip
    result = invoke("--unified", "16GiB", "--gpu-name", "M1")  # the M1 itself, not also the M1 Pro, Max and Ultra
    assert result.exit_code == 2
    assert "matches 2 chips (Apple M1 (7-core GPU); Apple M1 (8-core GPU)); name one of them" in result.output
    result = invoke("--vram", "8GiB", "--gpu-name", "RTX 2080")  # not the RTX 2080 Ti's figures
    assert result.exit_code == 2 and (
        "GPU name 'RTX 2080' is not in the chip table, only another chip's name holds it (NVIDIA GeForce RTX 2080 Ti) "
        "(`fitquant hw --chips` lists all "
    ) in " ".join(result.output.split())
    result = invoke("--vram", "48GiB", "--gpu-name", "A40")  # another number, not a sibling of the RTX A4000
    assert result.exit_code == 2 and "GPU name 'A40' is not in the chip table (nearest: NVIDIA A10; " in (
        " ".join(result.output.split())
    )
    result = invoke("--unified", "64GiB", "--gpu-name", "M5 Max")  # a chip without its bin is near every bin's name
    assert result.exit_code == 2 and "(nearest: Apple M4 Max (32-core GPU); Apple M3 Max (30-core GPU); " in (
        " ".join(result.output.split())
    )
    result = invoke("--vram", "8GiB", "--gpu-name", "RX 7900")  # three cards: a choice, not the first of them
    assert result.exit_code == 2 and "'RX 7900' matches 3 chips (AMD Radeon RX 7900 XTX; AMD Radeon RX 7900 XT; " in (
        " ".join(result.output.split())
    )
    result = invoke("--vram", "8GiB,8GiB", "--gpu-name", "4090,3090,3060")
    assert result.exit_code == 2
    assert last_line(result.output) == (
        "Error: 3 GPU names for 2 described GPUs; give one name for all, or one per GPU size"
    )
    result = invoke("--gpu-name", "4090")
    assert result.exit_code == 2
    assert last_line(result.output) == "Error: GPU names describe GPUs: give their memory too (vram or unified)"
    result = invoke("--vram", "8GiB", "--gpu-name", "4090,")
    assert result.exit_code == 2 and "has an empty item" in result.output
    for huge in ("x" * 100_000, "4090," * 20_000):  # one line, whatever was typed
        result = invoke("--vram", "8GiB", "--gpu-name", huge)
        assert result.exit_code == 2 and len(last_line(result.output)) < 1000, last_line(result.output)[:200]
    result = invoke("--vram", "8GiB", "--gpu-name", "RTX 4090\x1b[2J")  # a terminal escape is shown, not sent
    assert result.exit_code == 2 and "\x1b" not in result.output and "\\x1b" in result.output


def test_hw_describes_two_gpus_as_json():
    result = invoke("--vram", "24GiB,24GiB", "--ram", "64GiB", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["schema_version"] == 1 and data["described"] is True
    assert [(d["index"], d["total_bytes"], d["free_bytes"]) for d in data["devices"]] == [
        (0, 24 * GiB, 24 * GiB),
        (1, 24 * GiB, 24 * GiB),
    ]
    assert data["ram_total_bytes"] == 64 * GiB
    assert data["backends"] == {"llama_cpp_gpu_offload": None, "ollama": None}


def test_hw_table_for_a_described_mac():
    result = invoke("--unified", "32GiB")
    assert result.exit_code == 0, result.output
    assert "Described machine" in result.output
    assert "Apple GPU (described)" in result.output and "unified" in result.output
    assert "RAM: 32.0 GiB total, 32.0 GiB available" in result.output


def test_hw_hardware_error_is_one_red_line_and_exit_1(monkeypatch):
    def broken(**_):
        raise HardwareError("NVML could not start (NVMLError_NoPermission: Insufficient Permissions)")

    monkeypatch.setattr("launcher.hardware.detect_hardware", broken)
    result = invoke("--json")
    assert result.exit_code == 1
    assert result.output == "HardwareError: NVML could not start (NVMLError_NoPermission: Insufficient Permissions)\n"


def test_hw_doctor_prints_raw_readings_as_json():
    result = invoke("--doctor")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert {"system", "environment", "host", "nvml", "snapshot"} <= set(report)
    assert report["host"]["ram_total_bytes"] > 0


# --- this machine, through the real console script ----------------------------------------------


def _meminfo() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0]) * 1024
    return fields


def _has_gpu_driver() -> bool:
    return any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl", "/sys/class/kfd", "/dev/dxg"))


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc/meminfo")
def test_hw_json_on_this_machine_matches_proc_meminfo():
    # Speed is measured by scripts/bench_hw.py, not here.
    script = Path(sys.executable).with_name("fitquant")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "launcher"]
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "OLLAMA_HOST")}
    done = subprocess.run([*command, "hw", "--json"], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    meminfo = _meminfo()

    assert abs(data["ram_total_bytes"] - meminfo["MemTotal"]) <= 0.01 * meminfo["MemTotal"]
    assert abs(data["ram_available_bytes"] - meminfo["MemAvailable"]) <= 0.10 * meminfo["MemAvailable"]
    if not _has_gpu_driver():
        assert data["devices"] == []
        assert "no GPU found: models will run on the CPU" in data["notes"]
    assert data["cpu"]["logical_cores"] == os.cpu_count()


def test_fitquant_module_entry_point_runs_hw():
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "hw", "--vram", "12GiB", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["devices"][0]["total_bytes"] == 12 * GiB


def test_hw_chips_lists_the_chip_table_and_every_name_finds_itself():
    from launcher.speed import table_gpu

    result = invoke("--chips", "--json")
    assert result.exit_code == 0, result.output
    chips = json.loads(result.output)
    names = [c["name"] for c in chips]
    assert len(names) == len(set(names)) > 80 and not any(c["backend"] == "cpu" for c in chips)
    by_name = {c["name"]: c for c in chips}
    assert by_name["NVIDIA GeForce RTX 4090 D"]["bandwidth_bytes_per_s"] == 1008e9  # its own entry, not the 4090's
    assert (
        by_name["Tesla T4"]["backend"] == "cuda"
        and by_name["Apple M2 Max (38-core GPU)"]["host_link_bytes_per_s"] is None
    )
    assert by_name["NVIDIA H200"]["memory"] == "HBM3e" and by_name["NVIDIA GeForce RTX 4090"]["memory"] is None
    for name in names:
        assert table_gpu(name) == name
        short = name.removeprefix("NVIDIA GeForce ").removeprefix("AMD Radeon ")
        if short != name:  # how people name a card: "RTX 4070 Ti" is the 4070 Ti, not the 4070 Ti SUPER
            assert table_gpu(short) == name, short
    result = invoke("--chips")
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and f"The chip table: {len(names)} GPUs" in text and "RTX 4070 Ti SUPER" in text
    assert "HBM2e" in text  # the memory column: an HBM card decodes at its own efficiency
    result = invoke("--chips", "--vram", "8GiB")
    assert result.exit_code == 2 and "--chips lists the chip table; it cannot be combined" in result.output
