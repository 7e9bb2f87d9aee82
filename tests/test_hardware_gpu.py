"""On a real NVIDIA GPU: NVML's numbers through fitquant agree with nvidia-smi. Skipped where NVML finds none."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from launcher.hardware import detect_hardware
from launcher.hardware.nvml import read_nvml
from launcher.units import MiB

pytestmark = pytest.mark.gpu


def _nvml_gpu_count() -> tuple[int, str]:
    reading = read_nvml()
    if reading.init_error or reading.error:
        return 0, reading.init_error or reading.error or ""
    return len(reading.gpus), "NVML lists no GPU"


@pytest.fixture(scope="module")
def nvml_reading():
    count, why = _nvml_gpu_count()
    if count == 0:
        pytest.skip(f"no NVIDIA GPU: {why}")
    if shutil.which("nvidia-smi") is None:
        pytest.skip("NVML finds a GPU but nvidia-smi is not on PATH")
    return read_nvml()


def _smi() -> list[tuple[int, int]]:
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.total,memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return [tuple(int(value) * MiB for value in line.split(",")) for line in out.strip().splitlines()]


def test_real_gpus_match_nvidia_smi(nvml_reading):
    snapshot = detect_hardware(env={})  # nvidia-smi ignores CUDA_VISIBLE_DEVICES: compare every GPU
    smi = _smi()
    assert len(snapshot.devices) == len(smi) == len(nvml_reading.gpus)
    for device, gpu, (smi_total, smi_used) in zip(snapshot.devices, nvml_reading.gpus, smi, strict=True):
        assert device.kind == "cuda" and not device.integrated
        assert abs(device.total_bytes - smi_total) <= MiB, (device.name, device.total_bytes, smi_total)
        # nvidia-smi's "used" counts the driver's reserve on current drivers (like NVML v2), and leaves it
        # out on older ones (like v1); allow either, plus 64 MiB for allocations that came and went.
        reserve = gpu.reserved_bytes or 0
        closest = min(abs(device.used_bytes - smi_used), abs(device.used_bytes - reserve - smi_used))
        assert closest <= 64 * MiB, (device.name, device.used_bytes, reserve, smi_used)
        assert device.free_bytes <= device.total_bytes - smi_used + 64 * MiB
        assert device.compute_capability and device.driver
