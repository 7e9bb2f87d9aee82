"""The host's llama.cpp CPU kernels timed: flash attention and matrix products, as the model runs them.

A CPU's speed is not priced well by any published figure.

- Attention: llama.cpp's CPU flash attention tiles a prompt's queries only where K and V are both f16 (or f32),
  splits one query's positions across threads only then, and otherwise runs a per-query vector loop that
  dequantizes each cached row (ggml-cpu ops.cpp ggml_compute_forward_flash_attn_ext_f16). On this project's 2-core
  test machine that loop ran at a tenth of the FP32 matrix product's rate, so a q8_0 cache at depth was predicted
  twice as fast as it ran.
- Weights: each ggml type has its own dot-product kernel, and on a CPU the kernel, not memory, often sets the pace.
  On the same machine SmolLM2-135M decoded faster as F16 than as Q4_1, and prefilled Q8_0 at 190 GFLOPS where
  Q4_1 reached 72. A token's matrix-vector products also read rows of 576 weights at 24 GB/s where rows of 4096
  read at 48.

How fast either runs depends on the CPU's vector units, the shapes and the types, so it is measured: the same
ggml op the model runs (GGML_OP_FLASH_ATTN_EXT, GGML_OP_MUL_MAT) on zero-filled tensors of the model's shapes and
types, on as many threads as llama.cpp starts, through llama-cpp-python's own ggml libraries (ctypes; no model,
nothing loaded). A type's weights are timed as a set: every matrix shape the model holds in that type, in
proportion, shrunk to a bounded graph (rows cut, never the row length, which sets the kernel's pace); a decode's
set is repeated past the CPU's last-level cache, since a token streams its weights from memory. Each weight is held
where llama.cpp's loader would put it: in the CPU backend's repacking buffer (CPU_REPACK) where the device runs its
product from there, which is another kernel (Q2_K decoded 18% faster repacked on the test machine).
Besides its products, llama.cpp spends a fixed time per op on a decoded token (norms, rope, the cache's writes, a
barrier per op, the graph's build): measured once by decoding the embedded model with llama.cpp itself.

The timing runs in a subprocess: a ggml assertion aborts its process, and a plan must survive that (it then prices
the kernel from the published figures, as without this).

    AttentionShape(n_head, n_head_kv, head_dim_k, head_dim_v)
    rate_key(kind, type_k, type_v, shape)     the key an attention rate is cached and looked up by
                                              ("decode q8_0-q8_0 9x3x64x64")
    WeightSet(type_name, shapes)              one type's matrices of a model: ((row length, rows, count), ...)
    weight_key(kind, weights)                 the key a weight set's rate is kept by ("prefill q4_k 576x1536*2")
    weight_sets(matrices)                     the weight sets that stand for a model's matrices, with their FLOPs
    measure_rates(wanted, threads=, weights=)  {key: FLOPs per second} for each attention job and weight set it
                                              could time; {} when llama-cpp-python's ggml is not there
    measure_tensor_overhead(model, threads=)  llama.cpp's fixed seconds per block tensor of a decoded token

Run as `python -m launcher.measure.kernels` it reads a request as JSON on stdin and writes the rates as JSON.
"""

from __future__ import annotations

import ctypes
import json
import math
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("decode", "prefill")
DECODE_POSITIONS = 2048  # cached positions a decoded token attends to while timed
PREFILL_QUERIES = 64  # GGML_FA_TILE_Q: a batch this big takes the tiled path where K and V are f16 (ggml-cpu common.h)
PREFILL_POSITIONS = 1024
OPS = 8  # ops per graph, each with its own K and V (like layers): one graph call starts the threads once for all
GRAPH_FLOPS = 250_000_000  # a graph's work at most (while it holds more than one op or MIN_POSITIONS positions)
MIN_POSITIONS = 256
MAX_GRAPH_BYTES = 512 * 2**20  # a graph's tensors at most: a shape past it (a hostile header's) is left unknown
SECONDS = 0.2  # timed per measurement, after one untimed run, in ROUNDS rounds
ROUNDS = 5
MAX_REPS = 200
TIMEOUT_S = 60.0  # the whole subprocess; a slow machine gives up on the measurement, not on the plan
MAX_SHAPES = 4  # distinct attention shapes timed for one request (a model has one or two)
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
# weight sets (GGML_OP_MUL_MAT)
PREFILL_BATCH = 512  # llama.cpp's default ubatch: the tokens one prompt matrix product multiplies at once
WEIGHT_FLOPS = 1_000_000_000  # a prefill graph's work at most (rows cut to fit)
DECODE_BYTES = (64 * 2**20, 256 * 2**20)  # a decode graph's weights: 4x the last-level cache, within these bounds
WEIGHT_SECONDS = 0.05  # timed per weight set, in ROUNDS rounds: a plan may time dozens of them
MAX_WEIGHT_OPS = 512  # matrix products in one graph
MAX_WEIGHT_SHAPES = 16  # distinct shapes in one weight set
MAX_WEIGHT_SETS = 96  # weight sets timed for one request (a plan's quant ladder holds a few per quant)
MAX_COUNT = 64  # how many of one shape a set holds, in proportion


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer's heads and head sizes (queries, K/V heads, K and V head size)."""

    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int

    def key(self) -> str:
        return f"{self.n_head}x{self.n_head_kv}x{self.head_dim_k}x{self.head_dim_v}"

    def valid(self) -> bool:
        return (0 < self.n_head <= 1024 and 0 < self.n_head_kv <= self.n_head and self.n_head % self.n_head_kv == 0
                and 0 < self.head_dim_k <= 1024 and 0 < self.head_dim_v <= 1024)  # fmt: skip


def rate_key(kind: str, type_k: str, type_v: str, shape: AttentionShape) -> str:
    return f"{kind} {type_k}-{type_v} {shape.key()}"


@dataclass(frozen=True)
class WeightSet:
    """The matrices a model holds in one ggml type (lower case, "q4_k"), as (row length, rows, count) per distinct
    shape: count says how many of that shape, in proportion to the others (the fewest is 1)."""

    type_name: str
    shapes: tuple[tuple[int, int, int], ...]

    def key(self) -> str:
        return f"{self.type_name} " + ",".join(f"{k}x{rows}*{count}" for k, rows, count in self.shapes)

    def valid(self) -> bool:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block = GGML_QUANT_SIZES[GGMLQuantizationType[self.type_name.upper()]][0]
        except KeyError:
            return False
        return 0 < len(self.shapes) <= MAX_WEIGHT_SHAPES and all(
            0 < k <= 2**17 and k % block == 0 and 0 < rows <= 2**24 and 0 < count <= MAX_COUNT
            for k, rows, count in self.shapes
        )


def weight_key(kind: str, weights: WeightSet) -> str:
    return f"{kind} {weights.key()}"


SET_OPS = 32  # matrices in one weight set at most, its shapes kept in proportion


def multiplies(name: str, shape: Sequence[int]) -> bool:
    """Whether a model's tensor is a weight matrix a token multiplies by: 2-D (or stacked 3-D) `.weight` tensors, not
    a convolution's."""
    return len(shape) >= 2 and name.endswith(".weight") and "conv1d" not in name


def weight_sets(matrices: Iterable[tuple[str, int, int, float, bool]]) -> dict[WeightSet, float]:
    """The weight sets that stand for a model's matrices, each (type, row length, rows, how many a token multiplies
    by, whether it is the output layer), with the FLOPs per token each set stands for: one set per type (the output
    layer a set of its own), each shape of the type counted in proportion to how many of it a token multiplies by.
    Pure."""
    groups: dict[tuple[str, bool], dict[tuple[int, int], float]] = {}
    for type_name, k, rows, count, output in matrices:
        shapes = groups.setdefault((type_name.lower(), output), {})
        shapes[(k, rows)] = shapes.get((k, rows), 0.0) + count
    out: dict[WeightSet, float] = {}
    for (type_name, _), shapes in groups.items():
        least = min(shapes.values())
        counts = {shape: max(1, round(c / least)) for shape, c in shapes.items()}
        total = sum(counts.values())
        if total > SET_OPS:
            counts = {shape: max(1, round(c * SET_OPS / total)) for shape, c in counts.items()}
        weights = WeightSet(type_name, tuple(sorted((k, rows, n) for (k, rows), n in counts.items())))
        out[weights] = out.get(weights, 0.0) + sum(2 * k * rows * c for (k, rows), c in shapes.items())
    return out


def measure_tensor_overhead(model: Path, *, threads: int, timeout_s: float = TIMEOUT_S) -> float | None:
    """Seconds that llama.cpp spends on a decoded token beyond its matrix products, per block tensor of the model, on
    `threads` threads: `model` (a small GGUF: the embedded one) decoded by llama.cpp itself, token by token at a
    shallow depth, less its weights at the rates measure_rates times, over its count of block tensors. What a graph
    of small ops costs besides its products (norms, rope, the cache's writes, a barrier per op, the graph's build
    and scheduling) is the host's and llama.cpp's, not the model's size, and grows with the ops a layer holds, which
    its tensors stand for (a norm's weight is a norm and a multiply; a matrix, a product and what follows it). It
    sets a small model's decode: 1 to 2.5 ms of SmolLM2-135M's 7 on the 2-core test machine. None when it could
    not be measured."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None or not model.is_file():
        return None
    out = _worker({"threads": max(1, threads), "overhead": str(model)}, timeout_s)
    try:
        value = json.loads(out or b"{}").get("tensor_overhead_s")
    except (ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and 0 <= value < 0.1 else None


def _worker(request: dict[str, Any], timeout_s: float) -> bytes:
    """What this module, run as a subprocess on `request`, wrote to its standard output; on a timeout, what it had
    written by then (run() kills it then, and on Ctrl-C); b"" when it could not start."""
    from launcher.measure.dryrun import PACKAGE_PARENT, worker_env

    try:
        done = subprocess.run([sys.executable, "-m", "launcher.measure.kernels"], input=json.dumps(request).encode(),
                              capture_output=True, timeout=timeout_s, env=worker_env(), cwd=PACKAGE_PARENT,
                              check=False)  # fmt: skip
    except subprocess.TimeoutExpired as late:
        return late.stdout if isinstance(late.stdout, bytes) else b""
    except OSError:
        return b""
    return done.stdout or b""


def measure_rates(
    wanted: Sequence[tuple[str, str, str, AttentionShape]],
    *,
    threads: int,
    weights: Sequence[tuple[str, WeightSet]] = (),
    timeout_s: float = TIMEOUT_S,
) -> dict[str, float]:
    """FLOPs per second of llama.cpp's CPU kernels on `threads` threads: attention for each (kind, type_k, type_v,
    shape) in `wanted` (kind: "decode", one query; "prefill", a batch of queries), by rate_key, and matrix products
    for each (kind, weight set) in `weights` (decode: one token; prefill: PREFILL_BATCH tokens), by weight_key; what
    could not be timed is left out (unknown). FLOPs as launcher.speed counts them: attention, 2 x heads x (K + V
    head size) per position; a matrix product, 2 x row length x rows per token."""
    import importlib.util

    jobs: list[dict[str, Any]] = []
    for kind, type_k, type_v, shape in wanted:
        if kind in KINDS and type_k in CACHE_TYPES and type_v in CACHE_TYPES and shape.valid():
            jobs.append({"op": "attention", "kind": kind, "type_k": type_k, "type_v": type_v, "shape": shape.__dict__})
    sets = [(kind, w) for kind, w in dict.fromkeys(weights) if kind in KINDS and w.valid()][:MAX_WEIGHT_SETS]
    jobs += [{"op": "mul_mat", "kind": kind, "type": w.type_name, "shapes": w.shapes} for kind, w in sets]
    if not jobs or importlib.util.find_spec("llama_cpp") is None:
        return {}
    out = _worker({"threads": max(1, threads), "jobs": jobs}, timeout_s)
    rates: dict[str, float] = {}
    for line in (out or b"").splitlines():
        try:
            found = json.loads(line).get("rates", {})
            rates.update({str(k): float(v) for k, v in found.items() if isinstance(v, (int, float)) and v > 0})
        except (ValueError, AttributeError):
            continue
    return rates


# ---------------------------------------------------------------------------------------------------------------
# the subprocess: ggml through ctypes


def _libraries() -> tuple[Any, Any]:
    import ctypes
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("llama-cpp-python is not installed")
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    suffix = ".dylib" if sys.platform == "darwin" else ".dll" if sys.platform == "win32" else ".so"
    prefix = "" if sys.platform == "win32" else "lib"
    base = ctypes.CDLL(str(lib / f"{prefix}ggml-base{suffix}"), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    cpu = ctypes.CDLL(str(lib / f"{prefix}ggml-cpu{suffix}"), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    p = ctypes.c_void_p
    base.ggml_init.restype = p
    base.ggml_new_tensor_4d.restype = p
    base.ggml_new_tensor_4d.argtypes = [p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64]  # fmt: skip
    base.ggml_get_data.restype = p
    base.ggml_get_data.argtypes = [p]
    base.ggml_nbytes.restype = ctypes.c_size_t
    base.ggml_nbytes.argtypes = [p]
    base.ggml_row_size.restype = ctypes.c_size_t
    base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    base.ggml_tensor_overhead.restype = ctypes.c_size_t
    base.ggml_graph_overhead.restype = ctypes.c_size_t
    base.ggml_flash_attn_ext.restype = p
    base.ggml_flash_attn_ext.argtypes = [p, p, p, p, p, ctypes.c_float, ctypes.c_float, ctypes.c_float]
    base.ggml_new_graph.restype = p
    base.ggml_new_graph.argtypes = [p]
    base.ggml_mul_mat.restype = p
    base.ggml_mul_mat.argtypes = [p, p, p]
    base.ggml_new_graph_custom.restype = p
    base.ggml_new_graph_custom.argtypes = [p, ctypes.c_size_t, ctypes.c_bool]
    base.ggml_graph_overhead_custom.restype = ctypes.c_size_t
    base.ggml_graph_overhead_custom.argtypes = [ctypes.c_size_t, ctypes.c_bool]
    # the CPU backend's extra buffer types (repacked weights), as llama.cpp's loader finds and picks them
    cpu.ggml_backend_cpu_reg.restype = p
    base.ggml_backend_reg_dev_get.restype = p
    base.ggml_backend_reg_dev_get.argtypes = [p, ctypes.c_size_t]
    base.ggml_backend_reg_get_proc_address.restype = p
    base.ggml_backend_reg_get_proc_address.argtypes = [p, ctypes.c_char_p]
    base.ggml_backend_alloc_ctx_tensors_from_buft.restype = p
    base.ggml_backend_alloc_ctx_tensors_from_buft.argtypes = [p, p]
    base.ggml_backend_dev_supports_op.restype = ctypes.c_bool
    base.ggml_backend_dev_supports_op.argtypes = [p, p]
    base.ggml_backend_tensor_set.argtypes = [p, p, ctypes.c_size_t, ctypes.c_size_t]
    base.ggml_backend_buffer_free.argtypes = [p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [p]
    base.ggml_log_set.argtypes = [p, p]
    base.ggml_build_forward_expand.argtypes = [p, p]
    base.ggml_free.argtypes = [p]
    cpu.ggml_graph_plan.restype = _Plan
    cpu.ggml_graph_plan.argtypes = [p, ctypes.c_int, p]
    cpu.ggml_graph_compute.restype = ctypes.c_int
    cpu.ggml_graph_compute.argtypes = [p, ctypes.POINTER(_Plan)]
    cpu.ggml_cpu_init()
    base.ggml_log_set(_quiet, None)  # a repacking buffer logs every tensor it repacks
    return base, cpu


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level: int, text: bytes, user_data: Any) -> None:
    return None


class _Plan(ctypes.Structure):
    """ggml_cplan (ggml-cpu.h): its first two fields, the work buffer's size and address, then room for the rest
    (threads, threadpool, abort callback, flags), whose layout changes between ggml versions. Returned by value, a
    struct this big comes back through memory the caller provides, so the room only needs to be enough."""

    _fields_ = (("work_size", ctypes.c_size_t), ("work_data", ctypes.c_void_p), ("rest", ctypes.c_byte * 240))


def _compute(cpu: Any, graph: Any, threads: int) -> bool:
    """Runs `graph` (a _Graph or _WeightGraph) once on `threads` threads, with a work buffer of its own (not taken
    from its context: ggml_graph_compute_with_ctx's need for room there varies from one graph to the next)."""
    import ctypes

    if graph.plan is None:
        graph.plan = cpu.ggml_graph_plan(graph.graph, threads, None)
        graph.work = ctypes.create_string_buffer(max(1, graph.plan.work_size))
        graph.plan.work_data = ctypes.addressof(graph.work)
    return bool(cpu.ggml_graph_compute(graph.graph, ctypes.byref(graph.plan)) == 0)


def _context(base: Any, size: int, *, no_alloc: bool = False) -> Any:
    """A ggml context of `size` bytes that allocates its tensors (ggml_init), or only describes them (`no_alloc`)."""
    import ctypes

    class InitParams(ctypes.Structure):
        _fields_ = (("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool))

    ctx = base.ggml_init(InitParams(size, None, no_alloc))
    if not ctx:
        raise MemoryError(f"ggml_init({size})")
    return ctx


def _zeros(base: Any, tensor: Any) -> Any:
    """`tensor` filled with zeros: a valid value of every type, and the kernels' work does not depend on it (every
    page written, so a read is the memory's, not the kernel's shared zero page)."""
    import ctypes

    ctypes.memset(base.ggml_get_data(tensor), 0, base.ggml_nbytes(tensor))
    return tensor


class _Graph:
    """One job's graph: up to OPS flash-attention ops, each with its own zero-filled Q, K, V and mask, in its own ggml
    context (freed by close)."""

    seconds = SECONDS
    plan: Any = None  # its ggml_cplan and work buffer, made by _compute
    work: Any = None

    def __init__(self, base: Any, job: dict[str, Any]) -> None:
        from gguf import GGMLQuantizationType

        self.base = base
        shape = AttentionShape(**job["shape"])
        tk, tv = (int(GGMLQuantizationType[job[t].upper()]) for t in ("type_k", "type_v"))
        f32, f16 = int(GGMLQuantizationType.F32), int(GGMLQuantizationType.F16)
        decode = job["kind"] == "decode"
        queries, positions = (1, DECODE_POSITIONS) if decode else (PREFILL_QUERIES, PREFILL_POSITIONS)
        padded = -(-queries // 64) * 64  # the mask's rows: at least the queries, padded (GGML_KQ_MASK_PAD)
        h, hkv, dk, dv = shape.n_head, shape.n_head_kv, shape.head_dim_k, shape.head_dim_v
        # a big model's heads make one op costly: fewer ops, then fewer positions (a prompt's at least
        # MIN_POSITIONS), so that one graph stays near GRAPH_FLOPS and the whole timing near a second
        per_position = 2 * h * (dk + dv) * queries
        positions = max(min(positions, MIN_POSITIONS), min(positions, GRAPH_FLOPS // per_position))
        ops = max(1, min(OPS, GRAPH_FLOPS // (per_position * positions)))
        per_op = (base.ggml_row_size(f32, dk) * queries * h + base.ggml_row_size(tk, dk) * positions * hkv
                  + base.ggml_row_size(tv, dv) * positions * hkv + base.ggml_row_size(f16, positions) * padded
                  + base.ggml_row_size(f32, dv) * h * queries)  # fmt: skip
        size = ops * (per_op + 5 * base.ggml_tensor_overhead()) + base.ggml_graph_overhead() + 2**20
        self.flops = per_position * positions * ops
        if size > MAX_GRAPH_BYTES:  # checked before anything is allocated
            raise MemoryError(f"{size} bytes for one graph of {shape.key()}")
        self.ctx = _context(base, size)
        self.graph = base.ggml_new_graph(self.ctx)
        for _ in range(ops):
            q = _zeros(base, base.ggml_new_tensor_4d(self.ctx, f32, dk, queries, h, 1))
            k = _zeros(base, base.ggml_new_tensor_4d(self.ctx, tk, dk, positions, hkv, 1))
            v = _zeros(base, base.ggml_new_tensor_4d(self.ctx, tv, dv, positions, hkv, 1))
            mask = _zeros(base, base.ggml_new_tensor_4d(self.ctx, f16, positions, padded, 1, 1))
            out = base.ggml_flash_attn_ext(self.ctx, q, k, v, mask, dk**-0.5, 0.0, 0.0)
            base.ggml_build_forward_expand(self.graph, out)

    def close(self) -> None:
        self.base.ggml_free(self.ctx)


class _Repack:
    """The CPU backend's extra buffer types (CPU_REPACK; AMX, KleidiAI where built): llama.cpp's loader puts a weight
    in the first one whose device says it runs the weight's matrix product (ggml_backend_dev_supports_op), and that
    buffer repacks the weight into the layout of a faster kernel (Q4_K, Q2_K, Q4_0, IQ4_NL... on AVX2). A weight is
    timed in the buffer llama.cpp would load it into, asked the same way."""

    def __init__(self, base: Any, cpu: Any) -> None:
        import ctypes

        self.base = base
        self.bufts: list[int] = []
        self.dev = None
        reg = cpu.ggml_backend_cpu_reg()
        if not reg:
            return
        self.dev = base.ggml_backend_reg_dev_get(reg, 0)
        address = base.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not self.dev or not address:
            return
        found = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(address)(self.dev)
        for i in range(16):  # a NULL-terminated list
            if not found or not found[i]:
                break
            self.bufts.append(found[i])

    def buffer_type(self, wtype: int, k: int, rows: int, n: int) -> int | None:
        """The extra buffer type a (k, rows) weight of `wtype` multiplying `n` tokens would be loaded into; None: a
        plain host buffer."""
        from gguf import GGMLQuantizationType

        base = self.base
        for buft in self.bufts:
            ctx = _context(base, 4 * base.ggml_tensor_overhead() + 4096, no_alloc=True)
            try:
                weight = base.ggml_new_tensor_4d(ctx, wtype, k, rows, 1, 1)
                buffer = base.ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft)  # address space only: untouched
                if not buffer:
                    continue
                x = base.ggml_new_tensor_4d(ctx, int(GGMLQuantizationType.F32), k, n, 1, 1)
                runs = base.ggml_backend_dev_supports_op(self.dev, base.ggml_mul_mat(ctx, weight, x))
                base.ggml_backend_buffer_free(buffer)
                if runs:
                    return int(buft)
            finally:
                base.ggml_free(ctx)
        return None


_REPACK: _Repack | None = None


class _WeightGraph:
    """One weight set's graph: its matrices, zero-filled, each multiplying one token (decode) or PREFILL_BATCH
    (prefill) f32 activations shared by every matrix of a row length. Rows are cut in proportion where the set's work
    (prefill) or bytes (decode) pass the graph's bound; a decode's set is repeated until its weights pass the
    last-level cache several times over."""

    seconds = WEIGHT_SECONDS
    plan: Any = None
    work: Any = None

    def __init__(self, base: Any, cpu: Any, job: dict[str, Any]) -> None:
        import ctypes

        from gguf import GGMLQuantizationType

        self.base, self.cpu = base, cpu
        weights = _weight_set(job)
        if not weights.valid():
            raise MemoryError(f"not a weight set: {weights.key()}")
        kind = job["kind"]
        wtype, f32 = int(GGMLQuantizationType[weights.type_name.upper()]), int(GGMLQuantizationType.F32)
        n = 1 if kind == "decode" else PREFILL_BATCH
        one = sum(base.ggml_row_size(wtype, k) * rows * count for k, rows, count in weights.shapes)
        work = sum(2 * k * rows * count * n for k, rows, count in weights.shapes)
        ops_one = sum(count for _, _, count in weights.shapes)
        if kind == "decode":
            target = _decode_bytes()
            cut, repeats = min(1.0, target / one), max(1, target // one)
        else:
            cut, repeats = min(1.0, WEIGHT_FLOPS / work), max(1, WEIGHT_FLOPS // work)
        repeats = max(1, min(repeats, MAX_WEIGHT_OPS // ops_one))
        shapes = [(k, _cut(rows, cut), count) for k, rows, count in weights.shapes]
        size = base.ggml_graph_overhead_custom(2 * MAX_WEIGHT_OPS + 64, False)
        for k, rows, count in shapes:
            ops = count * repeats
            size += ops * (base.ggml_row_size(wtype, k) * rows + 4 * rows * n + 2 * base.ggml_tensor_overhead())
        size += sum(4 * k * n + base.ggml_tensor_overhead() for k in {k for k, _, _ in shapes})  # activations
        size += size // 64 + 2**16  # ggml's object headers and alignment
        if size > MAX_GRAPH_BYTES or ops_one > MAX_WEIGHT_OPS:  # checked before anything is allocated
            raise MemoryError(f"{size} bytes for one graph of {weights.key()}")
        self.ctx = _context(base, size)
        self.contexts, self.buffers = [self.ctx], []
        self.graph = base.ggml_new_graph_custom(self.ctx, 2 * MAX_WEIGHT_OPS + 64, False)
        inputs = {
            k: _zeros(base, base.ggml_new_tensor_4d(self.ctx, f32, k, n, 1, 1)) for k in {k for k, _, _ in shapes}
        }
        # each weight where llama.cpp would load it: a repacking buffer type, else the graph's own context
        global _REPACK
        _REPACK = _REPACK or _Repack(base, self.cpu)
        buft_of = {(k, rows): _REPACK.buffer_type(wtype, k, rows, n) for k, rows, _ in shapes}
        held: dict[int, Any] = {}
        for chosen in {b for b in buft_of.values() if b is not None}:
            ops = sum(count * repeats for k, rows, count in shapes if buft_of[(k, rows)] == chosen)
            held[chosen] = _context(base, (ops + 8) * base.ggml_tensor_overhead(), no_alloc=True)
            self.contexts.append(held[chosen])
        slots = []
        for _ in range(repeats):
            for k, rows, count in shapes:
                buft = buft_of[(k, rows)]
                for _ in range(count):
                    context = held[buft] if buft is not None else self.ctx
                    weight = base.ggml_new_tensor_4d(context, wtype, k, rows, 1, 1)
                    slots.append((weight, k, rows, buft is not None))
        for chosen, context in held.items():
            buffer = base.ggml_backend_alloc_ctx_tensors_from_buft(context, chosen)
            if not buffer:
                raise MemoryError(f"a {base.ggml_backend_buft_name(chosen)} buffer for {weights.key()}")
            self.buffers.append(buffer)
        source = ctypes.create_string_buffer(max((base.ggml_nbytes(w) for w, *_, repacked in slots if repacked),
                                                 default=1))  # fmt: skip
        self.flops = 0
        for weight, k, rows, repacked in slots:
            if repacked:  # the buffer repacks what it is given, zeros here, writing every page
                base.ggml_backend_tensor_set(weight, source, 0, base.ggml_nbytes(weight))
            else:
                _zeros(base, weight)
            base.ggml_build_forward_expand(self.graph, base.ggml_mul_mat(self.ctx, weight, inputs[k]))
            self.flops += 2 * k * rows * n

    def close(self) -> None:
        for buffer in self.buffers:
            self.base.ggml_backend_buffer_free(buffer)
        for context in self.contexts:
            self.base.ggml_free(context)


ROW_TILE = 64  # rows are cut to whole tiles of this many: llamafile's tinyBLAS takes F16 matrices (and others) only
# in whole tiles, and ggml falls back to a per-row loop 2.5x slower for a remainder (576x211 F16: 64 GFLOPS, 576x208:
# 162, on the 2-core test machine)


def _cut(rows: int, cut: float) -> int:
    """`rows` x `cut` in whole ROW_TILEs, at least one (or all of them, when there are fewer)."""
    if cut >= 1.0:
        return rows
    return max(min(rows, ROW_TILE), int(rows * cut) // ROW_TILE * ROW_TILE)


def _weight_set(job: dict[str, Any]) -> WeightSet:
    return WeightSet(str(job["type"]), tuple((int(k), int(rows), int(count)) for k, rows, count in job["shapes"]))


def _decode_bytes() -> int:
    """A decode graph's weights: 4x the CPU's last-level cache (Linux reports it), within DECODE_BYTES."""
    low, high = DECODE_BYTES
    largest = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip() if path.is_file() else ""
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text[:-1].isdigit() and text[-1] in units:
            largest = max(largest, int(text[:-1]) * units[text[-1]])
    return max(low, min(high, 4 * largest))


def _rates(base: Any, cpu: Any, jobs: list[dict[str, Any]], threads: int) -> list[float | None]:
    """FLOPs per second of each job: its graph's fastest round of ROUNDS, the rounds taken in turn over
    the jobs (a spell of a busy or noisy machine, which only ever slows a round down, then costs each job one round
    rather than one job all of its rounds)."""
    import time

    graphs: list[_Graph | _WeightGraph | None] = []
    try:
        for job in jobs:
            try:
                graphs.append(_WeightGraph(base, cpu, job) if job.get("op") == "mul_mat" else _Graph(base, job))
            except MemoryError:  # too big to time (or no memory for it): that job's rate stays unknown
                graphs.append(None)
        best: list[float | None] = [None] * len(graphs)
        for graph in graphs:  # untimed: pages touched, threads warm
            if graph is not None and not _compute(cpu, graph, threads):
                return [None] * len(jobs)
        for _ in range(ROUNDS):
            for i, graph in enumerate(graphs):
                if graph is None:
                    continue
                reps, started = 0, time.perf_counter()
                while reps < 1 or (time.perf_counter() - started < graph.seconds / ROUNDS and reps < MAX_REPS):
                    if not _compute(cpu, graph, threads):
                        return [None] * len(jobs)
                    reps += 1
                per_graph = (time.perf_counter() - started) / reps
                best[i] = per_graph if best[i] is None else min(per_graph, best[i] or per_graph)
        return [g.flops / b if g is not None and b else None for g, b in zip(graphs, best, strict=True)]
    finally:
        for graph in graphs:
            if graph is not None:
                graph.close()


OVERHEAD_TOKENS = 16  # tokens decoded per round while the fixed cost is measured, after one untimed


def _tensor_overhead(base: Any, cpu: Any, path: str, threads: int) -> float | None:
    """measure_tensor_overhead's measurement, in this subprocess."""
    import ctypes
    import time

    import llama_cpp
    from gguf import GGMLQuantizationType

    from launcher.gguf.sources import read_header

    @llama_cpp.llama_log_callback
    def quiet(level: int, text: bytes, user_data: Any) -> None:
        return None

    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    if not model:
        return None
    context = None
    try:
        settings = llama_cpp.llama_context_default_params()
        settings.n_ctx, settings.n_batch, settings.n_ubatch = 256, 8, 8
        settings.n_threads = settings.n_threads_batch = threads
        settings.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        settings.type_k = settings.type_v = int(GGMLQuantizationType.Q8_0)  # fitquant's default cache
        context = llama_cpp.llama_init_from_model(model, settings)
        if not context:
            return None
        token = (llama_cpp.llama_token * 1)(1)
        batch = llama_cpp.llama_batch_get_one(token, 1)
        memory = llama_cpp.llama_get_memory(context)
        best = None
        for _ in range(ROUNDS):
            llama_cpp.llama_memory_clear(memory, True)
            if llama_cpp.llama_decode(context, batch) != 0:
                return None
            started = time.perf_counter()
            for _ in range(OVERHEAD_TOKENS):
                if llama_cpp.llama_decode(context, batch) != 0:
                    return None
            per_token = (time.perf_counter() - started) / OVERHEAD_TOKENS
            best = per_token if best is None else min(best, per_token)
    finally:
        if context:
            llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)
    # the same model's matrices, timed as a plan's prediction times them (weight sets, one per type)
    tensors = read_header(path).tensors
    names = {t.name for t in tensors}
    matrices = []
    for t in tensors:
        output = t.name == "output.weight" or (t.name == "token_embd.weight" and "output.weight" not in names)
        if multiplies(t.name, t.shape) and (t.name.startswith("blk.") or output):
            matrices.append((t.type_name, t.shape[0], t.shape[1], float(math.prod(t.shape[2:])), output))
    products = 0.0
    for weights, flops in weight_sets(matrices).items():
        job = {"op": "mul_mat", "kind": "decode", "type": weights.type_name, "shapes": weights.shapes}
        rate = _rates(base, cpu, [job], threads)[0]
        if not rate:
            return None
        products += flops / rate
    blocks = sum(1 for t in tensors if t.name.startswith("blk."))
    return max(0.0, best - products) / max(1, blocks) if best is not None else None


def main() -> int:
    """Times the request's jobs and writes one JSON line of rates per batch as it is timed (attention jobs
    together, then each weight set alone: its graph is allocated, timed and freed before the next), so a parent
    that gives up on a slow machine keeps what was timed; or, for a request naming a model to decode ("overhead"),
    writes its fixed cost per block tensor."""
    request = json.loads(sys.stdin.read() or "{}")
    threads = max(1, int(request.get("threads", 1)))
    try:
        base, cpu = _libraries()
    except (OSError, AttributeError):
        print(json.dumps({"rates": {}}))
        return 0
    if request.get("overhead"):
        print(json.dumps({"tensor_overhead_s": _tensor_overhead(base, cpu, str(request["overhead"]), threads)}))
        return 0
    attention, weights, shapes = [], [], set()
    for job in request.get("jobs", []):
        if job.get("op") == "mul_mat":
            weights.append(job)
            continue
        shape = AttentionShape(**job["shape"])
        shapes.add(shape.key())
        if len(shapes) <= MAX_SHAPES and shape.valid():
            attention.append(job)
    for batch in ([attention] if attention else []) + [[job] for job in weights[:MAX_WEIGHT_SETS]]:
        found = _rates(base, cpu, batch, threads)
        print(json.dumps({"rates": {_job_key(j): r for j, r in zip(batch, found, strict=True) if r}}), flush=True)
    return 0


def _job_key(job: dict[str, Any]) -> str:
    if job.get("op") == "mul_mat":
        return weight_key(job["kind"], _weight_set(job))
    return rate_key(job["kind"], job["type_k"], job["type_v"], AttentionShape(**job["shape"]))


if __name__ == "__main__":
    raise SystemExit(main())
