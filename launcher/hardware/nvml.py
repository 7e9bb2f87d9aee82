"""NVIDIA GPUs through NVML (`nvidia-ml-py`, module `pynvml`, imported lazily).

`read_nvml(nvml)` is the only code that calls NVML; it turns every `pynvml.NVMLError` into a recorded
error string (this is the one place NVML exceptions are caught). `nvidia_devices(reading, ...)` is pure:
it applies CUDA_VISIBLE_DEVICES and decides what is a note and what is a `HardwareError`.

- Memory: `nvmlDeviceGetMemoryInfo(h, version=nvmlMemory_v2)` first, whose `used` includes the
  driver's reserved memory (closer to nvidia-smi); v1 when v2 is missing (old drivers).
- NVML present but no driver loaded, or no NVML library at all: no NVIDIA devices, one note.
- A GPU whose memory NVML does not report (NotSupported: GB10 / DGX Spark, Jetson) shares host RAM:
  it is reported as unified and integrated, sized from host RAM, with a note.
- Speed figures (launcher.speed): memory bandwidth from the maximum memory clock and the bus width, dense FP16
  tensor FLOPS from the SM count, the boost clock and the architecture's FLOPs per SM per clock
  (`memory_bandwidth_bytes_per_s`, `fp16_flops`), and the host link from the PCIe generation and width
  (`host_link_bytes_per_s`: prefill copies host weights over it in a partial offload); None whenever NVML does not
  say or the architecture is not in the table, never guessed. Not for a unified GPU: NVML has no bus width for it
  (reference/speed.md).
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
#: nvmlClockType_t NVML_CLOCK_SM, NVML_CLOCK_MEM and nvmlClockId_t NVML_CLOCK_ID_CUSTOMER_BOOST_MAX (nvml.h).
NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_CLOCK_ID_CUSTOMER_BOOST_MAX = 1, 2, 3

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
    max_memory_clock_mhz: int | None = None  # nvmlDeviceGetMaxClockInfo(NVML_CLOCK_MEM)
    memory_bus_width_bits: int | None = None  # nvmlDeviceGetMemoryBusWidth
    boost_sm_clock_mhz: int | None = None  # nvmlDeviceGetClock(SM, CUSTOMER_BOOST_MAX), else the maximum SM clock
    multiprocessor_count: int | None = None  # nvmlDeviceGetAttributes_v2, else CUDA cores / cores per SM
    gpu_cores: int | None = None  # nvmlDeviceGetNumGpuCores
    pcie_generation: int | None = None  # nvmlDeviceGetMaxPcieLinkGeneration: the GPU's and its slot's best
    pcie_width: int | None = None  # nvmlDeviceGetMaxPcieLinkWidth (lanes)


# Dense FP16 tensor FLOPs per SM per clock (FP16 accumulate: the figure NVIDIA's whitepapers quote, and the one
# data/speed.json's fp16_tflops use, so the fitted prefill slope applies unchanged), by compute capability. Each
# checked against its whitepaper: SMs x boost clock x this = the quoted dense TFLOPS.
FP16_TENSOR_FLOPS_PER_SM_CLOCK = {
    "7.0": 1024,  # Volta whitepaper: V100 SXM2 125 TFLOPS = 80 SMs x 1530 MHz x 1024
    "7.5": 1024,  # Turing whitepaper: RTX 2080 Ti FE 113.8 = 68 x 1635 MHz x 1024
    "8.0": 2048,  # A100 whitepaper: 312 = 108 x 1410 MHz x 2048
    "8.6": 1024,  # GA102 whitepaper: RTX 3090 142 = 82 x 1695 MHz x 1024
    "8.9": 1024,  # Ada whitepaper: RTX 4090 330.3 = 128 x 2520 MHz x 1024
    "9.0": 4096,  # H100 whitepaper: H100 SXM5 989.4 = 132 x 1830 MHz x 4096
    "12.0": 1024,  # Blackwell RTX whitepaper: RTX 5090 419 = 170 x 2407 MHz x 1024
    # GB10 (DGX Spark): 48 SMs x 2418 MHz x 1024 = 118.8; x 8, 951 TFLOPS of sparse FP4, NVIDIA's "1 PFLOP"
    "12.1": 1024,
}
# CUDA cores (FP32 lanes) per SM by compute capability: the CUDA C++ Programming Guide's "Arithmetic
# Instructions" throughput table (32-bit floating-point add, multiply, multiply-add per clock per SM).
CUDA_CORES_PER_SM = {"7.0": 64, "7.5": 64, "8.0": 64, "8.6": 128, "8.9": 128, "9.0": 128, "12.0": 128, "12.1": 128}


def nvml_bandwidth_bytes_per_s(max_memory_clock_mhz: int | None, bus_width_bits: int | None) -> float | None:
    """Peak memory bandwidth: NVML's memory clock x bus width x 2 (two transfers per clock as NVML counts it) / 8
    (RTX 4090: 10501 MHz x 384 bits -> 1008 GB/s; H100 SXM: 2619 x 5120 -> 3352 GB/s). None when either is unknown."""
    if not max_memory_clock_mhz or not bus_width_bits:
        return None
    return max_memory_clock_mhz * 1e6 * bus_width_bits * 2 / 8


# One direction of one PCIe lane, bytes/s after line encoding (PCI-SIG: 2.5 and 5 GT/s with 8b/10b; 8, 16 and 32
# GT/s with 128b/130b; 64 GT/s PAM4 with FLIT encoding, 242/256).
PCIE_LANE_BYTES_PER_S = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}


def pcie_bytes_per_s(generation: int | None, width: int | None) -> float | None:
    """The host link's peak, one direction: lanes x the generation's rate per lane (4.0 x16: 31.5 GB/s). None when
    either is unknown or the generation is not one PCI-SIG has published."""
    rate = PCIE_LANE_BYTES_PER_S.get(generation or 0)
    return rate * width if rate and width else None


def nvml_fp16_flops(gpu: NvmlGpuReading) -> float | None:
    """Dense FP16 tensor FLOPS: SMs x boost clock x the architecture's FLOPs per SM per clock; None when any is
    unknown (an architecture not in the table is not guessed)."""
    cc = gpu.compute_capability
    per_clock = FP16_TENSOR_FLOPS_PER_SM_CLOCK.get(cc or "")
    sms = gpu.multiprocessor_count
    if not sms and gpu.gpu_cores and cc in CUDA_CORES_PER_SM:
        sms = gpu.gpu_cores // CUDA_CORES_PER_SM[cc]
    if not per_clock or not sms or not gpu.boost_sm_clock_mhz:
        return None
    return sms * gpu.boost_sm_clock_mhz * 1e6 * per_clock


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
    _read_speed(nvml, handle, gpu, failures)
    return gpu


def _read_speed(nvml: Any, handle: Any, gpu: NvmlGpuReading, failures: tuple[type[Exception], ...]) -> None:
    # Each figure on its own: a driver that declines one (NotSupported) leaves only that one unknown.
    with contextlib.suppress(*failures):
        gpu.max_memory_clock_mhz = int(nvml.nvmlDeviceGetMaxClockInfo(handle, NVML_CLOCK_MEM)) or None
    with contextlib.suppress(*failures):
        gpu.memory_bus_width_bits = int(nvml.nvmlDeviceGetMemoryBusWidth(handle)) or None
    # The boost clock is what spec sheets' TFLOPS use; the maximum SM clock (the top of the V/F curve, ~20% above
    # boost on GeForce) only where the driver gives no boost clock.
    with contextlib.suppress(*failures):
        clock = nvml.nvmlDeviceGetClock(handle, NVML_CLOCK_SM, NVML_CLOCK_ID_CUSTOMER_BOOST_MAX)
        gpu.boost_sm_clock_mhz = int(clock) or None
    if gpu.boost_sm_clock_mhz is None:
        with contextlib.suppress(*failures):
            gpu.boost_sm_clock_mhz = int(nvml.nvmlDeviceGetMaxClockInfo(handle, NVML_CLOCK_SM)) or None
    with contextlib.suppress(*failures):  # documented for MIG handles; some drivers answer for a whole GPU too
        gpu.multiprocessor_count = int(nvml.nvmlDeviceGetAttributes_v2(handle).multiprocessorCount) or None
    with contextlib.suppress(*failures):
        gpu.gpu_cores = int(nvml.nvmlDeviceGetNumGpuCores(handle)) or None
    with contextlib.suppress(*failures):
        gpu.pcie_generation = int(nvml.nvmlDeviceGetMaxPcieLinkGeneration(handle)) or None
    with contextlib.suppress(*failures):
        gpu.pcie_width = int(nvml.nvmlDeviceGetMaxPcieLinkWidth(handle)) or None


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
        # a unified GPU reads host RAM: NVML's clock and bus say nothing about that (a table names it)
        memory_bandwidth_bytes_per_s=None
        if unified
        else nvml_bandwidth_bytes_per_s(gpu.max_memory_clock_mhz, gpu.memory_bus_width_bits),
        fp16_flops=nvml_fp16_flops(gpu),
        host_link_bytes_per_s=None if unified else pcie_bytes_per_s(gpu.pcie_generation, gpu.pcie_width),
        memory_bus_width_bits=None if unified else gpu.memory_bus_width_bits,
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
