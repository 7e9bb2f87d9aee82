"""Hardware: which GPUs this machine has, how much memory is free on each now, and what the host offers.

Contract
--------
`detect_hardware()` returns a `HardwareSnapshot`; `describe_machine(vram=..., ram=..., unified=...)`
returns one for a machine that is not this one (`described=True`), so every later stage can answer
"will it run on a 12 GB card?" from any computer.

- `devices` lists GPUs only, one `Device` per GPU, in the order the runtime numbers them after
  CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES (see `visible.py`). GPUs are
  never summed. A CPU-only machine has an empty list, and that is a result, not an error.
- `free_bytes` is what the device can take now: memory other processes hold is already subtracted.
- `unified=True` (Apple, AMD APUs, NVIDIA GB10/Jetson) means the device's memory is host RAM: do not add
  it to `ram_available_bytes`. `integrated=True` means there is no dedicated VRAM; an APU's memory is
  its carve-out plus GTT, never reported as if it were a discrete card's.
- Unknown values are None, never -1 or 0. Sizes are bytes; names end in `_bytes`.
- Fallbacks and oddities (NVML without a driver, an estimated Apple working set, a malformed
  CUDA_VISIBLE_DEVICES) are one-line `notes`. `HardwareError` is raised only when a probe that is
  present fails in a way that would make the answer wrong (NVML loaded but unable to start or to
  read a GPU's memory).

Sources, one module each: `nvml.py` (NVIDIA, nvidia-ml-py), `amd.py` (amdgpu sysfs), `apple.py`
(sysctl, vm_stat), `cpu.py` (procfs, psutil), `runtimes.py` (llama_cpp, Ollama). Each has a
`read_*` probe that touches the system and returns raw readings, and a pure function that turns
readings into devices; `collect_readings()` exposes the raw readings for `fitquant hw --doctor`.

Seams for tests: `nvml` (an object offering the pynvml functions used), `sysfs_root`, `proc_root`,
`run` (runs a command and returns its stdout: sysctl, vm_stat), `env` (the environment mapping) and
`platform` (a `sys.platform` value).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from launcher.errors import HardwareError
from launcher.hardware.amd import AmdReading, amd_devices, read_amd
from launcher.hardware.apple import AppleReading, Runner, apple_machine, metal_working_set, read_apple
from launcher.hardware.cpu import HostReading, read_host
from launcher.hardware.nvml import NvmlReading, nvidia_devices, read_nvml
from launcher.hardware.types import (
    SCHEMA_VERSION,
    BackendSupport,
    CpuInfo,
    Device,
    DeviceKind,
    GpuProcess,
    HardwareSnapshot,
    OllamaServer,
)
from launcher.units import parse_bytes

__all__ = [
    "SCHEMA_VERSION",
    "BackendSupport",
    "CpuInfo",
    "Device",
    "DeviceKind",
    "GpuProcess",
    "HardwareSnapshot",
    "MachineReadings",
    "OllamaServer",
    "collect_readings",
    "describe_machine",
    "detect_hardware",
    "interpret_readings",
    "parse_vram_list",
    "read_machine",
    "resolve_machine",
]

#: The only environment variables `collect_readings` reports: they decide which GPUs a runtime sees.
VISIBILITY_VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
)


@dataclasses.dataclass
class MachineReadings:
    """Raw readings of every probe that applies to the platform (None = not applicable)."""

    platform: str
    host: HostReading | None = None
    nvml: NvmlReading | None = None
    amd: AmdReading | None = None
    apple: AppleReading | None = None


def read_machine(
    *,
    nvml: Any = None,
    sysfs_root: str | Path = "/sys",
    proc_root: str | Path = "/proc",
    run: Runner | None = None,
    platform: str | None = None,
) -> MachineReadings:
    """Run every probe that applies to this platform and keep the raw readings."""
    platform = platform or sys.platform
    readings = MachineReadings(platform=platform, host=read_host(proc_root))
    if platform == "darwin":
        readings.apple = read_apple(run)
        return readings
    readings.nvml = read_nvml(nvml)
    if platform.startswith("linux"):
        readings.amd = read_amd(sysfs_root)
    return readings


def interpret_readings(
    readings: MachineReadings, *, env: Mapping[str, str], backends: BackendSupport | None = None
) -> HardwareSnapshot:
    """Turn raw readings into a snapshot (pure); raises HardwareError when a present probe is broken."""
    devices: list[Device] = []
    notes: list[str] = []
    try:
        host = readings.host
        ram_total = host.ram_total_bytes if host else None
        ram_available = host.ram_available_bytes if host else None
        cpu = host.cpu if host else CpuInfo()
        if readings.apple is not None:
            # On a Mac sysctl/vm_stat are the better source; the host reading (psutil) is the fallback.
            apple = apple_machine(readings.apple)
            devices, notes = apple.devices, apple.notes
            ram_total = apple.ram_total_bytes or ram_total
            ram_available = apple.ram_available_bytes or ram_available
            cpu = CpuInfo(
                model=apple.cpu.model or cpu.model,
                physical_cores=apple.cpu.physical_cores or cpu.physical_cores,
                logical_cores=apple.cpu.logical_cores or cpu.logical_cores,
            )
        if readings.nvml is not None:
            found, found_notes = nvidia_devices(
                readings.nvml, env=env, ram_total_bytes=ram_total, ram_available_bytes=ram_available
            )
            devices, notes = devices + found, notes + found_notes
        if readings.amd is not None:
            found, found_notes = amd_devices(readings.amd, env=env, ram_available_bytes=ram_available)
            devices, notes = devices + found, notes + found_notes
        if not devices:
            notes.append("no GPU found: models will run on the CPU")
        return HardwareSnapshot(
            devices=tuple(devices),
            ram_total_bytes=ram_total,
            ram_available_bytes=ram_available,
            cpu=cpu,
            notes=tuple(notes),
            backends=backends,
        )
    except ValidationError as exc:
        raise HardwareError(f"a hardware probe returned impossible values: {exc}") from None


def detect_hardware(
    *,
    nvml: Any = None,
    sysfs_root: str | Path = "/sys",
    proc_root: str | Path = "/proc",
    run: Runner | None = None,
    env: Mapping[str, str] | None = None,
    platform: str | None = None,
    probe_backends: bool = False,
) -> HardwareSnapshot:
    """Probe this machine: GPUs with their free memory now, host RAM, CPU; runtimes too if `probe_backends`.

    Raises HardwareError only when a present driver fails (see the module docstring); no GPU is a result.
    """
    env = os.environ if env is None else env
    readings = read_machine(nvml=nvml, sysfs_root=sysfs_root, proc_root=proc_root, run=run, platform=platform)
    backends = None
    if probe_backends:
        from launcher.hardware.runtimes import probe_backends as probe_runtimes

        backends = probe_runtimes(env=env)
    return interpret_readings(readings, env=env, backends=backends)


def parse_vram_list(text: str) -> list[int]:
    """'24GiB,24GiB' -> one size in bytes per GPU. Raises ValueError naming the bad item, in one line."""
    sizes = []
    for item in (part.strip() for part in str(text).split(",")):
        if not item:
            raise ValueError(f"{text!r} has an empty item; write one size per GPU, like 24GiB,24GiB")
        size = parse_bytes(item)
        if size <= 0:
            raise ValueError(f"{item!r} is not a GPU size; it must be more than 0")
        sizes.append(size)
    return sizes


def describe_machine(
    *,
    vram: Sequence[int] | None = None,
    ram: int | None = None,
    unified: int | None = None,
    kind: DeviceKind = "cuda",
    gpu_names: Sequence[str] | None = None,
) -> HardwareSnapshot:
    """A snapshot of a machine described by numbers: discrete GPUs (`vram`, one size each), host `ram`,
    or an Apple-style `unified` memory size. All memory is taken to be free. `gpu_names`: the chips the GPUs are
    (one for all, or one per GPU), by their names in the speed table (launcher.speed.table_gpu), so that a plan
    for this machine predicts speed from that chip's figures. Raises ValueError.
    """
    if gpu_names and not vram and unified is None:
        raise ValueError("GPU names describe GPUs: give their memory too (vram or unified)")
    if vram is None and ram is None and unified is None:
        raise ValueError("describe at least one of vram, ram or unified memory")
    if unified is not None and vram:
        raise ValueError("give either discrete GPU memory (vram) or unified memory, not both")
    if unified is not None and ram is not None and ram != unified:
        raise ValueError("unified memory is the machine's RAM; give unified or ram, not both")
    for name, value in (("ram", ram), ("unified", unified), *(("vram", size) for size in vram or ())):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive number of bytes, got {value!r}")
    n_gpus = 1 if unified is not None else len(vram or ())
    if gpu_names and len(gpu_names) not in (1, n_gpus):
        raise ValueError(f"{len(gpu_names)} GPU names for {n_gpus} described GPUs; give one name for all, or one per "
                         "GPU size")  # fmt: skip
    names = [gpu_names[min(i, len(gpu_names) - 1)] for i in range(n_gpus)] if gpu_names else []
    devices: list[Device] = []
    notes = ["described machine: sizes as given, all memory taken to be free"]
    if unified is not None:
        working_set, note = metal_working_set(unified, None)
        notes.append(note)
        devices.append(
            Device(
                kind="metal",
                index=0,
                name=names[0] if names else "Apple GPU (described)",
                total_bytes=working_set,
                free_bytes=working_set,
                used_bytes=0,
                unified=True,
                integrated=True,
            )
        )
        ram = unified
    for index, size in enumerate(vram or ()):
        devices.append(
            Device(
                kind="rocm" if kind == "cuda" and names and names[index].startswith("AMD ") else kind,
                index=index,
                name=names[index] if names else f"GPU {index} (described)",
                total_bytes=size,
                free_bytes=size,
                used_bytes=0,
            )
        )
    return HardwareSnapshot(
        devices=tuple(devices),
        ram_total_bytes=ram,
        ram_available_bytes=ram,
        cpu=CpuInfo(),
        notes=tuple(notes),
        described=True,
    )


def resolve_machine(
    *,
    vram: str | Sequence[int] | None = None,
    ram: str | int | None = None,
    unified: str | int | None = None,
    gpu_names: Sequence[str] | None = None,
    **detect: Any,
) -> HardwareSnapshot:
    """The machine a command plans for: described when any of vram/ram/unified is given (as bytes or as
    text like '24GiB,24GiB'), else detected with `detect_hardware(**detect)`. Raises ValueError on bad text.
    """
    if vram is None and ram is None and unified is None:
        if gpu_names:
            raise ValueError("GPU names describe GPUs: give their memory too (vram or unified)")
        return detect_hardware(**detect)
    return describe_machine(
        gpu_names=gpu_names,
        vram=parse_vram_list(vram) if isinstance(vram, str) else vram,
        ram=parse_bytes(ram) if isinstance(ram, str) else ram,
        unified=parse_bytes(unified) if isinstance(unified, str) else unified,
    )


def collect_readings(
    *,
    nvml: Any = None,
    sysfs_root: str | Path = "/sys",
    proc_root: str | Path = "/proc",
    run: Runner | None = None,
    env: Mapping[str, str] | None = None,
    platform: str | None = None,
) -> dict[str, Any]:
    """Raw readings of every probe plus what they were taken to mean, for bug reports. Never raises.

    Nothing secret: of the environment only VISIBILITY_VARIABLES; process names without their paths;
    a non-loopback Ollama address is not shown.
    """
    import platform as platform_module
    from importlib.metadata import PackageNotFoundError, version

    env = os.environ if env is None else env
    report: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    packages: dict[str, str | None] = {}
    for package in ("fitquant", "nvidia-ml-py", "psutil", "llama-cpp-python"):
        try:
            packages[package] = version(package)
        except PackageNotFoundError:
            packages[package] = None
    report["system"] = {
        "platform": platform or sys.platform,
        "machine": platform_module.machine(),
        "release": platform_module.release(),
        "python": platform_module.python_version(),
        "packages": packages,
    }
    report["environment"] = {name: env[name] for name in VISIBILITY_VARIABLES if name in env}
    try:
        readings = read_machine(nvml=nvml, sysfs_root=sysfs_root, proc_root=proc_root, run=run, platform=platform)
    except Exception as exc:  # a bug report must come out even when a probe crashes
        report["error"] = f"{type(exc).__name__}: {exc}"
        return report
    for name in ("host", "nvml", "amd", "apple"):
        value = getattr(readings, name)
        report[name] = _strip_paths(dataclasses.asdict(value)) if value is not None else None
    try:
        from launcher.hardware.runtimes import probe_backends

        snapshot = interpret_readings(readings, env=env, backends=probe_backends(env=env)).to_json()
        ollama = snapshot["backends"]["ollama"]
        if ollama and not _is_loopback(ollama["url"]):
            ollama["url"] = "(OLLAMA_HOST, not a loopback address)"
        report["snapshot"] = _strip_paths(snapshot)
    except Exception as exc:
        report["snapshot"] = {"error": f"{type(exc).__name__}: {exc}"}
    return report


def _strip_paths(value: Any) -> Any:
    # Process names from NVML can be full paths, and paths name users (/home/alice/...).
    if isinstance(value, dict):
        if set(value) == {"pid", "name", "used_bytes"}:
            return {**value, "name": _basename(value["name"])}
        return {key: _strip_paths(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        if len(value) == 3 and isinstance(value[0], int) and isinstance(value[1], (str, type(None))):
            return [value[0], _basename(value[1]), value[2]]  # an NVML (pid, name, bytes) triple
        return [_strip_paths(item) for item in value]
    return value


def _basename(name: str | None) -> str | None:
    return name.rstrip("/").rsplit("/", 1)[-1] if name else name


def _is_loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1", "0.0.0.0")
