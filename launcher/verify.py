"""Verify: where a loaded model really landed, from a server's log, Ollama's /api/ps, or NVML.

    placement_from_log(text, token_embd_bytes=...)   llama.cpp's load log -> Placement (pure)
    placement_from_ollama(entry, expected_ctx=...)   one /api/ps model entry -> Placement (pure)
    placement_from_ollama_log(text, ...)             `ollama serve`'s log: its llama-server's command and load (pure)
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

An RPC server's buffers (`RPC0[127.0.0.1:50112]`: every server calls its own device 0) go to the device the
`using device RPCn (host:port)` lines list for that endpoint (`RPC1`); without such a line the bracket is dropped.
Every host buffer is grouped into `CPU`.
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

#: `fitquant verify`'s exit status per verdict: 0 only for a 100% GPU load (or a verdict `--expect` names);
#: 1 stays "fitquant error" and 2 "usage error" (click).
EXIT_STATUS: dict[str, int] = {"gpu": 0, "spill": 3, "cpu-only": 4, "oom": 5, "incomplete": 6}

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
    host_allowed_is_bound: bool = False  # host_allowed_bytes is a bound from the log, not the GGUF's exact figure
    host_allowance_source: str = ""  # how host_allowed_bytes was found ("exact", "n_vocab x n_embd, file type ...")
    expected_ctx: int | None = None  # Ollama: the context asked for (num_ctx)
    context_mismatch: bool = False  # Ollama granted another context than expected_ctx
    swa_cache: bool = False  # the log shows a separate SWA KV cache (an iSWA model)
    repack_bytes: int = 0  # host model buffers named *_REPACK: weights copied into a CPU-friendly layout
    n_ubatch: int | None = None
    planned_type_k: str | None = None  # the plan's KV cache type, when attach_prediction was told it
    graph_splits: int | None = None  # the scheduler's graph splits at reserve (`sched_reserve: graph: ... splits`)
    fa_quants: str | None = None  # a CUDA build's FlashAttention K-V pairs (its system info's FA_QUANTS)
    fa_converted: str | None = None  # a K-V pair it has no FlashAttention kernel for: converted to f16 (slow)

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
            "mismatches": [m.to_json() for m in mismatches(self)],
            "graph_splits": self.graph_splits,
            "fa_quants": self.fa_quants,
            "fa_converted": self.fa_converted,
        }


# -- llama.cpp logs -------------------------------------------------------------------------------------------

# The one out-of-memory classifier (oom_lines / oom_line): every backend and the run path call it.
# Ollama's OOM substrings (llm/status.go, backends.md §2), its own memory refusals, and the backends' own wordings
# (memory-model.md §7a). Every repetition is bounded (a log is untrusted input: no pattern may backtrack on a long
# line), and a line is tried only when it holds one of _OOM_NEEDLES (lower-cased substrings, cheap on noise).
_OOM = re.compile(
    r"out of memory|out of device memory|outofdevicememory|outofmemory|vk_error_out_of_device_memory|"
    r"cudaMalloc failed|hipMalloc failed|failed to allocate|unable to allocate|allocation failed|"
    r"memory allocation of size \d{1,20} failed|allocating [\d.]{1,20} MiB .{0,200}?failed|not enough memory|"
    r"insufficient memory|unable to load full model on GPU|requires more system memory|"
    r"reported out-of-memory during startup|"  # Ollama v0.33 (llm/llama_server.go WaitUntilRunning)
    r"more (?:system|gpu|video) memory|command buffer \d{1,9} failed with status 5",
    re.IGNORECASE,
)
_OOM_NEEDLES = ("memory", "alloc", "full model", "status 5")
# Lines that match _OOM but are not the outcome of the load.
_OOM_WARNING = "pinned memory"
# After these, llama.cpp (or Ollama) tries again: the allocation failures before them did not decide the load.
_OOM_RETRY = ("retrying without pipeline parallelism", "applying backoff")
_METAL_STATUS = re.compile(r"command buffer \d{1,9} failed with status 5", re.IGNORECASE)
_METAL_CAUSE = re.compile(r"kIO\w{0,40}?CommandBufferCallbackError(?P<cause>\w{1,40})")
_LOAD_START = "llama_model_loader: loaded meta data with"
_USING_DEVICE = re.compile(r"using device \S{1,200}\s+\(")
_METADATA = ("llama_model_loader: - kv", "print_info: ", "llm_load_print_meta: ")  # the model's own strings
_BRACKET = re.compile(r"\[.{0,200}\]$")
MAX_LINE_CHARS = llamalog.MAX_LINE_CHARS


def exit_status(verdict: str, expect: Iterable[str] | None = None) -> int:
    """The exit status for a verdict: 0 when it is one `expect` names (default: gpu), else EXIT_STATUS's."""
    wanted = set(expect) if expect else {"gpu"}
    return 0 if verdict in wanted else EXIT_STATUS[verdict] or 3


def strip_header(text: str) -> str:
    """The log without the leading `#` comment block a saved fixture may start with."""
    lines = text.splitlines()
    start = 0
    while start < len(lines) and (lines[start].startswith("#") or not lines[start].strip()):
        start += 1
    return "\n".join(lines[start:])


def device_name(buffer_name: str, endpoints: Mapping[str, str] | None = None) -> str:
    """The device a buffer belongs to: `CUDA0_Mapped` -> `CUDA0`, host -> `CPU`, and an RPC server's buffer
    `RPC0[127.0.0.1:50112]` -> the device listed for that endpoint in `endpoints` (rpc_endpoints: `RPC1`), since
    every server names its own device 0; without the endpoint listed, the name without the bracket (`RPC0`)."""
    gpu = llamalog.gpu_device(buffer_name)
    if gpu is None:
        return "CPU"
    bracket = _BRACKET.search(gpu)
    if bracket is not None and endpoints and bracket.group()[1:-1] in endpoints:
        return endpoints[bracket.group()[1:-1]]
    if endpoints and gpu in endpoints:  # a GPU named by its description (older Vulkan builds): its device
        return endpoints[gpu]
    return _BRACKET.sub("", gpu) or gpu


def rpc_endpoints(log: LlamaLog) -> dict[str, str]:
    """host:port -> device name (`127.0.0.1:50112` -> `RPC1`) from the load's `using device RPCn (host:port)` lines.
    Pure."""
    found = {}
    for device in log.devices:
        if device.name.startswith("RPC"):
            endpoint = device.description.split(")", 1)[0].strip()
            if endpoint:
                found[endpoint] = device.name
    return found


def _unique_descriptions(named: Mapping[str, str]) -> dict[str, str]:
    """Description -> device name, for the descriptions that name one device only (two identical GPUs share a
    description: their buffers cannot be told apart by it, and keep the name they were printed with)."""
    return {description: name for description, name in named.items() if name}


def last_load_lines(text: str) -> list[str]:
    """The lines of the last model load: from the last `loaded meta data` line, else from the last `using device`
    block, else all. A load that failed before printing any buffer still ends there, so its errors stay its own.
    Lines longer than MAX_LINE_CHARS are cut there."""
    lines = [line[:MAX_LINE_CHARS].strip() for line in text.splitlines() if line.strip()]
    start = 0
    previous_device = False
    for i, line in enumerate(lines):
        device = "using device" in line and _USING_DEVICE.search(line) is not None
        if (device and not previous_device) or _LOAD_START in line:
            start = i
        previous_device = device
    return lines[start:]


def is_oom_line(line: str) -> bool:
    """True when one line says an allocation failed for memory (pinned-memory warnings excluded). Pure."""
    line = line[:MAX_LINE_CHARS]
    low = line.lower()
    if not any(needle in low for needle in _OOM_NEEDLES) or _OOM_WARNING in low:
        return False
    return _OOM.search(line) is not None


def oom_lines(lines: Iterable[str]) -> list[str]:
    """The lines that say the load failed for memory, in order (see the module docstring)."""
    found: list[str] = []
    metal_causes: list[str] = []
    for line in lines:
        line = line[:MAX_LINE_CHARS]
        if any(marker in line for marker in _METADATA):
            continue
        low = line.lower()
        if any(retry in low for retry in _OOM_RETRY):
            found = []  # the retry decides, not what failed before it
            continue
        cause = _METAL_CAUSE.search(line) if "kIO" in line else None
        if cause:
            metal_causes.append(cause["cause"])
        if is_oom_line(line):
            found.append(line)
    if metal_causes and not any("OutOfMemory" in c for c in metal_causes):
        # Metal named another cause (a GPU timeout, ignored submissions): "status 5" alone is not memory
        found = [line for line in found if not _METAL_STATUS.search(line)]
    return list(dict.fromkeys(found))  # a failure repeated at every step is reported once


def oom_line(lines: Iterable[str]) -> str | None:
    """The first line that says a load (or a request) failed for memory, or None: the one out-of-memory classifier
    for every backend and the run path, with oom_lines' rules (warnings skipped, a retry decides). Pure."""
    found = oom_lines(lines)
    return _telling(found) if found else None


def placement_from_log(text: str, *, token_embd_bytes: int | None = None) -> Placement:
    """Where llama.cpp put the model, from its load log (the last load in `text`). Pure; see the module docstring.

    `token_embd_bytes`: the size of what a full offload keeps on the host (the input layer, from the GGUF);
    without it the log's n_vocab x n_embd x 2 bytes is used as an upper bound.
    """
    text = strip_header(text)
    log = llamalog.parse(text)
    devices, host_model = _devices(log)
    allowed, is_bound, allowance_source = _host_allowance(log, token_embd_bytes)
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
        host_allowance_source=allowance_source,
        swa_cache=any(c.role == "SWA" for c in log.kv_caches),
        repack_bytes=sum(round(b.mib * MiB) for b in log.buffers if b.kind == "model" and b.name.endswith("_REPACK")),
        n_ubatch=log.n_ubatch,
        graph_splits=log.graph_splits,
        fa_quants=log.fa_quants,
        fa_converted=log.fa_converted,
    )
    counts, _planned = _layer_counts(log)
    if counts is not None:
        placement.layers_on_gpu, placement.layers_total = counts
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
    endpoints = {**rpc_endpoints(log), **_unique_descriptions(log.vulkan_devices)}
    for buffer in log.buffers:
        name = device_name(buffer.name, endpoints)
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
        prefix = device.name.rstrip("0123456789")
        digits = device.name[len(prefix) :]
        return (1, 0, prefix, int(digits) if digits and len(digits) < 10 else 0)

    return sorted(by_name.values(), key=order), host_model


def _type_bytes(name: str) -> float | None:
    """Bytes per value of a ggml type by name ("q8_0" -> 34/32), from the type table the GGUF parser uses."""
    from launcher.gguf.header import GGML_TYPE_NAMES, GGML_TYPE_SIZES

    wanted = name.strip().upper()
    for type_id, type_name in GGML_TYPE_NAMES.items():
        if type_name.upper() == wanted and type_id in GGML_TYPE_SIZES:
            block_size, type_size = GGML_TYPE_SIZES[type_id]
            return type_size / block_size
    return None


# The input layer: what a full offload keeps on the host (llama.cpp's dev_input is the CPU).
_INPUT_TENSORS = ("token_embd.weight", "per_layer_token_embd.weight", "token_types.weight")
_EXPERTS = re.compile(r"ffn_\w{0,20}_(?:ch)?exps")


def _embedding_bytes_per_value(log: LlamaLog) -> tuple[float, str]:
    """Bytes per value of token_embd and how that is known: the per-tensor line's type when printed, else an upper
    bound from the file type (quantizing keeps token_embd at the file's main type, Q6_K when tied to the output,
    or Q8_0 when its rows do not fit the k-quant blocks; nothing above Q8_0 unless asked), else 32 bits."""
    printed = log.tensor_types.get("token_embd.weight")
    printed_bytes = _type_bytes(printed) if printed is not None else None
    if printed_bytes is not None:
        return printed_bytes, f"token_embd is {printed}"
    ftype = (log.file_type or "").upper().replace("MOSTLY", "").strip()
    head = ftype.split()[0] if ftype.split() else ""
    if head in ("F32", "ALL") or "F32" in head:
        return 4.0, f"file type {log.file_type}: at most 32 bits"
    if head in ("F16", "BF16"):
        return 2.0, f"file type {log.file_type}: at most 16 bits"
    if re.match(r"^(?:I?Q\d|TQ\d)", head):
        return 34 / 32, f"file type {log.file_type}: at most Q8_0"  # Q8_0: 34 bytes per block of 32
    if "MXFP4" in head:
        return 2.0, f"file type {log.file_type}: at most 16 bits"
    if head:
        return 4.0, f"file type {log.file_type}: at most 32 bits"
    return 4.0, "no file type in the log: at most 32 bits"


def _host_allowance(log: LlamaLog, token_embd_bytes: int | None) -> tuple[int | None, bool, str]:
    """(allowed host model bytes, whether that is a bound rather than the GGUF's figure, how it was found)."""
    if token_embd_bytes is not None:
        return _with_slack(token_embd_bytes), False, "exact"
    if log.n_vocab and log.n_embd:
        per_value, how = _embedding_bytes_per_value(log)
        return _with_slack(round(log.n_vocab * log.n_embd * per_value)), True, f"n_vocab x n_embd, {how}"
    return None, False, ""


def _with_slack(nbytes: int) -> int:
    return nbytes + HOST_SLACK_BYTES + round(nbytes * HOST_SLACK_FRACTION)


def _gpu_present(log: LlamaLog, devices: list[DevicePlacement]) -> bool | None:
    """True when a GPU device holds a buffer or is listed by `using device`; False when buffers were printed
    and all are host buffers; None when the log shows neither."""
    if any(d.is_gpu for d in devices) or any(llamalog.gpu_device(d.name) for d in log.devices):
        return True
    return False if log.buffers else None


def _host_weights_evidence(log: LlamaLog) -> str | None:
    """Why the log itself proves weights beyond the input layer stay in host memory, whatever the sizes: MoE experts
    kept on the CPU (--cpu-moe, n_cpu_moe, "MoE CPU layers"), or tensors other than the input layer put in a host
    buffer by an override or a fallback (per-tensor lines)."""
    if log.cpu_moe:
        return f"the MoE experts are kept on the CPU ({_short(log.cpu_moe, 60)})"
    placed = [(t, buft) for t, buft in log.host_tensors.items() if t not in _INPUT_TENSORS]
    if not placed:
        return None
    experts = [t for t, _ in placed if _EXPERTS.search(t)]
    what = f"{len(experts)} expert tensors" if experts else f"{len(placed)} tensors"
    example, buft = next(((t, b) for t, b in placed if t in experts), placed[0])
    return f"{what} are in host buffers ({example} in {buft})"


def _only_embeddings_on_host(log: LlamaLog) -> bool:
    """True when the log proves the host model buffer is the token embedding table alone: llama.cpp says token_embd
    (and no other tensor) fell back to the CPU buffer, and the only host model buffers are CPU ones (no *_Host,
    CPU_REPACK or override)."""
    if set(log.host_tensors) != {"token_embd.weight"} or log.host_tensors["token_embd.weight"] != "CPU":
        return False
    host = {b.name for b in log.buffers if b.kind == "model" and llamalog.gpu_device(b.name) is None}
    return bool(host) and host <= {"CPU", "CPU_Mapped"} and log.fallback_others.get("token_embd.weight") == 0


def _layer_counts(log: LlamaLog) -> tuple[tuple[int, int] | None, str]:
    """(layers on the GPU, layers in all) and, when they come from Ollama's planner rather than llama.cpp's offload
    line, a note saying so. The runner's --n-gpu-layers, when the log shows it, is what was started."""
    if log.offloaded_layers is not None or log.planned_layers is None:
        return log.offloaded_layers, ""
    offload, total = log.planned_layers
    started = log.n_gpu_layers_arg
    n = offload if started is None or started < 0 else min(started, total)
    note = " (Ollama's plan" + (f", runner --n-gpu-layers {started}" if started is not None else "") + ")"
    return (n, total), note


def _verdict(log: LlamaLog, p: Placement) -> tuple[Verdict, str]:
    gpu = _gpu_present(log, p.devices)
    gpus = [d for d in p.devices if d.is_gpu]
    where = "+".join(d.name for d in gpus) or "the GPU"
    counts, planned = _layer_counts(log)
    if planned and counts is not None and counts[0] == counts[1] and not log.buffers:
        n, m = counts
        return "incomplete", f"Ollama planned {n}/{m} layers on the GPU, but the log ends before the load"
    if counts is None:
        if gpu is False and p.host_model_bytes:
            return "cpu-only", "no GPU on this machine: every model buffer is in host memory"
        return "incomplete", "the log ends before the model was placed (no 'offloaded N/M layers' line, no error)"
    n, m = counts
    if n == 0:
        return "cpu-only", f"0/{m} layers on the GPU{planned}"
    if gpu is False:
        return (
            "cpu-only",
            f"no GPU on this machine (the log says {n}/{m} offloaded, but every buffer is in host memory)",
        )
    if n < m:
        return "spill", f"{n}/{m} layers on the GPU, {m - n} on the CPU{planned}"
    host = p.host_model_bytes
    evidence = _host_weights_evidence(log)
    if evidence is not None:
        return "spill", f"{n}/{m} layers on the GPU, but {evidence}: {_size(host)} of weights in host memory"
    gpu_model = sum(d.model_bytes for d in gpus)
    if p.host_allowed_bytes is not None:
        kind = f"at most {p.host_allowance_source}, a bound from the log" if p.host_allowed_is_bound else "exact"
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
    if host <= HOST_SLACK_BYTES:
        return "gpu", f"{n}/{m} layers on {where}; host keeps {_size(host)} of weights"
    if _only_embeddings_on_host(log):
        return "gpu", (
            f"{n}/{m} layers on {where}; host keeps {_size(host)}: only token_embd.weight, which the log says fell "
            "back to the CPU buffer"
        )
    # Never 100% GPU on a guess: the host holds weights the log cannot size against the token embeddings.
    return "incomplete", (
        f"{n}/{m} layers on {where}, but the log cannot tell whether the {_size(host)} of host weights are only the "
        "token embeddings (no n_vocab/n_embd): pass --model"
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


def attach_prediction(placement: Placement, devices: Sequence[Any], *, type_k: str | None = None) -> Placement:
    """Put the plan's figures beside the measured ones; returns `placement`.

    `devices`: `launcher.estimate.DeviceEstimate`s (or their to_json() dicts), named "CPU" or a GPU name. The
    estimate's i-th GPU goes with the placement's i-th GPU device, CPU with CPU (added when the log printed no host
    buffer). `predicted_bytes` is weights + KV + recurrent state + compute + output: what llama.cpp prints. The
    runtime overhead (CUDA context, cuBLAS) is left out: no buffer line shows it (NVML's figure includes it).
    `type_k`: the plan's KV cache type, so a mismatch can name another type as its cause.
    """
    if type_k is not None:
        placement.planned_type_k = type_k
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


# -- predicted against measured ------------------------------------------------------------------------------

MISMATCH_FRACTION = 0.05  # a prediction misses when it is off by more than max(5% of the measured, 16 MiB)
MISMATCH_MIN_BYTES = 16 * MiB


@dataclass(frozen=True)
class Mismatch:
    """One device and kind where the plan's figure misses the measured one, and the likely cause."""

    device: str
    kind: str  # model, kv, compute, output; "total" for Ollama (it reports totals only)
    predicted_bytes: int
    measured_bytes: int
    cause: str

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "kind": self.kind,
            "predicted_bytes": self.predicted_bytes,
            "measured_bytes": self.measured_bytes,
            "cause": self.cause,
        }

    def line(self) -> str:
        """`mismatch: CPU kv predicted 14.3 MiB, measured 38.3 MiB (-62.5%): likely cause: ...`"""
        delta = self.predicted_bytes - self.measured_bytes
        share = f" ({delta / self.measured_bytes:+.1%})" if self.measured_bytes else ""
        return (
            f"mismatch: {self.device} {self.kind} predicted {self.predicted_bytes / MiB:,.1f} MiB, measured "
            f"{self.measured_bytes / MiB:,.1f} MiB{share}: likely cause: {self.cause}"
        )


def mismatches(placement: Placement) -> list[Mismatch]:
    """Every device and kind where both a prediction and a measurement exist and they differ by more than
    max(5% of the measured figure, 16 MiB), each with the likely cause (or "cause unknown"). Pure."""
    found: list[Mismatch] = []
    for d in placement.devices:
        if placement.source == "ollama":
            pairs = [("total", d.predicted_bytes, d.measured_bytes)]
        else:
            measured_by_kind = {"model": d.model_bytes, "kv": d.kv_bytes, "compute": d.compute_bytes,
                                "output": d.output_bytes}  # fmt: skip
            pairs = [(kind, d.predicted.get(kind), measured_by_kind[kind]) for kind in measured_by_kind]
        for kind, predicted, measured in pairs:
            if predicted is None or (not predicted and not measured):
                continue
            if abs(predicted - measured) > max(MISMATCH_FRACTION * measured, MISMATCH_MIN_BYTES):
                cause = _mismatch_cause(placement, d, kind, predicted, measured)
                found.append(Mismatch(d.name, kind, predicted, measured, cause))
    return found


def _mismatch_cause(placement: Placement, device: DevicePlacement, kind: str, predicted: int, measured: int) -> str:
    more = measured > predicted
    planned, used = placement.planned_type_k, placement.type_k
    if kind == "kv" and planned and used and planned.lower() != used.lower():
        return f"the server used a {used} KV cache, not the planned {planned}"
    if kind == "kv" and more and placement.swa_cache:
        return "a full-size SWA cache (swa_full): the sliding-window layers keep every token, not just the window"
    if kind == "kv":
        return "another context or slot count than planned" if placement.n_ctx else "cause unknown"
    if kind == "model" and not device.is_gpu and more and placement.repack_bytes:
        return f"weights repacked for the CPU (a {_size(placement.repack_bytes)} CPU_REPACK buffer)"
    if kind == "model":
        return "a different file than planned, or another split of the layers across devices"
    if kind == "compute":
        batch = f" (the server's n_ubatch is {placement.n_ubatch})" if placement.n_ubatch else ""
        return ("a larger" if more else "a smaller") + f" ubatch/n_batch than planned{batch}"
    if kind == "total":
        return "another context, KV type or batch than planned, or a different file"
    return "cause unknown"


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


def placement_from_ollama_log(
    text: str, *, token_embd_bytes: int | None = None, expected_ctx: int | None = None
) -> Placement | None:
    """Where the llama-server that `ollama serve` started last put the model, from Ollama's own log: the
    `starting llama-server cmd=...` line, then llama.cpp's offload and buffer lines read by placement_from_log. The
    KV cache type, flash attention, context and batch are the command line's (a flag Ollama did not pass is
    llama-server's default: an f16 cache). `expected_ctx`: the context per slot asked for. None when the log holds
    no launch line (an Ollama before v0.30, or a log cut short). Pure."""
    found = llamalog.last_ollama_launch(text)
    if found is None:
        return None
    launch, after = found
    placement = placement_from_log(after, token_embd_bytes=token_embd_bytes)
    placement.type_k = launch.type_k or "f16"
    placement.type_v = launch.type_v or "f16"
    if launch.flash_attn in ("on", "off"):
        placement.flash_attn = launch.flash_attn == "on"
    if launch.n_ubatch is not None:
        placement.n_ubatch = launch.n_ubatch
    if launch.n_parallel is not None:
        placement.n_slots = launch.n_parallel
    if launch.n_ctx is not None and placement.n_ctx is None:
        placement.n_ctx = launch.n_ctx
    if placement.n_ctx_per_slot is None and placement.n_ctx is not None:
        placement.n_ctx_per_slot = placement.n_ctx // max(1, placement.n_slots or 1)
    placement.expected_ctx = expected_ctx
    if expected_ctx is not None and placement.n_ctx_per_slot is not None and placement.n_ctx_per_slot != expected_ctx:
        placement.context_mismatch = True
        placement.reason += f"; context {placement.n_ctx_per_slot} per slot, not the {expected_ctx} asked for"
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


def attach_nvml(
    placement: Placement, used: Mapping[int, int] | None, *, visible: Sequence[int] | None = None
) -> Placement:
    """Put NVML's per-GPU figures (NVML index -> bytes) on the placement's GPU devices; returns `placement`.

    The server numbers the GPUs it sees: its i-th GPU device is the i-th of `visible` (NVML indices, from the
    server's CUDA_VISIBLE_DEVICES), or NVML GPU i when `visible` is None. So a server started with
    CUDA_VISIBLE_DEVICES=1 has GPU 1 as its CUDA0."""
    if not used:
        return placement
    gpus = placement.gpu_devices
    order = list(visible) if visible is not None else sorted(used)
    if visible is None:
        order = list(range(max(order) + 1)) if order else []
    for rank, index in enumerate(order):
        if rank < len(gpus) and index in used:
            gpus[rank].nvml_used_bytes = used[index]
    return placement


def visible_nvml_indices(env: Mapping[str, str] | None, uuids: Sequence[str | None] = ()) -> list[int] | None:
    """The NVML indices a server with environment `env` sees, in its order, from CUDA_VISIBLE_DEVICES; None when
    unset (NVML index i is then the server's GPU i). UUID entries resolve through `uuids` (NVML order), as
    launcher.hardware.visible does; without them only plain indices are read."""
    value = (env or {}).get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    if uuids:
        from launcher.hardware.visible import cuda_visible

        return cuda_visible({"CUDA_VISIBLE_DEVICES": value}, uuids)[0]
    chosen: list[int] = []
    for part in (p.strip() for p in value.split(",")):
        if not part.isdigit() or int(part) in chosen:
            break  # the runtime stops at the first entry it cannot use
        chosen.append(int(part))
    return chosen


# -- compute on the CPU ---------------------------------------------------------------------------------------


def full_offload_splits(placement: Placement) -> int | None:
    """The graph splits a full offload gives: one per GPU device that holds weights, plus one on the host for the
    input (the token embeddings stay in host memory, so their get_rows runs there). None unless the verdict is
    `gpu`: a partial offload's count depends on whether the backend copies host weights to the GPU per batch.

    llama.cpp starts a new split wherever a node's backend differs from the previous node's
    (ggml/src/ggml-backend.cpp, ggml_backend_sched_split_graph, "pass 5: split graph"). Measured with llama.cpp
    0c1e570 on Gemma 3 270M over ggml-rpc-server (tests/test_fallback.py): 1 on the CPU, 2 with one RPC device,
    3 with two, also with pipeline parallelism; 38 with the KV cache kept on the host (-nkvo)."""
    if placement.verdict != "gpu":
        return None
    holding = [d for d in placement.gpu_devices if d.model_bytes > 0]
    return len(holding) + 1 if holding else None


def splits_finding(placement: Placement) -> str | None:
    """The finding "slow: N graph splits, a full offload needs M: ..." when the log's splits exceed what the
    placement needs: work moved between the GPU and the CPU (an op or K/V type the GPU build cannot run, the KV
    cache on the host)."""
    needed = full_offload_splits(placement)
    splits = placement.graph_splits
    if needed is None or splits is None or splits <= needed:
        return None
    return f"slow: {splits} graph splits, a full offload needs {needed}: compute probably ran on the CPU"


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
