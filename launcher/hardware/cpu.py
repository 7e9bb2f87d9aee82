"""The host: RAM total and available, CPU model, physical and logical cores.

On Linux RAM comes from `<proc_root>/meminfo` (MemTotal, MemAvailable: the kernel's own estimate of
what can be allocated without swapping) and the CPU model from `<proc_root>/cpuinfo`; elsewhere, and
for core counts everywhere, from psutil. Apple machines get theirs from sysctl in `apple.py`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from launcher.hardware.types import CpuInfo
from launcher.units import KiB


@dataclass(frozen=True)
class HostReading:
    """Raw host readings; None where the source did not say."""

    ram_total_bytes: int | None
    ram_available_bytes: int | None
    ram_source: str
    cpu_model: str | None
    physical_cores: int | None
    logical_cores: int | None

    @property
    def cpu(self) -> CpuInfo:
        return CpuInfo(model=self.cpu_model, physical_cores=self.physical_cores, logical_cores=self.logical_cores)


def parse_meminfo(text: str) -> dict[str, int]:
    """`/proc/meminfo` as bytes per field ('MemTotal: 24684084 kB' -> {'MemTotal': 25276502016})."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        scale = KiB if len(parts) > 1 and parts[1].lower() == "kb" else 1
        fields[name.strip()] = int(parts[0]) * scale
    return fields


def available_from_meminfo(fields: dict[str, int]) -> int | None:
    """MemAvailable, or on kernels older than 3.14 the classic MemFree + Buffers + Cached."""
    if "MemAvailable" in fields:
        return fields["MemAvailable"]
    if "MemFree" in fields:
        return fields["MemFree"] + fields.get("Buffers", 0) + fields.get("Cached", 0)
    return None


def parse_cpu_model(text: str) -> str | None:
    """The CPU model from `/proc/cpuinfo`: x86 'model name', else ARM boards' 'Model' or 'Hardware'."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if sep and value and key not in found:
            found[key] = value
    for key in ("model name", "model", "hardware", "cpu model"):
        if key in found and not found[key].isdigit():
            return " ".join(found[key].split())
    return None


def read_host(proc_root: str | Path = "/proc") -> HostReading:
    """Read RAM and CPU facts from procfs, falling back to psutil where procfs is absent."""
    import psutil  # type: ignore[import-untyped]

    root = Path(proc_root)
    total = available = None
    source = "psutil"
    meminfo = _read_text(root / "meminfo")
    if meminfo is not None:
        fields = parse_meminfo(meminfo)
        total, available = fields.get("MemTotal"), available_from_meminfo(fields)
        source = str(root / "meminfo")
    if total is None:
        memory = psutil.virtual_memory()
        total, available, source = int(memory.total), int(memory.available), "psutil"
    cpuinfo = _read_text(root / "cpuinfo")
    model = parse_cpu_model(cpuinfo) if cpuinfo else None
    if model is None:
        import platform

        model = platform.processor() or None
    return HostReading(
        ram_total_bytes=total,
        ram_available_bytes=available,
        ram_source=source,
        cpu_model=model,
        physical_cores=psutil.cpu_count(logical=False) or None,
        logical_cores=psutil.cpu_count(logical=True) or None,
    )


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def parse_cpu_features(cpuinfo: str) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo text: x86's `flags` line, ARM's `Features` line (pure)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_features(proc_root: str = "/proc") -> tuple[frozenset[str], str]:
    """This host's CPU feature flags and machine type (`platform.machine()`): what llama.cpp's CPU backend
    decides its weight repacking by. Apple silicon has dotprod and (M2 on) i8mm: read from sysctl."""
    import platform

    machine = platform.machine()
    if platform.system() == "Darwin":
        from launcher.hardware.apple import arm_features

        return arm_features(), machine
    try:
        text = (Path(proc_root) / "cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset(), machine
    return parse_cpu_features(text), machine
