"""The host's flash-attention rate, timed on llama.cpp's own CPU kernel.

A CPU's attention is not priced well by any published figure: llama.cpp's CPU flash attention tiles a prompt's
queries only where K and V are both f16 (or f32), splits one query's positions across threads only then, and
otherwise runs a per-query vector loop that dequantizes each cached row (ggml-cpu ops.cpp
ggml_compute_forward_flash_attn_ext_f16). On this project's 2-core test machine that loop ran at a tenth of the FP32
matrix product's rate, so a q8_0 cache at depth was predicted twice as fast as it ran. How fast the loop runs
depends on the CPU's vector units, the head size and the cache type, so it is measured: the same ggml op the model
runs (GGML_OP_FLASH_ATTN_EXT), on zero-filled tensors of the model's attention shape and cache types, on as many
threads as llama.cpp starts, through llama-cpp-python's own ggml libraries (ctypes; no model, nothing loaded).

The timing runs in a subprocess: a ggml assertion aborts its process, and a plan must survive that (it then prices
attention from the published figures, as without this).

    AttentionShape(n_head, n_head_kv, head_dim_k, head_dim_v)
    rate_key(kind, type_k, type_v, shape)     the key a rate is cached and looked up by ("decode q8_0-q8_0 9x3x64x64")
    measure_rates(wanted, threads=)           {key: attention FLOPs per second} for each (kind, type_k, type_v, shape)
                                              it could time; {} when llama-cpp-python's ggml is not there

Run as `python -m launcher.measure.attention` it reads a request as JSON on stdin and writes the rates as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
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


def measure_rates(wanted: list[tuple[str, str, str, AttentionShape]], *, threads: int,
                  timeout_s: float = TIMEOUT_S) -> dict[str, float]:  # fmt: skip
    """Attention FLOPs per second of llama.cpp's CPU kernel for each (kind, type_k, type_v, shape) in `wanted`
    (kind: "decode", one query; "prefill", a batch of queries), on `threads` threads; what could not be timed is
    left out (unknown). FLOPs as launcher.speed counts them: 2 x heads x (K + V head size) per position."""
    import importlib.util

    from launcher.measure.dryrun import PACKAGE_PARENT, worker_env

    jobs = []
    for kind, type_k, type_v, shape in wanted:
        if kind in KINDS and type_k in CACHE_TYPES and type_v in CACHE_TYPES and shape.valid():
            jobs.append({"kind": kind, "type_k": type_k, "type_v": type_v, "shape": shape.__dict__})
    if not jobs or importlib.util.find_spec("llama_cpp") is None:
        return {}
    request = json.dumps({"threads": max(1, threads), "jobs": jobs}).encode()
    try:  # run() kills the child on a timeout or Ctrl-C
        done = subprocess.run([sys.executable, "-m", "launcher.measure.attention"], input=request, capture_output=True,
                              timeout=timeout_s, env=worker_env(), cwd=PACKAGE_PARENT, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return {}
    try:
        found = json.loads(done.stdout or b"{}").get("rates", {})
    except (ValueError, AttributeError):
        return {}
    return {str(k): float(v) for k, v in found.items() if isinstance(v, (int, float)) and v > 0}


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
    base.ggml_build_forward_expand.argtypes = [p, p]
    base.ggml_free.argtypes = [p]
    cpu.ggml_graph_compute_with_ctx.argtypes = [p, p, ctypes.c_int]
    cpu.ggml_graph_compute_with_ctx.restype = ctypes.c_int
    cpu.ggml_cpu_init()
    return base, cpu


class _Graph:
    """One job's graph: up to OPS flash-attention ops, each with its own zero-filled Q, K, V and mask, in its own ggml
    context (freed by close)."""

    def __init__(self, base: Any, job: dict[str, Any]) -> None:
        import ctypes

        from gguf import GGMLQuantizationType

        class InitParams(ctypes.Structure):
            _fields_ = (("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool))

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
        size = ops * (per_op + 5 * base.ggml_tensor_overhead()) + base.ggml_graph_overhead() + 64 * 2**20  # + work
        self.flops = per_position * positions * ops
        if size > MAX_GRAPH_BYTES:  # checked before anything is allocated
            raise MemoryError(f"{size} bytes for one graph of {shape.key()}")
        self.ctx = base.ggml_init(InitParams(size, None, False))
        if not self.ctx:
            raise MemoryError(f"ggml_init({size})")
        self.graph = base.ggml_new_graph(self.ctx)
        for _ in range(ops):
            q = base.ggml_new_tensor_4d(self.ctx, f32, dk, queries, h, 1)
            k = base.ggml_new_tensor_4d(self.ctx, tk, dk, positions, hkv, 1)
            v = base.ggml_new_tensor_4d(self.ctx, tv, dv, positions, hkv, 1)
            mask = base.ggml_new_tensor_4d(self.ctx, f16, positions, padded, 1, 1)
            for t in (q, k, v, mask):  # zeros: a valid value of every type; the kernel's work does not depend on it
                ctypes.memset(base.ggml_get_data(t), 0, base.ggml_nbytes(t))
            out = base.ggml_flash_attn_ext(self.ctx, q, k, v, mask, dk**-0.5, 0.0, 0.0)
            base.ggml_build_forward_expand(self.graph, out)

    def close(self) -> None:
        self.base.ggml_free(self.ctx)


def _rates(base: Any, cpu: Any, jobs: list[dict[str, Any]], threads: int) -> list[float | None]:
    """Attention FLOPs per second of each job: its graph's fastest round of ROUNDS, the rounds taken in turn over
    the jobs (a spell of a busy or noisy machine, which only ever slows a round down, then costs each job one round
    rather than one job all of its rounds)."""
    import time

    graphs: list[_Graph | None] = []
    try:
        for job in jobs:
            try:
                graphs.append(_Graph(base, job))
            except MemoryError:  # too big to time (or no memory for it): that job's rate stays unknown
                graphs.append(None)
        best: list[float | None] = [None] * len(graphs)
        for graph in graphs:  # untimed: pages touched, threads warm
            if graph is not None and cpu.ggml_graph_compute_with_ctx(graph.ctx, graph.graph, threads) != 0:
                return [None] * len(jobs)
        for _ in range(ROUNDS):
            for i, graph in enumerate(graphs):
                if graph is None:
                    continue
                reps, started = 0, time.perf_counter()
                while reps < 1 or (time.perf_counter() - started < SECONDS / ROUNDS and reps < MAX_REPS):
                    if cpu.ggml_graph_compute_with_ctx(graph.ctx, graph.graph, threads) != 0:
                        return [None] * len(jobs)
                    reps += 1
                per_graph = (time.perf_counter() - started) / reps
                best[i] = per_graph if best[i] is None else min(per_graph, best[i] or per_graph)
        return [g.flops / b if g is not None and b else None for g, b in zip(graphs, best, strict=True)]
    finally:
        for graph in graphs:
            if graph is not None:
                graph.close()


def main() -> int:
    request = json.loads(sys.stdin.read() or "{}")
    threads = max(1, int(request.get("threads", 1)))
    try:
        base, cpu = _libraries()
    except (OSError, AttributeError):
        print(json.dumps({"rates": {}}))
        return 0
    jobs, shapes = [], set()
    for job in request.get("jobs", []):
        shape = AttentionShape(**job["shape"])
        shapes.add(shape.key())
        if len(shapes) <= MAX_SHAPES and shape.valid():
            jobs.append(job)
    found = _rates(base, cpu, jobs, threads)
    rates = {rate_key(j["kind"], j["type_k"], j["type_v"], AttentionShape(**j["shape"])): r
             for j, r in zip(jobs, found, strict=True) if r}  # fmt: skip
    print(json.dumps({"rates": rates}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
