"""Apple Silicon: one Metal GPU sharing unified memory with the CPU, read through `sysctl`, `vm_stat` and `ioreg`.

llama.cpp's Metal backend sizes the GPU as `MTLDevice.recommendedMaxWorkingSetSize` and Ollama uses the
same value (backends.md 8.3). Without pyobjc we cannot ask Metal, so the working set is:

- `iogpu.wired_limit_mb` when it is set (non-zero): `sudo sysctl iogpu.wired_limit_mb=<MiB>` raises the
  limit and recommendedMaxWorkingSetSize follows it;
- otherwise macOS's default, estimated from `hw.memsize` by `default_working_set_bytes`.

Free memory for the GPU is that working set, capped by what the host can give now (`vm_stat`: free +
inactive + speculative pages), because it is the same RAM. The snapshot's RAM is the same pool again:
the planner must never add the Metal device's memory to host RAM.

The GPU is named by its chip and its GPU bin, "Apple M3 Max (40-core GPU)", as the speed table lists Apple's chips:
the bins of one chip differ in FLOPS and, for some (M3 Max 300 vs 400 GB/s, M4 Max 410 vs 546), in bandwidth. The
core count is the accelerator's `gpu-core-count` in the IO registry (`ioreg -r -d 1 -c AGXAccelerator`); no sysctl
holds it. Without it the GPU is named by its chip alone, which the table does not take for a bin, so its plans predict
no speed rather than guess one.

`parse_sysctl`, `parse_vm_stat` and `parse_gpu_cores` are pure parsers of captured output; `read_apple(run)` is the
probe.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from launcher.hardware.types import CpuInfo, Device
from launcher.units import GiB, MiB, format_bytes

Runner = Callable[[Sequence[str]], str]

SYSCTL_KEYS = (
    "hw.memsize",
    "iogpu.wired_limit_mb",
    "machdep.cpu.brand_string",
    "hw.physicalcpu",
    "hw.logicalcpu",
    "hw.optional.arm64",
)

IOREG_ARGV = ("ioreg", "-r", "-d", "1", "-w", "0", "-c", "AGXAccelerator")  # the GPU's IO registry entry, one level
_GPU_CORES = re.compile(r'^[\s|]*"gpu-core-count" = (\d{1,6})\s*$', re.MULTILINE)
MAX_GPU_CORES = 1024  # an M3 Ultra has 80; a larger count is not a reading to name a chip by

# macOS's default GPU working set as a fraction of RAM, at the two sizes backends.md 8.3 records:
# 11.84 GiB of 16 GiB (74 %) and 107.52 GiB of 128 GiB (84 %), as measured by antirez/ds4 PR #893 and
# AlexsJones/llmfit PR #754 from recommendedMaxWorkingSetSize. Between them the fraction is interpolated
# linearly in RAM size; outside them it is held at the nearer end. It is an estimate: the note says so.
_DEFAULT_WORKING_SET = ((16 * GiB, 0.74), (128 * GiB, 0.84))


def default_working_set_bytes(memsize_bytes: int) -> int:
    """Estimated default recommendedMaxWorkingSetSize for a Mac with this much RAM (see the table above)."""
    (low, low_fraction), (high, high_fraction) = _DEFAULT_WORKING_SET
    if memsize_bytes <= low:
        fraction = low_fraction
    elif memsize_bytes >= high:
        fraction = high_fraction
    else:
        fraction = low_fraction + (high_fraction - low_fraction) * (memsize_bytes - low) / (high - low)
    return int(memsize_bytes * fraction)


def run_command(argv: Sequence[str]) -> str:
    """Run a command and return its stdout, even on a non-zero exit (sysctl still prints the keys it knows).

    Raises OSError when the command cannot start and subprocess.TimeoutExpired after 5 s.
    """
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=5, check=False).stdout


@dataclass
class AppleReading:
    """Captured output of `sysctl <SYSCTL_KEYS>`, `vm_stat` and `ioreg` (IOREG_ARGV); errors say what could not run."""

    sysctl: str | None = None
    vm_stat: str | None = None
    ioreg: str | None = None
    errors: list[str] = field(default_factory=list)


def read_apple(run: Runner | None = None) -> AppleReading:
    """Run sysctl, vm_stat and ioreg (through `run`, for tests) and keep their output."""
    run = run or run_command
    reading = AppleReading()
    for attribute, argv in (
        ("sysctl", ["sysctl", *SYSCTL_KEYS]),
        ("vm_stat", ["vm_stat"]),
        ("ioreg", list(IOREG_ARGV)),
    ):
        try:
            setattr(reading, attribute, run(argv))
        except (OSError, subprocess.SubprocessError) as exc:
            reading.errors.append(f"{argv[0]}: {type(exc).__name__}: {exc}")
    return reading


def parse_sysctl(text: str) -> dict[str, str]:
    """`sysctl name...` output ('hw.memsize: 34359738368' lines) -> {name: value}."""
    values = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        name = name.strip()
        if sep and "." in name and " " not in name:  # "sysctl: unknown oid ..." is not a value
            values[name] = value.strip()
    return values


def parse_vm_stat(text: str) -> int | None:
    """Bytes the host can hand out now, from `vm_stat`: (free + inactive + speculative pages) x page size."""
    page_size = None
    pages: dict[str, int] = {}
    for line in text.splitlines():
        if "page size of" in line:
            words = line.split("page size of", 1)[1].split()
            page_size = int(words[0]) if words and words[0].isdigit() else None
            continue
        name, _, value = line.partition(":")
        value = value.strip().rstrip(".")
        if value.isdigit():
            pages[name.strip().strip('"')] = int(value)
    if page_size is None or "Pages free" not in pages:
        return None
    count = sum(pages.get(name, 0) for name in ("Pages free", "Pages inactive", "Pages speculative"))
    return count * page_size


def parse_gpu_cores(text: str) -> int | None:
    """The GPU's core count from `ioreg -r -d 1 -c AGXAccelerator` ('"gpu-core-count" = 40'), None when absent or
    not a count a chip has (0, or past MAX_GPU_CORES)."""
    match = _GPU_CORES.search(text)
    cores = int(match.group(1)) if match else 0
    return cores if 0 < cores <= MAX_GPU_CORES else None


@dataclass
class AppleMachine:
    """What an Apple reading means: the Metal device (if Apple Silicon), host RAM and CPU, notes."""

    devices: list[Device]
    ram_total_bytes: int | None
    ram_available_bytes: int | None
    cpu: CpuInfo
    notes: list[str]


def apple_machine(reading: AppleReading) -> AppleMachine:
    """Interpret captured sysctl/vm_stat output (pure)."""
    values = parse_sysctl(reading.sysctl or "")
    notes = list(reading.errors)
    memsize = _int(values.get("hw.memsize"))
    available = parse_vm_stat(reading.vm_stat) if reading.vm_stat else None
    model = values.get("machdep.cpu.brand_string") or None
    cpu = CpuInfo(
        model=model,
        physical_cores=_int(values.get("hw.physicalcpu")) or None,
        logical_cores=_int(values.get("hw.logicalcpu")) or None,
    )
    devices = []
    if values.get("hw.optional.arm64") != "1":
        notes.append("not an Apple Silicon Mac (hw.optional.arm64 is not 1); no Metal GPU is planned for")
    elif memsize is None:
        notes.append("sysctl did not report hw.memsize; the Metal GPU's size is unknown")
    else:
        working_set, note = metal_working_set(memsize, _int(values.get("iogpu.wired_limit_mb")))
        notes.append(note)
        free = working_set if available is None else min(working_set, available)
        cores = parse_gpu_cores(reading.ioreg or "")
        name = model or "Apple GPU"
        if cores is not None:
            name = f"{name} ({cores}-core GPU)"
        else:
            notes.append(f"ioreg gave no GPU core count (`{' '.join(IOREG_ARGV)}`): the GPU is named {name!r}, "
                         "without its bin, and its plans predict no speed")  # fmt: skip
        devices.append(
            Device(
                kind="metal",
                index=0,
                system_index=0,
                name=name,
                total_bytes=working_set,
                free_bytes=free,
                unified=True,
                integrated=True,
            )
        )
    return AppleMachine(devices, memsize, available, cpu, notes)


def metal_working_set(memsize_bytes: int, wired_limit_mb: int | None) -> tuple[int, str]:
    """The Metal GPU's budget and a note on where it came from."""
    if wired_limit_mb:
        working_set = min(wired_limit_mb * MiB, memsize_bytes)
        return working_set, (
            f"Metal working set {format_bytes(working_set)} of {format_bytes(memsize_bytes)} unified memory, "
            f"from iogpu.wired_limit_mb={wired_limit_mb}"
        )
    working_set = default_working_set_bytes(memsize_bytes)
    return working_set, (
        f"Metal working set estimated at {format_bytes(working_set)} of {format_bytes(memsize_bytes)} "
        "unified memory (macOS default); `sudo sysctl iogpu.wired_limit_mb=<MiB>` raises it"
    )


def _int(text: str | None) -> int | None:
    return int(text) if text and text.strip().isdigit() else None


ARM_FEATURE_KEYS = {"hw.optional.arm.FEAT_DotProd": "asimddp", "hw.optional.arm.FEAT_I8MM": "i8mm"}


def arm_features(run: Runner | None = None) -> frozenset[str]:
    """The Apple CPU's dot-product and int8-matmul features, named as Linux names them (asimddp, i8mm)."""
    text = (run or run_command)(["sysctl", *ARM_FEATURE_KEYS])
    values = parse_sysctl(text)
    return frozenset(flag for key, flag in ARM_FEATURE_KEYS.items() if values.get(key, "").strip() == "1")
