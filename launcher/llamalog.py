"""Parse llama.cpp's log text into the memory figures it prints (memory-model.md §7).

Pure text processing, no llama.cpp needed. It reads logs from libllama's log callback, from `llama-server`
(with or without `--no-log-prefix --no-log-timestamps`, e.g. `0.00.040.720 I llama_context: ...`), from
llama-cpp-python's verbose output and from older builds (`llm_load_tensors:`, `llama_new_context_with_model:`,
`llama_kv_cache_unified:`): every pattern matches the tail of a line, after whatever prefix the line has.

Buffer lines are **summed** per (buffer name, kind): iSWA prints two `KV buffer size` lines per device
(non-SWA then SWA) and both count. A log that holds several model loads (llama.cpp `--fit` probes, a restart,
a draft model) is split at each load start (a `using device` block or `llama_model_loader: loaded meta data`);
the result describes the **last** load and keeps the earlier ones in `earlier`.

Each line goes to the first (pattern, handler) pair of `_LINE_HANDLERS` whose handler takes it; a line that
none takes is kept in `errors` when it reads like one.

Under `no_alloc` (a memory-only dry run) llama.cpp prints `0.00 MiB` for model and KV buffers; `engine.py`
takes those from another exact source. Compute, output and RS lines are real in both modes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

KINDS = ("model", "KV", "RS", "compute", "output")

# Every pattern here is linear in the line's length, whatever the line holds: a log is untrusted input (a posted
# log, a server's stderr) and a pattern that backtracks can take minutes on one long line. So: the function-name
# prefix only starts where no identifier character precedes it (a run of letters is tried once, not at each of
# its characters); every open repetition after a fixed text is bounded; and lines are cut at MAX_LINE_CHARS.
MAX_LINE_CHARS = 4096  # the lines that matter are < 1000 characters; longer ones are metadata arrays or noise

# the function-name prefix every libllama line carries ("llama_context: ", "llm_load_tensors: ", ...)
_FUNC = r"(?<![A-Za-z0-9_])(?P<func>[A-Za-z_][A-Za-z0-9_]{0,79}):\s+"
_NUM = r"[-+]?\d{1,15}(?:\.\d{1,15})?"

# `<name> [<kind>] buffer size = <mib> MiB`: found from its tail, then the name is read back to the function prefix
# (_buffer_line): a one-word name (CUDA0, CPU_Mapped, RPC0[127.0.0.1:50111]) or a GPU named by its description
# (older Vulkan builds: "Radeon RX 580 Series buffer size = ..."), which has no ':' or '='.
_RE_BUFFER_TAIL = re.compile(
    r"\s(?:(?P<kind>model|KV|RS|compute|output)\s+)?buffer size\s*=\s*(?P<mib>" + _NUM + r")\s*MiB"
)
_RE_FUNC_ONLY = re.compile(_FUNC)
_SPACED_NAME_MAX = 241
_RE_VULKAN_DEVICE = re.compile(r"ggml_vulkan: (?P<index>\d{1,3}) = (?P<desc>[^(|]{1,200}?)\s*(?:\(|\||$)")
_RE_DEVICE = re.compile(
    r"using device (?P<name>\S{1,200})\s+\((?P<desc>.{0,300})\)\s+-\s+(?P<free>\d{1,12})\s+MiB free"
)
_RE_LOAD_START = re.compile(r"llama_model_loader: loaded meta data with")
_RE_OFFLOADED = re.compile(r"offloaded\s+(?P<n>\d{1,9})/(?P<m>\d{1,9})\s+layers to GPU")
_RE_KV = re.compile(
    _FUNC
    + r"size\s*=\s*(?P<total>"
    + _NUM
    + r")\s*MiB\s*\(\s*(?P<cells>\d{1,12})\s+cells,\s*(?P<layers>\d{1,12})\s+layers,"
    r"\s*(?P<seqs>\d{1,12})(?:\s*/\s*(?P<streams>\d{1,12}))?\s+seqs\),\s*"
    r"K\s*\((?P<kt>[^)]{1,32})\):\s*(?P<kmib>"
    + _NUM
    + r")\s*MiB,\s*V\s*\((?P<vt>[^)]{1,32})\):\s*(?P<vmib>"
    + _NUM
    + r")\s*MiB"
)
# 2024 builds: "llama_new_context_with_model: KV self size  =  256.00 MiB, K (f16):  128.00 MiB, V (f16): ..."
_RE_KV_OLD = re.compile(
    _FUNC
    + r"KV self size\s*=\s*(?P<total>"
    + _NUM
    + r")\s*MiB,\s*K\s*\((?P<kt>[^)]{1,32})\):\s*(?P<kmib>"
    + _NUM
    + r")\s*MiB,\s*V\s*\((?P<vt>[^)]{1,32})\):\s*(?P<vmib>"
    + _NUM
    + r")\s*MiB"
)
_RE_RS = re.compile(
    _FUNC
    + r"size\s*=\s*(?P<total>"
    + _NUM
    + r")\s*MiB\s*\(\s*(?P<cells>\d{1,12})\s+cells,\s*(?P<layers>\d{1,12})\s+layers,"
    r"\s*(?P<seqs>\d{1,12})\s+seqs(?:\s+(?P<rsseq>\d{1,12})\s+rs_seq)?\),\s*"
    r"R\s*\((?P<rt>[^)]{1,32})\):\s*(?P<rmib>"
    + _NUM
    + r")\s*MiB,\s*S\s*\((?P<st>[^)]{1,32})\):\s*(?P<smib>"
    + _NUM
    + r")\s*MiB"
    r"(?:,\s*P\s*\((?P<pt>[^)]{1,32})\):\s*(?P<pmib>" + _NUM + r")\s*MiB)?"
)
_RE_CACHE_ROLE = re.compile(
    r"creating\s+(?P<role>non-SWA|SWA|indexer)\s+KV cache,\s*size\s*=\s*(?P<cells>\d{1,12})\s+cells"
)
_CTX_KEYS = "n_ctx|n_ctx_seq|n_ctx_per_seq|n_seq_max|n_batch|n_ubatch|causal_attn|n_ctx_train"
_RE_CTX_INT = re.compile(_FUNC + r"(?P<key>" + _CTX_KEYS + r")\s*=\s*(?P<val>\d{1,12})\s*$")
_RE_FA = re.compile(_FUNC + r"flash_attn\s*=\s*(?P<val>\S{1,32})\s*$")
_RE_FA_RESOLVED = re.compile(
    r"Flash Attention (?:was auto, set to )?(?P<val>enabled|disabled)|"
    r"Flash Attention not supported, set to (?P<val2>disabled)"
)
_RE_FA_FORCED = re.compile(
    r"(?P<on>enabling flash_attn since)|(?P<off>flash_attn is not compatible .{0,200}? forcing off)"
)
_RE_UNIFIED = re.compile(_FUNC + r"kv_unified\s*=\s*(?P<val>\S{1,32})\s*$")
_RE_FILE_SIZE = re.compile(
    _FUNC
    + r"(?:file|model) size\s*=\s*(?P<size>"
    + _NUM
    + r")\s*(?P<unit>KiB|MiB|GiB)\s*\((?P<bpw>"
    + _NUM
    + r")\s*BPW\)"
)
_RE_FILE_TYPE = re.compile(_FUNC + r"(?:file type|file ftype|model ftype)\s*=\s*(?P<val>.{1,200})$")
_RE_PARAMS = re.compile(_FUNC + r"model params\s*=\s*(?P<n>" + _NUM + r")\s*(?P<unit>[KMBT])\s*$")
_RE_ARCH = re.compile(_FUNC + r"arch\s*=\s*(?P<val>\S{1,64})\s*$")
_RE_N_LAYER = re.compile(_FUNC + r"n_layer\s*=\s*(?P<val>\d{1,12})\s*$")
_RE_VOCAB_EMBD = re.compile(_FUNC + r"(?P<key>n_vocab|n_embd)\s*=\s*(?P<val>\d{1,12})\s*$")
_RE_PIPELINE = re.compile(r"pipeline parallelism enabled")
# The scheduler's graph splits (runs of nodes on one backend, ggml-backend.cpp ggml_backend_sched_split_graph):
#   "sched_reserve: graph: nodes = 727, splits = 2, input objects = 4, input tensors = 9"   (2026 builds)
#   "llama_context: graph splits = 2 (with bs=512), 1 (with bs=1)"                           (2025: the first is pp)
#   "llama_new_context_with_model: graph splits = 2"                                         (2024)
# a CUDA build's FlashAttention K-V pairs (system info) and a pair it has no kernel for (converted to f16, slow)
_RE_FA_QUANTS = re.compile(r"FA_QUANTS\s*=\s*(?P<val>[a-z0-9_,;-]{1,400})")
_RE_FA_CONVERTED = re.compile(
    r"no FlashAttention vector kernel compiled for K/V types (?P<k>[a-z0-9_]{1,16})-(?P<v>[a-z0-9_]{1,16})"
)
_RE_GRAPH_SPLITS = re.compile(r"graph(?::\s*nodes\s*=\s*\d{1,12},\s*|\s+)splits\s*=\s*(?P<n>\d{1,9})")
_RE_BREAKDOWN_GPU = re.compile(
    r"\|\s*-\s*(?P<name>\S{1,100})\s*(?:\((?P<desc>[^)]{0,200})\))?\s*\|\s*(?P<total>-?\d{1,12})\s*=\s*(?P<free>-?\d{1,12})\s*\+\s*\(\s*"
    r"(?P<self>-?\d{1,12})\s*=\s*(?P<model>-?\d{1,12})\s*\+\s*(?P<context>-?\d{1,12})\s*\+\s*(?P<compute>-?\d{1,12})\s*\)\s*\+\s*"
    r"(?P<unacc>-?\d{1,12})\s*\|"
)
_RE_BREAKDOWN_OTHER = re.compile(
    r"\|\s*-\s*(?P<name>\S{1,100})\s*\|\s*(?P<self>-?\d{1,12})\s*=\s*(?P<model>-?\d{1,12})\s*\+\s*(?P<context>-?\d{1,12})\s*\+\s*"
    r"(?P<compute>-?\d{1,12})\s*\|"
)
_RE_FIT = re.compile(
    r"(?P<ok>successfully fit params to free device memory)|"
    r"failed to fit params to free device memory:?\s*(?P<why>.{0,1000})"
)
# Per-tensor lines (debug level, or printed for overrides and fallbacks):
#   "tensor blk.0.ffn_up_exps.weight (q4_K) buffer type overridden to CUDA_Host"   (ik_llama: "Tensor ... overriden")
#   "tensor 'token_embd.weight' (q8_0) (and 0 others) cannot be used with preferred buffer type CUDA_Host, using CPU
#    instead"
_TENSOR_NAME = r"'?(?P<tensor>[A-Za-z0-9_.]{1,200})'?\s+(?:\((?P<type>[A-Za-z0-9_]{1,16})\)\s+)?"
_RE_TENSOR_OVERRIDE = re.compile(
    r"[Tt]ensor\s+" + _TENSOR_NAME + r"buffer type overrid{1,2}en to\s+(?P<buft>[^\s,]{1,100})"
)
_RE_TENSOR_FALLBACK = re.compile(
    r"tensor\s+" + _TENSOR_NAME + r"\(and\s+(?P<others>\d{1,9})\s+others\)\s+cannot be used with preferred buffer "
    r"type\s+(?P<pref>[^\s,]{1,100}),\s+using\s+(?P<buft>[^\s,]{1,100})\s+instead"
)
# MoE experts kept on the CPU on purpose: llama.cpp's --cpu-moe / --n-cpu-moe N (echoed in a command line or in
# its parameters), frontends' "MoE CPU layers: N".
_RE_CPU_MOE = re.compile(
    r"(?P<flag>--cpu-moe|(?<![\w-])-cmoe)(?![\w-])|"
    r"(?P<key>--n-cpu-moe|(?<![\w-])-ncmoe|n_cpu_moe|MoE CPU layers)\s*[:=]?\s*\"?(?P<n>\d{1,6})",
    re.IGNORECASE,
)
# Ollama's own planner (logs from before v0.30) and the runner command line it starts:
#   msg="offload to cuda" layers.requested=-1 layers.model=41 layers.offload=34 ...
#   msg="starting llama server" cmd="... --n-gpu-layers 34 ..."
_RE_OLLAMA_PLANNED_MODEL = re.compile(r"layers\.model=\"?(?P<n>\d{1,6})")
_RE_OLLAMA_PLANNED_OFFLOAD = re.compile(r"layers\.offload=\"?(?P<n>\d{1,6})")
_RE_NGL_ARG = re.compile(r"(?:--n-gpu-layers|(?<![\w-])-ngl|--gpu-layers)[\s=]+(?P<n>-?\d{1,9})")
# what makes an unparsed line an error line (lower-cased substrings: faster than a case-blind regex on long lines)
_ERROR_WORDS = (
    "error", "failed", "ggml_assert", "out of memory", "requires flash_attn", "requires flash attention", "cannot",
    "unable to",
)  # fmt: skip
_TRUE = {"1", "true", "enabled", "on", "yes"}
_FALSE = {"0", "false", "disabled", "off", "no"}


@dataclass(frozen=True)
class BufferLine:
    """One `<name> <kind> buffer size = <mib> MiB` line (already summed if repeated)."""

    name: str  # as printed: "CPU", "CPU_Mapped", "CUDA0", "CUDA_Host", ...
    kind: str  # "model" | "KV" | "RS" | "compute" | "output"
    mib: float

    @property
    def device(self) -> str | None:
        """The GPU this buffer lives on, or None for host memory (CPU, CPU_*, *_Host, BLAS)."""
        return gpu_device(self.name)


@dataclass(frozen=True)
class KVCacheLine:
    """One KV cache's `size = ...` line (one per cache: non-SWA then SWA for iSWA models)."""

    total_mib: float
    cells: int | None  # None for 2024 "KV self size" lines
    layers: int | None
    seqs: int | None  # n_seq_max
    streams: int | None  # n_stream (1 when unified); None when not printed
    k_type: str
    k_mib: float
    v_type: str
    v_mib: float
    role: str = ""  # "", "non-SWA", "SWA", "indexer" (from the preceding "creating ... KV cache" line)


@dataclass(frozen=True)
class RSCacheLine:
    """A recurrent-state cache's `size = ...` line."""

    total_mib: float
    cells: int
    layers: int
    seqs: int
    rs_seq: int | None
    r_type: str
    r_mib: float
    s_type: str
    s_mib: float
    p_type: str | None = None
    p_mib: float | None = None


@dataclass(frozen=True)
class DeviceLine:
    name: str
    description: str
    free_mib: int


@dataclass(frozen=True)
class BreakdownRow:
    """A row of the exit table `| memory breakdown [MiB] | total free self model context compute unaccounted |`."""

    name: str
    description: str | None
    self_mib: int
    model_mib: int
    context_mib: int
    compute_mib: int
    total_mib: int | None = None
    free_mib: int | None = None
    unaccounted_mib: int | None = None


@dataclass
class LlamaLog:
    """What one model load's log says; see the module docstring."""

    buffers: list[BufferLine] = field(default_factory=list)
    kv_caches: list[KVCacheLine] = field(default_factory=list)
    rs_caches: list[RSCacheLine] = field(default_factory=list)
    devices: list[DeviceLine] = field(default_factory=list)
    # older Vulkan builds name buffers by the GPU's description: `ggml_vulkan: 0 = <description> (...)` -> Vulkan0
    # ("" for a description two GPUs share: their buffers cannot be told apart by it)
    vulkan_devices: dict[str, str] = field(default_factory=dict)
    breakdown: list[BreakdownRow] = field(default_factory=list)
    offloaded_layers: tuple[int, int] | None = None
    n_ctx: int | None = None
    n_ctx_seq: int | None = None
    n_seq_max: int | None = None
    n_batch: int | None = None
    n_ubatch: int | None = None
    n_ctx_train: int | None = None
    flash_attn: bool | None = None  # resolved (auto -> what llama.cpp chose)
    flash_attn_setting: str | None = None  # as printed: "auto", "enabled", "disabled" (older: "1"/"0")
    kv_unified: bool | None = None
    pipeline_parallel: bool = False
    graph_splits: int | None = None  # the compute graph's splits at reserve (the last reserve line of the load)
    fa_quants: str | None = None  # a CUDA build's FlashAttention K-V pairs as its system info prints them
    fa_converted: str | None = None  # "q8_0-f16": a K-V pair the build has no FlashAttention kernel for (slow)
    arch: str | None = None
    n_layer: int | None = None
    n_vocab: int | None = None  # print_info: vocabulary and embedding width (token_embd is n_embd x n_vocab)
    n_embd: int | None = None
    file_type: str | None = None
    file_size_mib: float | None = None
    bpw: float | None = None
    n_params: float | None = None  # as printed ("268.10 M" -> 268100000.0)
    fit: str | None = None  # "ok" | "failed" | None
    fit_message: str | None = None
    tensor_types: dict[str, str] = field(default_factory=dict)  # per-tensor lines: tensor name -> ggml type
    host_tensors: dict[str, str] = field(default_factory=dict)  # tensor name -> host buffer type it was put in
    fallback_others: dict[str, int] = field(default_factory=dict)  # "tensor X ... (and N others) cannot be used ..."
    cpu_moe: str | None = None  # the text that keeps MoE experts on the CPU (--cpu-moe, n_cpu_moe = 3, ...)
    planned_layers: tuple[int, int] | None = None  # Ollama's planner: (layers.offload, layers.model)
    n_gpu_layers_arg: int | None = None  # a runner's --n-gpu-layers / -ngl, as started
    errors: list[str] = field(default_factory=list)
    earlier: list[LlamaLog] = field(default_factory=list)  # loads before the last one, oldest first

    def total_mib(self, kind: str, *, device: str | None = None, gpu_only: bool = False) -> float:
        """Sum of the buffers of one kind, optionally only one device's or only GPU buffers."""
        _check_kind(kind)
        total = 0.0
        for b in self.buffers:
            if b.kind != kind:
                continue
            if device is not None and b.name != device and b.device != device:
                continue
            if gpu_only and b.device is None:
                continue
            total += b.mib
        return round(total, 2)

    def by_device(self) -> dict[str, dict[str, float]]:
        """{device or "host": {kind: MiB}} with `_Mapped/_REPACK/_Host`-style names folded."""
        out: dict[str, dict[str, float]] = {}
        for b in self.buffers:
            key = b.device or "host"
            per = out.setdefault(key, {})
            per[b.kind] = round(per.get(b.kind, 0.0) + b.mib, 2)
        return out

    @property
    def kv_mib(self) -> float:
        """KV size from the cache `size =` lines (exact even under no_alloc)."""
        return round(sum(c.total_mib for c in self.kv_caches), 2)

    @property
    def rs_mib(self) -> float:
        return round(sum(c.total_mib for c in self.rs_caches), 2)

    @property
    def n_loads(self) -> int:
        return len(self.earlier) + 1


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown buffer kind {kind!r}; expected one of {', '.join(KINDS)}")


def gpu_device(name: str) -> str | None:
    """`CUDA0` -> `CUDA0`, `CUDA0_Mapped`-style suffixes stripped; host buffers (CPU, CPU_*, *_Host, BLAS) -> None."""
    if name in ("CPU", "BLAS", "AMX", "Host") or name.startswith("CPU_") or name.endswith("_Host"):
        return None
    for suffix in ("_Mapped", "_REPACK", "_Private", "_Split"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _as_bool(text: str) -> bool | None:
    t = text.strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    return None


class _Segment:
    """Accumulates one load."""

    def __init__(self) -> None:
        self.log = LlamaLog()
        self.buffers: dict[tuple[str, str], float] = {}
        self.content = False
        self.pending_role = ""
        self.fa_resolved: bool | None = None

    def next(self) -> _Segment:
        """The segment of the next load. What a launcher printed before the load began (Ollama's planner, the
        runner's command line) belongs to that next load, so it carries over until a later line replaces it."""
        seg = _Segment()
        seg.log.cpu_moe = self.log.cpu_moe
        seg.log.planned_layers = self.log.planned_layers
        seg.log.n_gpu_layers_arg = self.log.n_gpu_layers_arg
        return seg

    def finish(self) -> LlamaLog:
        log = self.log
        log.buffers = [BufferLine(name, kind, round(mib, 2)) for (name, kind), mib in self.buffers.items()]
        setting = log.flash_attn_setting
        if self.fa_resolved is not None:
            log.flash_attn = self.fa_resolved
        elif setting is not None:
            log.flash_attn = _as_bool(setting)
        return log


def parse(text: str | Iterable[str]) -> LlamaLog:
    """Parse llama.cpp log text (a string or an iterable of lines). Linear in the text's length: lines longer than
    MAX_LINE_CHARS are read up to that length."""
    lines = text.splitlines() if isinstance(text, str) else [ln for chunk in text for ln in chunk.splitlines()]
    done: list[LlamaLog] = []
    seg = _Segment()
    in_device_block = False
    vulkan: dict[str, str] = {}
    for raw in lines:
        line = raw[:MAX_LINE_CHARS].rstrip()
        if not line:
            continue
        v = _RE_VULKAN_DEVICE.search(line) if "ggml_vulkan:" in line else None
        if v is not None:  # printed once at start-up, before any load: it names the devices of every load
            desc, name = v["desc"].strip(), f"Vulkan{v['index']}"
            vulkan[desc] = name if vulkan.get(desc, name) == name else ""  # "": two GPUs of one description
            continue
        m = _RE_DEVICE.search(line) if "using device" in line else None
        if m:
            if seg.content and not in_device_block:
                done.append(seg.finish())
                seg = seg.next()
            in_device_block = True
            seg.log.devices.append(DeviceLine(m["name"], m["desc"], int(m["free"])))
            continue
        if _RE_LOAD_START.search(line):
            if seg.content:
                done.append(seg.finish())
                seg = seg.next()
            in_device_block = False
            continue
        in_device_block = False
        _parse_line(seg, line)
    last = seg.finish()
    last.earlier = done
    last.vulkan_devices = vulkan
    return last


# Line handlers: each gets the match of its pattern and says whether the line is used up (True), or whether the
# patterns after it should still be tried (False). `_parse_line` tries them in `_LINE_HANDLERS` order.


def _buffer_line(line: str) -> tuple[str, str, str | None, float] | None:
    """(function, buffer name, kind, MiB) of a `<name> [<kind>] buffer size = <mib> MiB` line, else None.

    The name is the one word right after a `func: ` prefix, else (a GPU named by its description) all the text after
    the last `func: ` prefix, when that text has no ':' or '='. Linear: one pass over the line's prefixes."""
    tail = _RE_BUFFER_TAIL.search(line)
    if tail is None:
        return None
    head = line[: tail.start()].rstrip()
    words = head.rsplit(None, 1)
    if not words:
        return None
    word_start = len(head) - len(words[-1])
    plain_from = max(head.rfind(":"), head.rfind("=")) + 1  # a described name has neither
    described: re.Match[str] | None = None
    for m in _RE_FUNC_ONLY.finditer(head):
        if m.end() == word_start:
            return m["func"], words[-1], tail["kind"], float(tail["mib"])
        if m.end() >= plain_from and len(head) - m.end() <= _SPACED_NAME_MAX:
            described = m
    if described is None:
        return None
    return described["func"], head[described.end() :], tail["kind"], float(tail["mib"])


def _on_buffer(seg: _Segment, func: str, name: str, kind: str | None, mib: float) -> None:
    if kind is None:  # 2024 "llm_load_tensors: CPU buffer size = ..." lines
        if "load_tensors" not in func:
            return
        kind = "model"
    key = (name, kind)
    seg.buffers[key] = seg.buffers.get(key, 0.0) + mib
    seg.content = True


def _on_kv_cache(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.kv_caches.append(
        KVCacheLine(
            total_mib=float(m["total"]),
            cells=int(m["cells"]),
            layers=int(m["layers"]),
            seqs=int(m["seqs"]),
            streams=int(m["streams"]) if m["streams"] else None,
            k_type=m["kt"].strip(),
            k_mib=float(m["kmib"]),
            v_type=m["vt"].strip(),
            v_mib=float(m["vmib"]),
            role=seg.pending_role,
        )
    )
    seg.pending_role = ""
    seg.content = True
    return True


def _on_rs_cache(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.rs_caches.append(
        RSCacheLine(
            total_mib=float(m["total"]),
            cells=int(m["cells"]),
            layers=int(m["layers"]),
            seqs=int(m["seqs"]),
            rs_seq=int(m["rsseq"]) if m["rsseq"] else None,
            r_type=m["rt"].strip(),
            r_mib=float(m["rmib"]),
            s_type=m["st"].strip(),
            s_mib=float(m["smib"]),
            p_type=m["pt"].strip() if m["pt"] else None,
            p_mib=float(m["pmib"]) if m["pmib"] else None,
        )
    )
    seg.content = True
    return True


def _on_kv_cache_2024(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.kv_caches.append(
        KVCacheLine(
            float(m["total"]), None, None, None, None, m["kt"].strip(), float(m["kmib"]), m["vt"].strip(),
            float(m["vmib"]),
        )
    )  # fmt: skip
    seg.content = True
    return True


def _on_cache_role(seg: _Segment, m: re.Match[str]) -> bool:
    seg.pending_role = m["role"]
    return True


def _on_offloaded(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.offloaded_layers = (int(m["n"]), int(m["m"]))
    seg.content = True
    return True


def _on_context_int(seg: _Segment, m: re.Match[str]) -> bool:
    field_name, val = str(m["key"]), int(m["val"])
    if field_name == "n_ctx_per_seq":
        field_name = "n_ctx_seq"
    if field_name != "causal_attn":
        setattr(seg.log, field_name, val)
    seg.content = True
    return True


def _on_flash_attn_setting(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.flash_attn_setting = m["val"]
    seg.content = True
    return True


def _on_flash_attn_resolved(seg: _Segment, m: re.Match[str]) -> bool:
    seg.fa_resolved = (m["val"] or m["val2"]) == "enabled"
    return True


def _on_flash_attn_forced(seg: _Segment, m: re.Match[str]) -> bool:
    seg.fa_resolved = bool(m["on"])
    return True


def _on_kv_unified(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.kv_unified = _as_bool(m["val"])
    return True


def _on_pipeline(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.pipeline_parallel = True
    return True


def _on_fa_quants(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.fa_quants = m["val"].strip(",;-")
    return False  # the system info line names other features too


def _on_fa_converted(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.fa_converted = f"{m['k']}-{m['v']}"
    return True


def _on_graph_splits(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.graph_splits = int(m["n"])  # a later reserve (a retry without pipeline parallelism) replaces it
    seg.content = True
    return True


def _on_file_size(seg: _Segment, m: re.Match[str]) -> bool:
    scale = {"KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}[m["unit"]]
    seg.log.file_size_mib = round(float(m["size"]) * scale, 2)
    seg.log.bpw = float(m["bpw"])
    return True


def _on_file_type(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.file_type = m["val"].strip()
    return True


def _on_params(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.n_params = float(round(float(m["n"]) * {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m["unit"]]))
    return True


def _on_arch(seg: _Segment, m: re.Match[str]) -> bool:
    if m["func"] not in _PRINT_INFO:
        return False  # another function's "arch = ...": not the model's
    seg.log.arch = m["val"]
    return True


def _on_n_layer(seg: _Segment, m: re.Match[str]) -> bool:
    if m["func"] not in _PRINT_INFO:
        return False
    seg.log.n_layer = int(m["val"])
    return True


def _on_vocab_embd(seg: _Segment, m: re.Match[str]) -> bool:
    if m["func"] not in _PRINT_INFO:
        return False
    setattr(seg.log, str(m["key"]), int(m["val"]))
    return True


def _on_breakdown_gpu(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.breakdown.append(
        BreakdownRow(
            m["name"], m["desc"], int(m["self"]), int(m["model"]), int(m["context"]), int(m["compute"]),
            int(m["total"]), int(m["free"]), int(m["unacc"]),
        )
    )  # fmt: skip
    return True


def _on_breakdown_other(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.breakdown.append(
        BreakdownRow(m["name"], None, int(m["self"]), int(m["model"]), int(m["context"]), int(m["compute"]))
    )
    return True


def _on_fit(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.fit = "ok" if m["ok"] else "failed"
    seg.log.fit_message = None if m["ok"] else (m["why"] or "").strip() or None
    return True


def _on_tensor_buffer(seg: _Segment, m: re.Match[str]) -> bool:
    tensor = m["tensor"]
    if m["type"]:
        seg.log.tensor_types[tensor] = m["type"]
    others = m.groupdict().get("others")
    if others is not None:
        seg.log.fallback_others[tensor] = int(others)
    if gpu_device(m["buft"]) is None:
        seg.log.host_tensors[tensor] = m["buft"]
    else:
        seg.log.host_tensors.pop(tensor, None)
    return True


def _on_cpu_moe(seg: _Segment, m: re.Match[str]) -> bool:
    if m["flag"] or int(m["n"]) > 0:
        seg.log.cpu_moe = m[0].strip()
    return True


def _on_ollama_planner(seg: _Segment, m: re.Match[str]) -> bool:
    offload = _RE_OLLAMA_PLANNED_OFFLOAD.search(m.string)
    if offload is not None:
        seg.log.planned_layers = (int(offload["n"]), int(m["n"]))
    return True


def _on_ngl_arg(seg: _Segment, m: re.Match[str]) -> bool:
    seg.log.n_gpu_layers_arg = int(m["n"])
    return False  # the same line may carry --cpu-moe


_PRINT_INFO = ("print_info", "llm_load_print_meta")  # the functions that print the model's own hparams
# The order matters: a line is given to the first pattern whose handler takes it.
# A needle, when given, must be in the line before its pattern is tried: a cheap substring test that keeps most
# patterns off most lines (the patterns are linear anyway; this keeps the constant small on 10 MB of noise).
_LINE_HANDLERS: tuple[tuple[str | None, re.Pattern[str], Callable[[_Segment, re.Match[str]], bool]], ...] = (
    ("cells", _RE_KV, _on_kv_cache),
    ("cells", _RE_RS, _on_rs_cache),
    ("KV self size", _RE_KV_OLD, _on_kv_cache_2024),
    ("KV cache", _RE_CACHE_ROLE, _on_cache_role),
    ("offloaded", _RE_OFFLOADED, _on_offloaded),
    ("n_", _RE_CTX_INT, _on_context_int),
    ("flash_attn", _RE_FA, _on_flash_attn_setting),
    ("Flash Attention", _RE_FA_RESOLVED, _on_flash_attn_resolved),
    ("flash_attn", _RE_FA_FORCED, _on_flash_attn_forced),
    ("kv_unified", _RE_UNIFIED, _on_kv_unified),
    ("pipeline", _RE_PIPELINE, _on_pipeline),
    ("splits", _RE_GRAPH_SPLITS, _on_graph_splits),
    ("FA_QUANTS", _RE_FA_QUANTS, _on_fa_quants),
    ("no FlashAttention vector kernel", _RE_FA_CONVERTED, _on_fa_converted),
    ("size", _RE_FILE_SIZE, _on_file_size),
    ("type", _RE_FILE_TYPE, _on_file_type),
    ("model params", _RE_PARAMS, _on_params),
    ("arch", _RE_ARCH, _on_arch),
    ("n_layer", _RE_N_LAYER, _on_n_layer),
    ("n_", _RE_VOCAB_EMBD, _on_vocab_embd),
    ("|", _RE_BREAKDOWN_GPU, _on_breakdown_gpu),
    ("|", _RE_BREAKDOWN_OTHER, _on_breakdown_other),
    ("fit params", _RE_FIT, _on_fit),
    ("buffer type", _RE_TENSOR_OVERRIDE, _on_tensor_buffer),
    ("buffer type", _RE_TENSOR_FALLBACK, _on_tensor_buffer),
    ("layers.model=", _RE_OLLAMA_PLANNED_MODEL, _on_ollama_planner),
    ("gpu-layers", _RE_NGL_ARG, _on_ngl_arg),
    ("-ngl", _RE_NGL_ARG, _on_ngl_arg),
    ("moe", _RE_CPU_MOE, _on_cpu_moe),
    ("MoE", _RE_CPU_MOE, _on_cpu_moe),
)


def _parse_line(seg: _Segment, line: str) -> None:
    if "buffer size" in line:
        found = _buffer_line(line)
        if found is not None:
            _on_buffer(seg, *found)
            return
    for needle, pattern, handler in _LINE_HANDLERS:
        if needle is not None and needle not in line:
            continue
        m = pattern.search(line)
        if m is not None and handler(seg, m):
            return
    low = line.lower()
    metadata = "print_info" in line or "llama_model_loader: - kv" in line
    if not metadata and any(word in low for word in _ERROR_WORDS):
        seg.log.errors.append(line.strip())


# -- Ollama's own log -----------------------------------------------------------------------------------------------

# `ollama serve` (v0.30+) logs the llama-server it starts with Go's slog text handler (llm/llama_server.go
# startLlamaServer): `... msg="starting llama-server" cmd="/usr/lib/ollama/llama-server --model ... -c 8192 ..."`,
# the value quoted as strconv.Quote does when it holds spaces. The child's own output follows in the same log.
_RE_OLLAMA_START = re.compile(r'msg="?starting llama-server"?\s{1,20}cmd=(?P<cmd>"(?:[^"\\]|\\.){0,4000}"|\S{1,4000})')
_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}
_RE_GO_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)")


@dataclass
class OllamaLaunch:
    """The llama-server command line `ollama serve` logged for one model load, and the flags that change memory.
    None: the flag is absent (llama-server's default applies: f16 cache, auto flash attention, fit decides -ngl)."""

    argv: list[str]
    model_path: str | None = None
    n_ctx: int | None = None  # -c: num_ctx x num_parallel
    n_parallel: int | None = None  # -np
    n_gpu_layers: int | None = None  # -ngl (only when num_gpu was set)
    type_k: str | None = None  # --cache-type-k (only when OLLAMA_KV_CACHE_TYPE is set)
    type_v: str | None = None
    flash_attn: str | None = None  # --flash-attn on|off|auto
    n_batch: int | None = None  # -b
    n_ubatch: int | None = None  # -ub
    split_mode: str | None = None  # --split-mode (none: one GPU, with --main-gpu)
    main_gpu: int | None = None
    mmproj: str | None = None  # --mmproj: a projector loaded beside the model
    draft: bool = False  # a draft or MTP model beside it (--spec-type, --spec-draft-model)


def _go_unquote(text: str) -> str:
    if not (len(text) >= 2 and text[0] == text[-1] == '"'):
        return text

    def one(m: re.Match[str]) -> str:
        code = m[1]
        if code[0] in "xuU" and len(code) > 1:
            return chr(int(code[1:], 16))
        return _GO_ESCAPES.get(code, code)

    return _RE_GO_ESCAPE.sub(one, text[1:-1])


_INT_FLAGS = {"-c": "n_ctx", "--ctx-size": "n_ctx", "-np": "n_parallel", "--parallel": "n_parallel",
              "-ngl": "n_gpu_layers", "--gpu-layers": "n_gpu_layers", "--n-gpu-layers": "n_gpu_layers",
              "-b": "n_batch", "--batch-size": "n_batch", "-ub": "n_ubatch", "--ubatch-size": "n_ubatch",
              "-mg": "main_gpu", "--main-gpu": "main_gpu"}  # fmt: skip
_STR_FLAGS = {"--model": "model_path", "-m": "model_path", "--cache-type-k": "type_k", "-ctk": "type_k",
              "--cache-type-v": "type_v", "-ctv": "type_v", "--flash-attn": "flash_attn", "-fa": "flash_attn",
              "--split-mode": "split_mode", "-sm": "split_mode", "--mmproj": "mmproj", "-mm": "mmproj"}  # fmt: skip
_DRAFT_FLAGS = ("--spec-type", "--spec-draft-model", "--model-draft", "-md")  # appendDraftArgs (MTP or a model)


def ollama_launch(line: str) -> OllamaLaunch | None:
    """The llama-server launch one `ollama serve` log line records, or None when it is not such a line. Pure."""
    m = _RE_OLLAMA_START.search(line[:MAX_LINE_CHARS])
    if m is None:
        return None
    argv = _go_unquote(m["cmd"]).split()
    launch = OllamaLaunch(argv=argv)
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else None
        if arg in _DRAFT_FLAGS:
            launch.draft = True
        if value is None:
            continue
        if arg in _INT_FLAGS and re.fullmatch(r"-?\d{1,9}", value):
            setattr(launch, _INT_FLAGS[arg], int(value))
        elif arg in _STR_FLAGS:
            path = arg in ("--model", "-m", "--mmproj", "-mm")
            setattr(launch, _STR_FLAGS[arg], value if path else value.lower())
    return launch


def last_ollama_launch(text: str) -> tuple[OllamaLaunch, str] | None:
    """The last llama-server launch an `ollama serve` log records, and the log text after it (that server's own
    output, and whatever Ollama logged meanwhile); None when the log holds no launch line. Pure."""
    found: tuple[OllamaLaunch, int] | None = None
    offset = 0
    for line in text.splitlines(keepends=True):
        offset += len(line)
        if "starting llama-server" in line:
            launch = ollama_launch(line)
            if launch is not None:
                found = (launch, offset)
    if found is None:
        return None
    return found[0], text[found[1] :]
