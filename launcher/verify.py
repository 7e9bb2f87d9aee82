"""Verify: where a loaded model really landed, from a server's log, Ollama's /api/ps, or NVML.

    placement_from_log(text, token_embd_bytes=...)   llama.cpp's load log -> Placement (pure)
    placement_from_ollama(entry, expected_ctx=...)   one /api/ps model entry -> Placement (pure)
    attach_prediction(placement, estimate.devices)   the plan's bytes beside the measured ones
    nvml_used_by_pid(pid)                            the server process's memory on each NVIDIA GPU (a probe)
    render_comparison(placement), summary_line(placement)   text for people

The verdict from a log (memory-model.md §7, §7a) reads the **last** model load (llama.cpp `--fit` probes, an
Ollama retry and a restart print earlier ones; llamalog splits them):

- `oom`: the load failed for memory (CUDA `cudaMalloc failed: out of memory`, HIP in CUDA's words or `ROCm error:
  out of memory`, Metal `Insufficient Memory (...kIOGPUCommandBufferCallbackErrorOutOfMemory)`, Vulkan
  `ErrorOutOfDeviceMemory`, `failed to allocate ... buffer`, `unable to allocate ... buffer`, Ollama's list in
  `llm/status.go`). Warnings that are not the outcome are skipped: pinned host memory that falls back to pageable
  memory, and allocation failures followed by `retrying without pipeline parallelism` or Ollama's `applying backoff`
  (the retry decides). A Metal `command buffer N failed with status 5` counts unless Metal names another cause.
- `gpu`: `offloaded N/M layers to GPU` with N == M (every repeating layer and the output layer), a GPU device holds
  the weights, and the model bytes in host buffers (CPU, CPU_Mapped, CPU_REPACK, *_Host, ...) are no more than what
  llama.cpp always keeps on the host: the input token embeddings. With `token_embd_bytes` (from the GGUF) that
  allowance is exact (+ 1 MiB + 1 %); without it the log's `n_vocab x n_embd x 2` bytes (16-bit embeddings) is an
  upper bound, and the reason says so. Without either, host weights larger than the GPU weights are a spill.
- `spill`: 0 < N < M; or N == M with more host weights than that allowance (`--cpu-moe`, `-ot exps=CPU`, weights
  that fell back to host memory).
- `cpu-only`: N == 0, or no GPU device at all (a CPU-only build prints `offloaded 49/49 layers to GPU` too).
- `incomplete`: no offload line and no error: the log ends before the model was placed.

Device names drop a bracketed suffix (`RPC0[127.0.0.1:50111]` -> `RPC0`); every host buffer is grouped into `CPU`.
GPU devices come in the order of the log's `using device` lines, else by name (CUDA0, CUDA1, ...), then `CPU`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from launcher import llamalog

if TYPE_CHECKING:
    from launcher.llamalog import LlamaLog

#: gpu: every repeating layer and the output layer on GPU devices, and the host model buffer no bigger than
#: what llama.cpp always keeps there (the input token embeddings); spill: part of the model on the CPU;
#: cpu-only: no GPU device holds anything; oom: the load failed for memory; incomplete: the log ends before
#: a verdict (no offload line, no error).
Verdict = Literal["gpu", "spill", "cpu-only", "oom", "incomplete"]

MiB = 1024**2
GiB = 1024**3
HOST_SLACK_BYTES = MiB  # allowance over the token embeddings: alignment and small input-layer tensors
HOST_SLACK_FRACTION = 0.01
EMBEDDING_BOUND_BYTES_PER_VALUE = 2  # without the GGUF: token embeddings at 16 bits, an upper bound for quantized ones


@dataclass
class DevicePlacement:
    """What one device holds, measured, with the prediction beside it when one is known."""

    name: str  # llama.cpp's device name (CUDA0, ROCm0, Metal, Vulkan0, RPC0, CPU) or Ollama's GPU/CPU split
    model_bytes: int = 0
    kv_bytes: int = 0  # KV cache plus recurrent state
    compute_bytes: int = 0
    output_bytes: int = 0
    predicted_bytes: int | None = None  # the plan's total for the matching device (GPU i <-> i-th GPU device)
    predicted: dict[str, int] = field(default_factory=dict)  # per kind: model, kv, compute, output
    nvml_used_bytes: int | None = None  # the server process's GPU memory, from NVML, when there is a GPU
    is_gpu: bool = False

    @property
    def measured_bytes(self) -> int:
        return self.model_bytes + self.kv_bytes + self.compute_bytes + self.output_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "is_gpu": self.is_gpu,
            "model_bytes": self.model_bytes,
            "kv_bytes": self.kv_bytes,
            "compute_bytes": self.compute_bytes,
            "output_bytes": self.output_bytes,
            "measured_bytes": self.measured_bytes,
            "predicted_bytes": self.predicted_bytes,
            "predicted": dict(self.predicted),
            "nvml_used_bytes": self.nvml_used_bytes,
        }


@dataclass
class Placement:
    """Where a model landed, and the verdict a person would give."""

    verdict: Verdict
    reason: str  # one line: why this verdict ("19/19 layers on RPC0; host keeps 170 MiB of token embeddings")
    layers_on_gpu: int | None = None
    layers_total: int | None = None
    devices: list[DevicePlacement] = field(default_factory=list)
    n_ctx: int | None = None  # total context granted
    n_ctx_per_slot: int | None = None  # per sequence (n_ctx_seq)
    n_slots: int | None = None
    type_k: str | None = None
    type_v: str | None = None
    flash_attn: bool | None = None
    host_model_bytes: int = 0  # model weights in host buffers (CPU, CPU_Mapped, CPU_REPACK, ...)
    host_allowed_bytes: int | None = None  # what a full offload still keeps on the host (input embeddings)
    errors: list[str] = field(default_factory=list)  # the failure lines (out of memory, failed to allocate)
    source: str = "log"  # "log" | "ollama" | "nvml"
    host_allowed_is_bound: bool = False  # host_allowed_bytes is n_vocab x n_embd x 2, not the GGUF's exact figure
    expected_ctx: int | None = None  # Ollama: the context asked for (num_ctx)
    context_mismatch: bool = False  # Ollama granted another context than expected_ctx

    @property
    def gpu_devices(self) -> list[DevicePlacement]:
        return [d for d in self.devices if d.is_gpu]

    def to_json(self) -> dict[str, Any]:
        """The `placement` object of the run JSON (docs/run.schema.json)."""
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "layers_on_gpu": self.layers_on_gpu,
            "layers_total": self.layers_total,
            "n_ctx": self.n_ctx,
            "n_ctx_per_slot": self.n_ctx_per_slot,
            "n_slots": self.n_slots,
            "type_k": self.type_k,
            "type_v": self.type_v,
            "flash_attn": self.flash_attn,
            "host_model_bytes": self.host_model_bytes,
            "host_allowed_bytes": self.host_allowed_bytes,
            "host_allowed_is_bound": self.host_allowed_is_bound,
            "devices": [d.to_json() for d in self.devices],
            "errors": list(self.errors),
            "source": self.source,
            "expected_ctx": self.expected_ctx,
            "context_mismatch": self.context_mismatch,
        }


# -- llama.cpp logs -------------------------------------------------------------------------------------------

# Ollama's OOM substrings (llm/status.go, backends.md §2) and the backends' own wordings (memory-model.md §7a).
_OOM = re.compile(
    r"out of memory|out of device memory|outofdevicememory|erroroutofmemory|vk_error_out_of_device_memory|"
    r"cudaMalloc failed|hipMalloc failed|failed to allocate|unable to allocate|allocation failed|"
    r"memory allocation of size \d+ failed|allocating [\d.]+ MiB .*failed|not enough memory|insufficient memory|"
    r"unable to load full model on GPU|command buffer \d+ failed with status 5",
    re.IGNORECASE,
)
# Lines that match _OOM but are not the outcome of the load.
_OOM_WARNING = re.compile(r"pinned memory", re.IGNORECASE)
# After these, llama.cpp (or Ollama) tries again: the allocation failures before them did not decide the load.
_OOM_RETRY = re.compile(r"retrying without pipeline parallelism|applying backoff", re.IGNORECASE)
_METAL_STATUS = re.compile(r"command buffer \d+ failed with status 5", re.IGNORECASE)
_METAL_CAUSE = re.compile(r"kIO\w*CommandBufferCallbackError(?P<cause>\w+)")
_LOAD_START = re.compile(r"llama_model_loader: loaded meta data with")
_USING_DEVICE = re.compile(r"using device \S+\s+\(")
_METADATA = re.compile(r"llama_model_loader: - kv|(?:print_info|llm_load_print_meta): ")  # the model's own strings
_BRACKET = re.compile(r"\[.*\]$")
_NATURAL = re.compile(r"^(?P<prefix>.*?)(?P<index>\d*)$")


def strip_header(text: str) -> str:
    """The log without the leading `#` comment block a saved fixture may start with."""
    lines = text.splitlines()
    start = 0
    while start < len(lines) and (lines[start].startswith("#") or not lines[start].strip()):
        start += 1
    return "\n".join(lines[start:])


def device_name(buffer_name: str) -> str:
    """The device a buffer belongs to: `CUDA0_Mapped` -> `CUDA0`, `RPC0[127.0.0.1:50111]` -> `RPC0`, host -> `CPU`."""
    gpu = llamalog.gpu_device(buffer_name)
    if gpu is None:
        return "CPU"
    return _BRACKET.sub("", gpu) or gpu


def last_load_lines(text: str) -> list[str]:
    """The lines of the last model load: from the last `loaded meta data` line, else from the last `using device`
    block, else all. A load that failed before printing any buffer still ends there, so its errors stay its own."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    start = 0
    for i, line in enumerate(lines):
        block_start = _USING_DEVICE.search(line) and not (i and _USING_DEVICE.search(lines[i - 1]))
        if block_start or _LOAD_START.search(line):
            start = i
    return lines[start:]


def oom_lines(lines: Iterable[str]) -> list[str]:
    """The lines that say the load failed for memory, in order (see the module docstring)."""
    found: list[str] = []
    metal_causes: list[str] = []
    for line in lines:
        if _METADATA.search(line):
            continue
        if _OOM_RETRY.search(line):
            found = []  # the retry decides, not what failed before it
            continue
        cause = _METAL_CAUSE.search(line)
        if cause:
            metal_causes.append(cause["cause"])
        if _OOM.search(line) and not _OOM_WARNING.search(line):
            found.append(line)
    if metal_causes and not any("OutOfMemory" in c for c in metal_causes):
        # Metal named another cause (a GPU timeout, ignored submissions): "status 5" alone is not memory
        found = [line for line in found if not _METAL_STATUS.search(line)]
    return list(dict.fromkeys(found))  # a failure repeated at every step is reported once


def placement_from_log(text: str, *, token_embd_bytes: int | None = None) -> Placement:
    """Where llama.cpp put the model, from its load log (the last load in `text`). Pure; see the module docstring.

    `token_embd_bytes`: the size of what a full offload keeps on the host (the input layer, from the GGUF);
    without it the log's n_vocab x n_embd x 2 bytes is used as an upper bound.
    """
    text = strip_header(text)
    log = llamalog.parse(text)
    devices, host_model = _devices(log)
    allowed, is_bound = _host_allowance(log, token_embd_bytes)
    placement = Placement(
        verdict="incomplete",
        reason="",
        devices=devices,
        n_ctx=log.n_ctx,
        n_ctx_per_slot=log.n_ctx_seq,
        n_slots=log.n_seq_max if log.n_seq_max is not None else (log.kv_caches[0].seqs if log.kv_caches else None),
        type_k=log.kv_caches[0].k_type if log.kv_caches else None,
        type_v=log.kv_caches[0].v_type if log.kv_caches else None,
        flash_attn=log.flash_attn,
        host_model_bytes=host_model,
        host_allowed_bytes=allowed,
        host_allowed_is_bound=is_bound,
    )
    if log.offloaded_layers is not None:
        placement.layers_on_gpu, placement.layers_total = log.offloaded_layers
    failed = oom_lines(last_load_lines(text))
    if failed:
        placement.verdict = "oom"
        placement.errors = failed
        placement.reason = f"out of memory: {_short(_telling(failed))}"
    else:
        placement.verdict, placement.reason = _verdict(log, placement)
    fit = _fit_note(log)
    if fit:
        placement.reason += f"; {fit}"
    return placement


def _devices(log: LlamaLog) -> tuple[list[DevicePlacement], int]:
    by_name: dict[str, DevicePlacement] = {}
    host_model = 0
    for buffer in log.buffers:
        name = device_name(buffer.name)
        device = by_name.setdefault(name, DevicePlacement(name, is_gpu=name != "CPU"))
        nbytes = round(buffer.mib * MiB)
        if buffer.kind == "model":
            device.model_bytes += nbytes
            if name == "CPU":
                host_model += nbytes
        elif buffer.kind in ("KV", "RS"):
            device.kv_bytes += nbytes
        elif buffer.kind == "compute":
            device.compute_bytes += nbytes
        elif buffer.kind == "output":
            device.output_bytes += nbytes
    listed = [_BRACKET.sub("", d.name) for d in log.devices]

    def order(device: DevicePlacement) -> tuple[int, int, str, int]:
        if not device.is_gpu:
            return (2, 0, "", 0)
        if device.name in listed:
            return (0, listed.index(device.name), "", 0)
        m = _NATURAL.match(device.name)
        prefix, index = (m["prefix"], int(m["index"] or 0)) if m else (device.name, 0)
        return (1, 0, prefix, index)

    return sorted(by_name.values(), key=order), host_model


def _host_allowance(log: LlamaLog, token_embd_bytes: int | None) -> tuple[int | None, bool]:
    if token_embd_bytes is not None:
        return _with_slack(token_embd_bytes), False
    if log.n_vocab and log.n_embd:
        return _with_slack(log.n_vocab * log.n_embd * EMBEDDING_BOUND_BYTES_PER_VALUE), True
    return None, False


def _with_slack(nbytes: int) -> int:
    return nbytes + HOST_SLACK_BYTES + round(nbytes * HOST_SLACK_FRACTION)


def _gpu_present(log: LlamaLog, devices: list[DevicePlacement]) -> bool | None:
    """True when a GPU device holds a buffer or is listed by `using device`; False when buffers were printed
    and all are host buffers; None when the log shows neither."""
    if any(d.is_gpu for d in devices) or any(llamalog.gpu_device(d.name) for d in log.devices):
        return True
    return False if log.buffers else None


def _verdict(log: LlamaLog, p: Placement) -> tuple[Verdict, str]:
    gpu = _gpu_present(log, p.devices)
    gpus = [d for d in p.devices if d.is_gpu]
    where = "+".join(d.name for d in gpus) or "the GPU"
    if log.offloaded_layers is None:
        if gpu is False and p.host_model_bytes:
            return "cpu-only", "no GPU on this machine: every model buffer is in host memory"
        return "incomplete", "the log ends before the model was placed (no 'offloaded N/M layers' line, no error)"
    n, m = log.offloaded_layers
    if n == 0:
        return "cpu-only", f"0/{m} layers on the GPU"
    if gpu is False:
        return (
            "cpu-only",
            f"no GPU on this machine (the log says {n}/{m} offloaded, but every buffer is in host memory)",
        )
    if n < m:
        return "spill", f"{n}/{m} layers on the GPU, {m - n} on the CPU"
    host = p.host_model_bytes
    gpu_model = sum(d.model_bytes for d in gpus)
    if p.host_allowed_bytes is not None:
        kind = "at most n_vocab x n_embd x 2 bytes, a bound from the log" if p.host_allowed_is_bound else "exact"
        allowance = f"{_size(p.host_allowed_bytes)} of token embeddings allowed ({kind})"
        if host > p.host_allowed_bytes:
            return "spill", (
                f"{n}/{m} layers on the GPU, but {_size(host)} of weights stay in host memory, more than the "
                f"{allowance}"
            )
        return "gpu", f"{n}/{m} layers on {where}; host keeps {_size(host)} of weights, within the {allowance}"
    if host > gpu_model:
        return "spill", (
            f"{n}/{m} layers on the GPU, but {_size(host)} of weights stay in host memory against {_size(gpu_model)} "
            "on the GPU (the token embeddings are never the bigger part)"
        )
    return "gpu", (
        f"{n}/{m} layers on {where}; host keeps {_size(host)} of weights (not checked against the token "
        "embeddings: their size is unknown)"
    )


def _fit_note(log: LlamaLog) -> str:
    if log.fit == "failed":
        return f"--fit failed: {log.fit_message}" if log.fit_message else "--fit failed"
    if log.fit == "ok":
        return "--fit fitted the parameters; the final load decides"
    return ""


def _telling(lines: list[str]) -> str:
    """The failure line that says the most: one naming memory outright rather than Metal's bare "status 5"."""
    return next((line for line in lines if not _METAL_STATUS.search(line)), lines[0])


def _short(line: str, limit: int = 200) -> str:
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _size(nbytes: int | float) -> str:
    from launcher.units import format_bytes

    return format_bytes(nbytes)


# -- the plan's prediction ------------------------------------------------------------------------------------


def _get(device: Any, name: str) -> Any:
    return device.get(name) if isinstance(device, Mapping) else getattr(device, name, None)


def attach_prediction(placement: Placement, devices: Sequence[Any]) -> Placement:
    """Put the plan's figures beside the measured ones; returns `placement`.

    `devices`: `launcher.estimate.DeviceEstimate`s (or their to_json() dicts), named "CPU" or a GPU name. The
    estimate's i-th GPU goes with the placement's i-th GPU device, CPU with CPU (added when the log printed no host
    buffer). `predicted_bytes` is weights + KV + recurrent state + compute + output: what llama.cpp prints. The
    runtime overhead (CUDA context, cuBLAS) is left out: no buffer line shows it (NVML's figure includes it).
    """
    measured_gpus = placement.gpu_devices
    gpu_index = 0
    for estimate in devices:
        name = str(_get(estimate, "name"))
        if name == "CPU":
            target = next((d for d in placement.devices if not d.is_gpu), None)
            if target is None:
                target = DevicePlacement("CPU")
                placement.devices.append(target)
        else:
            target = measured_gpus[gpu_index] if gpu_index < len(measured_gpus) else None
            gpu_index += 1
            if target is None:
                continue  # the plan put bytes on a GPU the log does not show
        kinds = {
            "model": int(_get(estimate, "weights_bytes") or 0),
            "kv": int(_get(estimate, "kv_bytes") or 0) + int(_get(estimate, "recurrent_bytes") or 0),
            "compute": int(_get(estimate, "compute_bytes") or 0),
            "output": int(_get(estimate, "output_bytes") or 0),
        }
        target.predicted = kinds
        target.predicted_bytes = sum(kinds.values())
    return placement


# -- Ollama ---------------------------------------------------------------------------------------------------


def placement_from_ollama(entry: Mapping[str, Any], *, expected_ctx: int | None = None) -> Placement:
    """Where Ollama put one loaded model, from its /api/ps entry (`size`, `size_vram`, `context_length`). Pure.

    Ollama reports bytes in VRAM and a total, not kinds: the GPU device's `model_bytes` carries `size_vram` and the
    CPU device's the rest (weights, KV cache and compute together).
    """
    size = int(entry.get("size") or 0)
    vram = int(entry.get("size_vram") or 0)
    ctx = entry.get("context_length")
    n_ctx = int(ctx) if ctx else None
    devices = [DevicePlacement("GPU", model_bytes=vram, is_gpu=True), DevicePlacement("CPU", model_bytes=size - vram)]
    placement = Placement(
        verdict="incomplete", reason="", devices=devices, n_ctx=n_ctx, source="ollama", expected_ctx=expected_ctx
    )
    if size <= 0:
        placement.reason = "Ollama reports no size for this model"
        placement.devices = []
        return placement
    vram = min(vram, size)
    percent = round(100 * vram / size)
    if vram == size:
        placement.verdict = "gpu"
        placement.reason = f"all {_size(size)} in VRAM"
    elif vram == 0:
        placement.verdict = "cpu-only"
        placement.reason = f"0% on the GPU: all {_size(size)} in system memory"
    else:
        placement.verdict = "spill"
        percent = min(percent, 99)
        placement.reason = (
            f"{percent}% on the GPU: {_size(vram)} of {_size(size)} in VRAM, {_size(size - vram)} in system memory"
        )
    if expected_ctx is not None and n_ctx is not None and n_ctx != expected_ctx:
        placement.context_mismatch = True
        placement.reason += f"; context {n_ctx}, not the {expected_ctx} asked for"
    return placement


# -- NVML -----------------------------------------------------------------------------------------------------


def nvml_used_by_pid(pid: int, *, nvml: Any = None) -> dict[int, int] | None:
    """GPU memory used by `pid` and its child processes, per NVML GPU index; None without NVML. Never raises.

    Reads through launcher.hardware.nvml.read_nvml (compute and graphics processes of every GPU); `nvml` is the
    pynvml module or a stand-in with the same functions.
    """
    try:
        from launcher.hardware.nvml import read_nvml

        reading = read_nvml(nvml)
        if reading.init_error is not None:
            return None
        family = _process_family(pid)
        used: dict[int, int] = {}
        for gpu in reading.gpus:
            mine = [nbytes or 0 for p, _name, nbytes in gpu.processes or () if p in family]
            if mine:
                used[gpu.index] = sum(mine)
        return used
    except Exception:  # a probe: whatever NVML or psutil does, verification goes on without it
        return None


def _process_family(pid: int) -> set[int]:
    family = {pid}
    try:
        import psutil

        family.update(child.pid for child in psutil.Process(pid).children(recursive=True))
    except Exception:  # psutil missing, or the process is gone: the pid alone
        pass
    return family


def attach_nvml(placement: Placement, used: Mapping[int, int] | None) -> Placement:
    """Put NVML's per-GPU figures on the placement's GPU devices, by order (NVML index i <-> i-th GPU device)."""
    if used:
        gpus = placement.gpu_devices
        for position, (_index, nbytes) in enumerate(sorted(used.items())):
            if position < len(gpus):
                gpus[position].nvml_used_bytes = nbytes
    return placement


# -- for people -----------------------------------------------------------------------------------------------


def summary_line(placement: Placement) -> str:
    """One line: "100% GPU: 19/19 layers on RPC0, 285.0 MiB used, 290.1 MiB predicted", "spill: ...", ..."""
    p = placement
    gpus = p.gpu_devices
    if p.verdict == "oom":
        return f"out of memory: {_short(_telling(p.errors), 160)}" if p.errors else "out of memory"
    if p.verdict == "incomplete":
        return f"incomplete: {p.reason}"
    if p.source == "ollama":
        label = {"gpu": "100% GPU", "spill": "spill", "cpu-only": "CPU only"}[p.verdict]
        return f"{label}: {p.reason}"
    if p.verdict == "cpu-only":
        if p.layers_on_gpu == 0:
            return f"CPU only: 0/{p.layers_total} layers on the GPU"
        return "CPU only: no GPU on this machine"
    if p.verdict == "spill":
        n, m = p.layers_on_gpu, p.layers_total
        if n is not None and m is not None and n < m:
            return f"spill: {n}/{m} layers on the GPU, {m - n} on the CPU"
        return f"spill: {n}/{m} layers on the GPU, but {_size(p.host_model_bytes)} of weights in host memory"
    used = sum(d.measured_bytes for d in gpus)
    where = "+".join(d.name for d in gpus)
    text = f"100% GPU: {p.layers_on_gpu}/{p.layers_total} layers on {where}, {_size(used)} used"
    predicted = [d.predicted_bytes for d in gpus if d.predicted_bytes is not None]
    if predicted:
        text += f", {_size(sum(predicted))} predicted"
    return text


def comparison_rows(placement: Placement) -> list[tuple[str, str, str, str, str]]:
    """(device, kind, predicted, measured, difference) per device and per kind, then the device's total (and
    NVML's figure for the process where there is one); the difference is predicted - measured, in MiB and as a
    share of the measured figure."""
    rows: list[tuple[str, str, str, str, str]] = []
    for d in placement.devices:
        kinds = {"model": d.model_bytes, "kv": d.kv_bytes, "compute": d.compute_bytes, "output": d.output_bytes}
        for kind, measured in kinds.items():
            predicted = d.predicted.get(kind)
            if not measured and not predicted:
                continue
            rows.append((d.name, kind, _mib(predicted), _mib(measured), _difference(predicted, measured)))
        rows.append((d.name, "total", _mib(d.predicted_bytes), _mib(d.measured_bytes),
                     _difference(d.predicted_bytes, d.measured_bytes)))  # fmt: skip
        if d.nvml_used_bytes is not None:
            rows.append((d.name, "NVML (process)", "", _mib(d.nvml_used_bytes), ""))
    return rows


def render_comparison(placement: Placement) -> list[str]:
    """comparison_rows as plain text lines, as `fitquant run` shows them, header first."""
    rows = [("device", "kind", "predicted", "measured", "difference"), *comparison_rows(placement)]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = []
    for row in rows:
        left = [row[i].ljust(widths[i]) for i in range(2)]
        right = [row[i].rjust(widths[i]) for i in range(2, 5)]
        lines.append("  ".join(left + right).rstrip())
    return lines


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / MiB:,.1f} MiB"


def _difference(predicted: int | None, measured: int) -> str:
    if predicted is None:
        return ""
    delta = predicted - measured
    share = f" ({delta / measured:+.1%})" if measured else ""
    return f"{delta / MiB:+,.1f} MiB{share}"
