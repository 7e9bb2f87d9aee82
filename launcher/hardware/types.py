"""The hardware stage's data: devices, the host, and a snapshot of both. Bytes everywhere; None = unknown."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Version of the `HardwareSnapshot.to_json()` shape (and of `fitquant hw --json`).
SCHEMA_VERSION = 1

DeviceKind = Literal["cuda", "rocm", "metal", "rpc", "cpu"]  # rpc: a llama.cpp RPC server's device (RPC0, ...)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GpuProcess(_Frozen):
    """A process holding memory on a GPU, as the driver reports it."""

    pid: int
    name: str | None = None
    used_bytes: int | None = Field(default=None, ge=0)


class Device(_Frozen):
    """One GPU as a runtime would see it.

    `index` is the device's number as CUDA/HIP/Metal would give it after CUDA_VISIBLE_DEVICES /
    HIP_VISIBLE_DEVICES are applied (what llama.cpp calls CUDA0, ROCm1, ...); `system_index` is the
    driver's own number (NVML index, n-th KFD GPU node), unaffected by those variables.
    `unified` means the memory is shared with the CPU (Apple, AMD APU GTT, NVIDIA GB10/Jetson): then
    `free_bytes` and the host's `ram_available_bytes` are the same pool and must never be added.
    `integrated` means the GPU has no memory of its own worth the name (an APU or SoC GPU).
    `compute_capability` is "8.6" for CUDA and the gfx target ("gfx1103") for ROCm.
    `processes` is None when the platform does not say, an empty tuple when it says "none".
    `memory_bandwidth_bytes_per_s` (peak) and `fp16_flops` (dense FP16 tensor) are the device's own speed figures
    (NVML's clocks and bus, or a profile's `bandwidth` / `flops`); None: not known, a table by name may know them.
    `host_link_bytes_per_s` is its PCIe link to the host, one direction (NVML's generation x width).
    """

    kind: DeviceKind
    index: int = Field(ge=0)
    system_index: int | None = Field(default=None, ge=0)
    name: str
    uuid: str | None = None
    pci_bus_id: str | None = None
    total_bytes: int | None = Field(default=None, ge=0)
    free_bytes: int | None = Field(default=None, ge=0)
    used_bytes: int | None = Field(default=None, ge=0)
    unified: bool = False
    integrated: bool = False
    compute_capability: str | None = None
    driver: str | None = None
    processes: tuple[GpuProcess, ...] | None = None
    memory_bandwidth_bytes_per_s: float | None = Field(default=None, gt=0)
    fp16_flops: float | None = Field(default=None, gt=0)
    host_link_bytes_per_s: float | None = Field(default=None, gt=0)  # PCIe to the host, one direction (NVML)
    memory_bus_width_bits: int | None = Field(default=None, gt=0)  # NVML's: HBM is 1024 bits a stack, GDDR <= 512

    @model_validator(mode="after")
    def _free_within_total(self) -> Device:
        if self.total_bytes is not None and self.free_bytes is not None and self.free_bytes > self.total_bytes:
            raise ValueError(f"free_bytes {self.free_bytes} exceeds total_bytes {self.total_bytes}")
        return self


class CpuInfo(_Frozen):
    """The host CPU: model name and core counts (None where the OS does not say)."""

    model: str | None = None
    physical_cores: int | None = Field(default=None, ge=1)
    logical_cores: int | None = Field(default=None, ge=1)


class OllamaServer(_Frozen):
    """An Ollama server that answered `GET /api/version`."""

    url: str
    version: str | None = None


class BackendSupport(_Frozen):
    """What the runtimes on this machine can do; None = not installed / not answering / not probed."""

    llama_cpp_gpu_offload: bool | None = None
    ollama: OllamaServer | None = None


class HardwareSnapshot(_Frozen):
    """Everything the planner needs to know about a machine, detected or described.

    `devices` holds GPUs only, one entry per GPU, never summed; a CPU-only machine has none.
    `described` is True when the snapshot comes from `describe_machine` (numbers a user gave)
    rather than from probing this computer. `notes` explain fallbacks and oddities, one line each.
    `host_bandwidth_bytes_per_s` is the host memory's bandwidth where a person gave it (a profile's cpu device);
    None: measured on this computer when needed (launcher.speed), unknown for a described one. `host_flops` is the
    host's FP32 FLOPS the same way.
    """

    devices: tuple[Device, ...] = ()
    ram_total_bytes: int | None = Field(default=None, ge=0)
    ram_available_bytes: int | None = Field(default=None, ge=0)
    cpu: CpuInfo = CpuInfo()
    notes: tuple[str, ...] = ()
    described: bool = False
    backends: BackendSupport | None = None
    host_bandwidth_bytes_per_s: float | None = Field(default=None, gt=0)
    host_flops: float | None = Field(default=None, gt=0)

    def to_json(self) -> dict[str, Any]:
        """The documented JSON form (`fitquant hw --json`), with `schema_version`."""
        backends = self.backends or BackendSupport()
        return {
            "schema_version": SCHEMA_VERSION,
            "described": self.described,
            "devices": [device.model_dump(mode="json") for device in self.devices],
            "ram_total_bytes": self.ram_total_bytes,
            "ram_available_bytes": self.ram_available_bytes,
            "cpu": self.cpu.model_dump(mode="json"),
            "backends": backends.model_dump(mode="json"),
            "notes": list(self.notes),
        }
