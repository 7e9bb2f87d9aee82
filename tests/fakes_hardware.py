"""Faithful fakes for the hardware boundary: NVML, an amdgpu sysfs tree, captured macOS command output.

FakeNvml offers exactly the pynvml functions launcher.hardware.nvml calls, returns the real pynvml
ctypes structures (filled in) and raises the real pynvml.NVMLError subclasses, including
NVMLError_Uninitialized when called before nvmlInit, as libnvidia-ml does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pynvml

from launcher.units import GiB, KiB, MiB


@dataclass
class FakeGpu:
    """One GPU as NVML would describe it. `used_bytes` is v2's used (allocations + reserved)."""

    name: str
    uuid: str
    pci_bus_id: str
    total_bytes: int
    used_bytes: int
    reserved_bytes: int = 256 * MiB
    compute_capability: tuple[int, int] = (8, 6)
    compute_processes: list[tuple[int, int | None]] = field(default_factory=list)
    graphics_processes: list[tuple[int, int | None]] = field(default_factory=list)
    memory_error: type[pynvml.NVMLError] | None = None  # raised by both memory calls
    memory_v2_error: type[pynvml.NVMLError] | None = None  # raised by the v2 call only (old driver)
    processes_error: type[pynvml.NVMLError] | None = None
    # Speed figures; None: the driver answers NVMLError_NotSupported, as it does for parts that lack one.
    max_memory_clock_mhz: int | None = None
    memory_bus_width_bits: int | None = None
    boost_sm_clock_mhz: int | None = None  # nvmlDeviceGetClock(SM, CUSTOMER_BOOST_MAX)
    max_sm_clock_mhz: int | None = None
    multiprocessor_count: int | None = None  # nvmlDeviceGetAttributes_v2 (answered for MIG handles on most drivers)
    gpu_cores: int | None = None
    pcie_generation: int | None = None  # nvmlDeviceGetMaxPcieLinkGeneration (the GPU and its slot)
    pcie_width: int | None = None  # nvmlDeviceGetMaxPcieLinkWidth


def _supported(value: int | None) -> int:
    if value is None:
        raise pynvml.NVMLError_NotSupported()
    return value


class _Handle:
    def __init__(self, index: int) -> None:
        self.index = index


class FakeNvml:
    """Stands in for the pynvml module. `init_error` is raised by nvmlInit (no driver, no library)."""

    def __init__(
        self,
        gpus: Sequence[FakeGpu] = (),
        *,
        init_error: type[pynvml.NVMLError] | None = None,
        driver_version: str = "550.54.15",
        process_names: dict[int, str] | None = None,
    ) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.driver_version = driver_version
        self.process_names = process_names or {}
        self.initialized = False
        self.calls: list[str] = []

    def _check(self, name: str) -> None:
        self.calls.append(name)
        if not self.initialized:
            raise pynvml.NVMLError_Uninitialized()

    def _gpu(self, handle: _Handle) -> FakeGpu:
        return self.gpus[handle.index]

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_error is not None:
            raise self.init_error()
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self._check("nvmlShutdown")
        self.initialized = False

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check("nvmlSystemGetDriverVersion")
        return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._check("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError_InvalidArgument()
        return _Handle(index)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        self._check("nvmlDeviceGetName")
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        self._check("nvmlDeviceGetUUID")
        return self._gpu(handle).uuid

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> pynvml.nvmlPciInfo_t:
        self._check("nvmlDeviceGetPciInfo")
        info = pynvml.nvmlPciInfo_t()
        info.busId = self._gpu(handle).pci_bus_id.encode()  # a char array: pynvml hands back bytes
        return info

    def nvmlDeviceGetCudaComputeCapability(self, handle: _Handle) -> tuple[int, int]:
        self._check("nvmlDeviceGetCudaComputeCapability")
        return self._gpu(handle).compute_capability

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None):
        self._check("nvmlDeviceGetMemoryInfo")
        gpu = self._gpu(handle)
        if gpu.memory_error is not None:
            raise gpu.memory_error()
        free = gpu.total_bytes - gpu.used_bytes
        if version:
            if gpu.memory_v2_error is not None:
                raise gpu.memory_v2_error()
            assert version == pynvml.nvmlMemory_v2
            memory = pynvml.c_nvmlMemory_v2_t()
            memory.version = version
            memory.total, memory.reserved = gpu.total_bytes, gpu.reserved_bytes
            memory.free, memory.used = free, gpu.used_bytes
            return memory
        memory = pynvml.c_nvmlMemory_t()
        # v1's used leaves the driver's reserve out; free is the same number.
        memory.total, memory.free, memory.used = gpu.total_bytes, free, gpu.used_bytes - gpu.reserved_bytes
        return memory

    def nvmlDeviceGetMaxClockInfo(self, handle: _Handle, clock_type: int) -> int:
        self._check("nvmlDeviceGetMaxClockInfo")
        gpu = self._gpu(handle)
        if clock_type == pynvml.NVML_CLOCK_MEM:
            return _supported(gpu.max_memory_clock_mhz)
        if clock_type == pynvml.NVML_CLOCK_SM:
            return _supported(gpu.max_sm_clock_mhz)
        raise pynvml.NVMLError_InvalidArgument()

    def nvmlDeviceGetClock(self, handle: _Handle, clock_type: int, clock_id: int) -> int:
        self._check("nvmlDeviceGetClock")
        gpu = self._gpu(handle)
        if clock_type == pynvml.NVML_CLOCK_SM and clock_id == pynvml.NVML_CLOCK_ID_CUSTOMER_BOOST_MAX:
            return _supported(gpu.boost_sm_clock_mhz)
        raise pynvml.NVMLError_NotSupported()

    def nvmlDeviceGetMemoryBusWidth(self, handle: _Handle) -> int:
        self._check("nvmlDeviceGetMemoryBusWidth")
        return _supported(self._gpu(handle).memory_bus_width_bits)

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: _Handle) -> int:
        self._check("nvmlDeviceGetMaxPcieLinkGeneration")
        return _supported(self._gpu(handle).pcie_generation)

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: _Handle) -> int:
        self._check("nvmlDeviceGetMaxPcieLinkWidth")
        return _supported(self._gpu(handle).pcie_width)

    def nvmlDeviceGetAttributes_v2(self, handle: _Handle) -> pynvml.c_nvmlDeviceAttributes:
        self._check("nvmlDeviceGetAttributes_v2")
        attributes = pynvml.c_nvmlDeviceAttributes()
        attributes.multiprocessorCount = _supported(self._gpu(handle).multiprocessor_count)
        return attributes

    def nvmlDeviceGetNumGpuCores(self, handle: _Handle) -> int:
        self._check("nvmlDeviceGetNumGpuCores")
        return _supported(self._gpu(handle).gpu_cores)

    def _processes(self, handle: _Handle, which: str) -> list[pynvml.nvmlFriendlyObject]:
        self._check(which)
        gpu = self._gpu(handle)
        if gpu.processes_error is not None:
            raise gpu.processes_error()
        entries = gpu.compute_processes if "Compute" in which else gpu.graphics_processes
        result = []
        for pid, used in entries:
            info = pynvml.c_nvmlProcessInfo_v3_t()
            info.pid = pid
            info.usedGpuMemory = pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value if used is None else used
            friendly = pynvml.nvmlStructToFriendlyObject(info)
            if friendly.usedGpuMemory == pynvml.NVML_VALUE_NOT_AVAILABLE_ulonglong.value:
                friendly.usedGpuMemory = None  # what pynvml does for Windows WDDM
            result.append(friendly)
        return result

    def nvmlDeviceGetComputeRunningProcesses(self, handle: _Handle) -> list[pynvml.nvmlFriendlyObject]:
        return self._processes(handle, "nvmlDeviceGetComputeRunningProcesses")

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: _Handle) -> list[pynvml.nvmlFriendlyObject]:
        return self._processes(handle, "nvmlDeviceGetGraphicsRunningProcesses")

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        self._check("nvmlSystemGetProcessName")
        if pid not in self.process_names:
            raise pynvml.NVMLError_NotFound()
        return self.process_names[pid]


RTX_3090 = dict(
    name="NVIDIA GeForce RTX 3090",
    uuid="GPU-5c7e1a2b-0000-4a4a-9d9d-000000003090",
    pci_bus_id="00000000:01:00.0",
    total_bytes=24 * GiB,
)
RTX_3060 = dict(
    name="NVIDIA GeForce RTX 3060",
    uuid="GPU-9f00aa11-1111-4b4b-8e8e-000000003060",
    pci_bus_id="00000000:02:00.0",
    total_bytes=12 * GiB,
)


def write_meminfo(root: Path, *, total_bytes: int, available_bytes: int) -> Path:
    """A /proc lookalike with meminfo and cpuinfo, as the kernel formats them (kB = KiB)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meminfo").write_text(
        f"MemTotal:       {total_bytes // KiB} kB\n"
        f"MemFree:        {available_bytes // KiB // 2} kB\n"
        f"MemAvailable:   {available_bytes // KiB} kB\n"
        "Buffers:          102400 kB\n"
        "HugePages_Total:       0\n"
    )
    (root / "cpuinfo").write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 116\n"
        "model name\t: AMD Ryzen 7 7840U w/ Radeon  780M Graphics\n\n"
    )
    return root


@dataclass
class FakeAmdGpu:
    """One amdgpu device: its KFD node properties and its DRM files."""

    gfx_target_version: int
    device_id: int
    render_minor: int
    pci_slot: str
    vram_total_bytes: int
    vram_used_bytes: int
    gtt_total_bytes: int
    gtt_used_bytes: int
    unique_id: int = 0
    product_name: str | None = None
    cpu_cores_count: int = 0
    revision: int | None = None  # the PCI revision file (0xc8): with device_id, the product in amdgpu.ids


def write_amd_sysfs(root: Path, gpus: Sequence[FakeAmdGpu], *, cpu_nodes: int = 1) -> Path:
    """A /sys lookalike laid out like amdgpu's: KFD topology nodes (CPUs first) and DRM render devices.

    As on a real system, class/drm/renderD<N>/device is a symlink to the PCI device directory.
    """
    nodes = root / "class/kfd/kfd/topology/nodes"
    for node in range(cpu_nodes):
        (nodes / str(node)).mkdir(parents=True)
        (nodes / str(node) / "properties").write_text(
            "cpu_cores_count 16\nsimd_count 0\nmem_banks_count 1\ncaches_count 0\nio_links_count 1\n"
            "cpu_core_id_base 0\nsimd_id_base 0\nmax_waves_per_simd 0\nlds_size_in_kb 0\ngds_size_in_kb 0\n"
            "num_gws 0\nwave_front_size 0\narray_count 0\nsimd_arrays_per_engine 0\ncu_per_simd_array 0\n"
            "simd_per_cu 0\nmax_slots_scratch_cu 0\ngfx_target_version 0\nvendor_id 0\ndevice_id 0\n"
            "location_id 0\ndomain 0\ndrm_render_minor 0\nhive_id 0\nnum_sdma_engines 0\n"
            "num_sdma_xgmi_engines 0\nnum_sdma_queues_per_engine 0\nnum_cp_queues 0\nmax_engine_clk_ccompute 3800\n"
        )
    for offset, gpu in enumerate(gpus):
        node = nodes / str(cpu_nodes + offset)
        node.mkdir(parents=True)
        (node / "name").write_text(f"gfx{gpu.gfx_target_version}\n")
        (node / "properties").write_text(
            f"cpu_cores_count {gpu.cpu_cores_count}\nsimd_count 24\nmem_banks_count 1\n"
            f"gfx_target_version {gpu.gfx_target_version}\nvendor_id 4098\ndevice_id {gpu.device_id}\n"
            f"location_id {0xC500 + offset}\ndomain 0\ndrm_render_minor {gpu.render_minor}\n"
            f"hive_id 0\nunique_id {gpu.unique_id}\nmax_engine_clk_fcompute 2700\nlocal_mem_size 0\n"
        )
        pci = root / "devices/pci0000:00" / gpu.pci_slot
        pci.mkdir(parents=True)
        files = {
            "vendor": "0x1002",
            "device": f"0x{gpu.device_id:04x}",
            "uevent": f"DRIVER=amdgpu\nPCI_CLASS=30000\nPCI_ID=1002:{gpu.device_id:04X}\n"
            f"PCI_SLOT_NAME={gpu.pci_slot}\nMODALIAS=pci:v00001002d0000{gpu.device_id:04X}",
            "mem_info_vram_total": str(gpu.vram_total_bytes),
            "mem_info_vram_used": str(gpu.vram_used_bytes),
            "mem_info_vis_vram_total": str(gpu.vram_total_bytes),
            "mem_info_gtt_total": str(gpu.gtt_total_bytes),
            "mem_info_gtt_used": str(gpu.gtt_used_bytes),
        }
        if gpu.product_name is not None:
            files["product_name"] = gpu.product_name
        if gpu.revision is not None:
            files["revision"] = f"0x{gpu.revision:02x}"
        for name, text in files.items():
            (pci / name).write_text(text + "\n")
        render = root / "class/drm" / f"renderD{gpu.render_minor}"
        render.mkdir(parents=True)
        (render / "device").symlink_to(pci)
    return root


# libdrm's amdgpu.ids, its head and an excerpt as mesa/drm ships it (data/amdgpu.ids): one tab after each comma,
# though a few lines use spaces; 744C is one chip sold as the RX 7900 XTX, XT and GRE, told apart by the revision
AMDGPU_IDS = """\
# List of AMDGPU IDs
#
# Syntax:
# device_id,\trevision_id,\tproduct_name        <-- single tab after comma

1.0.0
73BF,\tC0,\tAMD Radeon RX 6900 XT
73BF,\tC1,\tAMD Radeon RX 6800 XT
73BF,\tC3,\tAMD Radeon RX 6800
743F,\tC3,\tAMD Radeon RX 6500
743F,\tC3,\tAMD Radeon RX 6500M
744C,\tC8,\tAMD Radeon RX 7900 XTX
744C,\tCC,\tAMD Radeon RX 7900 XT
744C,\tCE,\tAMD Radeon RX 7900 GRE
744C,\tCF,\tAMD Radeon RX 7900M
7481,   C7,     AMD Steam Machine
7480,\tCF,\tAMD Radeon RX 7600
"""

# `sysctl hw.memsize iogpu.wired_limit_mb machdep.cpu.brand_string hw.physicalcpu hw.logicalcpu
# hw.optional.arm64` and `vm_stat` as captured on a 32 GiB M2 Max (macOS 14).
SYSCTL_M2_MAX_32GIB = """\
hw.memsize: 34359738368
iogpu.wired_limit_mb: 0
machdep.cpu.brand_string: Apple M2 Max
hw.physicalcpu: 12
hw.logicalcpu: 12
hw.optional.arm64: 1
"""

VM_STAT_M2_MAX = """\
Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               262144.
Pages active:                             655360.
Pages inactive:                           524288.
Pages speculative:                         65536.
Pages throttled:                               0.
Pages wired down:                         327680.
Pages purgeable:                           32768.
"Translation faults":                  123456789.
Pages copy-on-write:                     2345678.
Pages zero filled:                      34567890.
Pages reactivated:                        456789.
Pages purged:                              56789.
File-backed pages:                        458752.
Anonymous pages:                          786432.
Pages stored in compressor:               131072.
Pages occupied by compressor:              65536.
Decompressions:                           234567.
Compressions:                             345678.
Pageins:                                 4567890.
Pageouts:                                  12345.
Swapins:                                       0.
Swapouts:                                      0.
"""

# `ioreg -r -d 1 -w 0 -c AGXAccelerator` on the same 38-core M2 Max: the accelerator's entry, its properties one per
# line (trimmed: the real entry holds about 40, among them these)
IOREG_M2_MAX = """\
+-o AGXAcceleratorG14X  <class AGXAcceleratorG14X, id 0x1000003d6, registered, matched, active, busy 0 (1 ms), retain 20>
    {
      "IOMatchedAtBoot" = Yes
      "IOClass" = "AGXAcceleratorG14X"
      "PerformanceStatistics" = {"In use system memory (driver)"=0,"Alloc system memory"=2181693440,"Tiler Utilization %"=0,"Renderer Utilization %"=0,"Device Utilization %"=0,"In use system memory"=356089856}
      "model" = "Apple M2 Max"
      "gpu-core-count" = 38
      "IOGLBundleName" = "AppleMetalOpenGLRenderer"
    }

"""

# An Intel Mac has no hw.optional.arm64 = 1 and no iogpu sysctl: sysctl prints the keys it knows on
# stdout and "sysctl: unknown oid 'iogpu.wired_limit_mb'" on stderr.
SYSCTL_INTEL_MAC = """\
hw.memsize: 17179869184
machdep.cpu.brand_string: Intel(R) Core(TM) i7-9750H CPU @ 2.60GHz
hw.physicalcpu: 6
hw.logicalcpu: 12
hw.optional.arm64: 0
"""


def fake_run(outputs: dict[str, str]) -> Callable[[Sequence[str]], str]:
    """A `run` seam answering each command (by its program name) with captured stdout."""

    def run(argv: Sequence[str]) -> str:
        if argv[0] not in outputs:
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        return outputs[argv[0]]

    return run
