"""NVIDIA GPUs through NVML (`nvidia-ml-py`, module `pynvml`, imported lazily).

`read_nvml(nvml)` is the only code that calls NVML; it turns every `pynvml.NVMLError` into a recorded
error string (this is the one place NVML exceptions are caught). `nvidia_devices(reading, ...)` is pure:
it applies CUDA_VISIBLE_DEVICES and decides what is a note and what is a `HardwareError`.

- Memory: `nvmlDeviceGetMemoryInfo(h, version=nvmlMemory_v2)` first, whose `used` includes the
  driver's reserved memory (closer to nvidia-smi); v1 when v2 is missing (old drivers).
- NVML present but no driver loaded, or no NVML library at all: no NVIDIA devices, one note.
- A GPU whose memory NVML does not report (NotSupported: GB10 / DGX Spark, Jetson) shares host RAM:
  it is reported as unified and integrated, sized from host RAM, with a note.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from launcher.errors import HardwareError
from launcher.hardware.types import Device, GpuProcess
from launcher.hardware.visible import cuda_visible
from launcher.units import format_bytes

#: pynvml.nvmlMemory_v2: the version tag nvmlDeviceGetMemoryInfo_v2 expects (sizeof | 2 << 24).
NVML_MEMORY_V2 = 0x02000028

# Errors at nvmlInit that mean "no usable NVIDIA driver here" rather than "something is broken".
_ABSENT = {"NVMLError_LibraryNotFound", "NVMLError_DriverNotLoaded", "ImportError"}
_ABSENT_NOTES = {
    "NVMLError_DriverNotLoaded": "NVML found but no NVIDIA driver loaded; no NVIDIA GPU will be used",
    "ImportError": "nvidia-ml-py is not installed, so NVIDIA GPUs cannot be detected",
}


@dataclass
class NvmlGpuReading:
    """What NVML said about one GPU (driver index order); errors are 'NVMLError_X: message'."""

    index: int
    name: str | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    compute_capability: str | None = None
    memory_version: int | None = None
    total_bytes: int | None = None
    free_bytes: int | None = None
    used_bytes: int | None = None
    reserved_bytes: int | None = None
    memory_error: str | None = None
    processes: list[tuple[int, str | None, int | None]] | None = None
    processes_error: str | None = None


@dataclass
class NvmlReading:
    """Everything read from NVML in one session; `init_error` set means nothing else was read."""

    library: str | None = None
    init_error: str | None = None
    driver_version: str | None = None
    gpus: list[NvmlGpuReading] = field(default_factory=list)
    error: str | None = None


def read_nvml(nvml: Any = None) -> NvmlReading:
    """Read every GPU NVML lists. `nvml` is the pynvml module or an object offering the same functions."""
    try:
        with warnings.catch_warnings():
            # The deprecated `pynvml` distribution's shim warns on import; nvidia-ml-py does not.
            warnings.simplefilter("ignore", FutureWarning)
            import pynvml  # type: ignore[import-untyped]
    except ImportError:
        return NvmlReading(init_error="ImportError: nvidia-ml-py is not installed")
    if nvml is None:
        nvml = pynvml
    nvml_error: type[Exception] = pynvml.NVMLError
    failures: tuple[type[Exception], ...] = (nvml_error, pynvml.NVMLLibraryMismatchError)
    reading = NvmlReading(library=_package_version())
    try:
        nvml.nvmlInit()
    except nvml_error as exc:
        reading.init_error = _describe(exc)
        return reading
    try:
        with contextlib.suppress(*failures):
            reading.driver_version = _text(nvml.nvmlSystemGetDriverVersion())
        for index in range(nvml.nvmlDeviceGetCount()):
            reading.gpus.append(_read_gpu(nvml, index, failures))
    except failures as exc:
        reading.error = _describe(exc)
    finally:
        with contextlib.suppress(*failures):
            nvml.nvmlShutdown()
    return reading


def _read_gpu(nvml: Any, index: int, failures: tuple[type[Exception], ...]) -> NvmlGpuReading:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    gpu = NvmlGpuReading(index=index)
    with contextlib.suppress(*failures):
        gpu.name = _text(nvml.nvmlDeviceGetName(handle))
    with contextlib.suppress(*failures):
        gpu.uuid = _text(nvml.nvmlDeviceGetUUID(handle))
    with contextlib.suppress(*failures):
        gpu.pci_bus_id = _text(nvml.nvmlDeviceGetPciInfo(handle).busId)
    with contextlib.suppress(*failures):
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        gpu.compute_capability = f"{major}.{minor}"
    try:
        memory = nvml.nvmlDeviceGetMemoryInfo(handle, version=NVML_MEMORY_V2)
        gpu.memory_version, gpu.reserved_bytes = 2, int(memory.reserved)
    except (*failures, TypeError):  # type: ignore[misc]  # TypeError: a pynvml too old to take `version`
        try:
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpu.memory_version = 1
        except failures as exc:
            gpu.memory_error = _describe(exc)
            memory = None
    if memory is not None:
        gpu.total_bytes, gpu.free_bytes, gpu.used_bytes = (
            int(memory.total),
            int(memory.free),
            int(memory.used),
        )
    gpu.processes, gpu.processes_error = _read_processes(nvml, handle, failures)
    return gpu


def _read_processes(
    nvml: Any, handle: Any, failures: tuple[type[Exception], ...]
) -> tuple[list[tuple[int, str | None, int | None]] | None, str | None]:
    # Compute processes (CUDA, llama.cpp) and graphics ones (Xorg, a compositor, a game) both hold
    # memory; a process doing both is listed by both calls.
    by_pid: dict[int, int | None] = {}
    errors = []
    for call in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        try:
            for process in call(handle):
                used = process.usedGpuMemory  # None on Windows WDDM (NVML_VALUE_NOT_AVAILABLE)
                known = by_pid.get(process.pid)
                by_pid[process.pid] = max(known or 0, used) if used is not None else known
        except failures as exc:
            errors.append(_describe(exc))
    if len(errors) == 2:
        return None, errors[0]
    processes = []
    for pid, used in by_pid.items():
        name = None
        with contextlib.suppress(*failures):
            name = _text(nvml.nvmlSystemGetProcessName(pid)) or None
        processes.append((pid, name, used))
    return processes, (errors[0] if errors else None)


def nvidia_devices(
    reading: NvmlReading,
    *,
    env: Mapping[str, str],
    ram_total_bytes: int | None = None,
    ram_available_bytes: int | None = None,
) -> tuple[list[Device], list[str]]:
    """The GPUs CUDA will see, from an NVML reading; raises HardwareError when NVML is present but broken."""
    if reading.init_error:
        kind = reading.init_error.split(":", 1)[0]
        if kind in _ABSENT:
            return [], [_ABSENT_NOTES[kind]] if kind in _ABSENT_NOTES else []
        raise HardwareError(
            f"NVML could not start ({reading.init_error}); fix the NVIDIA driver (a reboot after a driver "
            "update often does it) or describe the GPU with --vram"
        )
    if reading.error:
        raise HardwareError(f"NVML failed while listing GPUs: {reading.error}")
    uuids = [gpu.uuid for gpu in reading.gpus]
    chosen, notes = cuda_visible(env, uuids)
    mixed = len({reading.gpus[i].name for i in chosen}) > 1
    if mixed and env.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        notes.append(
            "GPUs are numbered in PCI bus order (NVML); CUDA numbers them fastest first unless "
            "CUDA_DEVICE_ORDER=PCI_BUS_ID is set, so runtimes may number these GPUs differently"
        )
    devices = []
    for position, system_index in enumerate(chosen):
        gpu = reading.gpus[system_index]
        device, note = _device(gpu, position, reading.driver_version, ram_total_bytes, ram_available_bytes)
        devices.append(device)
        notes.extend(note)
    return devices, notes


def _device(
    gpu: NvmlGpuReading,
    position: int,
    driver: str | None,
    ram_total_bytes: int | None,
    ram_available_bytes: int | None,
) -> tuple[Device, list[str]]:
    name = gpu.name or f"NVIDIA GPU {gpu.index}"
    notes = []
    total, free, used = gpu.total_bytes, gpu.free_bytes, gpu.used_bytes
    unified = False
    if gpu.memory_error:
        if not gpu.memory_error.startswith("NVMLError_NotSupported"):
            raise HardwareError(f"NVML could not read the memory of GPU {gpu.index} ({name}): {gpu.memory_error}")
        # GB10 (DGX Spark) and Jetson have no memory of their own: NVML declines to size it.
        unified = True
        total, free, used = ram_total_bytes, ram_available_bytes, None
        notes.append(
            f"NVIDIA GPU {position} ({name}) reports no memory of its own; treating it as unified with host "
            f"RAM ({format_bytes(total) if total is not None else 'size unknown'})"
        )
    if total is not None and free is not None:
        free = min(free, total)
    processes = None
    if gpu.processes is not None:
        processes = tuple(GpuProcess(pid=pid, name=pname, used_bytes=pused) for pid, pname, pused in gpu.processes)
    device = Device(
        kind="cuda",
        index=position,
        system_index=gpu.index,
        name=name,
        uuid=gpu.uuid,
        pci_bus_id=gpu.pci_bus_id,
        total_bytes=total,
        free_bytes=free,
        used_bytes=used,
        unified=unified,
        integrated=unified,
        compute_capability=gpu.compute_capability,
        driver=driver,
        processes=processes,
    )
    return device, notes


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _text(value: Any) -> str:
    # Very old pynvml returned bytes; PCI bus ids are still char arrays (bytes).
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _package_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"nvidia-ml-py {version('nvidia-ml-py')}"
    except PackageNotFoundError:
        return None
