"""AMD GPUs from the amdgpu driver's sysfs, no ROCm library needed (as Ollama's discover/amd_linux.go does).

Layout read (under `sysfs_root`, normally /sys):

    class/kfd/kfd/topology/nodes/<N>/properties   "key value" lines; gfx_target_version 0 = a CPU node
    class/drm/renderD<drm_render_minor>/device/   vendor (0x1002), device, uevent (DRIVER, PCI_SLOT_NAME),
        mem_info_vram_total, mem_info_vram_used   dedicated VRAM (an APU's BIOS carve-out), bytes
        mem_info_gtt_total, mem_info_gtt_used     GTT: system RAM the GPU may map, bytes
        product_name                              marketing name, where the VBIOS has one
        revision                                  PCI revision: with the device id, which product of a chip
    module/amdgpu/version                         only with AMD's DKMS driver

A card whose VBIOS gives no product name (most consumer cards) is named from libdrm's `amdgpu.ids`, the table of
(PCI device, revision) -> marketing name that Mesa and rocm-smi name cards by ("744C, C8, AMD Radeon RX 7900 XTX":
the XTX, XT and GRE share one device id). Its name is what the speed table knows a card by; without a product
name the GPU is "AMD Radeon GPU (gfx1100, 1002:744c)", which no table entry is taken for.

GPU nodes are numbered in node order, as HIP numbers them. An APU (integrated GPU) is recognised by
its KFD node also owning CPU cores, or by the heuristic of backends.md 8.2: VRAM <= 4 GiB with GTT
>= 8 GiB and >= 4 x VRAM. Its memory is then carve-out + GTT, unified with host RAM; free GTT is
capped by the host's available RAM (GTT pages are host pages), and it is never called dedicated VRAM.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from launcher.hardware.types import Device
from launcher.hardware.visible import hip_visible
from launcher.units import GiB, format_bytes

AMD_VENDOR_ID = 0x1002
_DRM_FILES = (
    "vendor",
    "device",
    "uevent",
    "product_name",
    "revision",
    "mem_info_vram_total",
    "mem_info_vram_used",
    "mem_info_vis_vram_total",
    "mem_info_gtt_total",
    "mem_info_gtt_used",
)


@dataclass
class AmdGpuReading:
    """One KFD GPU node and the files of its DRM render device (stripped text; absent = not readable)."""

    node: int
    properties: dict[str, int]
    render_node: str | None = None
    drm: dict[str, str] = field(default_factory=dict)
    marketing_name: str | None = None  # from amdgpu.ids by (device, revision), where the card has no product_name


@dataclass
class AmdReading:
    """What sysfs said; `present` is False when there is no KFD topology (no amdgpu compute driver)."""

    present: bool = False
    driver_version: str | None = None
    cpu_nodes: int = 0
    gpus: list[AmdGpuReading] = field(default_factory=list)
    ids_file: str | None = None  # the amdgpu.ids the marketing names came from


def parse_kfd_properties(text: str) -> dict[str, int]:
    """A KFD node's `properties` file: 'gfx_target_version 110003' lines -> {name: int}."""
    properties = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            properties[parts[0]] = int(parts[1])
    return properties


def gfx_target(version: int) -> str:
    """KFD gfx_target_version (major*10000 + minor*100 + stepping) -> LLVM name.

    110003 -> gfx1103, 90010 -> gfx90a.
    """
    major, minor, stepping = version // 10000, version // 100 % 100, version % 100
    return f"gfx{major}{minor:x}{stepping:x}"


# libdrm's table, where distributions install it, then where AMD's own driver packages do
AMDGPU_IDS_FILES = ("/usr/share/libdrm/amdgpu.ids", "/opt/amdgpu/share/libdrm/amdgpu.ids")
MAX_IDS_BYTES = 1 << 20  # the file is about 40 KB; anything past a MiB is not it
MAX_NAME_CHARS = 100  # the longest name in it is under 40 characters


def parse_amdgpu_ids(text: str) -> dict[tuple[int, int], str]:
    """libdrm's amdgpu.ids ('744C,<tab>C8,<tab>AMD Radeon RX 7900 XTX' lines, '#' comments, a version line) ->
    {(device id, revision): name}; the first line for a pair wins, malformed lines are skipped, and so is a name that
    is not one printable line of at most MAX_NAME_CHARS (it becomes the GPU's name in every output) (pure)."""
    names: dict[tuple[int, int], str] = {}
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",", 2)]
        name = parts[2] if len(parts) == 3 else ""
        if line.startswith("#") or not name or not name.isprintable() or len(name) > MAX_NAME_CHARS:
            continue
        try:
            key = (int(parts[0], 16), int(parts[1], 16))
        except ValueError:
            continue
        if len(parts[0]) == 4 and len(parts[1]) == 2:
            names.setdefault(key, name)
    return names


def read_amd(sysfs_root: str | Path = "/sys", ids_files: Sequence[str | Path] = AMDGPU_IDS_FILES) -> AmdReading:
    """Read every KFD GPU node and its DRM device files; a card without a product name gets its marketing name
    from the first readable amdgpu.ids of `ids_files`."""
    root = Path(sysfs_root)
    nodes_dir = root / "class/kfd/kfd/topology/nodes"
    if not nodes_dir.is_dir():
        return AmdReading()
    reading = AmdReading(present=True, driver_version=_read(root / "module/amdgpu/version"))
    node_dirs = sorted((p for p in nodes_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    for node_dir in node_dirs:
        properties = parse_kfd_properties(_read(node_dir / "properties") or "")
        if not properties.get("gfx_target_version"):
            reading.cpu_nodes += 1
            continue
        gpu = AmdGpuReading(node=int(node_dir.name), properties=properties)
        if "drm_render_minor" in properties:
            gpu.render_node = f"renderD{properties['drm_render_minor']}"
            device_dir = root / "class/drm" / gpu.render_node / "device"
            for name in _DRM_FILES:
                text = _read(device_dir / name)
                if text is not None:
                    gpu.drm[name] = text
        reading.gpus.append(gpu)
    unnamed = [(gpu, key) for gpu in reading.gpus if not gpu.drm.get("product_name") and (key := _pci_id(gpu))]
    for path in ids_files if unnamed else ():
        text = _read_bounded(Path(path), MAX_IDS_BYTES)
        if text is None:
            continue
        names = parse_amdgpu_ids(text)
        reading.ids_file = str(path)
        for gpu, key in unnamed:
            gpu.marketing_name = names.get(key)
        break
    return reading


def _pci_id(gpu: AmdGpuReading) -> tuple[int, int] | None:
    """(device id, revision) from the DRM device files; None when either is missing."""
    device, revision = _hex(gpu.drm.get("device")), _hex(gpu.drm.get("revision"))
    return (device, revision) if device is not None and revision is not None else None


def amd_devices(
    reading: AmdReading, *, env: Mapping[str, str], ram_available_bytes: int | None = None
) -> tuple[list[Device], list[str]]:
    """The AMD GPUs HIP will see, from a sysfs reading (pure)."""
    if not reading.gpus:
        return [], []
    uuids = [_uuid(gpu) for gpu in reading.gpus]
    chosen, notes = hip_visible(env, uuids)
    devices = []
    for position, system_index in enumerate(chosen):
        gpu = reading.gpus[system_index]
        device, device_notes = _device(gpu, position, system_index, uuids[system_index], reading, ram_available_bytes)
        devices.append(device)
        notes.extend(device_notes)
    return devices, notes


def _device(
    gpu: AmdGpuReading,
    position: int,
    system_index: int,
    uuid: str | None,
    reading: AmdReading,
    ram_available_bytes: int | None,
) -> tuple[Device, list[str]]:
    drm = gpu.drm
    gfx = gfx_target(gpu.properties["gfx_target_version"])
    vendor, device_id = _hex(drm.get("vendor")), _hex(drm.get("device"))
    uevent = dict(line.partition("=")[::2] for line in drm.get("uevent", "").splitlines())
    ids = f", {vendor:04x}:{device_id:04x}" if vendor is not None and device_id is not None else ""
    name = drm.get("product_name") or gpu.marketing_name or f"AMD Radeon GPU ({gfx}{ids})"
    if name.startswith("Radeon "):  # libdrm before December 2025 named Strix Halo's GPU "Radeon 8060S Graphics"
        name = f"AMD {name}"
    vram_total, vram_used = _int(drm.get("mem_info_vram_total")), _int(drm.get("mem_info_vram_used"))
    gtt_total, gtt_used = _int(drm.get("mem_info_gtt_total")), _int(drm.get("mem_info_gtt_used"))
    notes = []
    if vendor is not None and vendor != AMD_VENDOR_ID:
        notes.append(f"KFD GPU node {gpu.node} maps to {gpu.render_node}, whose PCI vendor is {vendor:#06x}")
    integrated = gpu.properties.get("cpu_cores_count", 0) > 0 or _looks_like_apu(vram_total, gtt_total)
    total = free = used = None
    if vram_total is None:
        notes.append(
            f"AMD GPU {position} ({gfx}): cannot read its memory from "
            f"/sys/class/drm/{gpu.render_node or '?'}/device; size unknown"
        )
    elif not integrated:
        total, used = vram_total, vram_used
        free = max(vram_total - vram_used, 0) if vram_used is not None else None
    else:
        gtt_total, gtt_used = gtt_total or 0, gtt_used or 0
        total = vram_total + gtt_total
        used = (vram_used or 0) + gtt_used
        gtt_free = max(gtt_total - gtt_used, 0)
        if ram_available_bytes is not None:
            gtt_free = min(gtt_free, ram_available_bytes)
        free = min(max(vram_total - (vram_used or 0), 0) + gtt_free, total)
        notes.append(
            f"AMD GPU {position} ({name}) is integrated: {format_bytes(vram_total)} carve-out + "
            f"{format_bytes(gtt_total)} GTT shared with system RAM, not dedicated VRAM"
        )
    return (
        Device(
            kind="rocm",
            index=position,
            system_index=system_index,
            name=name,
            uuid=uuid,
            pci_bus_id=uevent.get("PCI_SLOT_NAME") or None,
            total_bytes=total,
            free_bytes=free,
            used_bytes=used,
            unified=integrated,
            integrated=integrated,
            compute_capability=gfx,
            driver=f"amdgpu {reading.driver_version}" if reading.driver_version else "amdgpu",
            processes=None,
        ),
        notes,
    )


def _looks_like_apu(vram_total: int | None, gtt_total: int | None) -> bool:
    # backends.md 8.2: a small carve-out next to a large GTT is an APU whose real memory is GTT.
    if vram_total is None or gtt_total is None:
        return False
    return vram_total <= 4 * GiB and gtt_total >= 8 * GiB and gtt_total >= 4 * vram_total


def _uuid(gpu: AmdGpuReading) -> str | None:
    # ROCr spells a GPU's UUID "GPU-" + the KFD unique_id in 16 hex digits (rocminfo's "Uuid").
    unique_id = gpu.properties.get("unique_id")
    return f"GPU-{unique_id:016x}" if unique_id else None


def _hex(text: str | None) -> int | None:
    try:
        return int(text, 16) if text else None
    except ValueError:
        return None


def _int(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _read_bounded(path: Path, limit: int) -> str | None:
    """A text file of at most `limit` bytes (no more than that is read); None when unreadable or larger."""
    try:
        with path.open("rb") as file:
            data = file.read(limit + 1)
    except OSError:
        return None
    return data.decode(errors="replace") if len(data) <= limit else None
